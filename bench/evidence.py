"""Class evidence throughput: images/s of Grad-CAM, occlusion and integrated gradients (the maps
alone, and with the checks: causal blobs, deletion / insertion, Average Drop), on the demo RNet
(24 px) and on ResNet-18 (random weights, 224 px).

    .venv/bin/python bench/evidence.py [--images 8] [--device cpu] [--repeat 2]

Occlusion runs its occluded copies ``batch_size`` at a time (Captum's ``perturbations_per_eval``);
its cost is (windows per image) forward passes: 484 at 24 px (window 3, stride 1), 225 at 224 px
(window 28, stride 14, 15 x 15 windows). IG is 32 steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _models(device: str, n: int) -> list[tuple[str, object, np.ndarray]]:
    import torch
    import torchvision

    from engine.backends import open_backend
    from engine.backends.torch_backend import TorchBackend
    from engine.data.images import ImageLoader, open_image_set
    from engine.demo import prepare_demo
    from engine.models.loading import load_model
    from engine.types import ModelSpec, Preprocess

    spec, images = prepare_demo()
    rnet = open_backend(load_model(spec), device=device)
    faces = next(iter(ImageLoader(open_image_set(images), spec.preprocess, batch_size=n))).array
    torch.manual_seed(0)
    r18 = TorchBackend(torchvision.models.resnet18().eval(),
                       ModelSpec(path="resnet18 (random weights)", arch="resnet18", preprocess=Preprocess()), device)
    x224 = np.random.default_rng(0).standard_normal((n, 3, 224, 224)).astype(np.float32)
    return [("RNet 24 px", rnet, faces), ("ResNet-18 224 px", r18, x224)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--checks", action="store_true", help="also time the checks (causal, deletion/insertion, drop)")
    a = ap.parse_args()

    import torch

    from engine.evidence import average_drop_increase, causal_check, deletion_insertion, evidence_maps

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, {a.images} images per run")
    print(f"{'model':<18}{'method':<11}{'maps img/s':>11}{'checks img/s':>14}")
    for name, backend, x in _models(a.device, a.images):
        for method in ("gradcam", "occlusion", "ig"):
            opts = {"batch_size": 256} if method == "occlusion" else {}
            evidence_maps(backend, x[:1], method, **opts)  # warm-up (the split's trace, the first conv)
            best = float("inf")
            for _ in range(a.repeat):
                t = time.perf_counter()
                ev = evidence_maps(backend, x, method, **opts)
                best = min(best, time.perf_counter() - t)
            checks = ""
            if a.checks:
                t = time.perf_counter()
                causal_check(backend, x, ev.maps, ev.targets)
                deletion_insertion(backend, x, ev.maps, ev.targets, steps=50)
                average_drop_increase(backend, x, ev.maps, ev.targets)
                checks = f"{len(x) / (time.perf_counter() - t):.3g}"
            print(f"{name:<18}{method:<11}{len(x) / best:>11.3g}{checks:>14}", flush=True)


if __name__ == "__main__":
    main()
