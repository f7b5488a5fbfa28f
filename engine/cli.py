"""Headless command line: ``convlens <command> ...``. Every command writes machine-readable output.

Exit codes: 0 success, 1 a problem with the input (the message names the file and the cause),
2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from .jobs import Job, run_sync
from .types import ConvLensError, ModelSpec, Progress

EXIT_OK, EXIT_INPUT, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ----------------------------------------------------------------------------- progress


class ProgressBar:
    """A one-line progress bar on a terminal; periodic plain lines otherwise (logs, CI)."""

    def __init__(self, title: str, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.title, self.stream, self.quiet = title, stream or sys.stderr, quiet
        self.tty = self.stream.isatty()
        self.t0 = self.last = time.perf_counter()
        self.shown = False

    def __call__(self, p: Progress) -> None:
        if self.quiet:
            return
        now = time.perf_counter()
        final = p.fraction is not None and p.fraction >= 1.0
        if not final and now - self.last < (0.1 if self.tty else 5.0) and self.shown:
            return
        self.last, self.shown = now, True
        frac = p.fraction or 0.0
        if self.tty:
            bar = "#" * int(frac * 30)
            self.stream.write(f"\r{self.title} [{bar:<30}] {frac:5.1%} {p.message[:60]:<60}")
            if final:
                self.stream.write("\n")
        else:
            self.stream.write(f"{self.title}: {frac:5.1%} {p.message}\n")
        self.stream.flush()


def run_job(job: Job[Any], title: str, quiet: bool = False) -> Any:
    return run_sync(job, ProgressBar(title, quiet=quiet))


# ----------------------------------------------------------------------------- model options


def add_model_options(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="checkpoint: TorchScript, .pt2, state dict, safetensors or ONNX")
    g.add_argument("--arch", help="architecture for state dicts: torchvision name, 'rnet', or file.py:Class")
    g.add_argument("--input-size", help="N or HxW (height x width)")
    g.add_argument("--mean", help="per-channel mean in [0,1] pixel units, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="per-channel std in [0,1] pixel units, e.g. 0.229,0.224,0.225")
    g.add_argument("--channels", choices=["rgb", "bgr"])
    g.add_argument("--grayscale", action="store_true", default=None, help="the model takes one channel")
    g.add_argument("--resize", choices=["stretch", "shorter_side_crop"])
    g.add_argument("--classes", help="class names: a file (one per line) or a comma-separated list")
    g.add_argument("--backend", choices=["auto", "torch", "onnx"])
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--output-index", type=int, help="which output is the classifier when there are several")
    g.add_argument("--scores", choices=["auto", "logits", "probs"], help="what the classifier output holds")
    g.add_argument("--num-classes", type=int, help="class count for a torchvision architecture")
    g.add_argument("--no-strict", dest="strict", action="store_false", default=None,
                   help="load a state dict even if some keys are missing or unexpected")
    g.add_argument("--allow-pickle", action="store_true", default=None,
                   help="allow unpickling a full pickled model (runs code stored in the file; trusted files only)")
    g.add_argument("--model-config", help="TOML model description (default: <model>.toml beside the checkpoint)")


def spec_from_args(a: argparse.Namespace) -> ModelSpec:
    from .models.config import build_spec

    return build_spec(
        a.model, config=a.model_config, arch=a.arch, input_size=a.input_size, mean=a.mean, std=a.std,
        channels=a.channels, grayscale=a.grayscale, resize=a.resize, classes=a.classes,
        backend=a.backend, device=a.device, output_index=a.output_index, scores=a.scores,
        num_classes=a.num_classes, strict=a.strict, allow_pickle=a.allow_pickle,
    )


def open_model(spec: ModelSpec) -> tuple[Any, Any]:
    """Load and open ``spec``; what the user should know about the load goes to stderr."""
    from .backends import open_backend
    from .models.loading import load_model

    loaded = load_model(spec)
    for note in loaded.notes:
        print(f"convlens: warning: {note}", file=sys.stderr)
    return loaded, open_backend(loaded)


def check_out_dir(out: str) -> Path:
    """An output folder that can be written into: a file in the way is an error before any work."""
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise ConvLensError(f"{p}: exists and is not a folder (--out names the output folder)")
    return p


def parse_layers(value: str | None, spec: ModelSpec, backend: Any) -> list[str]:
    if value:
        return [v.strip() for v in value.split(",") if v.strip()]
    if spec.layers:
        return list(spec.layers)
    from .models.layers import default_layers

    return default_layers(backend.layers())


# ----------------------------------------------------------------------------- commands


def cmd_info(a: argparse.Namespace) -> int:
    spec = spec_from_args(a)
    loaded, backend = open_model(spec)
    layers = backend.layers()
    from .models.layers import default_layers

    info = {
        "model": str(Path(spec.path).resolve()),
        "format": loaded.format,
        "sha256": loaded.sha256,
        "backend": backend.name,
        "device": backend.device,
        "gradients": backend.supports_gradients,
        "input_shape": [None, spec.preprocess.n_channels, *spec.preprocess.input_size],
        "preprocess": spec.preprocess.to_dict(),
        "classes": list(spec.classes) if spec.classes else None,
        "default_layers": default_layers(layers),
        "layers": [{"name": li.name, "kind": li.kind, "shape": list(li.shape)} for li in layers],
        "notes": loaded.notes,
    }
    _emit_json(info, a.out)
    return EXIT_OK


def _emit_json(obj: Any, out: str | None) -> None:
    text = json.dumps(obj, indent=2)
    if out:
        from .cache import atomic_write_text

        atomic_write_text(out, text + "\n")
    else:
        print(text)


def _extract_for(a: argparse.Namespace, layers_arg: str | None, with_layers: bool) -> tuple[Any, Any, Any, Any]:
    from .activations import extract
    from .data.images import open_image_set

    check_out_dir(a.out)
    spec = spec_from_args(a)
    images = open_image_set(a.images)
    loaded, backend = open_model(spec)
    layers = parse_layers(layers_arg, spec, backend) if with_layers else []
    acts = run_job(extract(backend, loaded.cache_id, images, layers, batch_size=a.batch_size,
                           store_maps=not getattr(a, "no_maps", False)), "extract", a.quiet)
    return spec, loaded, backend, acts


def _prediction_summary(preds: Any, acts: Any, spec: ModelSpec) -> dict[str, Any]:
    return {
        "images": len(preds.paths),
        "skipped": [{"path": p, "reason": r} for p, r in acts.skipped],
        "classes": list(preds.classes),
        "score_kind": preds.score_kind,
        "scored": preds.n_scored,
        "accuracy": preds.accuracy,
        "unmatched_labels": preds.unmatched_labels(),
        "model": spec.path,
    }


def cmd_predict(a: argparse.Namespace) -> int:
    from .cache import atomic_write_text
    from .predict import predictions_from

    spec, _loaded, _backend, acts = _extract_for(a, None, with_layers=False)
    preds = predictions_from(acts, spec)
    out = Path(a.out)
    preds.write_csv(out / "predictions.csv")
    summary = _prediction_summary(preds, acts, spec)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _say(a, _prediction_line(summary, out / "predictions.csv"))
    return EXIT_OK


def _prediction_line(s: dict[str, Any], csv_path: Path) -> str:
    acc = "no labels" if s["accuracy"] is None else f"accuracy {s['accuracy']:.2%} on {s['scored']} labelled"
    skip = f", {len(s['skipped'])} skipped" if s["skipped"] else ""
    return f"{s['images']} images{skip}: {acc}; wrote {csv_path}"


def cmd_activations(a: argparse.Namespace) -> int:
    from .activations import write_unit_tables
    from .cache import atomic_write_text

    _spec, _loaded, _backend, acts = _extract_for(a, a.layers, with_layers=True)
    out = Path(a.out)
    files = write_unit_tables(acts, out)
    summary = {
        "images": acts.n_images,
        "valid": int(acts.valid.sum()),
        "skipped": [{"path": p, "reason": r} for p, r in acts.skipped],
        "layers": {k: {"kind": v.kind, "shape": list(v.shape)} for k, v in acts.layers.items()},
        "cache": str(acts.folder),
        "seconds": acts.seconds,
        "files": [str(f) for f in files],
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _say(a, f"{acts.n_images} images, {len(acts.layers)} layers -> {out} (cache: {acts.folder})")
    return EXIT_OK


def cmd_demo(a: argparse.Namespace) -> int:
    from .activations import extract, write_unit_tables
    from .backends import open_backend
    from .cache import atomic_write_text
    from .data.images import open_image_set
    from .demo import DEMO_LAYERS, prepare_demo
    from .models.loading import load_model
    from .predict import predictions_from

    check_out_dir(a.out)
    spec, image_dir = prepare_demo()
    spec = spec.with_(device=a.device or "auto")
    loaded = load_model(spec)
    backend = open_backend(loaded)
    images = open_image_set(image_dir)
    acts = run_job(extract(backend, loaded.cache_id, images, list(DEMO_LAYERS)), "demo", a.quiet)
    preds = predictions_from(acts, spec)
    out = Path(a.out)
    preds.write_csv(out / "predictions.csv")
    write_unit_tables(acts, out / "units")
    summary = _prediction_summary(preds, acts, spec)
    summary.update({"model": str(Path(spec.path)), "images_dir": str(image_dir), "backend": backend.name,
                    "device": backend.device})
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    li, pr = preds.label_index, preds.predicted
    k = len(preds.classes)
    conf = [[int(((li == i) & (pr == j)).sum()) for j in range(k)] for i in range(k)]
    lines = [
        "# ConvLens demo", "",
        "MTCNN RNet (pretrained weights from the facenet-pytorch wheel) on scikit-image's lfw_subset "
        "(100 faces, 100 non-faces).", "",
        f"- model: `{spec.path}` ({loaded.format}, sha256 {loaded.sha256[:12]}), backend {backend.name} on {backend.device}",
        f"- images: `{image_dir}` ({len(images)} images)",
        f"- accuracy: **{summary['accuracy']:.2%}** ({int(preds.correct.sum())}/{preds.n_scored})", "",
        "| label \\ predicted | " + " | ".join(preds.classes) + " |",
        "|---|" + "---|" * k,
        *[f"| {preds.classes[i]} | " + " | ".join(map(str, conf[i])) + " |" for i in range(k)], "",
        f"Per-unit statistics of {', '.join(DEMO_LAYERS)}: `units/`.",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    _say(a, _prediction_line(summary, out / "predictions.csv"))
    return EXIT_OK


def cmd_cache(a: argparse.Namespace) -> int:
    from .cache import Cache

    cache = Cache()
    if a.clear is not None:
        kinds = list(cache.usage()) if a.clear == "all" else [a.clear]
        for kind in kinds:
            cache.clear(kind)
        _say(a, f"cleared {', '.join(kinds) or 'nothing'} in {cache.root}")
    usage = cache.usage()
    _emit_json({"root": str(cache.root), "kinds": usage,
                "total_bytes": sum(u["bytes"] for u in usage.values())}, None)
    return EXIT_OK


def _say(a: argparse.Namespace, msg: str) -> None:
    if not a.quiet:
        print(msg, file=sys.stderr)


# ----------------------------------------------------------------------------- parser


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convlens", description="See why your CNN decides what it decides. "
                                "Without a command, opens the desktop app.",
                                epilog="The app: convlens [--demo] [--open-model FILE] [--open-images DIR] "
                                "[--open-project FILE]. convlens figure --view NAME ... exports any view of "
                                "the app as PNG, SVG or PDF without a screen (see convlens figure --help).")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="command")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn)
        COMMANDS[name] = fn
        return sp

    sp = add("info", cmd_info, "describe a model: format, backend, input, classes and every layer (JSON)")
    add_model_options(sp)
    sp.add_argument("--out", help="write the JSON here instead of standard output")

    for name, fn, help_ in (("predict", cmd_predict, "predict every image; writes OUT/predictions.csv"),
                            ("activations", cmd_activations, "extract layers into the cache; per-unit stats")):
        sp = add(name, fn, help_)
        add_model_options(sp)
        sp.add_argument("--images", required=True, help="image folder (class subfolders = labels) or CSV list")
        sp.add_argument("--out", required=True, help="output folder")
        sp.add_argument("--batch-size", type=int, default=64)
        if name == "activations":
            sp.add_argument("--layers", help="comma-separated layer names (default: the model's conv stages)")
            sp.add_argument("--no-maps", action="store_true", help="keep per-unit statistics only, not maps")

    from .dissection.cli import add_parser as add_dissect

    add_dissect(sub, add_model_options)

    sp = add("cache", cmd_cache, "show what the on-disk cache holds (JSON); --clear KIND|all empties it")
    sp.add_argument("--clear", metavar="KIND", help="activations, dissection, onnx, thumbs, concepts, assets, ... or all")

    sp = add("demo", cmd_demo, "RNet face classifier on real face crops: predictions and a short report")
    sp.add_argument("--out", default="convlens-demo", help="output folder (default: convlens-demo)")
    sp.add_argument("--device", help="auto, cpu, cuda")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="convlens: %(levelname)s: %(message)s")
    if not getattr(a, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return a.func(a)
    except ConvLensError as e:
        print(f"convlens: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as e:  # an output path that cannot be written: read-only, full, a file in the way
        where = f"{e.filename}: " if e.filename else ""
        print(f"convlens: error: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("convlens: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `convlens info ... | head`: the reader left, nothing to report
        sys.stderr.close()
        return EXIT_OK
