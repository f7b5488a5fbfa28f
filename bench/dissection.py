"""Network Dissection: ConvLens ``dissect`` vs NetDissect-Lite itself and a float64 reference.

    .venv/bin/python bench/dissection.py [--images 2000] [--size 112] [--work DIR]
        [--ndl NDL_DIR --ndl-python PY] [--no-reference] [--rule paper|lite] [--batch-size N]

All sides dissect torchvision ResNet-18 (random weights, seed 0, saved once as a state dict)
layers ``layer3`` and ``layer4`` on the built-in concept set (ConvLens's generator, which
writes Broden's layout, generated once into ``--work``) at 112 px, on NetDissect-Lite's inputs
(its normalisation, ``(pixel - mean) / (255 * 0.224)``, given to ConvLens as ``--mean/--std``;
``--resize stretch``), each in its own subprocess so that its peak RSS (``ru_maxrss``) is its
own:

- **ConvLens**: the command, ``convlens dissect ... --out REPORT`` (dissection *and* report,
  with its tiles), with a fresh ``CONVLENS_CACHE``; disk = the cache + the report folder.
- **NetDissect-Lite** (when ``--ndl`` / ``$CONVLENS_NDL`` names a patched checkout and
  ``--ndl-python`` / ``$CONVLENS_NDL_PYTHON`` its interpreter; see
  ``../shared/netdissect-lite/README.md``): its own FeatureOperator (feature extraction to
  float64 memmaps, quantiles, tally) through ``run_ndl.py`` (``--ndl-driver`` /
  ``$CONVLENS_NDL_DRIVER``, default ``../shared/netdissect-lite/run_ndl.py``); it writes no HTML
  report. Disk = its memmaps; peak RSS = its process (``RUSAGE_CHILDREN``).
- **reference** (unless ``--no-reference``): what NetDissect-Lite computes, re-written in
  numpy: one forward pass writing every activation to float64 ``.mmap`` files; per unit
  ``np.quantile`` over the memmap; then per image and unit a float64 bilinear upsample
  (align_corners=False), ``>= T_k`` (the paper's rule, without ConvLens's tie fallback), and
  label counts with ``np.bincount``. Disk = the memmaps.

Prints one table: wall time (dissection + report; ConvLens's split into the dissection, the
report and the rest: start-up, model loading, input checks), CPU time, disk, peak RSS, label agreement per layer
with NetDissect-Lite (and the reference), and the ratios against the targets (ConvLens wall
time <= 0.5x NetDissect-Lite's, cache + report <= 0.2x its memmaps), with the machine's load
average before and after. NetDissect-Lite uses its strict ``S > T`` masks and its union rule;
ConvLens runs ``--rule paper`` unless ``--rule lite`` (which is NetDissect-Lite's), so labels may
differ on units whose IoUs are close.
"""

from __future__ import annotations

import argparse
import csv
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
NDL_MEAN = "0.48898,0.46545,0.42956"
"""NetDissect-Lite's mean (RGB 124.6901, 118.6897, 109.5388 over 255), as ConvLens's ``--mean``."""
NDL_STD = "0.224,0.224,0.224"
"""NetDissect-Lite divides by ``255 * 0.224``: ConvLens's ``--std``."""
DRIVER = Path(__file__).resolve().parents[2] / "shared" / "netdissect-lite" / "run_ndl.py"


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


def _open(weights: Path, size: int, mean: str, std: str):
    from engine.backends import open_backend
    from engine.models import build_spec, load_model

    spec = build_spec(str(weights), arch="resnet18", input_size=str(size), resize="stretch",
                      mean=mean, std=std, device="cpu")
    loaded = load_model(spec)
    return loaded, open_backend(loaded)


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def side_convlens(concepts_dir: Path, weights: Path, size: int, out: Path, mean: str, std: str,
                  rule: str, batch_size: int | None = None) -> dict[str, float]:
    """``convlens dissect`` end to end (dissection and report), as a user runs it."""
    from engine.cli import main
    from engine.dissection import load_result, report

    os.environ["CONVLENS_CACHE"] = str(out / "cache")
    writing = report.write_report
    report_s = []

    def timed_report(*args: object, **kwargs: object) -> Path:  # the command's own call, timed
        t = time.perf_counter()
        try:
            return writing(*args, **kwargs)  # type: ignore[arg-type]
        finally:
            report_s.append(time.perf_counter() - t)

    report.write_report = timed_report  # type: ignore[assignment]
    argv = ["dissect", "--model", str(weights), "--arch", "resnet18", "--input-size", str(size),
            "--resize", "stretch", "--mean", mean, "--std", std, "--device", "cpu",
            "--concepts", str(concepts_dir), "--layers", ",".join(LAYERS), "--rule", rule,
            "--out", str(out / "report"), *(["--batch-size", str(batch_size)] if batch_size else [])]
    t0 = time.perf_counter()
    code = main(argv)
    wall = time.perf_counter() - t0
    if code:
        raise SystemExit(f"convlens dissect failed (exit {code})")
    (entry,) = (out / "cache" / "dissection").iterdir()
    result = load_result(entry)
    for name, ld in result.layers.items():
        np.save(out / f"iou_{name}.npy", ld.iou)
        np.save(out / f"thr_{name}.npy", ld.thresholds)
        (out / f"labels_{name}.json").write_text(json.dumps(
            [s if i > 0 else "" for s, i in zip(ld.summary.label_name, ld.summary.iou, strict=True)]))
        (out / f"score_{name}.json").write_text(json.dumps(ld.summary.iou.tolist()))
    s = result.seconds
    dissection = float(s.get("total", wall))
    return {
        "wall": wall,
        "dissection": dissection,
        "report": sum(report_s),
        "other": wall - dissection - sum(report_s),
        "passes": float(result.passes),
        "tiles": float(sum(1 for _ in (out / "report" / "tiles").rglob("unit_*"))),
        "disk": _folder_bytes(out / "cache") + _folder_bytes(out / "report"),
        "disk cache": _folder_bytes(out / "cache"),
    }


