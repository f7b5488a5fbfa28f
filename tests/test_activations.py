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
from engine.data.images import ImageLoader, open_image_set
from engine.jobs import run_sync
from engine.models import load_model
from engine.predict import predictions_from


@pytest.fixture()
def engine_log():  # noqa: ANN201
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
def rnet(demo):  # noqa: ANN001, ANN201
    loaded = load_model(demo[0])
    return loaded, open_backend(loaded, device="cpu")


def test_extraction_values_stats_and_topk_are_exact(rnet, demo_images: Path, cache) -> None:  # noqa: ANN001
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


def test_second_run_comes_from_cache_and_key_tracks_the_images(rnet, demo_images: Path, tmp_path: Path, cache) -> None:  # noqa: ANN001
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


def test_cancel_midway_leaves_no_entry(rnet, demo_images: Path, cache) -> None:  # noqa: ANN001
    loaded, be = rnet
    job = extract(be, loaded.cache_id, open_image_set(demo_images), ["conv1"], batch_size=16, cache=cache)
    next(job), next(job), next(job)
    job.close()
    kinds = cache.root / "activations"
    assert not kinds.exists() or list(kinds.iterdir()) == []


def test_unreadable_files_are_skipped_and_counted(rnet, tmp_path: Path, cache, engine_log) -> None:  # noqa: ANN001
    loaded, be = rnet
    from skimage.data import lfw_subset

    (tmp_path / "face").mkdir()
    for i, arr in enumerate(lfw_subset()[:5]):
        Image.fromarray((arr * 255).astype(np.uint8)).save(tmp_path / "face" / f"{i}.png")
    (tmp_path / "face" / "notes.png").write_text("not an image")
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
    assert preds.accuracy == 1.0 and preds.n_scored == 5
