"""Network Dissection over a Broden-sized concept set: is memory bounded in the number of images?

    .venv/bin/python bench/broden_scale.py [--images 4000,63305,16000] [--size 32] [--work DIR]
        [--layers conv2,conv3]

Broden (broden1_224) has 63,305 images. This writes once, into ``--work`` (default
``/tmp/convlens-broden-scale``), a look-alike of its exact layout with as many images
(:func:`engine.concepts.broden_lookalike.write_broden_lookalike`: Broden's header, file naming,
multi-plane parts, image-level scenes and textures, sparse label numbers) but small images
(``--size`` px, masks half that) and a few hundred concepts (Broden's per-category counts x 0.3).
Then, for each image count N (the first N rows, ``open_broden(limit=N)``), a fresh subprocess
(so that ``ru_maxrss`` is its own) opens the set and runs :func:`engine.dissection.dissect` (the
public API, an empty cache folder) with the demo's RNet (real pretrained weights, layers
``--layers``, default conv2 and conv3) on the CPU, and reports:

- RSS after the imports, after ``open_broden`` (the index in memory) and the peak over the run;
- the dissection's wall time and the passes it made;
- the per-layer state that grows with N by design (the exact top-quantile buffers of
  :class:`engine.dissection.quantile.TopQuantile`, ``K * m * 4`` bytes with ``m = q * N * h * w``,
  which switch to a fixed-size histogram above 256 MiB per layer) and the pass-1 activations
  kept for pass 2 (only when they fit in 512 MiB).

"Bounded" means: peak RSS minus those two terms ("rest") is flat in N apart from what is O(N)
by nature (the index, the image records, the per-file digests: under 1 KB per image), printed
as bytes per image between the smallest and the largest count. (RSS after ``open_broden`` minus
RSS after the imports understates the index: it reuses heap pages freed while loading the model.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LAYERS = ("conv2", "conv3")


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _dataset(work: Path, n: int, size: int) -> Path:
    from engine.concepts.broden_lookalike import default_concepts, write_broden_lookalike

    root = work / f"broden-{n}-{size}"
    if not (root / "index.csv").is_file():
        t = time.perf_counter()
        print(f"writing a {n}-image Broden look-alike ({size} px) to {root} (once)...", flush=True)
        info = write_broden_lookalike(root, n_images=n, image_size=size,
                                      concepts=default_concepts(0.3), seed=0,
                                      progress=lambda d, m: print(f"  {d}/{m}", flush=True)
                                      if d % 10000 == 0 else None)
        print(f"  {len(info.labels)} labels, {time.perf_counter() - t:.0f} s", flush=True)
    return root


def _quantile_bytes(units: int, total: int, q: float, max_bytes: int = 256 * 2**20) -> tuple[int, bool]:
    """TopQuantile's kept state for ``total`` values per unit: (bytes, exact)."""
    h = (total - 1) * (1.0 - q)
    lo = total - 1 if h >= total - 1 else math.floor(h)
    m = min(total, max(math.floor(q * (total - 1)) + 2, total - lo))
    if units * m * 4 <= max_bytes:
        return units * m * 4, True
    return (max_bytes // (16 * units)) * 16 * units, False


def child(root: str, n: int, layers: tuple[str, ...]) -> None:
    """One measurement (run in its own process): prints one JSON line."""
    import numpy as np
    import torch

    from engine.backends import open_backend
    from engine.cache import Cache
    from engine.concepts import open_broden
    from engine.demo import prepare_demo
    from engine.dissection import DissectionParams, dissect
    from engine.jobs import run_sync
    from engine.models import load_model

    work = Path(root).parent
    spec, _ = prepare_demo(work / "demo")
    loaded = load_model(spec.with_(device="cpu"))
    backend = open_backend(loaded)
    info = {li.name: li for li in backend.layers()}
    torch.set_grad_enabled(False)
    rss_import = _current_rss_mib()
    t = time.perf_counter()
    concepts = open_broden(root, limit=n)
    open_s = time.perf_counter() - t
    rss_open = _current_rss_mib()
    params = DissectionParams()
    with tempfile.TemporaryDirectory(dir=work) as cache_dir:
        t = time.perf_counter()
        result = run_sync(dissect(backend, loaded.cache_id, concepts, list(layers), params,
                                  cache=Cache(cache_dir)))
        wall = time.perf_counter() - t
    quantile = {}
    kept = 0
    for name in layers:
        k, h, w = info[name].shape
        quantile[name] = _quantile_bytes(k, len(concepts) * h * w, params.quantile)
        kept += 4 * len(concepts) * k * h * w
    detectors = {name: int(np.sum(result.layers[name].summary.is_detector)) for name in layers}
    print(json.dumps({
        "n": len(concepts), "concepts": len(concepts.concepts), "open_s": open_s, "wall_s": wall,
        "rss_import": rss_import, "rss_open": rss_open, "rss_peak": _rss_mib(),
        "quantile_bytes": sum(b for b, _ in quantile.values()),
        "quantile_exact": all(e for _, e in quantile.values()),
        "kept_bytes": kept if kept <= 512 * 2**20 else 0,
        "forward2": "forward" in result.seconds and result.seconds.get("pass2", 0) > 0
                    and kept > 512 * 2**20,
        "seconds": {k: round(v, 1) for k, v in result.seconds.items()
                    if k in ("load", "forward", "quantile", "top_images", "labels", "masks", "tally",
                             "pass1", "pass2", "total")},
        "detectors": detectors, "skipped": len(result.skipped),
    }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", default="4000,63305,16000",
                    help="image counts to dissect, in this order (the largest is the size of the set written)")
    ap.add_argument("--layers", default=",".join(LAYERS))
    ap.add_argument("--set-images", type=int, default=None,
                    help="images of the look-alike to write or reuse (default: the largest count)")
    ap.add_argument("--size", type=int, default=32, help="image side in px (masks are half)")
    ap.add_argument("--work", default="/tmp/convlens-broden-scale")
    ap.add_argument("--child", nargs=2, metavar=("ROOT", "N"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    layers = tuple(a.layers.split(","))
    if a.child:
        child(a.child[0], int(a.child[1]), layers)
        return
    counts = [int(x) for x in a.images.split(",")]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    root = _dataset(work, max(*counts, a.set_images or 0), a.size)
    rows = []
    for n in counts:
        print(f"dissecting {n} images ...", flush=True)
        out = subprocess.run([sys.executable, __file__, "--child", str(root), str(n),
                              "--layers", ",".join(layers)],
                             capture_output=True, text=True, check=False)
        if out.returncode:
            sys.exit(f"child for N={n} failed:\n{out.stderr[-4000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print("  " + json.dumps(rows[-1]), flush=True)
    mib = 2**20
    rows.sort(key=lambda r: r["n"])
    print(f"\nDissection of RNet {','.join(layers)} (CPU) over a Broden look-alike "
          f"({a.size} px images, {a.size // 2} px masks, {rows[-1]['concepts']} concepts)\n")
    print("| images | open_broden s | RSS after open - import MiB | dissect s | passes | peak RSS MiB | "
          "quantile state MiB | kept acts MiB | rest = peak - import - quantile - kept MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rest = {}
    for r in rows:
        index = r["rss_open"] - r["rss_import"]
        rest[r["n"]] = r["rss_peak"] - r["rss_import"] - r["quantile_bytes"] / mib - r["kept_bytes"] / mib
        passes = "2 (model run twice)" if r["forward2"] else "2 (acts kept)"
        print(f"| {r['n']} | {r['open_s']:.1f} | {index:.0f} | "
              f"{r['wall_s']:.0f} | {passes} | {r['rss_peak']:.0f} | "
              f"{r['quantile_bytes'] / mib:.1f}{'' if r['quantile_exact'] else ' (hist)'} | "
              f"{r['kept_bytes'] / mib:.0f} | {rest[r['n']]:.0f} |")
    lo, hi = rows[0]["n"], rows[-1]["n"]
    if hi > lo:
        print(f"\n'rest' grows by {(rest[hi] - rest[lo]) * mib / (hi - lo):.0f} bytes per image from {lo} to {hi} "
              "images (the index, the image records, per-file digests)")
    print("\nphase seconds:", {r["n"]: r["seconds"] for r in rows})
    print("quantile seconds per image:", {r["n"]: round(r["seconds"].get("quantile", 0.0) / r["n"] * 1e3, 2)
                                          for r in rows}, "ms (flat if TopQuantile's merge is linear in N)")


if __name__ == "__main__":
    main()
