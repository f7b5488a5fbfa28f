"""Streaming extraction: exact values, per-unit summaries, caching, cancel, bad files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.activations import extract
from engine.backends import open_backend
from engine.data.images import DIGEST_SIZE, ImageLoader, open_image_set
from engine.jobs import run_sync
from engine.models import load_model
from engine.predict import predictions_from


@pytest.fixture
def engine_log():
    """Records the engine logs under ``convlens`` (WARNING and up), captured by a handler of its
    own: unaffected by filters a CLI run put on the root logger's handlers."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("convlens")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def rnet(demo):
    loaded = load_model(demo[0])
    return loaded, open_backend(loaded, device="cpu")


def test_extraction_values_stats_and_topk_are_exact(rnet, demo_images: Path, cache) -> None:
    loaded, be = rnet
    images = open_image_set(demo_images)
    acts = run_sync(extract(be, loaded.cache_id, images, ["conv1", "conv3", "dense4"], batch_size=48, cache=cache))
    assert acts.n_images == 200 and acts.valid.all() and not acts.from_cache
    # reference: a plain forward over the same preprocessed batches
    ref = {n: [] for n in ("conv1", "conv3", "dense4")}
    with ImageLoader(images, be.spec.preprocess, batch_size=200) as loader:
        x = next(iter(loader)).array
    res = be.forward(x, list(ref))
    for n in ref:
        maps = np.asarray(acts.maps(n), dtype=np.float32)
        np.testing.assert_allclose(maps, res.activations[n], rtol=1e-3, atol=1e-3)  # float16 storage
        flat = res.activations[n].reshape(200, res.activations[n].shape[1], -1)
        st = acts.stats(n)
        np.testing.assert_allclose(st.max, flat.max(2), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(st.mean, flat.mean(2), rtol=1e-5, atol=1e-6)
        best = np.argsort(-flat.max(2), axis=0, kind="stable")[:16].T
        np.testing.assert_allclose(st.top_values, np.take_along_axis(flat.max(2).T, best, 1), rtol=1e-6)
    np.testing.assert_allclose(acts.outputs, res.outputs[0], rtol=1e-5, atol=1e-5)
    preds = predictions_from(acts, be.spec)
    assert preds.accuracy == 1.0  # the real pretrained RNet on real faces


def test_second_run_comes_from_cache_and_key_tracks_the_images(rnet, demo_images: Path, tmp_path: Path, cache) -> None:
    loaded, be = rnet
    folder = tmp_path / "imgs"
    shutil.copytree(demo_images, folder)
    images = open_image_set(folder)
    first = run_sync(extract(be, loaded.cache_id, images, ["conv2"], cache=cache))
    second = run_sync(extract(be, loaded.cache_id, open_image_set(folder), ["conv2"], cache=cache))
    assert second.from_cache and second.folder == first.folder
    img = folder / "face" / "000.png"
    Image.fromarray(np.zeros((25, 25), np.uint8)).save(img)  # the user edits an image
    third = run_sync(extract(be, loaded.cache_id, open_image_set(folder), ["conv2"], cache=cache))
    assert third.folder != first.folder


def test_cancel_midway_leaves_no_entry(rnet, demo_images: Path, cache) -> None:
    loaded, be = rnet
    job = extract(be, loaded.cache_id, open_image_set(demo_images), ["conv1"], batch_size=16, cache=cache)
    next(job), next(job), next(job)
    job.close()
    kinds = cache.root / "activations"
    assert not kinds.exists() or list(kinds.iterdir()) == []


def test_unreadable_files_are_skipped_and_counted(rnet, tmp_path: Path, cache, engine_log) -> None:
    loaded, be = rnet
    from skimage.data import lfw_subset

    (tmp_path / "face").mkdir()
    for i, arr in enumerate(lfw_subset()[:5]):
        Image.fromarray((arr * 255).astype(np.uint8)).save(tmp_path / "face" / f"{i}.png")
    (tmp_path / "face" / "2notes.png").write_text("not an image")  # sorts among the good ones
    Image.new("RGB", (1, 1)).save(tmp_path / "face" / "tiny.png")
    images = open_image_set(tmp_path)
    acts = run_sync(extract(be, loaded.cache_id, images, ["conv1"], cache=cache))
    assert acts.valid.sum() == 5 and len(acts.skipped) == 2
    reasons = dict(acts.skipped)
    assert any("notes.png" in p for p in reasons) and any("tiny.png" in p for p in reasons)
    logged = "\n".join(r.getMessage() for r in engine_log)
    assert "notes.png" in logged and "tiny.png" in logged
    preds = predictions_from(acts, be.spec)
    assert np.isnan(acts.stats("conv1").max[~acts.valid]).all()
    with ImageLoader(images, be.spec.preprocess, batch_size=64) as loader:
        batch = next(iter(loader))  # the 5 good images: rows 0-2 and 4-5, written row by row
    ref = be.forward(batch.array, ["conv1"]).activations["conv1"]
    np.testing.assert_allclose(np.asarray(acts.maps("conv1"), np.float32)[batch.indices], ref, rtol=1e-3, atol=1e-3)
    assert not np.asarray(acts.maps("conv1"))[~acts.valid].any()  # rows of skipped images stay zero
    assert preds.accuracy == 1.0 and preds.n_scored == 5


@pytest.fixture
def forward_calls(rnet, monkeypatch):
    """The layers of every ``forward_summaries`` call of the real backend (its method wrapped)."""
    _, be = rnet
    calls: list[list[str]] = []
    real = be.forward_summaries

    def counted(batch, capture, maps=True):
        calls.append(list(capture))
        return real(batch, capture, maps)

    monkeypatch.setattr(be, "forward_summaries", counted)
    return calls


def test_layers_are_cached_one_entry_each_and_only_missing_layers_are_computed(
        rnet, demo_images: Path, cache, forward_calls) -> None:
    loaded, be = rnet
    images = open_image_set(demo_images)

    def run(layers: list[str]):
        forward_calls.clear()
        return run_sync(extract(be, loaded.cache_id, images, layers, batch_size=100, cache=cache))

    a = run(["conv1"])
    assert forward_calls == [["conv1"], ["conv1"]] and not a.from_cache  # one pass, 2 batches
    b = run(["conv1", "conv2"])
    assert forward_calls == [["conv2"], ["conv2"]] and not b.from_cache  # one more pass, conv2 only
    assert list(b.layers) == ["conv1", "conv2"] and b.layer_folder("conv1") == a.layer_folder("conv1")
    assert b.folder == a.folder  # the outputs entry was reused too
    c = run(["conv2"])
    assert forward_calls == [] and c.from_cache and c.layer_folder("conv2") == b.layer_folder("conv2")
    d = run(["conv1", "conv2"])
    assert forward_calls == [] and d.from_cache
    assert run([]).from_cache and forward_calls == []  # predictions come from the same outputs entry
    assert run_sync(extract(be, loaded.cache_id, images, ["conv2"], store_maps=False, batch_size=100,
                            cache=cache)).from_cache and forward_calls == []  # an entry with maps serves
    # the assembled result equals a one-shot extraction of both layers in a fresh cache
    from engine.cache import Cache

    one = run_sync(extract(be, loaded.cache_id, images, ["conv1", "conv2"], batch_size=100,
                           cache=Cache(cache.root.parent / "fresh")))
    np.testing.assert_array_equal(d.outputs, one.outputs)
    for n in ("conv1", "conv2"):
        np.testing.assert_array_equal(d.maps(n), one.maps(n))
        for arr in ("max", "mean", "top_images", "top_values"):
            np.testing.assert_array_equal(getattr(d.stats(n), arr), getattr(one.stats(n), arr))
    entries = sorted(p.name for p in (cache.root / "activations").iterdir())
    assert len(entries) == 3  # outputs, conv1, conv2


def test_switching_between_extracted_layers_one_at_a_time_runs_no_forward_pass(
        rnet, demo_images: Path, cache, forward_calls) -> None:
    """What the heatmaps view does (gui/session.py: ``extract([layer])`` per selected layer):
    once two layers were extracted, going back and forth between them never runs the model."""
    loaded, be = rnet
    images = open_image_set(demo_images)
    for layer in ("conv1", "conv2"):
        run_sync(extract(be, loaded.cache_id, images, [layer], cache=cache))
    assert [c for c in forward_calls if c] and all(len(c) == 1 for c in forward_calls)
    forward_calls.clear()
    for layer in ("conv1", "conv2", "conv1", "conv2"):
        acts = run_sync(extract(be, loaded.cache_id, open_image_set(demo_images), [layer], cache=cache))
        assert acts.from_cache and list(acts.layers) == [layer] and acts.maps(layer).shape[0] == 200
    assert forward_calls == []


def _entry_files(cache) -> dict[str, bytes | dict]:
    """Every file of the cache's activations entries (meta.json as data, less the pass's time and
    device), by entry key and name."""
    import json

    files: dict[str, bytes | dict] = {}
    for entry in sorted((cache.root / "activations").iterdir()):
        for f in sorted(entry.iterdir()):
            if f.name == "meta.json":
                meta = json.loads(f.read_text())
                files[f"{entry.name}/{f.name}"] = {k: v for k, v in meta.items() if k not in ("seconds", "device")}
            else:
                files[f"{entry.name}/{f.name}"] = f.read_bytes()
    return files


def test_entry_writer_fed_batches_out_of_order_writes_the_entries_extract_writes(
        rnet, demo_images: Path, cache, tmp_path: Path, forward_calls) -> None:
    """The public writing API (what the Ray driver uses): a pass run by hand over a shard, its
    batches handed to EntryWriter in a shuffled order, leaves byte for byte the entries
    ``extract`` writes for that shard, and ``extract`` then reuses them without running the model."""
    from engine.activations import EntryWriter, cache_source, check_finite, open_entries
    from engine.cache import Cache

    loaded, be = rnet
    images = open_image_set(demo_images)
    shard = np.arange(0, 200, 3)[:40]  # 40 images, not consecutive: rows are not image positions
    layers = ["conv1", "dense4"]
    info = {li.name: li for li in be.layers()}
    source = cache_source(be, loaded.cache_id, images)
    with ImageLoader(images, be.spec.preprocess, batch_size=16, indices=shard.tolist()) as loader:
        batches = []
        for b in loader:
            out, summaries = be.forward_summaries(b.array, layers, maps=True)
            check_finite(be, images, b.indices, out, summaries, layers)
            batches.append((b.indices, out, summaries))
        digests = loader.digests[shard]
        skipped = loader.skipped
    assert len(batches) == 3
    order = [2, 0, 1]  # the batches of a local run (same numbers), in another order
    with EntryWriter(cache, source, images, [info[n] for n in layers], store_maps=True, top_k=5, indices=shard) as w:
        for i in order:
            w.add(*batches[i])
        w.finish(digests=digests, skipped=skipped, seconds=1.0, device="by hand")
    by_hand = open_entries(cache, source, images, layers, store_maps=True, top_k=5, indices=shard)
    assert not by_hand.from_cache and by_hand.valid.all() and list(by_hand.rows()) == list(shard)

    ref_cache = Cache(tmp_path / "ref")
    ref = run_sync(extract(be, loaded.cache_id, images, layers, batch_size=16, top_k=5, cache=ref_cache, indices=shard))
    assert _entry_files(cache) == _entry_files(ref_cache)
    np.testing.assert_array_equal(by_hand.outputs, ref.outputs)
    np.testing.assert_array_equal(by_hand.stats("conv1").top_images, ref.stats("conv1").top_images)

    forward_calls.clear()
    again = run_sync(extract(be, loaded.cache_id, images, layers, top_k=5, cache=cache, indices=shard))
    assert again.from_cache and forward_calls == [] and again.layer_folder("conv1") == by_hand.layer_folder("conv1")


def test_entry_writer_leaves_no_entry_unless_finished(rnet, demo_images: Path, cache) -> None:
    from engine.activations import EntryWriter, cache_source, open_entries
    from engine.types import ConvLensError

    loaded, be = rnet
    images = open_image_set(demo_images)
    source = cache_source(be, loaded.cache_id, images)
    conv1 = next(li for li in be.layers() if li.name == "conv1")

    def writer() -> EntryWriter:
        return EntryWriter(cache, source, images, [conv1], store_maps=True, top_k=3)

    def entries() -> list[Path]:
        kind = cache.root / "activations"
        return sorted(kind.iterdir()) if kind.exists() else []

    with ImageLoader(images, be.spec.preprocess, batch_size=20) as loader:
        b = next(iter(loader))
    out, summaries = be.forward_summaries(b.array, ["conv1"], maps=True)

    def fails_midway() -> None:  # an error (or a cancel) inside the block
        with writer() as w:
            w.add(b.indices, out, summaries)
            raise ValueError("stop")

    def not_finished() -> None:
        with writer() as w:
            w.add(b.indices, out, summaries)

    def nothing_read() -> None:
        with writer() as w:
            w.finish(digests=np.zeros((200, DIGEST_SIZE), np.uint8), skipped=[], seconds=0.0, device="cpu")

    with pytest.raises(ValueError, match="stop"):
        fails_midway()
    assert entries() == []
    with pytest.raises(RuntimeError, match="without finish"):
        not_finished()
    assert entries() == []
    with pytest.raises(ConvLensError, match="none of the 200 images could be read"):
        nothing_read()
    assert entries() == []
    with pytest.raises(ConvLensError, match="no activations entry for the outputs"):
        open_entries(cache, source, images, ["conv1"], store_maps=True, top_k=3)
