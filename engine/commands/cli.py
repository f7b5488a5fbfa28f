"""The built-in commands: ``info``, ``predict``, ``activations``, ``demo`` and ``cache``.

Registered like every method's command (see :mod:`engine.cli_common`); found by
:func:`engine.cli.discover_commands` as the ``cli`` module of package ``engine.commands``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from engine.cli_common import (
    EXIT_OK,
    add_executor_options,
    add_model_options,
    check_out_dir,
    check_out_file,
    emit_json,
    executor_from_args,
    listed_count,
    open_model,
    parse_layers,
    positive_int,
    report_skipped,
    run_job,
    say,
    skipped_files,
    spec_from_args,
    write_json_output,
    write_text_output,
    writing,
)
from engine.types import ModelSpec

#: listed before the methods' commands in ``convlens --help``
ORDER = 0


def register(subparsers: Any) -> None:
    """Add info, predict, activations, demo and cache to ``subparsers``."""

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        sp = subparsers.add_parser(name, help=help_, description=help_)
        sp.set_defaults(func=fn, names_skipped=True)
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
        sp.add_argument("--batch-size", type=positive_int, default=64, help="images per batch (default 64)")
        if name == "activations":
            sp.add_argument("--layers", help="comma-separated layer names (default: the model's conv stages)")
            sp.add_argument("--no-maps", action="store_true", help="keep per-unit statistics only, not maps")
        add_executor_options(sp)

    sp = add("demo", cmd_demo, "RNet face classifier on real face crops: predictions and a short report")
    sp.add_argument("--out", default="convlens-demo", help="output folder (default: convlens-demo)")
    sp.add_argument("--device", help="auto, cpu, cuda")

    sp = add("cache", cmd_cache, "show what the on-disk cache holds (JSON); --clear KIND|all empties it")
    sp.add_argument("--clear", metavar="KIND",
                    help="activations, dissection, onnx, thumbs, concepts, assets, ... or all")


def cmd_info(a: argparse.Namespace) -> int:
    if a.out is not None:
        check_out_file(a.out, "JSON file")
    opened = open_model(spec_from_args(a), a)
    loaded, backend, spec = opened.loaded, opened.backend, opened.spec
    layers = backend.layers()
    from engine.models.layers import default_layers

    chosen = opened.choice.chosen
    info = {
        "model": str(Path(spec.path).resolve()),
        "format": loaded.format,
        "sha256": loaded.sha256,
        "backend": backend.name,
        "device": backend.device,
        "gradients": backend.supports_gradients,
        "input_shape": [None, spec.preprocess.n_channels, *spec.preprocess.input_size],
        "preprocess": spec.preprocess.to_dict(),
        "classes": _info_classes(spec, chosen.n_classes if chosen else None),
        **opened.choice.to_dict(),
        "assumed": opened.assumed,
        "default_layers": default_layers(layers),
        "layers": [{"name": li.name, "kind": li.kind, "shape": list(li.shape)} for li in layers],
        "notes": loaded.notes,
    }
    emit_json(info, a.out)
    return EXIT_OK


def _info_classes(spec: ModelSpec, n: int | None) -> list[str] | None:
    """The class names ``predict`` uses (ImageNet's for a torchvision architecture with 1000
    outputs), or those given; None without names."""
    from engine.predict import class_names, imagenet_names_apply

    if n is not None and ((spec.classes is None and imagenet_names_apply(spec, n))
                          or (spec.classes is not None and len(spec.classes) == n)):
        return list(class_names(spec, n))
    return list(spec.classes) if spec.classes else None


def _extract_for(a: argparse.Namespace, layers_arg: str | None, with_layers: bool) -> tuple[Any, Any, Any, Any]:
    from engine.activations import extract
    from engine.data.images import open_image_set

    executor = executor_from_args(a)  # before any work: --ray without Ray installed says how to get it
    check_out_dir(a.out, ["summary.json", *([] if with_layers else ["predictions.csv"])])
    spec = spec_from_args(a)
    images = open_image_set(a.images)
    opened = open_model(spec, a)
    loaded, backend, spec = opened.loaded, opened.backend, opened.spec
    layers = parse_layers(layers_arg, spec, backend) if with_layers else []
    store_maps = not getattr(a, "no_maps", False)
    if executor is None:
        acts = run_job(extract(backend, loaded.cache_id, images, layers, batch_size=a.batch_size,
                               store_maps=store_maps), "extract", a.quiet)
    else:
        from engine.cluster import extract_on_ray

        with executor:
            acts = run_job(extract_on_ray(backend, loaded.cache_id, images, layers, executor=executor,
                                          batch_size=a.batch_size, store_maps=store_maps), "extract", a.quiet)
    return spec, images, opened, acts


def _prediction_summary(preds: Any, acts: Any, images: Any, spec: ModelSpec) -> dict[str, Any]:
    return {
        "images": len(preds.paths),  # the rows of predictions.csv
        "listed": listed_count(images),
        "skipped": skipped_files(acts, images),
        "classes": list(preds.classes),
        "score_kind": preds.score_kind,
        "scored": preds.n_scored,
        "accuracy": preds.accuracy,
        "unmatched_labels": preds.unmatched_labels(),
        "model": spec.path,
    }


def _write_predictions(preds: Any, out: Path) -> Path:
    with writing(out / "predictions.csv"):
        return preds.write_csv(out / "predictions.csv")


def cmd_predict(a: argparse.Namespace) -> int:
    from engine.predict import predictions_from, write_unscored_csv

    spec, images, opened, acts = _extract_for(a, None, with_layers=False)
    out = Path(a.out)
    if opened.choice.index is None:  # not a classifier: no classes, no accuracy (said when opened)
        with writing(out / "predictions.csv"):
            write_unscored_csv(acts, out / "predictions.csv")
        summary = {"images": acts.n_images, "listed": listed_count(images), "skipped": skipped_files(acts, images),
                   "classes": None, "score_kind": None, "scored": 0, "accuracy": None, "unmatched_labels": [],
                   "model": spec.path, "class_scores": False, **opened.choice.to_dict(), "assumed": opened.assumed}
        write_json_output(out / "summary.json", summary)
        report_skipped(summary["skipped"], out / "summary.json")
        say(a, f"{_images_note(summary)}: the model's output is not class scores, so no predictions or accuracy; "
               f"wrote {out / 'predictions.csv'} (paths, labels and status)")
        return EXIT_OK
    preds = predictions_from(acts, spec)
    _write_predictions(preds, out)
    summary = {**_prediction_summary(preds, acts, images, spec), "class_scores": True,
               **opened.choice.to_dict(), "assumed": opened.assumed}
    write_json_output(out / "summary.json", summary)
    report_skipped(summary["skipped"], out / "summary.json")
    say(a, _prediction_line(summary, out / "predictions.csv"))
    return EXIT_OK


def _images_note(s: dict[str, Any]) -> str:
    skipped = f", {len(s['skipped'])} skipped" if s["skipped"] else ""
    return f"{s['listed']} images{skipped}"


def _few(names: list[str], n: int = 8) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _prediction_line(s: dict[str, Any], csv_path: Path) -> str:
    if s["accuracy"] is not None:
        acc = f"accuracy {s['accuracy']:.2%} on {s['scored']} labelled"
        if s["unmatched_labels"]:
            acc += f" (labels that match no class name, not scored: {_few(s['unmatched_labels'])})"
    elif s["unmatched_labels"]:
        acc = (f"no accuracy: no label matches a class name (labels: {_few(s['unmatched_labels'])}; "
               f"classes: {_few(list(s['classes']))}; give the names with --classes)")
    else:
        acc = "no labels"
    return f"{_images_note(s)}: {acc}; wrote {csv_path}"


def cmd_activations(a: argparse.Namespace) -> int:
    from engine.activations import write_unit_tables

    _spec, images, _opened, acts = _extract_for(a, a.layers, with_layers=True)
    out = Path(a.out)
    with writing(out):
        files = write_unit_tables(acts, out)
    summary = {
        "images": acts.n_images,
        "listed": listed_count(images),
        "valid": int(acts.valid.sum()),
        "skipped": skipped_files(acts, images),
        "layers": {k: {"kind": v.kind, "shape": list(v.shape)} for k, v in acts.layers.items()},
        "cache": str(acts.folder),
        "seconds": acts.seconds,
        "files": [str(f) for f in files],
    }
    write_json_output(out / "summary.json", summary)
    report_skipped(summary["skipped"], out / "summary.json")
    say(a, f"{_images_note(summary)}, {len(acts.layers)} layers -> {out} (cache: {acts.folder})")
    return EXIT_OK


def cmd_demo(a: argparse.Namespace) -> int:
    from engine.activations import extract, write_unit_tables
    from engine.backends import open_backend
    from engine.data.images import open_image_set
    from engine.demo import DEMO_LAYERS, prepare_demo
    from engine.models.loading import load_model
    from engine.predict import predictions_from

    check_out_dir(a.out, ["predictions.csv", "summary.json", "report.md"])
    spec, image_dir = prepare_demo()
    spec = spec.with_(device=a.device or "auto")
    loaded = load_model(spec)
    backend = open_backend(loaded)
    images = open_image_set(image_dir)
    acts = run_job(extract(backend, loaded.cache_id, images, list(DEMO_LAYERS)), "demo", a.quiet)
    preds = predictions_from(acts, spec)
    out = Path(a.out)
    _write_predictions(preds, out)
    with writing(out / "units"):
        write_unit_tables(acts, out / "units")
    summary = _prediction_summary(preds, acts, images, spec)
    summary.update({"model": str(Path(spec.path)), "images_dir": str(image_dir), "backend": backend.name,
                    "device": backend.device})
    write_json_output(out / "summary.json", summary)
    li, pr = preds.label_index, preds.predicted
    k = len(preds.classes)
    conf = [[int(((li == i) & (pr == j)).sum()) for j in range(k)] for i in range(k)]
    lines = [
        "# ConvLens demo", "",
        ("MTCNN RNet (pretrained weights from the facenet-pytorch wheel) on scikit-image's lfw_subset "
        "(100 faces, 100 non-faces)."), "",
        f"- model: `{spec.path}` ({loaded.format}, sha256 {loaded.sha256[:12]}), "
        f"backend {backend.name} on {backend.device}",
        f"- images: `{image_dir}` ({len(images)} images)",
        f"- accuracy: **{summary['accuracy']:.2%}** ({int(preds.correct.sum())}/{preds.n_scored})", "",
        "| label \\ predicted | " + " | ".join(preds.classes) + " |",
        "|---|" + "---|" * k,
        *[f"| {preds.classes[i]} | " + " | ".join(map(str, conf[i])) + " |" for i in range(k)], "",
        f"Per-unit statistics of {', '.join(DEMO_LAYERS)}: `units/`.",
    ]
    write_text_output(out / "report.md", "\n".join(lines) + "\n")
    report_skipped(summary["skipped"], out / "summary.json")
    say(a, _prediction_line(summary, out / "predictions.csv"))
    return EXIT_OK


def cmd_cache(a: argparse.Namespace) -> int:
    from engine.cache import Cache

    cache = Cache()
    if a.clear is not None:
        # only a kind the cache lists, or "all": a path, "..", an unknown name is a CacheError
        # (exit 1) and removes nothing
        kinds = cache.clear(a.clear)
        say(a, f"cleared {', '.join(kinds) or 'nothing'} in {cache.root}")
    freed = cache.clean_temporaries()  # a killed run's leftovers (never a live writer's)
    if freed:
        say(a, f"removed {freed} bytes left behind by interrupted runs in {cache.root}")
    usage = cache.usage()
    emit_json({"root": str(cache.root), "kinds": usage,
               "total_bytes": sum(u["bytes"] + u.get("temporary_bytes", 0) for u in usage.values()),
               "temporary_bytes": sum(u.get("temporary_bytes", 0) for u in usage.values())}, None)
    return EXIT_OK
