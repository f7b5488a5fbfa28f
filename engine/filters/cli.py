"""``convlens filters``: Interpretable CNNs (Zhang, Wu, Zhu, CVPR 2018) from the command line.

    convlens filters metrics --model M [model options] --images DIR|CSV|builtin --layer L --out OUT
                             [--landmarks CSV] [--parts DIR|builtin]
    convlens filters train   --model M [model options] --images DIR|CSV|builtin --layer L --out OUT
                             [--val-images DIR|CSV] [--epochs N] [--weight W] [--no-baseline] ...

``metrics`` writes ``OUT/filters.csv`` (one row per filter: category, inter-category and spatial
entropy, -MI, and with landmarks / parts the location instability and best part IoU) and
``OUT/summary.json``. ``train`` trains the interpretable CNN into ``OUT/interpretable`` and, unless
``--no-baseline``, the ordinary baseline from the same start into ``OUT/ordinary`` (checkpoint,
model TOML and class file, TorchScript, curves CSV + PNG; resumable), then measures both on the
validation images and writes ``OUT/comparison.json`` and ``OUT/comparison.md``.
``--images builtin`` uses the built-in part data set (:mod:`engine.concepts.parts`; its
``val.csv`` for metrics, ``train.csv`` and ``val.csv`` for training) with its landmarks and part
masks. Importing this module imports neither torch nor the engine's heavy modules.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def _common() -> Any:
    """The shared CLI helpers (``engine.cli_common`` once it exists, else ``engine.cli``)."""
    import importlib

    name = "engine.cli_common" if importlib.util.find_spec("engine.cli_common") else "engine.cli"
    mod = importlib.import_module(name)
    if not hasattr(mod, "add_model_options"):  # pragma: no cover - a partial module
        mod = importlib.import_module("engine.cli")
    return mod


def register(subparsers: Any) -> None:
    """Add ``filters`` (with ``metrics`` and ``train``) to ``subparsers``."""
    c = _common()
    help_ = "Interpretable CNNs (Zhang et al. 2018): filter metrics, interpretable training, comparison"
    sp = subparsers.add_parser("filters", help=help_, description=help_)
    sp.set_defaults(func=_no_subcommand(sp))
    sub = sp.add_subparsers(dest="filters_command", metavar="subcommand")

    m = sub.add_parser("metrics", help="per-filter category, entropies, location instability, part IoU",
                       description="per-filter metrics of one spatial layer; writes OUT/filters.csv and "
                       "OUT/summary.json")
    m.set_defaults(func=cmd_metrics)
    c.add_model_options(m)
    _data_options(m, c)
    m.add_argument("--top-k", type=c.positive_int, default=20,
                   help="top images per filter for instability (default 20)")
    m.add_argument("--min-images", type=c.int_range(2), default=3,
                   help="top images a landmark must be in to count for a filter (default 3)")

    t = sub.add_parser("train", help="train the interpretable CNN and the ordinary baseline; compare them",
                       description="fine-tune a converted copy with the filter loss (and the same without); "
                       "writes checkpoints, curves and the comparison into OUT")
    t.set_defaults(func=cmd_train)
    c.add_model_options(t)
    _data_options(t, c)
    t.add_argument("--val-images", help="validation images (default: the built-in val.csv, else none)")
    t.add_argument("--epochs", type=c.positive_int, default=10, help="epochs (default 10)")
    t.add_argument("--batch-size", type=c.positive_int, default=32, help="images per batch (default 32)")
    t.add_argument("--lr", type=c.positive_float, default=1e-3, help="learning rate (default 0.001)")
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument("--weight", type=c.float_range(0, 1e6, low_open=False, high_open=False), default=1.0,
                   help="filter loss weight before the 1/t schedule (default 1)")
    t.add_argument("--loss-scale", choices=["normalised", "paper"], default="normalised",
                   help="normalised: loss on maps divided by their batch mean max (default); paper: raw maps")
    t.add_argument("--seed", type=c.non_negative_int, default=0)
    t.add_argument("--no-new-conv", action="store_true", help="do not add the new 3x3 conv layer")
    t.add_argument("--no-mask-top", action="store_true", help="mask only the new layer, not the chosen one")
    t.add_argument("--no-baseline", action="store_true", help="train only the interpretable model")
    t.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")


def _no_subcommand(parser: argparse.ArgumentParser) -> Any:
    def run(_a: argparse.Namespace) -> int:
        parser.print_help(sys.stderr)
        return 2

    return run


def _data_options(p: argparse.ArgumentParser, c: Any) -> None:
    p.add_argument("--images", required=True, help="labelled image folder (class subfolders), CSV, or 'builtin'")
    p.add_argument("--layer", required=True, help="the spatial layer (for train: the top conv layer to convert)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--landmarks", help="landmark CSV: image,landmark,x,y (pixels of the image)")
    p.add_argument("--parts", help="Broden-layout folder with a 'part' category, or 'builtin'")
    p.add_argument("--tau", type=c.positive_float, help="template scale (default 0.5/n^2)")
    p.add_argument("--beta", type=c.positive_float, default=4.0, help="template slope (default 4)")
    p.add_argument("--alpha", type=c.float_range(0, 1, low_open=True, high_open=True),
                   help="prior of the positive templates (default n^2/(1+n^2))")
    p.add_argument("--category-mode", choices=["labels", "none"], default="labels",
                   help="labels: positive templates explain the filter's category only (default)")
    p.add_argument("--mask", choices=["template", "unit"], default="template",
                   help="forward mask: the template (paper) or the template / tau (peak 1)")
    p.add_argument("--quantile", type=c.float_range(0, 1, low_open=True, high_open=True), default=0.005,
                   help="part masks: top fraction of activations (default 0.005, as dissection)")
    p.add_argument("--iou-threshold", type=c.float_range(0, 1, low_open=False, high_open=False), default=0.2,
                   help="a filter represents a part above this IoU (default 0.2)")
    p.add_argument("--builtin-images", type=c.int_range(3, 100000), default=900,
                   help="images of the built-in part set (default 900)")


def _filter_params(a: argparse.Namespace) -> Any:
    from .templates import FilterParams

    return FilterParams(tau=a.tau, beta=a.beta, alpha=a.alpha, category_mode=a.category_mode, mask=a.mask)


def _metrics_params(a: argparse.Namespace) -> Any:
    from .metrics import MetricsParams

    return MetricsParams(filter_params=_filter_params(a), top_k=getattr(a, "top_k", 20),
                         min_images=getattr(a, "min_images", 3), quantile=a.quantile,
                         iou_threshold=a.iou_threshold, batch_size=getattr(a, "batch_size", 64) or 64)


def _data(a: argparse.Namespace, split: str) -> tuple[Any, str | None, Any, Path | None]:
    """(images, landmarks path, parts dataset, built-in root) from the options."""
    from engine.concepts import open_broden
    from engine.data.images import open_image_set

    c = _common()
    root = None
    if a.images == "builtin" or a.parts == "builtin" or a.landmarks == "builtin":
        from engine.concepts.parts import builtin_parts

        root = Path(c.run_job(builtin_parts(a.builtin_images), "parts", bool(getattr(a, "quiet", False))).root)
    images = open_image_set(root / f"{split}.csv") if a.images == "builtin" and root else open_image_set(a.images)
    landmarks = a.landmarks
    if landmarks == "builtin" or (landmarks is None and a.images == "builtin"):
        landmarks = str(root / "landmarks.csv") if root else None
    parts = None
    if a.parts == "builtin" or (a.parts is None and a.images == "builtin"):
        parts = open_broden(root, split="val") if root else None
    elif a.parts is not None:
        parts = open_broden(a.parts)
    return images, landmarks, parts, root


def _torch_backend(backend: Any, spec: Any) -> None:
    if getattr(backend, "name", "") != "torch" or not hasattr(backend, "trainable_copy"):
        raise _error(f"{spec.path}: training needs the PyTorch backend (a TorchScript-free torch model); "
                     "drop --backend onnx")


def _error(msg: str) -> Exception:
    from engine.types import ConvLensError

    return ConvLensError(msg)


def cmd_metrics(a: argparse.Namespace) -> int:
    """``convlens filters metrics``."""
    from .metrics import filter_metrics

    c = _common()
    params = _metrics_params(a)
    params.check()
    out = c.check_out_dir(a.out, ["filters.csv", "summary.json"])
    spec = c.spec_from_args(a)
    images, landmarks, parts, _ = _data(a, "val")
    loaded, backend = c.open_model(spec)
    quiet = bool(getattr(a, "quiet", False))
    result = c.run_job(filter_metrics(backend, loaded.cache_id, images, a.layer, params, landmarks=landmarks,
                                      parts=parts), "filters", quiet)
    with c.writing(out / "filters.csv"):
        result.write_csv(out / "filters.csv")
    summary = {**result.summary(), "model": spec.path, "images_source": images.source,
               "landmarks": landmarks, "parts": parts.root if parts is not None else None}
    c.write_json_output(out / "summary.json", summary)
    if not quiet:
        print(c.shown(_headline(summary) + f"; wrote {out / 'filters.csv'}"), file=sys.stderr)
    return 0


def _headline(s: dict[str, Any]) -> str:
    text = (f"{s['layer']}: {s['filters']} filters on {s['images']} images, inter-category entropy "
            f"{s['mean_inter_category_entropy']:.4f}, spatial entropy {s['mean_spatial_entropy']:.4f}")
    if s.get("mean_location_instability") is not None:
        text += f", location instability {s['mean_location_instability']:.4f}"
    if "part_interpretability" in s:
        text += f", part interpretability {s['part_interpretability']:.3f} (mean IoU {s['mean_part_iou']:.3f})"
    return text


def cmd_train(a: argparse.Namespace) -> int:
    """``convlens filters train``."""
    from engine.backends.torch_backend import TorchBackend
    from engine.data.images import open_image_set
    from engine.models.loading import load_model
    from engine.types import ModelSpec

    from .metrics import filter_metrics
    from .train import TrainParams, train_filters

    c = _common()
    quiet = bool(getattr(a, "quiet", False))
    params = TrainParams(layer=a.layer, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, optimizer=a.optimizer,
                         weight=a.weight, seed=a.seed, new_conv=not a.no_new_conv, mask_top=not a.no_mask_top,
                         filter_params=_filter_params(a), loss_scale=a.loss_scale, resume=not a.no_resume)
    params.check()
    mparams = _metrics_params(a)
    mparams.check()
    out = c.check_out_dir(a.out, ["comparison.json", "comparison.md"])
    spec = c.spec_from_args(a)
    images, landmarks, parts, root = _data(a, "train")
    val = open_image_set(a.val_images) if a.val_images else (open_image_set(root / "val.csv") if root and
                                                            a.images == "builtin" else None)
    loaded, backend = c.open_model(spec)
    _torch_backend(backend, spec)
    runs = [("interpretable", params)] + ([] if a.no_baseline else [("ordinary", params.baseline())])
    table: dict[str, Any] = {}
    for name, p in runs:
        with c.writing(out / name):
            res = c.run_job(train_filters(backend, loaded.cache_id, images, p, out / name, val_images=val,
                                          source_format=loaded.format), f"train {name}", quiet)
        row: dict[str, Any] = {"final": res.final, "files": res.files, "resumed_from": res.resumed_from}
        if "class_file" in res.files:
            tspec = ModelSpec(path=res.files["state_dict"], arch=f"{res.files['class_file']}:InterpretableNet",
                              preprocess=spec.preprocess, classes=res.classes, output_index=spec.output_index)
        else:
            tspec = ModelSpec(path=res.files["torchscript"], preprocess=spec.preprocess, classes=res.classes,
                              output_index=spec.output_index)
        trained = load_model(tspec)
        tb = TorchBackend(trained.module, trained.spec, backend.device)
        m = c.run_job(filter_metrics(tb, trained.cache_id, val or images, res.measured_layer, mparams,
                                     landmarks=landmarks, parts=parts), f"metrics {name}", quiet)
        row["metrics"] = m.summary()
        with c.writing(out / name / "filters.csv"):
            m.write_csv(out / name / "filters.csv")
        table[name] = row
    comparison = {"model": spec.path, "layer": a.layer, "measured_layer": params.conversion().measured_layer,
                  "images": images.source, "val_images": val.source if val is not None else None,
                  "params": params.to_dict(), "runs": table}
    c.write_json_output(out / "comparison.json", comparison)
    c.write_text_output(out / "comparison.md", comparison_markdown(comparison))
    if not quiet:
        print(c.shown(comparison_markdown(comparison)), file=sys.stderr)
    return 0


def comparison_markdown(comp: dict[str, Any]) -> str:
    """The comparison table (Markdown)."""
    lines = [f"# Ordinary vs interpretable: {comp['model']} at {comp['measured_layer']}", "",
             "| model | val accuracy | train accuracy | location instability | part interpretability | "
             "mean part IoU | inter-category entropy | spatial entropy |", "|---|---|---|---|---|---|---|---|"]

    def f(v: Any, d: int = 4) -> str:
        return "-" if v is None else f"{v:.{d}f}"

    for name, r in comp["runs"].items():
        s, fin = r["metrics"], r["final"]
        lines.append(f"| {name} | {f(fin.get('val_accuracy'), 3)} | {f(fin.get('train_accuracy'), 3)} | "
                     f"{f(s.get('mean_location_instability'))} | {f(s.get('part_interpretability'), 3)} | "
                     f"{f(s.get('mean_part_iou'), 3)} | {f(s['mean_inter_category_entropy'])} | "
                     f"{f(s['mean_spatial_entropy'])} |")
    return "\n".join(lines) + "\n"
