"""``convlens evidence``: class evidence maps, the causal check and deletion / insertion curves.

    convlens evidence --model M [model options] --images DIR --method gradcam|occlusion|ig|saliency|guided_backprop
                      [--layer L] [--class C] --out OUT
    convlens evidence --demo --method gradcam --out OUT          # the demo model and images

Writes into OUT: ``maps.npy`` (float32 (N, H, W), rows in the order of ``images.csv``),
``overlays/NNNN_<name>.png`` (the map over the image, blobs outlined: green causal, red
non-causal), ``images.csv`` / ``images.json`` (per image: class explained, its probability,
deletion and insertion AUC, Average Drop and Increase, blobs), ``causal.csv`` / ``causal.json``
(per blob: area, share of the evidence, probability with it masked, drop, causal or not),
``summary.json`` (the means, per class too) and ``curves.png``. Exit codes: 0 success, 1 a
problem with the input (the message names it).
"""

from __future__ import annotations

import argparse
import csv
import io
import re
from pathlib import Path
from typing import Any

FILES = ("maps.npy", "images.csv", "images.json", "causal.csv", "causal.json", "summary.json", "curves.png")


def register(subparsers: Any) -> None:
    from engine import cli_common as c

    help_ = ("class evidence (Grad-CAM, occlusion, integrated gradients, saliency): maps and overlays, the causal "
             "check of the map's blobs, deletion / insertion curves with AUC and Average Drop / Increase")
    sp = subparsers.add_parser("evidence", help=help_, description=help_)
    sp.set_defaults(func=cmd_evidence, names_skipped=True)
    c.add_model_options(sp, required=False)
    sp.add_argument("--demo", action="store_true",
                    help="the demo: RNet and its 200 face / non-face crops (for --model and --images when not given)")
    sp.add_argument("--images", help="image folder or CSV")
    sp.add_argument("--method", default="gradcam",
                    choices=["gradcam", "occlusion", "ig", "saliency", "guided_backprop"],
                    help="gradcam (torch, at --layer), occlusion (any backend, ONNX too), ig, saliency, "
                         "guided_backprop (torch); default gradcam")
    sp.add_argument("--layer", help="Grad-CAM's layer (default: the last layer with a spatial output)")
    sp.add_argument("--class", dest="target", help="the class to explain, index or name (default: the predicted one)")
    sp.add_argument("--out", required=True, help="output folder")
    g = sp.add_argument_group("method")
    g.add_argument("--window", type=c.int_range(1), help="occlusion patch size in pixels (default: 1/8 of the side)")
    g.add_argument("--stride", type=c.int_range(1), help="occlusion stride, at most the window (default: the largest up to half the window "
                        "that tiles the input)")
    g.add_argument("--ig-steps", type=c.int_range(1, 4096), default=32, help="integrated-gradients steps (default 32)")
    g.add_argument("--baseline", choices=["zero", "black", "mean", "blur"], default="zero",
                   help="what occlusion and IG replace the image with (default zero: the model input 0)")
    g = sp.add_argument_group("checks")
    g.add_argument("--top", type=c.float_range(0, 1, low_open=True, high_open=False), default=0.2,
                   help="the causal check's top region: this fraction of the pixels (default 0.2)")
    g.add_argument("--threshold", type=c.float_range(0, 1, low_open=False, high_open=False), default=0.05,
                   help="a blob is causal when masking it lowers the class probability this much (default 0.05)")
    g.add_argument("--mask", choices=["mean", "blur", "zero", "black"], default="mean",
                   help="what a masked blob becomes (default: the image's mean colour)")
    g.add_argument("--max-blobs", type=c.int_range(1, 100), default=8, help="blobs per image (default 8)")
    g.add_argument("--steps", type=c.int_range(1, 10_000), default=50, help="deletion / insertion steps (default 50)")
    g.add_argument("--blur", choices=["rise", "relative"], default="rise",
                   help="the insertion (and --mask / --baseline blur) baseline: RISE's 11x11 kernel (gkern(11, 5), default) or a "
                        "Gaussian of sigma 1/8 of the shorter side")
    g.add_argument("--blur-sigma", type=c.positive_float,
                   help="instead, a Gaussian blur of this sigma, pixels")
    sp.add_argument("--overlays", type=c.int_range(0), default=64, help="overlay PNGs for the first N images (default 64)")
    sp.add_argument("--batch-size", type=c.int_range(1, 4096), default=32, help="images per batch (default 32)")


def _target(value: str | None, classes: tuple[str, ...]) -> int | None:
    from engine.types import ConvLensError

    if value is None:
        return None
    if value in classes:
        return classes.index(value)
    if value.strip().isascii() and value.strip().isdigit():
        k = int(value.strip())
        if k < len(classes):
            return k
        raise ConvLensError(f"--class {value}: the classifier has {len(classes)} classes (0 to {len(classes) - 1})")
    shown = ", ".join(classes[:8]) + (" ..." if len(classes) > 8 else "")
    raise ConvLensError(f"--class {value!r}: not a class index or name (classes: {shown})")


