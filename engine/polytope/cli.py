"""``convlens polytope``: the polytope neighbour gallery (Representative Interpretations, Lam, Chu
et al., ICCV 2021) from the command line.

    convlens polytope --model M [model options] --images DIR [--layer L] --out OUT
                      [--image PATH] [--candidates N] [--delta D] [--seed S] [--sanity]

With ``--image`` (one file of the set): ``OUT/polytope.json`` (P(x), coverage, certificate
error, the ranked neighbours with distances and predicted classes, the local affine map's
summary), ``OUT/gallery.png`` and ``OUT/local_map.npz`` (``A``, ``c``, ``W``, ``b`` of the image's
linear region: ``logits = A psi + c``, hidden boundaries ``W psi + b = 0``; written when at most
16M numbers).
Without it: ``OUT/metrics.json`` (precision and coverage of the gallery and of the baselines,
the certificate maximum, timings) and ``OUT/images.csv`` (one row per image); the metric table
is printed. Exit codes: 0 success, 1 a problem with the input (the message names it).
"""

from __future__ import annotations

import argparse
from typing import Any

#: the files the command writes into OUT
IMAGE_FILES = ("polytope.json", "gallery.png", "local_map.npz")
SET_FILES = ("metrics.json", "images.csv")


def _common() -> Any:
    """The shared CLI helpers (``engine.cli_common`` when present, else ``engine.cli``)."""
    import importlib

    try:
        return importlib.import_module("engine.cli_common")
    except ImportError:  # pragma: no cover - before the command registry
        return importlib.import_module("engine.cli")


