"""Benchmark of the polytope gallery (Representative Interpretations), CPU.

    .venv/bin/python bench/polytope.py                # synthetic SCSC + the demo
    .venv/bin/python bench/polytope.py --evidence     # also the VGG-style and ResNet-18 runs of docs/polytope.md

1. **Synthetic**: |R| = 50,000 feature vectors (dimension 64, two to four classes from a noisy
   linear rule), |Q| = 1,000 random hyperplanes; sides as packed bitsets, then the SCSC greedy
   for a few query images (target: under 1 s each). Prints the time to build the bitsets, the
   greedy's time per image, |P(x)| and the cover sizes.
2. **Demo** (pretrained RNet on the 200 lfw_subset images): the whole job without cache, with the
   throughput of the local affine maps (images/s) and of the boundaries (boundaries/s), and the
   metric table.
3. ``--evidence``: a VGG-11 with BatchNorm (torchvision, two classes, 32 px) and a ResNet-18 (two classes, 32 px)
   trained for a few epochs on the demo images, then the gallery at the VGG's default layer, at
   ResNet-18 ``layer3`` and at ``layer4`` (the affine head).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.polytope import scsc


def synthetic(n: int = 50_000, q: int = 1_000, dim: int = 64, classes: int = 3, queries: int = 5,
              seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32)
    rule = rng.normal(size=(dim, classes)).astype(np.float32)
    labels = np.argmax(x @ rule + 0.5 * rng.normal(size=(n, classes)).astype(np.float32), axis=1)
    w = rng.normal(size=(q, dim)).astype(np.float32)
    b = (0.5 * rng.normal(size=q)).astype(np.float32)
    t = time.perf_counter()
    sides = np.empty((q, scsc.words_for(n)), np.uint64)
    for s in range(0, q, 250):
        sides[s:s + 250] = scsc.pack((x @ w[s:s + 250].T + b[s:s + 250] > 0).T)
    t_bits = time.perf_counter() - t
    valid = scsc.valid_mask(n)
    print(f"synthetic: |R| = {n:,}, |Q| = {q:,}, dim {dim}, {classes} classes; sides as bitsets in {t_bits:.2f} s "
          f"({sides.nbytes / 2**20:.1f} MiB)")
    print(f"{'query':>6}{'|D(x)|':>8}{'delta':>7}{'|P(x)|':>8}{'covered':>9}{'same':>7}{'greedy s':>10}")
    times = []
    for xi in rng.choice(n, size=queries, replace=False):
        t = time.perf_counter()
        x_side = (x[xi] @ w.T + b) > 0
        region = scsc.region_sets(sides, x_side, valid)
        diff_b = labels != labels[xi]
        cov = scsc.scsc_greedy(region, scsc.pack(diff_b), valid)
        dt = time.perf_counter() - t
        times.append(dt)
        got = scsc.members(cov.cover, n)
        print(f"{xi:>6}{int(diff_b.sum()):>8}{cov.delta:>7}{len(cov.chosen):>8}{len(got):>9}"
              f"{int((~diff_b[got]).sum()):>7}{dt:>10.3f}")
    print(f"greedy: mean {np.mean(times):.3f} s, max {np.max(times):.3f} s per image (target < 1 s)")


def demo(candidates: int) -> None:
    from engine.backends.torch_backend import TorchBackend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.demo import prepare_demo
    from engine.jobs import run_sync
    from engine.models import load_model
    from engine.polytope.run import PolytopeParams, run

    with tempfile.TemporaryDirectory() as tmp:
        spec, images = prepare_demo(Path(tmp) / "demo")
        loaded = load_model(spec)
        be = TorchBackend(loaded.module, spec, "cpu")
        res = run_sync(run(be, loaded.cache_id, open_image_set(images), PolytopeParams(candidates=candidates),
                           cache=Cache(Path(tmp) / "cache")))
        report("demo (RNet, lfw_subset)", res)


def report(title: str, res: Any) -> None:
    from engine.polytope.cli import metric_table

    r = res  # a PolytopeResult
    tp = r.throughput
    sec = r.seconds
    print(f"\n== {title}")
    print(metric_table(r))
    print(f"local affine maps + certificate: {tp['local_maps_images_per_s']:.0f} images/s; boundaries: "
          f"{tp['boundaries_per_s']:.0f} boundaries/s; greedy: {tp['greedy_images_per_s']:.0f} images/s; "
          f"total {sec['total']:.1f} s")
    h = r.head
    print(f"head: affine={h['affine']} hidden units={h['hidden_units']} "
          f"nonlinear={[d['node'] + ':' + d['op'] for d in h['nonlinear']]} suggested={h.get('suggested_layers')}")
    print(f"boundary certificate max {r.boundary_certificate:.2e}, linear regions "
          f"{len(np.unique(r.region_id))} of {r.n}")


def _train(model: Any, images: Path, size: int, epochs: int, lr: float) -> Any:
    import torch

    from engine.data.images import ImageLoader, open_image_set
    from engine.types import Preprocess

    iset = open_image_set(images)
    labels = {n: i for i, n in enumerate(iset.labels)}
    pre = Preprocess(input_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    xs, ys = [], []
    for batch in ImageLoader(iset, pre, batch_size=64):
        xs.append(torch.from_numpy(batch.array))
        ys += [labels[str(iset.records[int(i)].label)] for i in batch.indices]
    x, y = torch.cat(xs), torch.tensor(ys)
    m: Any = model
    opt = torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    m.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for s in range(0, len(x), 32):
            i = perm[s:s + 32]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(m(x[i]), y[i])
            loss.backward()
            opt.step()
    m.eval()
    with torch.no_grad():
        acc = float((m(x).argmax(1) == y).float().mean())
    print(f"trained {type(m).__name__} for {epochs} epochs: training accuracy {acc:.3f}")
    return m


def evidence(candidates: int) -> None:
    import torch
    import torchvision

    from engine.backends.torch_backend import TorchBackend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.demo import prepare_demo
    from engine.jobs import run_sync
    from engine.polytope.run import PolytopeParams, run
    from engine.types import ModelSpec, Preprocess

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        _spec, images = prepare_demo(Path(tmp) / "demo")
        iset = open_image_set(images)
        pre = Preprocess(input_size=(32, 32), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
        cache = Cache(Path(tmp) / "cache")
        classes = ("face", "non-face")
        vgg = _train(torchvision.models.vgg11_bn(weights=None, num_classes=2), images, 32, 5, 0.003)
        be = TorchBackend(vgg, ModelSpec(path="vgg11", preprocess=pre, classes=classes), "cpu")
        res = run_sync(run(be, "vgg11-quick", iset, PolytopeParams(candidates=candidates), cache=cache))
        report(f"VGG-11-BN (quickly trained), default layer {res.layer}", res)
        r18 = _train(torchvision.models.resnet18(weights=None, num_classes=2), images, 32, 4, 0.01)
        be = TorchBackend(r18, ModelSpec(path="resnet18", preprocess=pre, classes=classes), "cpu")
        for layer in ("layer3", "layer4"):
            res = run_sync(run(be, "r18-quick", iset, PolytopeParams(layer=layer, candidates=candidates),
                               cache=cache))
            report(f"ResNet-18 (quickly trained) at {layer}", res)
            if res.head["affine"]:
                print(f"note: {res.head['note']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--evidence", action="store_true", help="also train and run VGG-11 and ResNet-18")
    ap.add_argument("--candidates", type=int, default=50, help="|Q| for the model runs (default 50)")
    ap.add_argument("--no-demo", action="store_true")
    a = ap.parse_args()
    synthetic()
    if not a.no_demo:
        demo(a.candidates)
    if a.evidence:
        evidence(a.candidates)


if __name__ == "__main__":
    main()