def cmd_evidence(a: argparse.Namespace) -> int:
    import numpy as np

    from engine import cli_common as c
    from engine.data.images import open_image_set
    from engine.evidence.figure import write_curves, write_overlay
    from engine.evidence.run import EvidenceParams, run
    from engine.predict import class_names
    from engine.types import ConvLensError

    if a.demo:
        from engine.demo import prepare_demo

        spec_demo, demo_images = prepare_demo()
        if a.model is None:
            a.model = spec_demo.path
        if a.images is None:
            a.images = str(demo_images)
    if a.model is None or a.images is None:
        raise ConvLensError("give --model and --images (or --demo for the demo model and images)")
    out = c.check_out_dir(a.out, FILES)
    spec = c.spec_from_args(a)
    images = open_image_set(a.images)
    opened = c.open_model(spec, a)
    backend = opened.backend
    try:
        k = backend.classifier_output(backend.forward(backend.dummy_batch(1))).shape[1]
        classes = class_names(opened.spec, k)
        params = EvidenceParams(method=a.method, layer=a.layer, target=_target(a.target, classes), window=a.window,
                                stride=a.stride, ig_steps=a.ig_steps, method_baseline=a.baseline, top_fraction=a.top,
                                threshold=a.threshold, mask_baseline=a.mask, max_blobs=a.max_blobs, steps=a.steps,
                                blur=a.blur, blur_sigma=a.blur_sigma, batch_size=a.batch_size)
        result = c.run_job(run(backend, opened.loaded.cache_id, images, params), "evidence", quiet=a.quiet)
    finally:
        backend.close()
    c.report_skipped([{"path": p, "reason": why} for p, why in result.skipped], out / "summary.json")
    if not result.n:
        raise ConvLensError(f"{a.images}: no image could be read")
    with c.writing(out / "maps.npy"):
        from engine.cache import atomic_write_bytes

        buf = io.BytesIO()
        np.save(buf, result.maps, allow_pickle=False)
        atomic_write_bytes(out / "maps.npy", buf.getvalue())
    rows = result.image_rows()
    names = [_overlay_name(i, p) for i, p in enumerate(result.paths)]
    for i, r in enumerate(rows):
        r["map_row"] = i
        r["overlay"] = f"overlays/{names[i]}" if i < a.overlays else ""
    blobs = result.blob_rows()
    c.write_text_output(out / "images.csv", _csv(rows))
    c.write_json_output(out / "images.json", rows)
    c.write_text_output(out / "causal.csv", _csv(blobs, ["image", "class", "blob", "area", "mass", "row", "col",
                                                         "probability", "probability_masked", "drop", "causal"]))
    c.write_json_output(out / "causal.json", blobs)
    summary = {**result.summary(), "images_source": a.images, "skipped_files": [list(s) for s in result.skipped],
               "from_cache": result.from_cache}
    c.write_json_output(out / "summary.json", summary)
    with c.writing(out / "curves.png"):
        write_curves(result, out / "curves.png")
    if a.overlays:
        (out / "overlays").mkdir(exist_ok=True)
        with c.writing(out / "overlays"):
            for i in range(min(a.overlays, result.n)):
                write_overlay(result, i, out / "overlays" / names[i])
    print(table(result))
    c.say(a, f"wrote {c.shown(out)}: maps.npy, images.csv/json, causal.csv/json, summary.json, curves.png"
             + (f", {min(a.overlays, result.n)} overlays" if a.overlays else ""))
    return 0


def _overlay_name(i: int, path: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(path).stem)[:60] or "image"
    return f"{i:04d}_{stem}.png"


def _csv(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    cols = columns or (list(rows[0]) if rows else ["image"])
    w = csv.writer(buf)
    w.writerow(cols)
    for r in rows:
        w.writerow([f"{r[k]:.6g}" if isinstance(r[k], float) else str(r[k]).lower() if isinstance(r[k], bool) else r[k]
                    for k in cols])
    return buf.getvalue()


def table(result: Any) -> str:
    """The printed table: per explained class and over all, the AUCs, Average Drop / Increase
    and the causal blobs."""
    s = result.summary()
    head = (f"{result.n} images, {result.params.method}" + (f" at {result.layer}" if result.layer else "")
            + f", probabilities from {s['score_kind']}")
    lines = [head, f"{'class':<16}{'images':>7}{'deletion':>10}{'insertion':>10}{'avg drop %':>11}{'avg inc %':>10}"
             f"{'blobs':>7}{'causal':>7}"]

    def row(name: str, b: dict[str, Any]) -> str:
        return (f"{name[:15]:<16}{b['images']:>7}{b['deletion_auc']:>10.3f}{b['insertion_auc']:>10.3f}"
                f"{b['average_drop']:>11.1f}{b['average_increase']:>10.1f}{b['blobs']:>7}{b['causal_blobs']:>7}")

    for name, b in s["per_class"].items():
        lines.append(row(name, b))
    lines.append(row("all", s))
    return "\n".join(lines)
