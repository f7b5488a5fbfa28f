"""Extraction and Network Dissection in-process vs on a local Ray cluster of 1 and 2 workers.

    .venv/bin/python bench/cluster.py [--images 256] [--size 112] [--batch-size 32] [--work DIR]

Model: torchvision ResNet-18 (random weights, seed 0) at ``--size`` px, layers ``layer3`` and
``layer4``; data: the built-in concept set (``--images`` images, generated once into
``--work``), used as the image set of the extraction too (maps stored, float16).

Every run starts from an empty cache. The in-process runs use one torch thread, as each Ray
worker does (``cpus_per_worker=1``), so "1 worker" shows Ray's overhead and "2 workers" the
scaling on two cores. Ray's own start (``ray.init``) is timed apart; a run's time includes its
actors' start (each loads torch and the model once) and the driver's reduction. Prints
images/s, the time relative to in-process (the overhead ratio: > 1 is slower) and, for the
paper estimate in docs/cluster.md, the per-image costs and the sizes of what the workers send
back per block (pickled partial statistics, as Ray ships them).
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = ["layer3", "layer4"]


def _setup(work: Path, n: int, size: int) -> tuple[Path, Path]:
    import torch
    import torchvision

    from engine.concepts import generate_concepts
    from engine.jobs import run_sync

    concepts = work / f"concepts-{n}-{size}"
    if not (concepts / "index.csv").is_file():
        run_sync(generate_concepts(concepts, n_images=n, image_size=size))
    weights = work / "resnet18-random-seed0.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return concepts, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "convlens-bench-cluster")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)

    import numpy as np
    import ray
    import torch

    from engine.activations import extract
    from engine.backends import open_backend
    from engine.cache import Cache
    from engine.cluster import RayExecutor, dissect_on_ray, extract_on_ray
    from engine.concepts import open_broden
    from engine.dissection import DissectionParams, dissect
    from engine.dissection.run import concept_image_set
    from engine.jobs import run_sync
    from engine.models import build_spec, load_model

    torch.set_num_threads(1)
    concepts_dir, weights = _setup(a.work, a.images, a.size)
    concepts = open_broden(concepts_dir)
    spec = build_spec(str(weights), arch="resnet18", input_size=str(a.size), device="cpu")
    loaded = load_model(spec)
    backend = open_backend(loaded)
    images = concept_image_set(concepts)
    n = len(images)
    params = DissectionParams(batch_size=a.batch_size, map_budget_mb=0) if "map_budget_mb" in \
        DissectionParams.__dataclass_fields__ else DissectionParams(batch_size=a.batch_size)  # two forward passes

    def fresh() -> Cache:
        return Cache(tempfile.mkdtemp(prefix="cache-", dir=a.work))

    rows: list[tuple[str, str, float]] = []

    def timed(what: str, where: str, job) -> object:
        t = time.perf_counter()
        out = run_sync(job)
        rows.append((what, where, time.perf_counter() - t))
        return out

    ref_acts = timed("extract", "in-process", extract(backend, loaded.cache_id, images, LAYERS,
                                                      batch_size=a.batch_size, cache=fresh()))
    ref_dis = timed("dissect", "in-process", dissect(backend, loaded.cache_id, concepts, LAYERS, params, cache=fresh()))
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_start = time.perf_counter() - t
    same = []
    sizes: dict[str, int] = {}
    try:
        for workers in (1, 2):
            ex = RayExecutor("local", workers=workers)
            acts = timed("extract", f"Ray, {workers} worker{'s' if workers > 1 else ''}",
                         extract_on_ray(backend, loaded.cache_id, images, LAYERS, executor=ex,
                                        batch_size=a.batch_size, cache=fresh()))
            same.append(bool(np.array_equal(np.asarray(acts.outputs), np.asarray(ref_acts.outputs))))
            ex = RayExecutor("local", workers=workers)
            res = timed("dissect", f"Ray, {workers} worker{'s' if workers > 1 else ''}",
                        dissect_on_ray(backend, loaded.cache_id, concepts, LAYERS, params, executor=ex, cache=fresh()))
            same.append(all(np.array_equal(res.layers[k].iou, ref_dis.layers[k].iou) for k in LAYERS))
        sizes = _partial_sizes(backend, loaded, concepts, images, params, a.batch_size)
    finally:
        ray.shutdown()

    base = {w: s for w, where, s in rows if where == "in-process"}
    print(f"\nResNet-18 (random), {a.size} px, layers {', '.join(LAYERS)}, {n} images, batch {a.batch_size}; "
          f"machine: {os.cpu_count()} cores (shared); ray.init {ray_start:.1f} s (not in the times below)\n")
    print("| job | where | seconds | images/s | time vs in-process |")
    print("|---|---|---|---|---|")
    for what, where, s in rows:
        print(f"| {what} | {where} | {s:.1f} | {n / s:.1f} | {s / base[what]:.2f}x |")
    print(f"\nsame numbers as in-process (outputs / IoUs) in every Ray run: {all(same)}")
    print(f"in-process per image: extract {1e3 * base['extract'] / n:.1f} ms, dissect (2 forward passes) "
          f"{1e3 * base['dissect'] / n:.1f} ms (1 thread)")
    for k, v in sizes.items():
        print(f"{k}: {v / 2**20:.2f} MiB")


def _partial_sizes(backend, loaded, concepts, images, params, batch_size) -> dict[str, int]:
    """Pickled bytes of what a worker returns for one block of ``4 * batch_size`` images."""
    import numpy as np

    from engine.cluster import RayExecutor
    from engine.cluster.dissect import DissectWorker
    from engine.cluster.extract import ExtractWorker
    from engine.cluster.payload import ModelPayload
    from engine.dissection.labels import Labels
    from engine.dissection.passes import tie_plan
    from engine.dissection.run import dissection_preprocess, spatial_layers

    ex = RayExecutor("local", workers=1)
    payload = ModelPayload.of(backend.spec, loaded.cache_id, ex)
    block = np.arange(min(4 * batch_size, len(images)), dtype=np.int64)
    info = spatial_layers(backend, LAYERS)
    pre = dissection_preprocess(backend.spec.preprocess)
    common = {"payload": payload, "concepts": concepts, "image_set": images, "pre": pre, "info": info,
              "params": params, "device": "cpu", "threads": 1}
    out = {}
    ew = ExtractWorker(payload, images, LAYERS, True, batch_size, "cpu", 1)
    out[f"extract block ({len(block)} images, maps float16)"] = len(pickle.dumps(ew({"data": block})))
    w1 = DissectWorker(**common, phase=1, total=len(images))
    row = w1({"data": block})
    out[f"dissect pass-1 partial ({len(block)} images; TopQuantile + TopK)"] = len(pickle.dumps(row))
    quantiles = {k: q for k, (q, _) in row["part"][0].items()}
    thresholds = {k: q.thresholds() if q.count == q.total else np.zeros(q.n_units) for k, q in quantiles.items()}
    ties = {k: tie_plan(q, thresholds[k], params) for k, q in quantiles.items()}
    w2 = DissectWorker(**common, phase=2, thresholds=thresholds, ties=ties, labels=Labels.of(concepts))
    out[f"dissect pass-2 partial ({len(block)} images; sparse IoU tally)"] = len(pickle.dumps(w2({"data": block})))
    return out


if __name__ == "__main__":
    main()
