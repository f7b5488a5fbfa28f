"""``convlens figure``: export any view as PNG, SVG or PDF without a screen.

The same views and the same export code as the app's File > Export figure, on Qt's offscreen
platform: open the model and images, set the selection (layer, unit, image), let every job the
view started finish, then export the view's figure.

    convlens figure --view heatmaps --model M [model options] --images DIR \\
                    [--layer L] [--unit K] [--image I] --out fig.pdf [--dpi 300] \\
                    [--kind unit|layer] [--size-preset column|full | --width-in W] \\
                    [--include PART,PART] [--exclude PART,PART] [--option PART=on|off]

What a figure can include is declared by its view (``View.figure_kinds`` and
``View.figure_options``); a kind or part the view does not declare is an error naming those it
does, before the model runs. This module imports no Qt until the command runs: ``register``
puts ``figure`` into ``convlens --help`` with the other commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

#: what Qt's offscreen platform says about every top-level window; nothing a user can act on
_QT_NOISE = ("This plugin does not support propagateSizeHints()",)


def window_size(text: str) -> tuple[int, int]:
    """``--size WxH``: two whole numbers from 100 to 8000."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        w, h = (int(v) for v in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels such as 1400x900, got {text!r}") from None
    if not (100 <= w <= 8000 and 100 <= h <= 8000):
        raise argparse.ArgumentTypeError(f"width and height must be from 100 to 8000 pixels, got {text!r}")
    return w, h


#: page widths (gui.figures.SIZE_PRESETS, which needs Qt: checked against it when the command runs)
_SIZE_PRESETS = ("column", "full")
_ON, _OFF = ("on", "true", "yes", "1"), ("off", "false", "no", "0")


def part_names(text: str) -> list[str]:
    """``--include`` / ``--exclude``: comma-separated part names."""
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"names no part: {text!r}")
    return names


