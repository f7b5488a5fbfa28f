"""Interpretable CNNs on the built-in part data: ordinary vs interpretable from the same start.

Zhang, Wu, Zhu, CVPR 2018. Generates the built-in part set (engine.concepts.parts), trains a
PartNet briefly (the common start), then fine-tunes two copies with the same data, order and
budget: the ordinary baseline (converted tree, masks off, no filter loss) and the interpretable
CNN (masks on, filter loss with the paper's schedule). Prints a table of validation accuracy,
mean location instability and part interpretability at the converted layer, and the start
model's numbers at its own top conv layer. CPU minutes.

    .venv/bin/python bench/filters.py [--epochs 8] [--start-epochs 6] [--images 900] [--seed 0]
        [--weight 1.0] [--mask template|unit] [--quantile 0.005] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pretrain(net, x, y, epochs: int, seed: int, lr: float = 2e-3, batch_size: int = 32) -> None:
    import numpy as np
    import torch

    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for e in range(epochs):
        order = np.random.default_rng([seed, 999, e]).permutation(len(x))
        for lo in range(0, len(x), batch_size):
            idx = order[lo:lo + batch_size]
            loss = torch.nn.functional.cross_entropy(net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()


def run(epochs: int = 8, start_epochs: int = 6, n_images: int = 900, seed: int = 0, weight: float = 1.0,
        mask: str = "template", out: str | None = None, quiet: bool = False, quantile: float = 0.005) -> dict:
    import torch

    from engine.backends.torch_backend import TorchBackend
    from engine.concepts import open_broden
    from engine.concepts.parts import builtin_parts
    from engine.data.images import open_image_set
    from engine.filters.metrics import MetricsParams, filter_metrics
    from engine.filters.partnet import PARTNET_ARCH, PartNet
    from engine.filters.templates import FilterParams
    from engine.filters.train import TrainParams, label_indices, load_arrays, train_filters
    from engine.jobs import run_sync
    from engine.models.loading import load_model
    from engine.types import ModelSpec, Preprocess

    t0 = time.perf_counter()
    work = Path(out or tempfile.mkdtemp(prefix="convlens-filters-"))
    work.mkdir(parents=True, exist_ok=True)
    ds = run_sync(builtin_parts(n_images, 48, seed))
    root = Path(ds.root)
    train, val = open_image_set(root / "train.csv"), open_image_set(root / "val.csv")
    parts_val = open_broden(root, split="val")
    classes = ("animal", "face", "house")
    pre = Preprocess(input_size=(48, 48), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    start_path = work / "start.pt"
    spec = ModelSpec(path=str(start_path), arch=PARTNET_ARCH, preprocess=pre, classes=classes)
    x, read = run_sync(load_arrays(train, spec))
    y = label_indices(train, classes)[read]
    torch.manual_seed(seed)
    net = PartNet(len(classes))
    pretrain(net, x, y, start_epochs, seed)
    torch.save(net.state_dict(), start_path)
    loaded = load_model(spec)
    backend = TorchBackend(loaded.module, spec, "cpu")
    fp = FilterParams(mask=mask)  # type: ignore[arg-type]
    mp = MetricsParams(filter_params=fp, quantile=quantile)
    rows = {}

    def measure(name: str, be, sha: str, layer: str, acc: float) -> None:
        m = run_sync(filter_metrics(be, sha, val, layer, mp, landmarks=root / "landmarks.csv", parts=parts_val))
        s = m.summary()
        rows[name] = {"val_accuracy": acc, "location_instability": s["mean_location_instability"],
                      "part_interpretability": s["part_interpretability"], "mean_part_iou": s["mean_part_iou"],
                      "inter_category_entropy": s["mean_inter_category_entropy"],
                      "spatial_entropy": s["mean_spatial_entropy"], "layer": layer}

    from engine.filters.train import evaluate

    xv, rv = run_sync(load_arrays(val, spec))
    yv = label_indices(val, classes)[rv]
    measure("start", backend, loaded.cache_id, "relu4", evaluate(loaded.module, xv, yv, 0, torch.device("cpu")))
    params = TrainParams(layer="relu4", epochs=epochs, seed=seed, weight=weight, filter_params=fp)
    for name, p in (("ordinary", params.baseline()), ("interpretable", params)):
        res = run_sync(train_filters(backend, loaded.cache_id, train, p, work / name, val_images=val))
        trained = load_model(ModelSpec(path=res.files["state_dict"], arch=f"{res.files['class_file']}:InterpretableNet",
                                       preprocess=pre, classes=classes))
        measure(name, TorchBackend(trained.module, trained.spec, "cpu"), trained.cache_id, res.measured_layer,
                res.final["val_accuracy"])
    out_rows = {"rows": rows, "epochs": epochs, "start_epochs": start_epochs, "images": n_images, "seed": seed,
                "weight": weight, "mask": mask, "quantile": quantile,
                "seconds": time.perf_counter() - t0, "work": str(work)}
    if not quiet:
        print("| model | layer | val accuracy | location instability | part interpretability | mean part IoU | "
              "inter-cat. entropy | spatial entropy |")
        print("|---|---|---|---|---|---|---|---|")
        for k, r in rows.items():
            print(f"| {k} | {r['layer']} | {r['val_accuracy']:.3f} | {r['location_instability']:.4f} | "
                  f"{r['part_interpretability']:.3f} | {r['mean_part_iou']:.3f} | {r['inter_category_entropy']:.4f} | "
                  f"{r['spatial_entropy']:.4f} |")
        print(f"({out_rows['seconds']:.0f} s; {n_images} images, start {start_epochs} epochs, "
              f"fine-tune {epochs} epochs, seed {seed}, weight {weight}, mask {mask}, part quantile {quantile}; "
              f"work folder {work})")
    (work / "comparison.json").write_text(json.dumps(out_rows, indent=2) + "\n")
    return out_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--start-epochs", type=int, default=6)
    ap.add_argument("--images", type=int, default=900)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--mask", choices=["template", "unit"], default="template")
    ap.add_argument("--quantile", type=float, default=0.005, help="part mask quantile (default 0.005)")
    ap.add_argument("--out")
    a = ap.parse_args()
    os.environ.setdefault("CONVLENS_CACHE", tempfile.mkdtemp(prefix="convlens-cache-"))
    run(a.epochs, a.start_epochs, a.images, a.seed, a.weight, a.mask, a.out, quantile=a.quantile)


if __name__ == "__main__":
    main()
