"""Train a torchvision ResNet-18 (random start, seed 0) for six epochs on the 200 demo crops at 64 px,
face vs non-face: the torchvision model of the inference-graph evidence in docs/graphs.md.

    .venv/bin/python docs/graphs/train_resnet18_faces.py ~/.cache/convlens/demo/lfw resnet18_faces.pt

The preprocessing is what ``--arch resnet18 --input-size 64 --resize stretch`` gives: RGB, a
64 x 64 stretch, ImageNet mean and std.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

CLASSES = ("face", "non-face")
MEAN = np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]
STD = np.array([0.229, 0.224, 0.225], np.float32)[:, None, None]


def main(root: Path, out: str, epochs: int = 6) -> None:
    xs, ys = [], []
    for ci, c in enumerate(CLASSES):
        for p in sorted((root / c).iterdir()):
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), np.float32)
            xs.append((a.transpose(2, 0, 1) / 255 - MEAN) / STD)
            ys.append(ci)
    x, y = torch.from_numpy(np.stack(xs)), torch.tensor(ys)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=len(CLASSES))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x).argmax(1) == y).float().mean().item()
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, train accuracy (eval mode) {acc:.3f}, "
              f"{time.time() - t0:.0f} s", flush=True)
    torch.save(model.state_dict(), out)


if __name__ == "__main__":
    main(Path(sys.argv[1]).expanduser(), sys.argv[2])