def ndl_data(concepts_dir: Path) -> Path:
    """The concept folder as NetDissect-Lite reads it: the same files (linked), except that
    ``label.csv`` leaves out ConvLens's row for label 0 ("unlabelled", no category), which
    NetDissect-Lite's ``decode_label_dict`` cannot parse (it fills the missing row itself)."""
    view = concepts_dir.with_name(concepts_dir.name + "-ndl")
    view.mkdir(exist_ok=True)
    for f in concepts_dir.iterdir():
        link = view / f.name
        if f.name != "label.csv" and not link.exists():
            link.symlink_to(f.resolve())
    with open(concepts_dir / "label.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    with open(view / "label.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([rows[0], *(r for r in rows[1:] if r[0] != "0")])
    return view


def side_ndl(concepts_dir: Path, weights: Path, size: int, out: Path, ndl: Path, python: str,
             driver: Path) -> dict[str, float]:
    """NetDissect-Lite's own pipeline through its driver, in its own interpreter."""
    cmd = [python, str(driver), "--ndl", str(ndl), "--data", str(ndl_data(concepts_dir)), "--arch", "resnet18",
           "--state-dict", str(weights), "--layers", ",".join(LAYERS), "--img-size", str(size),
           "--out", str(out / "ndl")]
    t0 = time.perf_counter()
    with open(out / "ndl.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    timing = json.loads((out / "ndl" / "timing.json").read_text())
    for name in LAYERS:
        with open(out / "ndl" / f"tally_{name}.csv", newline="") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: int(r["unit"]))
        score = [float(r["score"]) for r in rows]
        (out / f"labels_{name}.json").write_text(json.dumps(
            [r["label"] if sc > 0 else "" for r, sc in zip(rows, score, strict=True)]))
        (out / f"score_{name}.json").write_text(json.dumps(score))
    return {
        "wall": wall,
        "dissection": float(timing["total_s"]),
        "report": 0.0,
        "disk": sum(f.stat().st_size for f in (out / "ndl").glob("*.mmap")),
        "peak_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "cpu": _cpu(resource.RUSAGE_CHILDREN),
    }


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


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


def side_reference(concepts_dir: Path, weights: Path, size: int, out: Path, mean: str, std: str,
                   q: float = 0.005) -> dict[str, float]:
    from engine.concepts import open_broden
    from engine.data.images import ImageLoader
    from engine.dissection.run import concept_image_set, dissection_preprocess

    t0 = time.perf_counter()
    _loaded, backend = _open(weights, size, mean, std)
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


def _run_side(side: str, a: argparse.Namespace, concepts: Path, weights: Path, out: Path) -> dict[str, float]:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--side", side, "--concepts", str(concepts), "--weights", str(weights),
           "--size", str(a.size), "--out", str(out), "--rule", a.rule,
           *(["--batch-size", str(a.batch_size)] if a.batch_size else [])]
    if side == "ndl":
        cmd += ["--ndl", a.ndl, "--ndl-python", a.ndl_python, "--ndl-driver", a.ndl_driver]
    subprocess.run(cmd, check=True)
    return json.loads((out / "times.json").read_text())


def _reference_labels(concepts: Path, out: Path) -> None:
    """The reference's labels and best IoUs, from its IoU matrices (as ConvLens summarises)."""
    from engine.concepts import open_broden
    from engine.dissection.labels import Labels
    from engine.dissection.result import summarize_layer

    labels = Labels.of(open_broden(concepts))
    for name in LAYERS:
        s = summarize_layer(np.load(out / f"iou_{name}.npy"), labels.names, labels.category_index,
                            labels.categories, 0.04)
        (out / f"labels_{name}.json").write_text(json.dumps(
            [n if i > 0 else "" for n, i in zip(s.label_name, s.iou, strict=True)]))
        (out / f"score_{name}.json").write_text(json.dumps(s.iou.tolist()))


