"""Activation extraction throughput vs a bare PyTorch loop, and ONNX Runtime vs PyTorch.

    .venv/bin/python bench/extraction.py [--images 2000] [--repeats 3]

For each model the same image folder is read with the same loader and batch size:

- bare torch:  ImageLoader + ``model(x)`` under inference_mode, nothing kept (what a user's own
  notebook loop costs);
- extraction:  ConvLens ``extract`` with 3 layers captured, float16 maps and per-unit
  statistics written to a fresh on-disk cache;
- bare ORT:    ImageLoader + ONNX Runtime session (the model exported by ConvLens).

Bare and extraction runs alternate (``--repeats`` pairs), so that a load change on a shared
machine hits both alike: the table prints images/s of the best runs, the ratio of the best times
and the median of the per-pair ratios (the steadier figure on a busy machine; both are printed
with the load average). ``--models rnet`` skips ResNet-18.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.activations import extract
from engine.backends import open_backend
from engine.cache import Cache
from engine.data.images import ImageLoader, open_image_set
from engine.demo import prepare_demo
from engine.jobs import run_sync
from engine.models import build_spec, load_model


def make_images(folder: Path, n: int, size: int, source: str) -> Path:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if source == "lfw":
        faces = data.lfw_subset()
        for i in range(n):
            Image.fromarray((faces[i % 200] * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
    else:
        pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
        for i in range(n):
            p = pics[i % len(pics)]
            y, x = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
            Image.fromarray(p[y:y + size, x:x + size]).save(folder / f"{i:05d}.jpg", quality=92)
    return folder


def bare_torch(be, images, batch):
    import torch

    with ImageLoader(images, be.spec.preprocess, batch_size=batch) as loader, torch.inference_mode():
        for b in loader:
            be.module(torch.from_numpy(b.array))


def bare_ort(be, images, batch):
    sess = be._session(())
    with ImageLoader(images, be.spec.preprocess, batch_size=batch) as loader:
        for b in loader:
            sess.run(None, {be.input_name: b.array})


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", choices=("all", "rnet"), default="all")
    a = ap.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        rnet_spec, _ = prepare_demo(tmp / "demo")
        torch.manual_seed(0)
        import torchvision

        r18 = tmp / "resnet18.pt"
        torch.save(torchvision.models.resnet18().state_dict(), r18)
        cases = [
            ("RNet 24x24 (demo)", rnet_spec, ["conv1", "conv2", "conv3"], "lfw", 25),
            ("ResNet-18 112x112", build_spec(str(r18), arch="resnet18", input_size="112", resize="stretch"),
             ["layer2", "layer3", "layer4"], "photo", 128),
        ]
        rows = []
        if a.models == "rnet":
            cases = cases[:1]
        for name, spec, layers, source, size in cases:
            folder = make_images(tmp / f"img_{source}", a.images, size, source)
            images = open_image_set(folder)
            loaded = load_model(spec)
            tb = open_backend(loaded, "torch", "cpu")
            ob = open_backend(loaded, "onnx", "cpu", onnx_dir=tmp / "onnx")
            bare_torch(tb, images, a.batch)  # warm-up: page cache, allocator, threads

            def run_extract(tb=tb, loaded=loaded, images=images, layers=layers) -> None:
                with tempfile.TemporaryDirectory(dir=tmp) as c:
                    run_sync(extract(tb, loaded.cache_id, images, layers, batch_size=a.batch, cache=Cache(c)))

            run_extract()
            pairs = [(timed(lambda tb=tb, images=images: bare_torch(tb, images, a.batch), 1), timed(run_extract, 1))
                     for _ in range(a.repeats)]
            t_bare, t_ext = min(p[0] for p in pairs), min(p[1] for p in pairs)
            paired = float(np.median([e / b for b, e in pairs]))
            bare_ort(ob, images, a.batch)
            t_ort = timed(lambda ob=ob, images=images: bare_ort(ob, images, a.batch), a.repeats)
            n = len(images)
            rows.append((name, a.batch, n / t_bare, n / t_ext, t_ext / t_bare, paired, n / t_ort, t_ort / t_bare))

    threads = torch.get_num_threads()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\nActivation extraction, {a.images} images, CPU ({threads} torch threads, {os.cpu_count()} cores, "
          f"load average {load}), best of {a.repeats}\n")
    head = ("model", "batch", "bare torch img/s", "extraction img/s", "extract/bare time (best)",
            "extract/bare (median pair)", "bare ORT img/s", "ORT/torch time")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.2f}x | {r[5]:.2f}x | {r[6]:.0f} | {r[7]:.2f}x |")
    print("\nTarget: extraction <= 1.10x the bare loop's time.")


if __name__ == "__main__":
    main()
