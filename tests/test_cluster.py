"""Extraction and predictions on a real local Ray cluster (2 CPUs, 2 actors) give the numbers
of the in-process run, in the same cache entries; a killed actor is retried by Ray, a cancelled
job stops the Ray work and writes nothing, an unsafe model file is refused on the workers, and
without Ray every command works and ``--ray`` says how to install it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from engine.activations import extract  # noqa: E402
from engine.cache import Cache  # noqa: E402
from engine.cluster import RayExecutor, extract_on_ray  # noqa: E402
from engine.jobs import run_sync  # noqa: E402
from engine.types import ConvLensError  # noqa: E402

LAYERS = ["conv1", "conv3"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs (shared machine: keep it small), shut down after."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(demo_images, tmp_path_factory) -> Path:
    """48 of the demo's face crops in two class folders."""
    root = tmp_path_factory.mktemp("cluster-images")
    for cls in ("face", "non-face"):
        (root / cls).mkdir()
        for p in sorted((demo_images / cls).iterdir())[:24]:
            shutil.copy(p, root / cls / p.name)
    return root


@pytest.fixture(scope="module")
def bad_images(images, tmp_path_factory) -> Path:
    """The same images plus two files that are not images."""
    root = tmp_path_factory.mktemp("cluster-bad-images")
    shutil.copytree(images, root, dirs_exist_ok=True)
    (root / "face" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (root / "non-face" / "empty.jpg").write_bytes(b"")
    return root


@pytest.fixture(scope="module")
def model(rnet_spec):
    from engine.backends import open_backend
    from engine.models.loading import load_model

    loaded = load_model(rnet_spec.with_(device="cpu"))
    return loaded, open_backend(loaded)


def _image_set(images: Path):
    from engine.data.images import open_image_set

    return open_image_set(str(images))


def _same_activations(a, b, layers, exact: bool = True) -> None:
    same = np.testing.assert_array_equal if exact else _close
    same(np.asarray(a.outputs), np.asarray(b.outputs))
    np.testing.assert_array_equal(a.valid, b.valid)
    assert a.skipped == b.skipped
    for name in layers:
        sa, sb = a.stats(name), b.stats(name)
        same(np.asarray(sa.max), np.asarray(sb.max))
        same(np.asarray(sa.mean), np.asarray(sb.mean))
        np.testing.assert_array_equal(sa.top_images, sb.top_images)
        same(sa.top_values, sb.top_values)
        if a.store_maps:
            same(np.asarray(a.maps(name)), np.asarray(b.maps(name)))


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to rounding: a few float32 ulps (float16 maps: one float16 ulp), NaN where NaN."""
    rtol, atol = (2.0**-10, 2.0**-14) if a.dtype == np.float16 else (2e-6, 1e-6)
    np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def local_run(model, images, tmp_path_factory):
    loaded, backend = model
    cache = Cache(tmp_path_factory.mktemp("local-cache"))
    return run_sync(extract(backend, loaded.cache_id, _image_set(images), LAYERS, batch_size=8, top_k=5,
                            cache=cache))


def test_extraction_on_two_workers_equals_in_process(ray_cluster, model, images, local_run, tmp_path):
    loaded, backend = model
    cache = Cache(tmp_path / "cache")
    ex = RayExecutor("local", workers=2, block_images=8)
    got = run_sync(extract_on_ray(backend, loaded.cache_id, _image_set(images), LAYERS, executor=ex,
                                  batch_size=8, top_k=5, cache=cache))
    # blocks go to whichever actor is ready (the second may still be starting), in any order
    assert not got.from_cache and 1 <= len(ex.seen_pids) <= 2
    _same_activations(local_run, got, LAYERS)
    # the same cache entries: the in-process extract (the app, every command) finds them
    again = run_sync(extract(backend, loaded.cache_id, _image_set(images), LAYERS, batch_size=8, top_k=5,
                             cache=cache))
    assert again.from_cache and again.folder == got.folder
    _same_activations(local_run, again, LAYERS)
    # and a cluster run of what is cached starts no Ray work
    ex2 = RayExecutor("local", workers=2)
    hit = run_sync(extract_on_ray(backend, loaded.cache_id, _image_set(images), LAYERS[:1], executor=ex2,
                                  batch_size=8, top_k=5, cache=cache))
    assert hit.from_cache and not ex2.seen_pids


def test_bad_files_are_skipped_and_named_as_in_a_local_run(ray_cluster, model, bad_images, tmp_path):
    """The workers decode the images: unreadable files are left out and named with their cause,
    in image order, as locally. (After a skipped file a local run's forward batches hold other
    images than the workers' blocks, and PyTorch's CPU kernels may round a value differently by
    a float32 ulp depending on the batch: the numbers agree to float32 rounding, the
    predictions and top images exactly.)"""
    loaded, backend = model
    local = run_sync(extract(backend, loaded.cache_id, _image_set(bad_images), LAYERS, batch_size=8, top_k=5,
                             cache=Cache(tmp_path / "c1")))
    got = run_sync(extract_on_ray(backend, loaded.cache_id, _image_set(bad_images), LAYERS,
                                  executor=RayExecutor("local", workers=2, block_images=8), batch_size=8, top_k=5,
                                  cache=Cache(tmp_path / "c2")))
    assert [Path(p).name for p, _ in got.skipped] == ["broken.png", "empty.jpg"]
    assert all("not a readable image" in cause for _, cause in got.skipped)
    _same_activations(local, got, LAYERS, exact=False)
    ok = local.valid
    np.testing.assert_array_equal(np.asarray(local.outputs)[ok].argmax(1), np.asarray(got.outputs)[ok].argmax(1))


def test_killed_worker_is_retried_and_the_result_is_the_same(ray_cluster, model, images, local_run, tmp_path):
    loaded, backend = model
    ex = RayExecutor("local", workers=2, block_images=8)
    job = extract_on_ray(backend, loaded.cache_id, _image_set(images), LAYERS, executor=ex, batch_size=8,
                         top_k=5, cache=Cache(tmp_path / "cache"))
    killed, at = None, None
    try:
        while True:
            p = next(job)
            if killed is None and ex.seen_pids:
                killed, at = min(ex.seen_pids), p.fraction
                os.kill(killed, signal.SIGKILL)  # a worker dies mid-run
    except StopIteration as stop:
        got = stop.value
    assert killed is not None and at is not None and at < 1.0
    _same_activations(local_run, got, LAYERS)


def _complete_entries(cache: Cache) -> list[Path]:
    root = cache.root / "activations"
    return [p for p in root.iterdir() if (p / "meta.json").is_file()] if root.is_dir() else []


def test_cancelled_job_stops_ray_and_leaves_no_entry(ray_cluster, model, images, tmp_path):
    loaded, backend = model
    cache = Cache(tmp_path / "cache")
    ex = RayExecutor("local", workers=2, block_images=8)
    job = extract_on_ray(backend, loaded.cache_id, _image_set(images), LAYERS, executor=ex, batch_size=8,
                         top_k=5, cache=cache)
    while not ex.seen_pids:
        next(job)
    job.close()  # what the app's Cancel and Ctrl-C do
    assert _complete_entries(cache) == []
    assert not any(p.name.startswith(".") for p in (cache.root / "activations").iterdir())
    for _ in range(120):  # the actors end and hand their CPUs back
        if ray.available_resources().get("CPU", 0) >= 2:
            break
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2


def test_unsafe_model_file_is_refused_on_the_workers(ray_cluster, rnet_spec, images, tmp_path):
    """The driver opened a safe file; the file the workers get is a pickle that runs code: the
    workers' loader refuses it (ConvLens's rules apply there too), naming the user's file."""
    import torch

    from engine.backends import open_backend
    from engine.models.loading import load_model

    path = tmp_path / "model.pt"
    shutil.copy(rnet_spec.path, path)
    spec = rnet_spec.with_(path=str(path), device="cpu")
    loaded = load_model(spec)
    backend = open_backend(loaded)
    torch.save({"weights": torch.zeros(2), "payload": _Evil()}, path)  # swapped after opening
    ex = RayExecutor("local", workers=1)
    with pytest.raises(ConvLensError) as e:
        run_sync(extract_on_ray(backend, loaded.cache_id, _image_set(images), [], executor=ex, batch_size=8,
                                cache=Cache(tmp_path / "cache")))
    msg = str(e.value)
    assert "on a Ray worker" in msg and str(path) in msg and "pickled Python objects" in msg
    assert not (tmp_path / "ran").exists()


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "ran",))


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CONVLENS_CACHE": str(cache), "QT_QPA_PLATFORM": "offscreen"}
    return subprocess.run([sys.executable, "-c", "import sys; from engine.cli import main; sys.exit(main(sys.argv[1:]))",
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_predict_and_activations_commands_with_ray_local(rnet_spec, images, bad_images, tmp_path):
    """``--ray local --workers 2`` (the command starts and stops its own local cluster) writes
    the same predictions and unit tables as the in-process command."""
    model = ["--model", rnet_spec.path, "--arch", "rnet", "--device", "cpu", "--images", str(images),
             "--batch-size", "8"]
    bad = _cli("predict", *model[:-4], "--images", str(bad_images), "--out", str(tmp_path / "bad"), "--ray", "local",
               "--workers", "2", cache=tmp_path / "c3")
    assert bad.returncode == 0, bad.stderr
    assert "2 files skipped" in bad.stderr and "broken.png" in bad.stderr and "empty.jpg" in bad.stderr
    for cmd, files in (("predict", ["predictions.csv"]), ("activations", ["conv3_units.csv", "conv3_top.json"])):
        extra = ["--layers", "conv3"] if cmd == "activations" else []
        here = _cli(cmd, *model, *extra, "--out", str(tmp_path / f"{cmd}-local"), cache=tmp_path / "c1")
        there = _cli(cmd, *model, *extra, "--out", str(tmp_path / f"{cmd}-ray"), "--ray", "local", "--workers", "2",
                     cache=tmp_path / "c2")
        assert here.returncode == 0, here.stderr
        assert there.returncode == 0, there.stderr
        for f in files:
            assert (tmp_path / f"{cmd}-ray" / f).read_bytes() == (tmp_path / f"{cmd}-local" / f).read_bytes()


_NO_RAY = """
import sys
sys.modules["ray"] = None  # Ray absent: any import of it fails, as when it is not installed
from engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_without_ray_commands_work_and_ray_option_says_how_to_install(rnet_spec, images, tmp_path):
    env = {**os.environ, "CONVLENS_CACHE": str(tmp_path / "cache")}
    model = ["--model", rnet_spec.path, "--arch", "rnet", "--device", "cpu", "--images", str(images)]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _NO_RAY, *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=600)

    ok = run("predict", *model, "--out", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "predictions.csv").is_file()
    for cmd in ("predict", "activations"):
        r = run(cmd, *model, "--out", str(tmp_path / "out2"), "--ray", "local")
        assert r.returncode == 1
        assert "pip install convlens[cluster]" in r.stderr and "Traceback" not in r.stderr
    r = run("predict", *model, "--out", str(tmp_path / "out3"), "--workers", "2")
    assert r.returncode == 1 and "--ray" in r.stderr
