"""Transformation probe throughput: model inputs per second of the sweep (transform + preprocess +
one forward capturing every layer) and the time of the linear maps, on the demo RNet (24 px) and a
random-weight ResNet-18 (64 px), pooled and flat features. Prints a table; no cache is kept.

    .venv/bin/python bench/probes.py [--images 60] [--values -30:30:10]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from engine.backends.torch_backend import TorchBackend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.demo import prepare_demo
    from engine.jobs import run_sync
    from engine.models import load_model
    from engine.probes.run import ProbeParams, run
    from engine.probes.transforms import parse_range
    from engine.types import ModelSpec, Preprocess

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--values", default="-30:30:10")
    a = ap.parse_args()
    values = parse_range(a.values)
    tmp = Path(tempfile.mkdtemp(prefix="probe-bench-"))
    spec, folder = prepare_demo(tmp / "demo")
    loaded = load_model(spec)
    rnet = TorchBackend(loaded.module, spec, "cpu")
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    r18_be = TorchBackend(r18, ModelSpec(path="resnet18", preprocess=Preprocess(input_size=(64, 64))), "cpu")
    rng = np.random.default_rng(0)
    rfolder = tmp / "r18"
    rfolder.mkdir()
    for i in range(a.images):
        Image.fromarray(rng.integers(0, 256, (80, 80, 3)).astype(np.uint8)).save(rfolder / f"{i:03d}.png")
    cases = [("RNet 24 px", rnet, open_image_set(folder), ("conv1", "conv2", "conv3")),
             ("ResNet-18 64 px", r18_be, open_image_set(rfolder), ("layer2", "layer3", "layer4"))]
    print(f"{'model':<17}{'features':<9}{'images':>7}{'values':>7}{'inputs/s':>10}{'sweep s':>9}{'maps s':>8}")
    for name, be, iset, layers in cases:
        for features in ("pooled", "flat"):
            p = ProbeParams(values=values, layers=layers, features=features, max_images=a.images)
            res = run_sync(run(be, name, iset, p, cache=Cache(tmp / f"cache-{name}-{features}")))
            inputs = res.n * (len(values) + 1)
            s = res.seconds
            print(f"{name:<17}{features:<9}{res.n:>7}{len(values):>7}{inputs / s['sweep']:>10.0f}{s['sweep']:>9.2f}"
                  f"{s['linear_maps']:>8.2f}")


if __name__ == "__main__":
    main()
