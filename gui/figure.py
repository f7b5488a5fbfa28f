"""``convlens figure``: export any view as PNG, SVG or PDF without a screen.

The same views and the same export code as the app's File > Export figure, on Qt's offscreen
platform: open the model and images, set the selection (layer, unit, image), let every job the
view started finish, then export the view's figure.

    convlens figure --view heatmaps --model M [model options] --images DIR \\
                    [--layer L] [--unit K] [--image I] --out fig.pdf [--dpi 300]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence


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


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import add_model_options, int_range, non_negative_int, positive_float

    p = argparse.ArgumentParser(prog="convlens figure", description=__doc__.splitlines()[0])
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
    return p


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
    """``convlens figure ARGS``; ``quiet`` (``convlens -q figure``) leaves out the closing line."""
    try:
        a = build_parser().parse_args(list(argv))
    except SystemExit as e:  # a usage error (argparse printed it; exit 2) or --help
        return e.code if isinstance(e.code, int) else 2
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

    from engine.cli import check_out_file, error, shown, spec_from_args, writing
    from engine.types import ConvLensError

    from .export import FORMATS, export_widget
    from .main_window import MainWindow

    try:
        spec = spec_from_args(a)
        if not a.out.lower().endswith(tuple(f".{f}" for f in FORMATS)):
            raise ConvLensError(f"{a.out}: the figure must be .png, .svg or .pdf")
        check_out_file(a.out, "figure")
    except ConvLensError as e:
        error(e)
        return 1
    _quiet_qt()
    app = QApplication.instance() or QApplication(sys.argv[:1])
    tmp = QTemporaryDir()
    win = MainWindow(settings=QSettings(tmp.filePath("settings.ini"), QSettings.Format.IniFormat))
    if a.view not in win.views:
        error(f"no view named '{a.view}' (views: {', '.join(win.views)})")
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
            out = export_widget(win.views[a.view].export_target(), a.out, dpi=a.dpi)
    except (ConvLensError, TimeoutError, ValueError, OSError) as e:
        msg = f"timed out waiting for {e}" if isinstance(e, TimeoutError) else str(e)
        error(msg)
        win.close()
        return 1
    if not quiet:
        print(shown(f"wrote {out}"), file=sys.stderr)
    win.close()
    return 0
