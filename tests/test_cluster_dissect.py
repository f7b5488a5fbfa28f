"""Network Dissection on a real local Ray cluster (2 CPUs, 2 actors) gives the in-process
run's thresholds, IoUs, labels and top images, in the same cache entry; unreadable concept
images are skipped and named as locally."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from engine.cache import Cache  # noqa: E402
from engine.cluster import RayExecutor, dissect_on_ray  # noqa: E402
from engine.concepts import ConceptDataset, generate_concepts, open_broden  # noqa: E402
from engine.dissection import DissectionParams, dissect  # noqa: E402
from engine.jobs import run_sync  # noqa: E402

LAYERS = ["conv1", "conv2", "conv3"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def concepts(tmp_path_factory) -> ConceptDataset:
    """The built-in synthetic concept set, 60 images at 64 px."""
    return run_sync(generate_concepts(tmp_path_factory.mktemp("c") / "set", n_images=60, image_size=64))


@pytest.fixture(scope="module")
def rnet(rnet_spec):
    from engine.backends import open_backend
    from engine.models.loading import load_model

    loaded = load_model(rnet_spec.with_(device="cpu"))
    return loaded, open_backend(loaded)


def _same_dissection(a, b) -> None:
    assert list(a.layers) == list(b.layers)
    assert a.n_images == b.n_images and a.skipped == b.skipped
    assert (a.concept_names, a.categories) == (b.concept_names, b.categories)
    np.testing.assert_array_equal(a.input_digests, b.input_digests)
    for name in a.layers:
        la, lb = a.layers[name], b.layers[name]
        np.testing.assert_array_equal(la.thresholds, lb.thresholds)  # exact-mode quantiles: bit for bit
        np.testing.assert_array_equal(la.iou, lb.iou)
        np.testing.assert_array_equal(la.top_images, lb.top_images)
        np.testing.assert_array_equal(la.top_values, lb.top_values)
        np.testing.assert_array_equal(la.tie_fallback, lb.tie_fallback)
        np.testing.assert_array_equal(la.summary.label, lb.summary.label)
        np.testing.assert_array_equal(la.summary.is_detector, lb.summary.is_detector)
        assert a.summary_line(name) == b.summary_line(name)


def test_dissection_on_two_workers_equals_in_process(ray_cluster, rnet, concepts, tmp_path):
    loaded, backend = rnet
    params = DissectionParams(batch_size=8)
    local = run_sync(dissect(backend, loaded.cache_id, concepts, LAYERS, params, cache=Cache(tmp_path / "c1")))
    cache = Cache(tmp_path / "c2")
    ex = RayExecutor("local", workers=2, block_images=16)
    got = run_sync(dissect_on_ray(backend, loaded.cache_id, concepts, LAYERS, params, cache=cache, executor=ex))
    assert not got.from_cache and ex.seen_pids
    _same_dissection(local, got)
    assert any(got.layers[n].summary.is_detector.any() for n in LAYERS)  # there is something to compare
    # the same cache entry: the in-process dissect (the app, the report) opens it
    again = run_sync(dissect(backend, loaded.cache_id, concepts, LAYERS, params, cache=cache))
    assert again.from_cache
    _same_dissection(local, again)


def test_unreadable_concept_images_are_skipped_as_locally(ray_cluster, rnet, concepts, tmp_path):
    root = tmp_path / "set"
    shutil.copytree(concepts.root, root)
    bad = [Path(open_broden(root).image_path(i)) for i in (3, 40)]
    for p in bad:
        p.write_bytes(b"not an image")
    broken = open_broden(root)
    loaded, backend = rnet
    params = DissectionParams(batch_size=8)
    local = run_sync(dissect(backend, loaded.cache_id, broken, LAYERS, params, cache=Cache(tmp_path / "c1")))
    got = run_sync(dissect_on_ray(backend, loaded.cache_id, broken, LAYERS, params, cache=Cache(tmp_path / "c2"),
                                  executor=RayExecutor("local", workers=2, block_images=16)))
    assert [Path(p).name for p, _ in got.skipped] == [p.name for p in bad]
    assert got.n_images == len(broken) - 2
    _same_dissection(local, got)


def test_cancelled_dissection_leaves_no_entry_and_frees_the_workers(ray_cluster, rnet, concepts, tmp_path):
    import time

    loaded, backend = rnet
    cache = Cache(tmp_path / "cache")
    ex = RayExecutor("local", workers=2, block_images=8)
    job = dissect_on_ray(backend, loaded.cache_id, concepts, LAYERS, DissectionParams(batch_size=8), cache=cache,
                         executor=ex)
    while not ex.seen_pids:  # until the first block came back from a worker
        next(job)
    job.close()
    folder = cache.root / "dissection"
    assert not folder.is_dir() or not any(folder.iterdir())
    for _ in range(120):
        if ray.available_resources().get("CPU", 0) >= 2:
            break
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= 2


def test_cli_dissect_with_ray_local(rnet_spec, concepts, tmp_path, monkeypatch):
    """``convlens dissect --ray local --workers 2`` gives the labels and IoUs of the local run."""
    import csv

    from engine.cli import main

    base = ["-q", "dissect", "--model", rnet_spec.path, "--arch", "rnet", "--device", "cpu", "--concepts",
            concepts.root, "--layers", ",".join(LAYERS), "--batch-size", "8", "--no-tiles"]
    rows = []
    for i, extra in enumerate(([], ["--ray", "local", "--workers", "2"])):
        monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / f"c{i}"))
        assert main([*base, "--out", str(tmp_path / f"out{i}"), *extra]) == 0
        with open(tmp_path / f"out{i}" / "dissection.csv", newline="") as f:
            rows.append(list(csv.reader(f)))
    assert rows[0] == rows[1]
