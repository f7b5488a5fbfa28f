"""Network Dissection: ConvLens ``dissect`` vs a NetDissect-Lite-style reference.

    .venv/bin/python bench/dissection.py [--images 2000] [--size 112] [--work DIR]

Both sides dissect torchvision ResNet-18 (random weights, seed 0, fed whole 112 px images)
layers ``layer3`` and ``layer4`` on the built-in concept set (generated once into
``--work``), each in its own subprocess so that its peak RSS (``ru_maxrss``) is its own:

- **ConvLens**: :func:`engine.dissection.dissect` with a fresh cache folder; disk = bytes in
  that folder afterwards.
- **reference**: what NetDissect-Lite does (Bau et al. 2017 as re-implemented by its authors):
  one forward pass writing every activation to float64 ``.mmap`` files; per unit
  ``np.quantile`` over the memmap; then per image and unit a float64 bilinear upsample
  (align_corners=False), ``>= T_k`` (the paper's rule, as ConvLens' default), and label counts
  with ``np.bincount``, skipping units whose map max is below ``T_k`` as Lite does. Disk = the
  memmaps.

Prints wall time per phase, peak RSS and disk, the ratios, and how many of the 768 units get
the same label from both, with the largest IoU difference (float32 vs float64 upsampling can
flip pixels that tie with ``T_k``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = ("layer3", "layer4")


def _setup(work: Path, n: int, size: int) -> tuple[Path, Path]:
    """The concept set and the random ResNet-18 state dict (made once)."""
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


def _open(weights: Path, size: int):
    from engine.backends import open_backend
    from engine.models import build_spec, load_model

    spec = build_spec(str(weights), arch="resnet18", input_size=str(size), resize="stretch",
                      device="cpu")
    loaded = load_model(spec)
    return loaded, open_backend(loaded)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def side_convlens(concepts_dir: Path, weights: Path, size: int, out: Path) -> dict[str, float]:
    from engine.cache import Cache
    from engine.concepts import open_broden
    from engine.dissection import dissect
    from engine.jobs import run_sync

    t0 = time.perf_counter()
    loaded, backend = _open(weights, size)
    concepts = open_broden(concepts_dir)
    cache = Cache(out / "cache")
    result = run_sync(dissect(backend, loaded.cache_id, concepts, LAYERS, cache=cache))
    wall = time.perf_counter() - t0
    for name, ld in result.layers.items():
        np.save(out / f"iou_{name}.npy", ld.iou)
        np.save(out / f"thr_{name}.npy", ld.thresholds)
    s = result.seconds
    return {
        "wall": wall,
        "extraction": s.get("load", 0.0) + s.get("forward", 0.0),
        "quantile": s["quantile"] + s.get("top_images", 0.0),
        "tally": s["masks"] + s["tally"] + s.get("labels", 0.0),
        **{f"quantile {n}": s[f"quantile[{n}]"] for n in LAYERS},
        **{f"tally {n}": s[f"tally[{n}]"] for n in LAYERS},
        "disk": _folder_bytes(out / "cache"),
    }


def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) float64 matrix of 1-D bilinear upsampling with align_corners=False."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = src - i0
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), i0] += 1.0 - w1
    m[np.arange(n_out), i1] += w1
    return m


def side_reference(concepts_dir: Path, weights: Path, size: int, out: Path,
                   q: float = 0.005) -> dict[str, float]:
    from engine.concepts import open_broden
    from engine.data.images import ImageLoader
    from engine.dissection.run import concept_image_set, dissection_preprocess

    t0 = time.perf_counter()
    _loaded, backend = _open(weights, size)
    concepts = open_broden(concepts_dir)
    n = len(concepts)
    info = {li.name: li for li in backend.layers()}
    feats = {name: np.lib.format.open_memmap(out / f"features_{name}.mmap.npy", "w+",
                                             np.float64, (n, *info[name].shape))
             for name in LAYERS}
    t_ex = time.perf_counter()
    with ImageLoader(concept_image_set(concepts), dissection_preprocess(backend.spec.preprocess),
                     batch_size=32) as loader:
        for batch in loader:
            res = backend.forward(batch.array, capture=LAYERS)
            for name in LAYERS:
                feats[name][batch.indices] = res.activations[name]
    for f in feats.values():
        f.flush()
    times = {"extraction": time.perf_counter() - t_ex}
    disk = sum(f.nbytes for f in feats.values())

    thresholds = {}
    for name in LAYERS:
        t = time.perf_counter()
        k = info[name].units
        thr = np.empty(k)
        for k0 in range(0, k, 64):
            block = np.asarray(feats[name][:, k0:k0 + 64]).transpose(1, 0, 2, 3).reshape(
                min(64, k - k0), -1)
            thr[k0:k0 + 64] = np.quantile(block, 1 - q, axis=1)
        thresholds[name] = thr
        times[f"quantile {name}"] = time.perf_counter() - t

    cats = concepts.label_categories()
    n_labels, n_cat = concepts.n_labels, len(concepts.categories)
    for name in LAYERS:
        t = time.perf_counter()
        k, h, w = info[name].shape
        thr = thresholds[name]
        inter = np.zeros((k, n_labels), dtype=np.int64)
        area_cat = np.zeros((k, n_cat), dtype=np.int64)
        label_area = np.zeros(n_labels, dtype=np.int64)
        mats: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for i in range(n):
            s = concepts.sample(i)
            sh, sw = s.mask_size
            if (sh, sw) not in mats:
                mats[(sh, sw)] = (_bilinear_matrix(sh, h), _bilinear_matrix(sw, w).T)
            ry, rxt = mats[(sh, sw)]
            pixels = np.stack([m for _, m in s.pixel_labels]).reshape(len(s.pixel_labels), -1) \
                if s.pixel_labels else np.zeros((0, sh * sw), dtype=np.int64)
            counts = np.bincount(pixels.ravel(), minlength=n_labels)
            counts[0] = 0
            for _, lab in s.image_labels:
                counts[lab] += sh * sw
            label_area += counts
            present = np.zeros(n_cat, dtype=bool)
            present[cats[np.flatnonzero(counts)]] = True
            fm = feats[name][i]
            for u in np.flatnonzero(fm.reshape(k, -1).max(axis=1) >= thr):
                mask = (ry @ fm[u] @ rxt >= thr[u]).ravel()
                m_area = int(mask.sum())
                if not m_area:
                    continue
                hit = np.bincount(pixels[:, mask].ravel(), minlength=n_labels)
                hit[0] = 0
                for _, lab in s.image_labels:
                    hit[lab] += m_area
                inter[u] += hit
                area_cat[u] += m_area * present
        union = area_cat[:, np.maximum(cats, 0)] + label_area[None] - inter
        union[:, 0] = 0
        iou = np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)
        np.save(out / f"iou_{name}.npy", iou)
        np.save(out / f"thr_{name}.npy", thr)
        times[f"tally {name}"] = time.perf_counter() - t
    for name in LAYERS:
        del feats[name]
    for f in out.glob("features_*.mmap.npy"):
        f.unlink()
    return {
        "wall": time.perf_counter() - t0,
        "extraction": times["extraction"],
        "quantile": sum(times[f"quantile {n}"] for n in LAYERS),
        "tally": sum(times[f"tally {n}"] for n in LAYERS),
        **times,
        "disk": disk,
    }


def _run_side(side: str, concepts: Path, weights: Path, size: int, out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--side", side, "--concepts", str(concepts),
           "--weights", str(weights), "--size", str(size), "--out", str(out)]
    subprocess.run(cmd, check=True)
    return json.loads((out / "times.json").read_text())


def _agreement(concepts: Path, a: Path, b: Path) -> tuple[int, int, float, float]:
    from engine.concepts import open_broden
    from engine.dissection.run import _Labels, summarize_layer

    labels = _Labels.of(open_broden(concepts))
    same = total = 0
    max_diff = max_thr = 0.0
    for name in LAYERS:
        x, y = np.load(a / f"iou_{name}.npy"), np.load(b / f"iou_{name}.npy")
        sx, sy = (summarize_layer(m, labels.names, labels.category_index, labels.categories, 0.04)
                  for m in (x, y))
        same += int((sx.label == sy.label).sum())
        total += len(sx.label)
        max_diff = max(max_diff, float(np.abs(x - y).max()))
        max_thr = max(max_thr, float(np.abs(np.load(a / f"thr_{name}.npy")
                                            - np.load(b / f"thr_{name}.npy")).max()))
    return same, total, max_diff, max_thr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "convlens-bench-dissect"))
    p.add_argument("--side", choices=["convlens", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--concepts", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        fn = side_convlens if a.side == "convlens" else side_reference
        times = fn(Path(a.concepts), Path(a.weights), a.size, Path(a.out))
        times["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        (Path(a.out) / "times.json").write_text(json.dumps(times))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    concepts, weights = _setup(work, a.images, a.size)
    runs = {}
    for side in ("convlens", "reference"):
        out = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
        runs[side] = (_run_side(side, concepts, weights, a.size, out), out)
    mb = 1e6
    print(f"\nResNet-18 (random weights) {', '.join(LAYERS)}, {a.images} concept images at "
          f"{a.size} px, {os.cpu_count()} CPU cores\n")
    print(f"{'implementation':<16}| {'wall s':>7} | {'extraction s':>12} | {'quantile s':>10} | "
          f"{'tally s':>8} | {'peak RSS MB':>11} | {'disk MB':>8}")
    print("-" * 16 + "|" + "-" * 9 + "|" + "-" * 14 + "|" + "-" * 12 + "|" + "-" * 10 + "|"
          + "-" * 13 + "|" + "-" * 9)
    for side, (t, _) in runs.items():
        print(f"{side:<16}| {t['wall']:7.1f} | {t['extraction']:12.1f} | {t['quantile']:10.2f} | "
              f"{t['tally']:8.1f} | {t['peak_rss'] / mb:11.0f} | {t['disk'] / mb:8.2f}")
    c, r = runs["convlens"][0], runs["reference"][0]
    print(f"\nreference / ConvLens: wall {r['wall'] / c['wall']:.2f}x, "
          f"disk {r['disk'] / max(c['disk'], 1):.0f}x, peak RSS {r['peak_rss'] / c['peak_rss']:.2f}x")
    for name in LAYERS:
        print(f"  {name}: quantile {c[f'quantile {name}']:.2f} s vs {r[f'quantile {name}']:.2f} s, "
              f"tally {c[f'tally {name}']:.1f} s vs {r[f'tally {name}']:.1f} s")
    same, total, diff, thr = _agreement(concepts, runs["convlens"][1], runs["reference"][1])
    print(f"\nagreement: {same}/{total} units get the same label; max |IoU difference| {diff:.2e}; "
          f"max |threshold difference| {thr:.2e}")


if __name__ == "__main__":
    main()