def _agreement(a: Path, b: Path, name: str) -> tuple[int, int, float]:
    """Units of ``name`` with the same label (or none on both sides), their count, max |best IoU difference|."""
    la, lb = (json.loads((d / f"labels_{name}.json").read_text()) for d in (a, b))
    sa, sb = (np.asarray(json.loads((d / f"score_{name}.json").read_text())) for d in (a, b))
    return sum(x == y for x, y in zip(la, lb, strict=True)), len(la), float(np.abs(sa - sb).max())


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "convlens-bench-dissect"))
    p.add_argument("--ndl", default=os.environ.get("CONVLENS_NDL"), help="a patched NetDissect-Lite checkout")
    p.add_argument("--ndl-python", default=os.environ.get("CONVLENS_NDL_PYTHON"),
                   help="the Python of NetDissect-Lite's own venv")
    p.add_argument("--ndl-driver", default=os.environ.get("CONVLENS_NDL_DRIVER", str(DRIVER)))
    p.add_argument("--no-reference", action="store_true", help="skip the float64 numpy reference")
    p.add_argument("--rule", choices=["paper", "lite"], default="paper", help="ConvLens's --rule")
    p.add_argument("--batch-size", type=int, help="ConvLens's --batch-size (default: the command's; NetDissect-Lite uses 128)")
    p.add_argument("--side", choices=["convlens", "reference", "ndl"], help=argparse.SUPPRESS)
    p.add_argument("--concepts", help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        out, concepts, weights = Path(a.out), Path(a.concepts), Path(a.weights)
        if a.side == "convlens":
            times = side_convlens(concepts, weights, a.size, out, NDL_MEAN, NDL_STD, a.rule, a.batch_size)
        elif a.side == "reference":
            times = side_reference(concepts, weights, a.size, out, NDL_MEAN, NDL_STD)
            times["dissection"], times["report"] = times["wall"], 0.0
            _reference_labels(concepts, out)
        else:
            times = side_ndl(concepts, weights, a.size, out, Path(a.ndl), a.ndl_python, Path(a.ndl_driver))
        times.setdefault("peak_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        times.setdefault("cpu", _cpu(resource.RUSAGE_SELF))
        (out / "times.json").write_text(json.dumps(times))
        return
    have_ndl = bool(a.ndl and a.ndl_python)
    if not have_ndl:
        print("NetDissect-Lite not given (--ndl DIR --ndl-python PY): ConvLens vs the float64 reference only")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    concepts, weights = _setup(work, a.images, a.size)
    load_before = _load()
    sides = ["convlens", *(["ndl"] if have_ndl else []), *([] if a.no_reference else ["reference"])]
    runs = {}
    for side in sides:
        out = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=work))
        runs[side] = (_run_side(side, a, concepts, weights, out), out)
    load_after = _load()
    batch = f", batch {a.batch_size}" if a.batch_size else ""
    names = {"convlens": f"ConvLens dissect ({a.rule}{batch})", "ndl": "NetDissect-Lite", "reference": "reference (f64)"}
    mb = 1e6
    print(f"\nResNet-18 (random weights, seed 0) {', '.join(LAYERS)}, {a.images} concept images at {a.size} px; "
          f"{os.cpu_count()} CPU cores, load average (1, 5, 15 min) {load_before} before, {load_after} after\n")
    cols = [names[s] for s in sides]
    anchor = "ndl" if have_ndl else ("reference" if "reference" in runs else None)
    width = max(len(c) for c in cols) + 2
    print(f"{'':<34}" + "".join(f"{c:>{width}}" for c in cols)
          + (f"{'ConvLens / ' + names[anchor]:>{width + 12}}" if anchor else ""))

    def row(label: str, key: str, scale: float = 1.0, fmt: str = "{:.1f}", ratio: bool = True) -> None:
        vals = [runs[s][0].get(key) for s in sides]
        cells = "".join(f"{(fmt.format(v / scale) if v is not None else '-'):>{width}}" for v in vals)
        r = ""
        if anchor and ratio and runs[anchor][0].get(key):
            r = f"{runs['convlens'][0][key] / runs[anchor][0][key]:>{width + 12}.3g}x"
        print(f"{label:<34}{cells}{r}")

    row("wall s (dissection + report)", "wall")
    row("  dissection s", "dissection")
    row("  report s", "report", ratio=False)
    row("  start-up, model, checks s", "other", ratio=False)
    row("CPU s (user + system)", "cpu")
    row("disk MB (memmaps | cache+report)", "disk", mb, "{:.2f}")
    row("peak RSS MB", "peak_rss", mb, "{:.0f}")
    c = runs["convlens"][0]
    print(f"\nConvLens: {int(c['passes'])} forward pass{'es' if c['passes'] > 1 else ''}, {int(c['tiles'])} tiles drawn, "
          f"cache {c['disk cache'] / mb:.2f} MB")
    for other in sides[1:]:
        for name in LAYERS:
            same, total, diff = _agreement(runs["convlens"][1], runs[other][1], name)
            print(f"labels {name} vs {names[other]}: {same}/{total} equal, max |best IoU difference| {diff:.4f}")
    if have_ndl:
        n = runs["ndl"][0]
        print(f"\ntargets: wall {c['wall'] / n['wall']:.2f}x NetDissect-Lite's (target <= 0.5x), "
              f"cache + report {c['disk'] / n['disk']:.3f}x its memmaps (target <= 0.2x)")


if __name__ == "__main__":
    main()