def register(subparsers: Any) -> None:
    """Add the ``polytope`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    c = _common()
    help_ = ("polytope neighbour gallery (Representative Interpretations): certified linear boundaries of the "
             "head, SCSC greedy, ranked neighbours and baselines; writes JSON (and a figure) into OUT")
    sp = subparsers.add_parser("polytope", help=help_, description=help_)
    sp.set_defaults(func=cmd_polytope, names_skipped=True)
    c.add_model_options(sp)
    sp.add_argument("--images", required=True, help="image folder or CSV: the reference set R")
    sp.add_argument("--layer", help="layer to split at (default: the last convolution's output)")
    sp.add_argument("--out", required=True, help="output folder")
    sp.add_argument("--image", help="one image of the set: write its gallery (JSON + figure) instead of the metrics")
    sp.add_argument("--candidates", type=c.int_range(1, 100_000), default=50,
                    help="|Q|, candidate boundaries sampled from the set (default 50, as in the paper)")
    sp.add_argument("--delta", type=c.int_range(0), default=None,
                    help="different-class images a gallery may hold (default: the smallest feasible value)")
    sp.add_argument("--seed", type=c.int_range(0), default=0, help="sampling seed (default 0)")
    sp.add_argument("--no-decision", action="store_true", help="sample hidden-unit boundaries only")
    sp.add_argument("--sanity", action="store_true", help="also run the randomised-head sanity check")
    sp.add_argument("--top", type=c.int_range(1, 10_000), default=16,
                    help="neighbours shown in the figure (the JSON lists all; default 16)")
    sp.add_argument("--batch-size", type=c.int_range(1, 4096), default=32, help="images per batch (default 32)")


def cmd_polytope(a: argparse.Namespace) -> int:
    """Run ``convlens polytope``; a ConvLensError becomes ``convlens: error: ...`` (exit 1)."""
    import csv
    import io

    from engine.data.images import open_image_set
    from engine.polytope.figure import gallery_figure
    from engine.polytope.run import PolytopeParams, run
    from engine.types import ConvLensError

    c = _common()
    out = c.check_out_dir(a.out, IMAGE_FILES if a.image else SET_FILES)
    params = PolytopeParams(layer=a.layer, candidates=a.candidates, delta=a.delta, seed=a.seed,
                            decision=not a.no_decision, sanity=a.sanity, batch_size=a.batch_size)
    params.check()
    spec = c.spec_from_args(a)
    images = open_image_set(a.images)
    loaded, backend = c.open_model(spec)
    try:
        quiet = bool(getattr(a, "quiet", False))
        result = c.run_job(run(backend, loaded.cache_id, images, params), "polytope", quiet=quiet)
        local = None
        if a.image:
            j = result.index_of(a.image)
            local = _local_map(backend, images, result, j, out)
    finally:
        backend.close()
    if result.skipped:
        c.report_skipped([{"path": p, "cause": why} for p, why in result.skipped])
    if result.head.get("affine"):
        sug = result.head.get("suggested_layers") or []
        c.warn(result.head["note"] + (f" (e.g. --layer {', '.join(sug)})" if sug else ""))
    if a.image:
        data = {**result.image_summary(j), "layer": result.layer, "head": result.head,
                "candidates": len(result.q_kind), "params": result.params.result_key(), "local_map": local}
        c.write_json_output(out / "polytope.json", data)
        with c.writing(out / "gallery.png"):
            gallery_figure(result, j, out / "gallery.png", top=a.top)
        prec = "n/a" if data["precision"] is None else f"{data['precision']:.3f}"
        _say(a, f"{result.paths[j]}: {data['n_boundaries']} boundaries, {data['covered']} covered "
                f"({data['covered_different_class']} other-class), precision {prec}, certificate "
                f"{data['certificate_error']:.2e}; wrote {c.shown(out / 'polytope.json')} and "
                f"{c.shown(out / 'gallery.png')}")
        return 0
    c.write_json_output(out / "metrics.json", result.summary())
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["image", "predicted", "certificate_error", "region_id", "boundaries", "delta", "covered",
                "covered_same_class", "covered_different_class", "precision", "coverage"])
    for j in range(result.n):
        s = result.image_summary(j, top=0)
        w.writerow([s["image"], s["predicted"], f"{s['certificate_error']:.3e}", s["region_id"], s["n_boundaries"],
                    s["delta"], s["covered"], s["covered_same_class"], s["covered_different_class"],
                    "" if s["precision"] is None else f"{s['precision']:.4f}",
                    "" if s["coverage"] is None else f"{s['coverage']:.4f}"])
    c.write_text_output(out / "images.csv", buf.getvalue())
    if not result.n:
        raise ConvLensError(f"{a.images}: no image could be read")
    print(metric_table(result))
    _say(a, f"wrote {c.shown(out / 'metrics.json')} and {c.shown(out / 'images.csv')}")
    return 0


def _local_map(backend: Any, images: Any, result: Any, j: int, out: Any) -> dict[str, Any]:
    """The full local affine map of image ``j`` (summary for the JSON; ``local_map.npz`` with A,
    c, W, b when it is at most 16M numbers)."""
    import io

    import numpy as np
    import torch

    from engine.cache import atomic_write_bytes
    from engine.data.images import ImageLoader
    from engine.polytope.head import local_affine_map
    from engine.polytope.run import split_checked
    from engine.types import ConvLensError

    sp, prog = split_checked(backend, result.layer)
    rec = int(result.record_indices[j])
    batch = next(iter(ImageLoader(images, backend.spec.preprocess, batch_size=1, indices=[rec])), None)
    if batch is None:
        raise ConvLensError(f"{images.records[rec].path}: the image could not be read again")
    with torch.no_grad():
        psi = sp.psi(backend.to_tensor(batch.array))
    summary: dict[str, Any] = {"psi_shape": list(psi.shape[1:])}
    try:
        lm = local_affine_map(prog, psi, max_elements=2**24)
    except ConvLensError as e:
        summary["note"] = str(e)
        return summary
    summary.update({"certificate_error": lm.certificate, "A_shape": list(lm.a.shape), "c": lm.c.tolist(),
                    "hidden_boundaries": len(lm.units), "units_on_identity_piece": lm.pattern,
                    "file": "local_map.npz"})
    buf = io.BytesIO()
    np.savez(buf, A=lm.a.cpu().numpy(), c=lm.c.cpu().numpy(), W=lm.w.cpu().numpy(), b=lm.b.cpu().numpy())
    atomic_write_bytes(out / "local_map.npz", buf.getvalue())
    return summary


def _say(a: argparse.Namespace, msg: str) -> None:
    import sys

    if not getattr(a, "quiet", False):
        print(msg, file=sys.stderr)


def metric_table(result: Any) -> str:
    """The metric table: precision and coverage of the gallery and the baselines."""
    m = result.baselines

    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"{result.n} images, layer {result.layer}, |Q| = {len(result.q_kind)}, mean |P(x)| = "
             f"{f(m.get('mean_boundaries'))}, certificate max {result.certificate.max():.2e} "
             f"(float32 model vs float64 head: {result.float32_gap.max():.2e})",
             f"{'method':<16}{'precision':>10}{'coverage':>10}{'mean size':>11}"]
    for name in ("gallery", "knn_euclidean", "knn_cosine", "exact_region"):
        r = m[name]
        lines.append(f"{name:<16}{f(r['precision']):>10}{f(r['coverage']):>10}{f(r['mean_size']):>11}")
    if result.sanity:
        lines.append(f"sanity (head randomised): mean Jaccard of galleries {result.sanity['mean_jaccard']:.3f}")
    return "\n".join(lines)
