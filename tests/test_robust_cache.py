"""The on-disk cache under faults: clearing only removes cache kinds, temporaries of killed runs
are cleaned up, damaged entries and changed pixels are recomputed, non-finite models are errors,
non-UTF-8 file names are written. Real models, real files, real subprocesses."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.activations import extract, write_unit_tables
from engine.backends import open_backend
from engine.cache import (
    KNOWN_KINDS,
    ROOT_MARKER,
    TEMP_MAX_AGE,
    Cache,
    CacheError,
    DamagedEntry,
    atomic_write_text,
    read_meta,
    write_meta,
)
from engine.data.images import open_image_set
from engine.jobs import run_sync
from engine.models import build_spec, load_model
from engine.types import ConvLensError

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def engine_log():
    """Messages the engine logs under ``convlens`` (WARNING and up), captured by a handler of
    its own: unaffected by filters a CLI run put on the root logger's handlers."""
    class Lines(list):
        @property
        def text(self) -> str:
            return "\n".join(self)

    lines = Lines()

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logger = logging.getLogger("convlens")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


# ----------------------------------------------------------------------------- clear


def _entry(cache: Cache, kind: str, key: str, payload: bytes = b"x" * 100) -> Path:
    with cache.write(kind, key) as tmp:
        (tmp / "a.npy").write_bytes(payload)
        write_meta(tmp, {"version": 1})
    return cache.path(kind, key)


def test_clear_refuses_paths_and_unknown_names_and_removes_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    _entry(cache, "activations", "k1")
    user = tmp_path / "precious"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    sibling = tmp_path / "x"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("keep")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    for bad in (str(user), "../x", "..", ".", "", "activations/../../precious", "activations/k1",
                "nonsense", "/", str(tmp_path / "cache" / "activations")):
        with pytest.raises(CacheError) as err:
            cache.clear(bad)
        msg = str(err.value)
        assert "not a cache kind" in msg and "activations" in msg and "all" in msg
        assert isinstance(err.value, ConvLensError)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert set(KNOWN_KINDS) <= set(cache.kinds())


def test_clear_kind_and_all_and_a_symlinked_kind_is_unlinked_not_followed(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    _entry(cache, "activations", "k1")
    _entry(cache, "dissection", "k2")
    elsewhere = tmp_path / "big-disk-thumbs"
    elsewhere.mkdir()
    (elsewhere / "t.jpg").write_bytes(b"jpeg")
    (cache.root / "thumbs").symlink_to(elsewhere, target_is_directory=True)
    (cache.root / "from-a-newer-version").mkdir()  # a kind this version does not know: root is ours
    assert (cache.root / ROOT_MARKER).is_file()
    assert set(cache.usage()) == {"activations", "dissection", "thumbs", "from-a-newer-version"}

    assert cache.clear("thumbs") == ["thumbs"]
    assert not os.path.lexists(cache.root / "thumbs") and (elsewhere / "t.jpg").read_bytes() == b"jpeg"
    assert cache.clear("onnx") == []  # a known kind that is not there: nothing to remove, no error
    assert cache.clear("activations") == ["activations"]
    assert not (cache.root / "activations").exists() and (cache.root / "dissection" / "k2").is_dir()
    assert cache.clear("all") == ["dissection", "from-a-newer-version"]
    assert sorted(os.listdir(cache.root)) == [ROOT_MARKER] and cache.usage() == {}


def test_a_root_that_is_not_convlens_own_only_gives_up_known_kinds(tmp_path: Path) -> None:
    """$CONVLENS_CACHE pointed at a user's folder by mistake: `--clear all` must not empty it."""
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "cv.pdf").write_bytes(b"%PDF")
    (home / "thumbs").mkdir()
    (home / "thumbs" / "t.jpg").write_bytes(b"jpeg")
    cache = Cache(home)
    assert "Documents" not in cache.kinds() and list(cache.usage()) == ["thumbs"]
    with pytest.raises(CacheError):
        cache.clear("Documents")
    assert cache.clear("all") == ["thumbs"]
    assert (home / "Documents" / "cv.pdf").read_bytes() == b"%PDF"


# ----------------------------------------------------------------------------- temporaries


