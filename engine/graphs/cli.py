"""``convlens graph``: inference graphs (Konforti et al., ECCV 2020) from the command line.

    convlens graph fit --model M [model options] --images DIR --layers A,B,C --k 32,32,32 --out FIT
    convlens graph explain --fit FIT (--class C | --image PATH) --out OUT

``fit`` writes the dictionaries and statistics into FIT (``meta.json`` and ``.npy`` arrays, as
cached; ``model.toml``, the model description ``explain`` reopens for an image outside the fit;
``summary.json``). ``explain`` writes ``graph.json`` (networkx node-link), ``graph.graphml``
(every node has a ``layer`` attribute) and ``graph.png`` (the figure). Exit codes as for every
command: 0 success, 1 a problem with the input (the message names it), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def _common() -> Any:
    """The shared CLI helpers (``engine.cli_common`` once the method platform has it)."""
    import importlib

    try:
        return importlib.import_module("engine.cli_common")
    except ImportError:  # before the platform split
        return importlib.import_module("engine.cli")


def _ks(text: str) -> tuple[int, ...]:
    vals = []
    for part in text.split(","):
        try:
            v = int(part.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"every K must be a positive whole number, got {v}")
        vals.append(v)
    return tuple(vals)


def register(subparsers: Any) -> None:
    """Add the ``graph`` command (``fit`` and ``explain``) to ``subparsers``."""
    c = _common()
    help_ = "inference graphs (GMM visual words per layer, transitions): fit, then explain a class or an image"
    gp = subparsers.add_parser("graph", help=help_, description=help_)
    gp.set_defaults(func=lambda a: _no_action(gp))
    sub = gp.add_subparsers(dest="graph_command", metavar="action")

    h = "fit the per-layer dictionaries and transition statistics; writes them into OUT"
    sp = sub.add_parser("fit", help=h, description=h)
    sp.set_defaults(func=cmd_fit)
    c.add_model_options(sp)
    sp.add_argument("--images", required=True, help="image folder (class subfolders = labels) or CSV list")
    sp.add_argument("--layers", help="comma-separated spatial layers, lowest first (default: the model's conv stages)")
    sp.add_argument("--k", type=_ks, default=(),
                    help="components per layer, comma-separated, one per layer or one for all "
                         "(default min(32, max(4, channels/2)))")
    sp.add_argument("--max-iter", type=c.positive_int, default=100, help="EM iterations at most (default 100)")
    sp.add_argument("--tol", type=c.float_range(0, 1e9, low_open=False, high_open=False), default=1e-3,
                    help="stop when the mean log-likelihood per column improves by less (default 1e-3)")
    sp.add_argument("--var-floor", type=c.float_range(0, 1, low_open=False, high_open=False), default=1e-3,
                    help="variance floor as a fraction of each channel's variance (default 1e-3)")
    sp.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="EM arithmetic (default float32)")
    sp.add_argument("--seed", type=c.non_negative_int, default=0, help="initialisation seed (default 0)")
    sp.add_argument("--patches", type=c.positive_int, default=16, help="best columns kept per word (default 16)")
    sp.add_argument("--batch-size", type=c.positive_int, default=64, help="images per forward pass (default 64)")
    sp.add_argument("--columns", type=c.positive_int, default=65536, help="columns per EM batch (default 65536)")
    sp.add_argument("--em-device", help="where EM runs: cpu, cuda, cuda:N (default: CUDA when available)")
    sp.add_argument("--out", required=True, help="output folder for the fit")

    h = "the inference graph of a class or an image: graph.json, graph.graphml and graph.png into OUT"
    sp = sub.add_parser("explain", help=h, description=h)
    sp.set_defaults(func=cmd_explain)
    sp.add_argument("--fit", required=True, help="folder written by 'convlens graph fit'")
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument("--class", dest="class_name", help="a class name (or number): the images predicted as it")
    which.add_argument("--image", help="one image: of the fit's image set, or any file (the model is rerun)")
    sp.add_argument("--top", type=c.positive_int, default=3, help="nodes per layer at most (default 3)")
    sp.add_argument("--patches", type=c.non_negative_int, default=8, help="patches per node (default 8)")
    sp.add_argument("--no-figure", action="store_true", help="write the graph files only")
    sp.add_argument("--out", required=True, help="output folder")


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_fit(a: argparse.Namespace) -> int:
    import sys

    from engine.data.images import open_image_set
    from engine.models.config import write_config

    from .model import GraphParams, run, save_result

    c = _common()
    out = c.check_out_dir(a.out, ["meta.json", "summary.json", "model.toml"])
    params = GraphParams(k=tuple(a.k), max_iter=a.max_iter, tol=a.tol, var_floor=a.var_floor, dtype=a.dtype,
                         top_patches=a.patches, seed=a.seed, batch_columns=a.columns, device=a.em_device)
    params.check()
    spec = c.spec_from_args(a)
    images = open_image_set(a.images)
    loaded, backend = c.open_model(spec)
    layers = c.parse_layers(a.layers, spec, backend)
    fit = c.run_job(run(backend, loaded.cache_id, images, layers, params, batch_size=a.batch_size),
                    "graph fit", getattr(a, "quiet", False))
    with c.writing(out):
        save_result(fit, out)
        write_config(spec.with_(path=str(Path(spec.path).resolve())), out / "model.toml")
    summary = {
        "model": spec.path, "images": len(images), "valid": int((fit.predicted >= 0).sum()),
        "classes": list(fit.classes), "from_cache": fit.from_cache, "seconds": fit.seconds,
        "layers": [{"name": m.name, "shape": list(m.shape), "k": m.k, "n_iter": m.n_iter, "converged": m.converged,
                    "final_loglik": m.final_loglik, "loglik": m.loglik} for m in fit.layers],
        "transitions": [list(x.shape) for x in fit.pair_counts],
    }
    c.write_json_output(out / "summary.json", summary)
    if not getattr(a, "quiet", False):
        for m in fit.layers:
            print(f"{c.shown(m.name)}: K={m.k}, {m.n_iter} EM iterations"
                  f"{'' if m.converged else ' (not converged)'}, mean log-likelihood {m.final_loglik:.4f}",
                  file=sys.stderr)
        print(c.shown(f"wrote the fit to {out}"), file=sys.stderr)
    return c.EXIT_OK


def _open_fit(folder: str) -> Any:
    from engine.types import ConvLensError

    from .model import load_result

    p = Path(folder)
    if not p.is_dir():
        raise ConvLensError(f"{folder}: {'no such folder' if not p.exists() else 'not a folder'} "
                            "(--fit names a folder written by 'convlens graph fit')")
    return load_result(p)


def cmd_explain(a: argparse.Namespace) -> int:
    import sys

    from engine.types import ConvLensError

    from .figure import render_graph
    from .model import explain

    c = _common()
    out = c.check_out_dir(a.out, ["graph.json", "graph.graphml", "graph.png"])
    fit = _open_fit(a.fit)
    backend = None
    if a.image is not None:
        if not Path(a.image).is_file():
            raise ConvLensError(f"{a.image}: no such image file")
        if fit.image_index(a.image) is None:
            from engine.models.config import build_spec

            toml = Path(a.fit) / "model.toml"
            if not toml.is_file():
                raise ConvLensError(f"{toml}: missing; the model is needed to explain an image outside the fit")
            _loaded, backend = c.open_model(build_spec(None, config=str(toml)))
    expl = explain(fit, class_name=a.class_name, image=a.image, n=a.top, patches=a.patches, backend=backend)
    with c.writing(out):
        files = expl.write(out)
        if not a.no_figure:
            render_graph(expl, out / "graph.png", preprocess=fit.preprocess)
            files.append(out / "graph.png")
    per_layer: dict[str, list[int]] = {}
    for nd in expl.nodes:
        per_layer.setdefault(nd["layer"], []).append(nd["word"])
    if not getattr(a, "quiet", False):
        what = f"class '{expl.class_name}' ({expl.images} images)" if expl.kind == "class" else \
            f"{a.image} (predicted '{expl.class_name}')"
        nodes = "; ".join(f"{k}: {', '.join(map(str, v))}" for k, v in per_layer.items())
        print(c.shown(f"graph of {what}: {nodes}; wrote {', '.join(str(f) for f in files)}"), file=sys.stderr)
    print(json.dumps({"kind": expl.kind, "target": expl.target, "class": expl.class_name,
                      "nodes": len(expl.nodes), "edges": len(expl.edges),
                      "files": [str(f) for f in files]}))
    return c.EXIT_OK
