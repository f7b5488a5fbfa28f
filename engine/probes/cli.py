"""``convlens probe``: the transformation probe (Worrall et al., ICCV 2017) from the command line.

    convlens probe --model M [model options] --images DIR|CSV|FILE --transform rotate|translate-x|
                   translate-y|scale|brightness --range -45:45:5 [--fill reflect] [--layers L1,L2]
                   [--features pooled|flat] [--ridge 1e-3] [--affine] --out OUT

Writes into OUT: ``summary.json`` (everything below, with the settings), ``invariance.csv`` (per
layer and value: mean and spread of the normalised feature distance, the linear map's train and
held-out errors, the identity map's error, the share of predictions kept), ``composition.csv``
(per layer and pair a, b with T_a T_b = T_k: the relative Frobenius error of M_a M_b vs M_k, the
composed map's and M_k's held-out errors), ``predictions.csv`` (per image and value: the class,
its probability, the probability of the untransformed image's class), ``responses.csv`` (per
layer, unit and value: the mean spatially averaged activation), and the figures
``invariance.png``, ``responses.png`` and ``sweep.png`` (one image along the sweep: ``--image``,
default the first). Prints the table of invariance, linear-map error and composition error per
layer. Exit codes: 0 success, 1 a problem with the input (the message names it).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import re
from typing import Any

FILES = ("summary.json", "invariance.csv", "composition.csv", "predictions.csv", "responses.csv", "invariance.png",
         "responses.png", "sweep.png")


def register(subparsers: Any) -> None:
    """Add the ``probe`` command to ``subparsers``."""
    from engine import cli_common as c
    from engine.probes.transforms import DEFAULT_RANGES, FILLS, TRANSFORMS

    help_ = ("transformation probe: sweep a rotation, translation, scale or brightness change over images; per layer "
             "the features' invariance, unit response curves, predictions and the best linear map M_theta with its "
             "held-out error and composition; writes CSV, JSON and figures into OUT")
    sp = subparsers.add_parser("probe", help=help_, description=help_)
    sp.set_defaults(func=cmd_probe, names_skipped=True)
    # "--range -45:45:5" as written in the docs: argparse reads an argument starting with "-" as an
    # option unless it looks like a negative number; ranges and lists of negative numbers count too
    sp._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.]+[:,][-\d.:,]*$")
    c.add_model_options(sp)
    sp.add_argument("--images", required=True, help="image folder, CSV, or one image file")
    sp.add_argument("--transform", choices=TRANSFORMS, default="rotate", help="the transformation (default rotate)")
    sp.add_argument("--range", dest="values",
                    help="start:stop:step or a comma-separated list; degrees for rotate, model-input pixels for "
                         "translate, factors for scale, fractions of full range for brightness (defaults: "
                         + ", ".join(f"{k} {v}" for k, v in DEFAULT_RANGES.items()) + ")")
    sp.add_argument("--fill", choices=FILLS, default="reflect",
                    help="pixels brought in by rotate/translate/scale (default reflect: mirrored at the border)")
    sp.add_argument("--layers", help="comma-separated layers (default: the model's default spatial layers)")
    sp.add_argument("--features", choices=["pooled", "flat"], default="pooled",
                    help="features of the linear maps: pooled (spatial mean per unit, default) or flat (the whole map, "
                         "randomly projected to --projection dimensions when larger)")
    sp.add_argument("--projection", type=c.int_range(1, 8192), default=256,
                    help="largest flat feature dimension kept (default 256)")
    sp.add_argument("--ridge", type=c.float_range(0.0, 1e6, low_open=False, high_open=False), default=1e-3,
                    help="ridge penalty, relative to the mean eigenvalue of X^T X (default 1e-3)")
    sp.add_argument("--affine", action="store_true", help="fit affine maps (a constant feature appended)")
    sp.add_argument("--train-fraction", type=c.float_range(0.0, 1.0, low_open=True, high_open=True), default=0.7,
                    help="share of the images the maps are fitted on; the rest tests them (default 0.7)")
    sp.add_argument("--seed", type=c.int_range(0), default=0, help="split, projection and subset seed (default 0)")
    sp.add_argument("--max-images", type=c.int_range(1), default=None, help="a seeded subset of at most N images")
    sp.add_argument("--image", help="the image of the sweep strip (default: the first)")
    sp.add_argument("--top", type=c.int_range(1, 10), default=5, help="units per layer in responses.png (default 5)")
    sp.add_argument("--batch-size", type=c.int_range(1, 4096), default=128, help="model inputs per forward (default 128)")
    sp.add_argument("--out", required=True, help="output folder")


def cmd_probe(a: argparse.Namespace) -> int:
    """Run ``convlens probe``; a ConvLensError becomes ``convlens: error: ...`` (exit 1)."""
    import os

    from engine import cli_common as c
    from engine.data.images import load_image, open_image_set
    from engine.probes.figure import invariance_figure, responses_figure, strip_figure
    from engine.probes.run import ProbeParams, run, single_image_set, sweep_views
    from engine.probes.transforms import DEFAULT_RANGES, parse_range
    from engine.types import ConvLensError

    out = c.check_out_dir(a.out, FILES)
    values = parse_range(a.values if a.values is not None else DEFAULT_RANGES[a.transform])
    spec = c.spec_from_args(a)
    layers = tuple(c.parse_layers(a.layers, spec, None)) if a.layers is not None else ()
    params = ProbeParams(transform=a.transform, values=values, fill=a.fill, layers=layers, features=a.features,
                         projection=a.projection, ridge=a.ridge, affine=a.affine, train_fraction=a.train_fraction,
                         seed=a.seed, max_images=a.max_images, batch_size=a.batch_size)
    params.check()
    images = single_image_set(a.images) if os.path.isfile(a.images) and not a.images.lower().endswith(".csv") \
        else open_image_set(a.images)
    opened = c.open_model(spec, a)
    backend = opened.backend
    try:
        result = c.run_job(run(backend, opened.loaded.cache_id, images, params), "probe",
                           quiet=bool(getattr(a, "quiet", False)))
    finally:
        backend.close()
    skipped = [{"path": str(p), "reason": str(why)} for p, why in result.skipped]
    c.report_skipped(skipped)
    j = 0
    if a.image:
        want = os.path.abspath(a.image)
        hits = [k for k, p in enumerate(result.paths) if os.path.abspath(os.path.join(result.image_source, p)) == want
                or p == a.image]
        if not hits:
            raise ConvLensError(f"{a.image}: not among the {result.n} images probed (give one of the files of --images; "
                                "--max-images probes a seeded subset)")
        j = hits[0]
    c.write_json_output(out / "summary.json", result.summary())
    c.write_text_output(out / "invariance.csv", invariance_csv(result))
    c.write_text_output(out / "composition.csv", composition_csv(result))
    c.write_text_output(out / "predictions.csv", predictions_csv(result))
    c.write_text_output(out / "responses.csv", responses_csv(result))
    views = sweep_views(load_image(os.path.join(result.image_source, result.paths[j])), result.transform,
                        list(result.values), result.params.fill, opened.spec.preprocess)
    with c.writing(out):
        invariance_figure(result, out / "invariance.png")
        responses_figure(result, out / "responses.png", top=a.top)
        strip_figure(result, views, j, out / "sweep.png")
    print(table(result))
    c.say(a, f"wrote {len(FILES)} files into {c.shown(out)}")
    return 0


def _rows(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _f(v: Any) -> str:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return ""
    return f"{x:.6g}" if math.isfinite(x) else ""


def invariance_csv(result: Any) -> str:
    inv, sd, agree = result.invariance(), result.invariance_std(), result.agreement()
    rows = []
    for li, name in enumerate(result.layers):
        for t, v in enumerate(result.values):
            lin = [result.lin_train[li, t], result.lin_test[li, t], result.lin_identity[li, t]] \
                if result.lin_test is not None else ["", "", ""]
            rows.append([name, _f(v), _f(inv[li, t]), _f(sd[li, t]), *map(_f, lin), _f(agree[t])])
    pix = result.input_invariance()
    rows += [["(model input)", _f(v), _f(pix[t]), "", "", "", "", _f(agree[t])] for t, v in enumerate(result.values)]
    return _rows(["layer", "value", "invariance_mean", "invariance_std", "linear_train_error", "linear_test_error",
                  "identity_map_error", "prediction_kept"], rows)


def composition_csv(result: Any) -> str:
    rows = []
    for li, name in enumerate(result.layers):
        for p, (a, b, k) in enumerate(result.comp_pairs):
            rows.append([name, _f(result.values[a]), _f(result.values[b]), _f(result.values[k]),
                         _f(result.comp_frob[li, p]), _f(result.comp_test[li, p]), _f(result.comp_direct[li, p])])
    return _rows(["layer", "a", "b", "composed", "frobenius_error", "composed_test_error", "direct_test_error"], rows)


def predictions_csv(result: Any) -> str:
    rows = []
    for j, path in enumerate(result.paths):
        for t, v in enumerate(result.values):
            rows.append([path, _f(v), result.class_name(int(result.pred[j, t])), _f(result.prob[j, t]),
                         result.class_name(int(result.ref_pred[j])), _f(result.ref_prob[j, t])])
    return _rows(["image", "value", "predicted", "probability", "untransformed_class", "untransformed_class_probability"],
                 rows)


def responses_csv(result: Any) -> str:
    rows = []
    for li, name in enumerate(result.layers):
        r = result.responses(li)
        ref = result.response_ref(li)
        for u in range(r.shape[1]):
            rows.append([name, u, _f(ref[u]), *(_f(x) for x in r[:, u])])
    return _rows(["layer", "unit", "untransformed", *(f"{v:g}" for v in result.values)], rows)


def table(result: Any) -> str:
    """Per layer: invariance at a few values, the linear map's mean held-out error (and the
    identity map's), and the mean composition errors."""
    vals = [float(v) for v in result.values]
    pick = sorted({vals[0], vals[len(vals) // 4], vals[-1], vals[(3 * len(vals)) // 4]} - {0.0} or {vals[0]})
    pick_idx = [vals.index(v) for v in pick]
    inv = result.invariance()
    comp = {d["layer"]: d for d in result.composition_summary()}
    w = max(14, *(len(n) + 2 for n in result.layers))
    head = f"{'layer':<{w}}" + "".join(f"{'inv@' + format(v, 'g'):>11}" for v in pick) + \
        f"{'M test':>9}{'identity':>10}{'comp F':>9}{'comp test':>11}"
    lines = [f"{result.n} images, {result.transform} over {', '.join(f'{v:g}' for v in vals)} "
             f"({result.params.fill} fill); maps on {result.feature_note}; train {result.n_train}, test {result.n_test}",
             head]
    ident = 1.0 if result.transform == "scale" else 0.0
    moved = [t for t, v in enumerate(vals) if v != ident]
    for li, name in enumerate(result.layers):
        row = f"{name:<{w}}" + "".join(f"{inv[li, t]:>11.3f}" for t in pick_idx)
        if result.lin_test is not None and moved:
            row += f"{result.lin_test[li, moved].mean():>9.3f}{result.lin_identity[li, moved].mean():>10.3f}"
        else:
            row += f"{'n/a':>9}{'n/a':>10}"
        cd = comp.get(name, {})
        row += f"{cd['frobenius_mean']:>9.3f}{cd['composed_test_mean']:>11.3f}" if "frobenius_mean" in cd else \
            f"{'n/a':>9}{'n/a':>11}"
        lines.append(row)
    pix = result.input_invariance()
    lines.append(f"{'(model input)':<{w}}" + "".join(f"{pix[t]:>11.3f}" for t in pick_idx))
    lines.append(f"prediction kept: {min(result.agreement()):.3f} at worst; M test / identity: mean held-out relative "
                 "error over the non-identity values; comp: mean over the pairs a, b with T_a T_b in the sweep")
    return "\n".join(lines)