KILLED_WRITER = """
import sys, time
from engine.cache import Cache
with Cache(sys.argv[1]).write("activations", "deadbeef") as tmp:
    (tmp / "outputs.npy").write_bytes(b"\\0" * 3_000_000)
    print("writing", flush=True)
    time.sleep(120)
"""


def _killed_writer(root: Path) -> None:
    """A real process killed by SIGKILL in the middle of Cache.write."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_temporaries_of_a_killed_run_are_counted_and_cleaned_while_live_writers_are_kept(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    _killed_writer(cache.root)
    left = list((cache.root / "activations").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".deadbeef.tmp-")
    use = cache.usage()["activations"]
    assert use["entries"] == 0 and use["bytes"] == 0 and use["temporary_bytes"] >= 3_000_000

    with cache.write("activations", "live") as live:  # this write's clean-up removed the dead one
        (live / "outputs.npy").write_bytes(b"\0" * 1000)
        assert not left[0].exists()
        _killed_writer(cache.root)  # and another process dies while we write
        assert cache.clean_temporaries() >= 3_000_000
        assert live.is_dir()  # a live writer's temporary is never taken (its lock is held)
        assert list((cache.root / "activations").iterdir()) == [live]
        assert cache.usage()["activations"]["temporary_bytes"] >= 1000
        write_meta(live, {"version": 1})
    assert (cache.root / "activations" / "live" / "meta.json").is_file()
    assert not (cache.root / "activations" / "live" / ".owner").exists()
    assert cache.usage()["activations"] == {"entries": 1, "bytes": (cache.root / "activations" / "live" / "outputs.npy").stat().st_size
                                            + (cache.root / "activations" / "live" / "meta.json").stat().st_size,
                                            "temporary_bytes": 0}


def test_ownerless_temporaries_go_only_once_old(tmp_path: Path) -> None:
    """Temporaries of other writers (atomic files, concept sets) have no lock: the age rule."""
    cache = Cache(tmp_path / "cache")
    thumbs = cache.root / "thumbs" / "ab"
    thumbs.mkdir(parents=True)
    fresh = thumbs / ".x.jpg.k2j3h4.tmp"
    fresh.write_bytes(b"half a jpeg")
    old = thumbs / ".y.jpg.a8d7f6.tmp"
    old.write_bytes(b"abandoned")
    old_dir = cache.root / "concepts" / ".builtin-60-64.tmp-0123abcd"
    (old_dir / "images").mkdir(parents=True)
    (old_dir / "images" / "0.png").write_bytes(b"png")
    then = time.time() - TEMP_MAX_AGE - 60
    for p in (old, old_dir / "images" / "0.png", old_dir / "images", old_dir):
        os.utime(p, (then, then))
    assert cache.usage()["thumbs"]["temporary_bytes"] == len(b"half a jpeg") + len(b"abandoned")
    assert cache.clean_temporaries() == len(b"abandoned") + len(b"png")
    assert fresh.exists() and not old.exists() and not old_dir.exists()


# ----------------------------------------------------------------------------- damaged entries


@pytest.fixture(scope="module")
def rnet(demo):
    loaded = load_model(demo[0])
    return loaded, open_backend(loaded, device="cpu")


@pytest.fixture
def faces(demo_images: Path, tmp_path: Path) -> Path:
    """24 of the demo's real crops, as BMP (a BMP's size depends only on its dimensions)."""
    folder = tmp_path / "faces"
    for src in sorted(demo_images.rglob("*.png"))[::9][:24]:
        dest = folder / src.parent.name / (src.stem + ".bmp")
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(src).convert("RGB").save(dest)
    return folder


def _truncate(entry: Path) -> None:
    p = entry / "maps_conv2.npy"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage_meta(entry: Path) -> None:
    (entry / "meta.json").write_bytes(b"\x00\xffnot json at all")


def _partial_meta(entry: Path) -> None:
    text = (entry / "meta.json").read_bytes()
    (entry / "meta.json").write_bytes(text[: len(text) // 2])


def _wrong_meta(entry: Path) -> None:
    meta = read_meta(entry)
    meta["shape"] = 5
    write_meta(entry, meta)


def _delete_array(entry: Path) -> None:
    (entry / "max_conv2.npy").unlink()


def _delete_meta(entry: Path) -> None:
    (entry / "meta.json").unlink()


def _wrong_shape(entry: Path) -> None:
    np.save(entry / "topidx_conv2.npy", np.zeros((3, 3), np.int64))


def _truncate_outputs(entry: Path) -> None:
    p = entry / "outputs.npy"
    p.write_bytes(p.read_bytes()[:-4])


def _delete_digests(entry: Path) -> None:
    (entry / "digests.npy").unlink()


@pytest.mark.parametrize(("which", "damage"), [
    *[("layer", d) for d in (_truncate, _garbage_meta, _partial_meta, _wrong_meta, _delete_array, _delete_meta,
                             _wrong_shape, _delete_digests)],
    *[("outputs", d) for d in (_truncate_outputs, _garbage_meta, _partial_meta, _delete_meta, _delete_digests)],
])
def test_a_damaged_entry_is_discarded_with_a_warning_and_recomputed(rnet, faces: Path, tmp_path: Path,
                                                                     engine_log, which, damage) -> None:
    loaded, be = rnet
    cache = Cache(tmp_path / "cache")
    images = open_image_set(faces)
    first = run_sync(extract(be, loaded.cache_id, images, ["conv2"], batch_size=10, cache=cache))
    want_out, want_max = np.array(first.outputs), np.array(first.stats("conv2").max)
    want_maps = np.array(first.maps("conv2"))
    entry = first.layer_folder("conv2") if which == "layer" else first.folder
    other = first.folder if which == "layer" else first.layer_folder("conv2")
    entries = sorted(p.name for p in (cache.root / "activations").iterdir())
    assert len(entries) == 2 and entry != other  # one entry for the outputs, one for the layer
    del first
    damage(entry)
    again = run_sync(extract(be, loaded.cache_id, open_image_set(faces), ["conv2"], batch_size=10, cache=cache))
    assert not again.from_cache
    assert (again.layer_folder("conv2"), again.folder) == ((entry, other) if which == "layer" else (other, entry))
    if damage is not _delete_meta:  # a folder without meta.json is no entry at all: replaced silently
        assert "damaged cache entry" in engine_log.text and str(entry) in engine_log.text
    np.testing.assert_array_equal(again.outputs, want_out)
    np.testing.assert_array_equal(again.stats("conv2").max, want_max)
    np.testing.assert_array_equal(again.maps("conv2"), want_maps)
    assert run_sync(extract(be, loaded.cache_id, open_image_set(faces), ["conv2"], batch_size=10, cache=cache)).from_cache
    assert sorted(p.name for p in (cache.root / "activations").iterdir()) == entries  # nothing left aside


def test_a_damaged_dissection_entry_is_recomputed(rnet, tmp_path: Path, engine_log) -> None:
    from engine.concepts import generate_concepts
    from engine.dissection import dissect, load_result

    loaded, be = rnet
    concepts = run_sync(generate_concepts(tmp_path / "concepts", n_images=12, image_size=48))
    cache = Cache(tmp_path / "cache")
    first = run_sync(dissect(be, loaded.cache_id, concepts, ["conv1"], cache=cache))
    [entry] = list((cache.root / "dissection").iterdir())
    iou = entry / "layer0_iou.npy"
    iou.write_bytes(iou.read_bytes()[:-8])
    with pytest.raises(DamagedEntry, match="layer0_iou"):
        load_result(entry)
    again = run_sync(dissect(be, loaded.cache_id, concepts, ["conv1"], cache=cache))
    assert not again.from_cache and "damaged cache entry" in engine_log.text
    np.testing.assert_array_equal(again.layers["conv1"].iou, first.layers["conv1"].iou)
    (entry / "meta.json").write_text('{"version": ')
    again = run_sync(dissect(be, loaded.cache_id, concepts, ["conv1"], cache=cache))
    assert not again.from_cache
    np.testing.assert_array_equal(again.layers["conv1"].iou, first.layers["conv1"].iou)
    assert run_sync(dissect(be, loaded.cache_id, concepts, ["conv1"], cache=cache)).from_cache


# ----------------------------------------------------------------------------- stale pixels


def _rewrite_keeping_size_and_mtime(path: Path, pixels: np.ndarray) -> None:
    """Write other pixels into ``path`` with its size and modification time unchanged: a
    smaller PNG padded after its IEND chunk (which decoders ignore)."""
    st = path.stat()
    Image.fromarray(pixels).save(path, compress_level=9)
    data = path.read_bytes()
    assert len(data) <= st.st_size
    path.write_bytes(data + b"\0" * (st.st_size - len(data)))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)


@pytest.mark.parametrize("what", ["image", "mask"])
def test_changed_concept_files_with_the_same_size_and_mtime_are_recomputed(rnet, tmp_path: Path, engine_log,
                                                                          what: str) -> None:
    from engine.concepts import generate_concepts, open_broden
    from engine.dissection import dissect

    loaded, be = rnet
    root = tmp_path / "concepts"
    run_sync(generate_concepts(root, n_images=12, image_size=48))
    cache = Cache(tmp_path / "cache")
    first = run_sync(dissect(be, loaded.cache_id, open_broden(root), ["conv1"], cache=cache))
    assert first.input_digests is not None and run_sync(
        dissect(be, loaded.cache_id, open_broden(root), ["conv1"], cache=cache)).from_cache
    concepts = open_broden(root)
    files = concepts.content_files()
    image = Path(concepts.image_path(0))
    images = {concepts.image_path(i) for i in range(len(concepts))}
    masks = [f for f in files if f not in images]
    assert masks and len(files) == len(images) + len(masks)
    victim = image if what == "image" else Path(masks[0])
    shape = np.asarray(Image.open(victim)).shape
    _rewrite_keeping_size_and_mtime(victim, np.zeros(shape, np.uint8))  # black image / unlabelled mask
    assert open_broden(root).fingerprint() == concepts.fingerprint()  # size and mtime cannot see it
    again = run_sync(dissect(be, loaded.cache_id, open_broden(root), ["conv1"], cache=cache))
    assert not again.from_cache and "1 concept file changed" in engine_log.text and str(victim) in engine_log.text
    assert not np.array_equal(again.input_digests, first.input_digests)
    assert run_sync(dissect(be, loaded.cache_id, open_broden(root), ["conv1"], cache=cache)).from_cache


def test_changed_pixels_with_the_same_size_and_mtime_are_recomputed(rnet, faces: Path, tmp_path: Path,
                                                                     engine_log) -> None:
    loaded, be = rnet
    cache = Cache(tmp_path / "cache")
    images = open_image_set(faces)
    first = run_sync(extract(be, loaded.cache_id, images, ["conv3"], cache=cache))
    out1, max1 = np.array(first.outputs), np.array(first.stats("conv3").max)
    del first
    assert run_sync(extract(be, loaded.cache_id, open_image_set(faces), ["conv3"], cache=cache)).from_cache

    victim = Path(images.records[5].path)
    st = victim.stat()
    pixels = np.asarray(Image.open(victim))
    Image.fromarray(255 - pixels).save(victim)  # what `cp -p` / `rsync -t` of another file does
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert open_image_set(faces).fingerprint() == images.fingerprint()

    again = run_sync(extract(be, loaded.cache_id, open_image_set(faces), ["conv3"], cache=cache))
    assert not again.from_cache and "1 image changed" in engine_log.text and str(victim) in engine_log.text
    others = np.arange(len(images)) != 5
    assert not np.allclose(again.outputs[5], out1[5]) and not np.allclose(again.stats("conv3").max[5], max1[5])
    np.testing.assert_array_equal(again.outputs[others], out1[others])
    np.testing.assert_array_equal(again.stats("conv3").max[others], max1[others])
    assert run_sync(extract(be, loaded.cache_id, open_image_set(faces), ["conv3"], cache=cache)).from_cache


# ----------------------------------------------------------------------------- non-finite models


TINY_NET = """
import torch
from torch import nn

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, kernel_size=3)
        self.side = nn.Conv2d(3, 2, kernel_size=1)  # computed, captured, but not used for the output
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        self.side(x)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))
"""


def _tiny(tmp_path: Path, nan_in: str | None):
    py = tmp_path / "tiny.py"
    py.write_text(TINY_NET)
    ns: dict = {}
    exec(compile(TINY_NET, str(py), "exec"), ns)
    torch.manual_seed(0)
    net = ns["Net"]()
    if nan_in is not None:
        with torch.no_grad():
            getattr(net, nan_in).weight[0, 0, 0, 0] = float("nan")
    pt = tmp_path / f"tiny-{nan_in}.pt"
    torch.save(net.state_dict(), pt)
    loaded = load_model(build_spec(str(pt), arch=f"{py}:Net", input_size="16"))
    return loaded, open_backend(loaded, device="cpu")


def _few_images(tmp_path: Path, n: int = 5) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_nan_weights_are_an_error_naming_the_model(tmp_path: Path) -> None:
    images = open_image_set(_few_images(tmp_path))
    loaded, be = _tiny(tmp_path, None)
    ok = run_sync(extract(be, loaded.cache_id, images, ["conv", "side"], cache=Cache(tmp_path / "c")))
    assert np.isfinite(ok.outputs).all()

    loaded, be = _tiny(tmp_path, "conv")
    with pytest.raises(ConvLensError, match=r"model output is not finite .* for 5 of 5 images") as err:
        run_sync(extract(be, loaded.cache_id, images, ["conv"], cache=Cache(tmp_path / "nan")))
    assert loaded.spec.path in str(err.value) and "'conv'" in str(err.value)
    with pytest.raises(ConvLensError, match="model output is not finite"):  # predictions: no layers
        run_sync(extract(be, loaded.cache_id, images, [], cache=Cache(tmp_path / "nan")))
    assert not any((tmp_path / "nan" / "activations").iterdir())  # nothing cached

    loaded, be = _tiny(tmp_path, "side")
    with pytest.raises(ConvLensError, match=r"layer 'side' has non-finite activations .* for 5 of 5 images") as err:
        run_sync(extract(be, loaded.cache_id, images, ["conv", "side"], cache=Cache(tmp_path / "nan")))
    assert loaded.spec.path in str(err.value)


def test_a_nan_mean_is_an_error_naming_the_preprocessing(tmp_path: Path) -> None:
    """Options and configs refuse a NaN mean early; a spec that gets one anyway (a project file,
    code) still cannot produce made-up predictions."""
    images = open_image_set(_few_images(tmp_path, 3))
    loaded, _ = _tiny(tmp_path, None)
    nan_mean = replace(loaded.spec.preprocess, mean=(float("nan"), 0.5, 0.5))
    loaded = replace(loaded, spec=loaded.spec.with_(preprocess=nan_mean))
    be = open_backend(loaded, device="cpu")
    with pytest.raises(ConvLensError, match=r"not finite .* for 3 of 3 images.*preprocessing is not finite"):
        run_sync(extract(be, loaded.cache_id, images, [], cache=Cache(tmp_path / "c")))


# ----------------------------------------------------------------------------- non-UTF-8 names


def test_text_and_meta_with_non_utf8_file_names(tmp_path: Path) -> None:
    name = os.fsdecode(b"caf\xe9 \xff.png")  # surrogate escapes, as os.listdir gives them
    text = f"path,label\n{tmp_path / name},face\nnaïve.png,x\n"
    out = atomic_write_text(tmp_path / "predictions.csv", text)
    raw = out.read_bytes()
    assert b"caf\xe9 \xff.png,face\n" in raw and "naïve.png".encode() in raw
    assert os.fsdecode(raw) == text  # what a reader decoding file names the same way gets back
    write_meta(tmp_path, {"skipped": [[name, "cause"]], "root": str(tmp_path / name)})
    assert read_meta(tmp_path) == {"skipped": [[name, "cause"]], "root": str(tmp_path / name)}
    assert json.loads((tmp_path / "meta.json").read_text(encoding="ascii"))["skipped"][0][0] == name


def test_extraction_and_unit_tables_of_a_folder_with_non_utf8_names(rnet, faces: Path, tmp_path: Path) -> None:
    loaded, be = rnet
    folder = Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9"))
    shutil.copytree(faces, folder)
    first = next(folder.rglob("*.bmp"))
    first.rename(first.with_name(os.fsdecode(b"\xff\xfe.bmp")))
    acts = run_sync(extract(be, loaded.cache_id, open_image_set(folder), ["conv1"], cache=Cache(tmp_path / "c")))
    assert acts.valid.all()
    written = write_unit_tables(acts, tmp_path / "out")
    assert b"caf\xe9/" in written[0].read_bytes()
    assert run_sync(extract(be, loaded.cache_id, open_image_set(folder), ["conv1"], cache=Cache(tmp_path / "c"))).from_cache
