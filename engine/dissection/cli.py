"""``convlens dissect``: Network Dissection (Bau et al., CVPR 2017) from the command line.

    convlens dissect --model M [model options] --concepts DIR|builtin --layers A,B --out OUT

Prints progress to standard error and one summary line per layer ("layer4: 12/512 units
covering 9 concepts"), writes the report (see :mod:`engine.dissection.report`) into OUT.
``--concepts builtin`` generates the built-in synthetic concept set once into the user cache.
Exit codes as for every command: 0 success, 1 a problem with the input (message names it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.cli_common import (
    EXIT_OK,
    add_executor_options,
    add_model_options,
    check_out_parent,
    executor_from_args,
    float_range,
    int_range,
    open_model,
    parse_layers,
    positive_int,
    report_skipped,
    run_job,
    shown,
    spec_from_args,
    writing,
)


def register(subparsers: Any) -> None:
    """Add the ``dissect`` command to ``subparsers`` (from ``ArgumentParser.add_subparsers``).

    Every numeric option is checked while parsing (a usage error, exit 2, before any work).
    """
    from engine.concepts import BUILTIN_DEFAULT_IMAGES, BUILTIN_DEFAULT_SIZE

    help_ = "Network Dissection: label units with concepts by IoU; writes a report into OUT"
    sp = subparsers.add_parser("dissect", help=help_, description=help_)
    sp.set_defaults(func=cmd_dissect, names_skipped=True)
    add_model_options(sp)
    sp.add_argument("--concepts", required=True,
                    help="Broden-layout concept folder, or 'builtin' for the built-in synthetic set")
    sp.add_argument("--layers", help="comma-separated layer names (default: the model's conv stages)")
    sp.add_argument("--out", required=True, help="report folder (replaced when complete)")
    sp.add_argument("--categories", help="comma-separated concept categories to score (default: all)")
    sp.add_argument("--quantile", type=float_range(0, 1, low_open=True, high_open=True), default=0.005,
                    help="top fraction of activations in a unit's mask (default 0.005)")
    sp.add_argument("--iou-threshold", type=float_range(0, 1, low_open=False, high_open=False), default=0.04,
                    help="a unit is a detector above this IoU (default 0.04)")
    sp.add_argument("--rule", choices=["paper", "lite"], default="paper",
                    help="paper: Bau et al. 2017; lite: NetDissect-Lite's union rule and S > T masks")
    sp.add_argument("--strict-mask", action="store_true", help="mask S > T instead of S >= T")
    sp.add_argument("--no-tie-fallback", action="store_true",
                    help="apply S >= T even where a mass of activations ties with T (default: such units use "
                         "S > T, see docs/dissection.md)")
    sp.add_argument("--map-budget-mb", type=float_range(0, 1e9, low_open=False, high_open=False), default=1024.0,
                    help="keep the layers' maps in memory up to this many MB and run the model once; "
                         "else twice (default 1024)")
    sp.add_argument("--batch-size", type=positive_int, default=32, help="images per batch (default 32)")
    sp.add_argument("--top-k", type=positive_int, default=10, help="top images per unit (default 10)")
    sp.add_argument("--no-tiles", action="store_true", help="skip the per-unit image tiles")
    sp.add_argument("--all-units", action="store_true",
                    help="draw the top-image tiles of every unit (default: the detectors and the 16 best units per layer)")
    sp.add_argument("--builtin-images", type=positive_int, default=BUILTIN_DEFAULT_IMAGES,
                    help=f"images of the built-in concept set (default {BUILTIN_DEFAULT_IMAGES})")
    sp.add_argument("--builtin-size", type=int_range(16, 4096), default=BUILTIN_DEFAULT_SIZE,
                    help=f"image size of the built-in concept set, 16 to 4096 px (default {BUILTIN_DEFAULT_SIZE})")
    add_executor_options(sp)


def cmd_dissect(a: argparse.Namespace) -> int:
    """Run ``convlens dissect`` (engine.cli.main turns a ConvLensError into exit code 1)."""
    _dissect(a)
    return EXIT_OK


def _dissect(a: argparse.Namespace) -> None:
    from engine.concepts import open_broden
    from engine.dissection.masks import TIE_FACTOR
    from engine.dissection.report import write_report
    from engine.dissection.run import DissectionParams, dissect

    quiet = bool(getattr(a, "quiet", False))
    categories = tuple(c.strip() for c in a.categories.split(",") if c.strip()) if a.categories \
        else None
    params = DissectionParams(
        quantile=a.quantile, iou_threshold=a.iou_threshold, mask_rule=a.rule,
        strict_mask=a.strict_mask or a.rule == "lite", batch_size=a.batch_size, top_k=a.top_k,
        categories=categories, tie_factor=None if a.no_tie_fallback else TIE_FACTOR,
        map_budget_mb=a.map_budget_mb,
    )
    params.check()
    executor = executor_from_args(a)  # None: in this process; says how to install Ray when it is missing
    from engine.cache import check_replaceable

    check_out_parent(a.out)  # before any work: the report can be built beside OUT and renamed in
    check_replaceable(a.out)  # ... and a folder of the user's is never replaced
    spec = spec_from_args(a)
    loaded, backend = open_model(spec, a)
    layers = parse_layers(a.layers, spec, backend)
    backend.check_capture(layers)
    if a.concepts == "builtin":
        from engine.concepts import builtin_concepts

        root = run_job(builtin_concepts(a.builtin_images, a.builtin_size), "concepts", quiet).root
    else:
        root = a.concepts
    concepts = open_broden(root, categories=categories)
    if executor is None:
        result = run_job(dissect(backend, loaded.cache_id, concepts, layers, params), "dissect", quiet)
    else:
        from engine.cluster import dissect_on_ray

        with executor:
            result = run_job(dissect_on_ray(backend, loaded.cache_id, concepts, layers, params, executor=executor),
                             "dissect", quiet)
    with writing(a.out):
        out = write_report(result, concepts, a.out, backend=None if a.no_tiles else backend, all_units=a.all_units)
    report_skipped([{"path": str(p), "reason": str(r)} for p, r in result.skipped])
    for warning in result.warnings:
        print(shown(f"convlens: warning: {warning}"), file=sys.stderr)
    if not quiet:
        for note in result.notes:
            print(shown(note), file=sys.stderr)
        for name in result.layers:
            print(shown(result.summary_line(name)), file=sys.stderr)
        skipped = f", {len(result.skipped)} images skipped" if result.skipped else ""
        print(shown(f"{result.n_images} images{skipped}; wrote {out / 'index.html'}"), file=sys.stderr)


def add_parser(subparsers: Any, _add_model_options: Any = None) -> None:
    """The former name of :func:`register`."""
    register(subparsers)