def part_setting(text: str) -> tuple[str, bool]:
    """``--option PART=on|off``."""
    key, eq, value = text.partition("=")
    value = value.strip().lower()
    if not eq or not key.strip() or value not in (*_ON, *_OFF):
        raise argparse.ArgumentTypeError(f"expected PART=on or PART=off, got {text!r}")
    return key.strip(), value in _ON


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``convlens figure``."""
    from engine.cli_common import (
        add_model_options,
        float_range,
        int_range,
        non_negative_int,
        positive_float,
    )

    add_model_options(p)
    p.add_argument("--view", required=True, help="view name: images, heatmaps, dissection, ...")
    p.add_argument("--images", required=True, help="image folder or CSV list")
    p.add_argument("--layer", help="layer to show (default: the view's choice)")
    p.add_argument("--unit", type=non_negative_int, help="unit to show")
    p.add_argument("--image", type=non_negative_int, default=0, help="index of the image to show (default 0)")
    p.add_argument("--out", required=True, help="output file: .png, .svg or .pdf")
    p.add_argument("--dpi", type=int_range(1, 1200), default=300, help="PNG resolution, 1 to 1200 (default 300)")
    p.add_argument("--size", type=window_size, default=(1400, 900), metavar="WxH",
                   help="window size WxH used for the layout (default 1400x900)")
    p.add_argument("--timeout", type=positive_float, default=600, help="seconds to wait for the view's jobs")
    g = p.add_argument_group("figure", "what the view's figure shows; an unknown kind or part is an error "
                             "that lists the view's own")
    g.add_argument("--kind", help="which of the view's figures (e.g. heatmaps: unit, layer; default: the first)")
    g.add_argument("--size-preset", choices=_SIZE_PRESETS, default="full",
                   help="page width: column (3.5 in) or full (7 in, the default)")
    g.add_argument("--width-in", type=float_range(1, 40, low_open=False, high_open=False),
                   help="page width in inches, 1 to 40 (instead of --size-preset)")
    g.add_argument("--include", type=part_names, action="append", default=[], metavar="PART[,PART]",
                   help="parts to show (e.g. heatmaps: image, colorbar, top_images, captions)")
    g.add_argument("--exclude", type=part_names, action="append", default=[], metavar="PART[,PART]",
                   help="parts to leave out")
    g.add_argument("--option", type=part_setting, action="append", default=[], metavar="PART=on|off",
                   help="one part on or off (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    """``convlens figure`` as a parser of its own (``main``); ``register`` adds the same command."""
    p = argparse.ArgumentParser(prog="convlens figure", description=_HELP)
    add_arguments(p)
    return p


_HELP = "export any view of the app as PNG, SVG or PDF without a screen (same figures as File > Export figure)"

#: after the engine's commands in ``convlens --help``
ORDER = 200


def register(subparsers: object) -> None:
    """Add ``figure`` to the ``convlens`` subparsers (no Qt is imported until it runs)."""
    sp = subparsers.add_parser("figure", help=_HELP, description=_HELP)  # type: ignore[attr-defined]
    add_arguments(sp)
    sp.set_defaults(func=run)


def run(a: argparse.Namespace) -> int:
    """The ``figure`` command of ``convlens`` (``a.quiet``: no closing line)."""
    return _run(a, bool(getattr(a, "quiet", False)))


def figure_options(a: argparse.Namespace, view: object) -> object:
    """The :class:`gui.figures.FigureOptions` of ``a`` for ``view``: kind and parts checked against
    what the view declares (a ConvLensError naming them)."""
    from engine.types import ConvLensError

    from .figures import SIZE_PRESETS, FigureOptions

    title = getattr(view, "title", "") or a.view
    kinds = [k.key for k in view.figure_kinds()]  # type: ignore[attr-defined]
    if not kinds:
        raise ConvLensError(f"the {title} view composes no figure")
    if a.kind is not None and a.kind not in kinds:
        raise ConvLensError(f"--kind {a.kind}: the {title} view has no such figure (figures: {', '.join(kinds)})")
    kind = a.kind or kinds[0]
    declared = {o.key: o for o in view.figure_options()}  # type: ignore[attr-defined]
    include: dict[str, bool] = {}
    settings = [(k, True) for names in a.include for k in names] + [(k, False) for names in a.exclude for k in names]
    for key, on in [*settings, *a.option]:
        option = declared.get(key)
        if option is None:
            raise ConvLensError(f"the {title} figure has no part '{key}' "
                                f"(parts: {', '.join(declared) or 'none'})")
        if option.kinds and kind not in option.kinds:
            raise ConvLensError(f"part '{key}' belongs to the {', '.join(option.kinds)} figure of the {title} "
                                f"view, not the {kind} figure (--kind)")
        if key in include and include[key] != on:
            raise ConvLensError(f"part '{key}' is both included and excluded")
        include[key] = on
    if a.size_preset not in SIZE_PRESETS:
        raise ConvLensError(f"--size-preset {a.size_preset}: sizes are {', '.join(SIZE_PRESETS)}")
    return FigureOptions(kind=kind, size=a.size_preset, width_in=a.width_in, dpi=a.dpi, include=include)


def _quiet_qt() -> None:
    """Drop the offscreen platform's known noise (only those exact messages); Qt's other
    messages still reach standard error."""
    from PySide6.QtCore import qInstallMessageHandler

    def handler(_mode: object, _context: object, message: str) -> None:
        if message in _QT_NOISE:
            return
        print(message, file=sys.stderr)

    qInstallMessageHandler(handler)


class _Once(logging.Filter):
    """Each log message once: the app's views may open the same images more than once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _check_selection(a: argparse.Namespace, model: object, current_layer: str, n_images: int | None) -> None:
    """The asked-for layer, unit and image exist: an error naming what there is, before any export."""
    from engine.types import ConvLensError

    layers = list(getattr(model, "layers", []))
    names = [li.name for li in layers]
    if a.layer is not None:
        info = next((li for li in layers if li.name == a.layer), None)
        spatial = [li.name for li in layers if li.is_spatial]
        if info is None or (a.view == "heatmaps" and not info.is_spatial):
            choice = spatial if a.view == "heatmaps" else names
            few = ", ".join(choice[:8]) + (f", ... ({len(choice)} in all)" if len(choice) > 8 else "")
            why = "no layer named" if info is None else "heatmaps need a layer with C x H x W output, not"
            raise ConvLensError(f"{a.model}: {why} '{a.layer}' (layers: {few or 'none'})")
    if a.unit is not None:
        layer = a.layer or current_layer  # without --layer: the layer the app chose on loading
        info = next((li for li in layers if li.name == layer), None)
        if info is not None and info.units and a.unit >= info.units:
            raise ConvLensError(f"--unit {a.unit}: layer '{layer}' has {info.units} units (0 to {info.units - 1})")
    if n_images is not None and a.image >= n_images:
        raise ConvLensError(f"--image {a.image}: {a.images} has {n_images} images (0 to {n_images - 1})")


