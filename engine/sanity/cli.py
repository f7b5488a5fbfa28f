"""``convlens sanity``: the weight-randomisation sanity check (Adebayo et al., NeurIPS 2018).

    convlens sanity --model M [model options] --images DIR|CSV --method METHOD --out OUT
                    [--mode cascade|independent] [--layer L] [--unit U] [--n-images N]
                    [--seed S] [--init normal|permute] [--randomise L1,L2,...]

METHOD: ``gradcam``, ``saliency``, ``guided_backprop``, ``ig``, ``occlusion`` (class evidence,
for the predicted class), ``heatmap`` (the activation map of ``--unit`` at ``--layer``),
``dissection`` (the labels of ``--layer``'s units on a small built-in concept set),
``polytope`` (the gallery of every image), ``filters`` (the filter metrics of ``--layer``) or
``graphs`` (the inference graphs of the first images).
Writes ``OUT/sanity.csv`` (one row per step: the layer randomised, per metric the mean and
standard deviation over images / units), ``OUT/sanity.json`` (the settings, the table, per metric
the similarity at the last step and the first step below 0.5) and ``OUT/sanity.png`` (the
similarity-vs-randomised-layer figure, with the maps strip for maps). Exit codes: 0 success, 1 a
problem with the input (the message names it). Importing this module imports neither torch nor
the engine's heavy modules.
"""

from __future__ import annotations

import argparse
from typing import Any

FILES = ("sanity.csv", "sanity.json", "sanity.png")
METHODS = ("gradcam", "saliency", "guided_backprop", "ig", "occlusion", "heatmap", "dissection", "polytope",
           "filters", "graphs")


def _common() -> Any:
    import importlib

    return importlib.import_module("engine.cli_common")


def register(subparsers: Any) -> None:
    """Add the ``sanity`` command to ``subparsers``."""
    c = _common()
    help_ = ("weight-randomisation sanity check (Adebayo et al. 2018): randomise the weights from the top layer down "
             "(or one at a time), recompute an explanation and measure its similarity to the original; writes CSV, "
             "JSON and a figure into OUT")
    sp = subparsers.add_parser("sanity", help=help_, description=help_)
    sp.set_defaults(func=cmd_sanity)
    c.add_model_options(sp)
    sp.add_argument("--images", required=True, help="image folder or CSV")
    sp.add_argument("--method", required=True, choices=METHODS, help="the explanation to check")
    sp.add_argument("--mode", choices=["cascade", "independent"], default="cascade",
                    help="cascade: the top k layers randomised at step k (default); independent: one layer at a time")
    sp.add_argument("--layer", help="the layer (gradcam: default its own; heatmap, dissection, filters: required)")
    sp.add_argument("--unit", type=c.non_negative_int, default=0, help="heatmap: the unit (default 0)")
    sp.add_argument("--n-images", type=c.int_range(1, 100_000), default=16,
                    help="images, spread evenly over the set (default 16)")
    sp.add_argument("--seed", type=c.non_negative_int, default=0, help="random weights seed (default 0)")
    sp.add_argument("--init", choices=["normal", "permute"], default="normal",
                    help="normal: N(0, std of the trained tensor) (default); permute: the trained values shuffled")
    sp.add_argument("--randomise", help="comma-separated layers to randomise (default: every layer with weights "
                                        "the classifier output depends on); a container such as layer4 randomises "
                                        "all its weight layers in one step")
    sp.add_argument("--out", required=True, help="output folder")


def cmd_sanity(a: argparse.Namespace) -> int:
    """Run ``convlens sanity``; a ConvLensError becomes ``convlens: error: ...`` (exit 1)."""
    import csv
    import io

    from engine.data.images import open_image_set
    from engine.sanity.figure import sanity_figure
    from engine.sanity.run import SanityParams, run
    from engine.types import ConvLensError

    c = _common()
    out = c.check_out_dir(a.out, FILES)
    layers = None
    if a.randomise is not None:
        layers = tuple(v.strip() for v in a.randomise.split(",") if v.strip())
        if not layers:
            raise ConvLensError(f"--randomise {a.randomise!r}: names no layer")
    params = SanityParams(explanation=a.method, mode=a.mode, layer=a.layer, unit=a.unit, images=a.n_images,
                          layers=layers, seed=a.seed, init=a.init)
    params.check()
    spec = c.spec_from_args(a)
    images = open_image_set(a.images)
    opened = c.open_model(spec, a)
    loaded, backend = opened
    try:
        result = c.run_job(run(backend, loaded.cache_id, images, params), "sanity", quiet=bool(getattr(a, "quiet", False)))
    finally:
        backend.close()
    if result.skipped:
        c.report_skipped([{"path": p, "cause": why} for p, why in result.skipped])
    rows = result.rows()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
    c.write_text_output(out / "sanity.csv", buf.getvalue())
    c.write_json_output(out / "sanity.json", result.summary())
    with c.writing(out / "sanity.png"):
        sanity_figure(result, out / "sanity.png")
    print(table(result))
    c.say(a, f"wrote {c.shown(out / 'sanity.csv')}, {c.shown(out / 'sanity.json')} and {c.shown(out / 'sanity.png')}")
    return 0


def table(result: Any) -> str:
    """The per-step table as text."""
    import numpy as np

    mean = result.mean()
    head = f"{'step':>4}  {'layer randomised':<20}" + "".join(f"{m:>16}" for m in result.metrics)
    lines = [f"{result.title}, {result.mode} randomisation, {result.values.shape[2]} {result.item}(s)", head]
    for s in range(result.n_steps):
        vals = "".join(f"{v:>16.3f}" if np.isfinite(v) else f"{'n/a':>16}" for v in mean[s])
        lines.append(f"{s + 1:>4}  {result.steps[s]:<20}" + vals)
    if result.dropped:
        lines.append(f"not randomised (the classifier output does not depend on them): {', '.join(result.dropped)}")
    return "\n".join(lines)