def main(argv: Sequence[str], quiet: bool = False) -> int:
    """``convlens figure ARGS`` on its own parser; ``quiet`` (``convlens -q figure``) leaves out
    the closing line. ``convlens figure`` itself goes through :func:`register` and :func:`run`."""
    try:
        a = build_parser().parse_args(list(argv))
    except SystemExit as e:  # a usage error (argparse printed it; exit 2) or --help
        return e.code if isinstance(e.code, int) else 2
    return _run(a, quiet)


def _run(a: argparse.Namespace, quiet: bool) -> int:
    logging.basicConfig(level=logging.WARNING, format="convlens: %(levelname)s: %(message)s")
    once, handlers = _Once(), list(logging.getLogger().handlers)
    for h in handlers:
        h.addFilter(once)
    try:
        return _figure(a, quiet)
    finally:  # handlers outlive the command when main is called in-process
        for h in handlers:
            h.removeFilter(once)


def _figure(a: argparse.Namespace, quiet: bool) -> int:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings, QTemporaryDir
    from PySide6.QtWidgets import QApplication

    from engine.cli_common import (
        assumed_line,
        assumed_values,
        check_out_file,
        error,
        shown,
        spec_from_args,
        warn,
        writing,
    )
    from engine.types import ConvLensError

    from .export import FORMATS, export_figure
    from .main_window import MainWindow

    try:
        spec = spec_from_args(a)
        if not a.out.lower().endswith(tuple(f".{f}" for f in FORMATS)):
            raise ConvLensError(f"{a.out}: the figure must be .png, .svg or .pdf")
        check_out_file(a.out, "figure")
        assumed = assumed_values(spec, dict(vars(a)), a.model_config)
    except ConvLensError as e:
        error(e)
        return 1
    if assumed:  # the same line as every command's
        warn(assumed_line(Path(spec.path).name, assumed))
    _quiet_qt()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    tmp = QTemporaryDir()
    win = MainWindow(settings=QSettings(tmp.filePath("settings.ini"), QSettings.Format.IniFormat))
    if a.view not in win.views:
        error(f"no view named '{a.view}' (views: {', '.join(win.views)})")
        win.close()
        return 1
    try:
        options = figure_options(a, win.views[a.view])
    except ConvLensError as e:
        error(e)
        win.close()
        return 1
    win.resize(*a.size)
    win.show()
    dock = win.docks[a.view]
    dock.setFloating(False)
    dock.show()
    dock.raise_()
    errors: list[str] = []
    win.session.model_failed.connect(errors.append)
    win.session.images_failed.connect(errors.append)
    win.session.load_model(spec)
    win.session.open_images(a.images)

    def idle() -> bool:
        return not any(j.state in ("queued", "running") for j in win.runner.jobs())

    def wait(cond: object, what: str) -> None:
        deadline = time.monotonic() + a.timeout
        while not cond() and not errors:  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            app.processEvents()
            time.sleep(0.01)

    def failed() -> None:
        if errors:
            raise ConvLensError(errors[0])

    try:
        sel = win.selection
        wait(lambda: win.session.model is not None, "the model")
        failed()
        _check_selection(a, win.session.model, sel.layer, None)  # before the images are run through the model
        wait(lambda: sel.images is not None, "the images")
        failed()
        _check_selection(a, win.session.model, sel.layer, len(sel.images))
        wait(lambda: win.session.predictions is not None and idle(), "model, images and predictions")
        sel.current_image = a.image
        if a.layer:
            sel.layer = a.layer
        wait(lambda: idle() and (not a.layer or sel.layer == a.layer), "the view's data")
        if a.unit is not None:
            sel.unit = a.unit
        wait(idle, "the view's data")
        for _ in range(20):  # let queued repaints and deferred layouts settle
            app.processEvents()
            time.sleep(0.01)
        failed()
        with writing(a.out):
            out = export_figure(win.views[a.view], a.out, options)
    except (ConvLensError, TimeoutError, ValueError, OSError) as e:
        msg = f"timed out waiting for {e}" if isinstance(e, TimeoutError) else str(e)
        error(msg)
        win.close()
        return 1
    if not quiet:
        print(shown(f"wrote {out}"), file=sys.stderr)
    win.close()
    return 0
