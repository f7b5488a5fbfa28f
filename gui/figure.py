"""``convlens figure``: export any view as PNG, SVG or PDF without a screen.

The same views and the same export code as the app's File > Export figure, on Qt's offscreen
platform: open the model and images, set the selection (layer, unit, image), let every job the
view started finish, then export the view's figure.

    convlens figure --view heatmaps --model M [model options] --images DIR \\
                    [--layer L] [--unit K] [--image I] --out fig.pdf [--dpi 300]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from engine.cli import add_model_options

    p = argparse.ArgumentParser(prog="convlens figure", description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--view", required=True, help="view name: images, heatmaps, dissection, ...")
    p.add_argument("--images", required=True, help="image folder or CSV list")
    p.add_argument("--layer", help="layer to show (default: the view's choice)")
    p.add_argument("--unit", type=int, help="unit to show")
    p.add_argument("--image", type=int, default=0, help="index of the image to show (default 0)")
    p.add_argument("--out", required=True, help="output file: .png, .svg or .pdf")
    p.add_argument("--dpi", type=int, default=300, help="PNG resolution (default 300)")
    p.add_argument("--size", default="1400x900", help="window size WxH used for the layout")
    p.add_argument("--timeout", type=float, default=600, help="seconds to wait for the view's jobs")
    return p


def main(argv: Sequence[str]) -> int:
    a = build_parser().parse_args(list(argv))
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings, QTemporaryDir
    from PySide6.QtWidgets import QApplication

    from engine.cli import spec_from_args
    from engine.types import ConvLensError

    from .export import FORMATS, export_widget
    from .main_window import MainWindow

    try:
        spec = spec_from_args(a)
        if not a.out.lower().endswith(tuple(f".{f}" for f in FORMATS)):
            raise ConvLensError(f"{a.out}: the figure must be .png, .svg or .pdf")
    except ConvLensError as e:
        print(f"convlens: error: {e}", file=sys.stderr)
        return 1
    app = QApplication.instance() or QApplication(sys.argv[:1])
    tmp = QTemporaryDir()
    win = MainWindow(settings=QSettings(tmp.filePath("settings.ini"), QSettings.Format.IniFormat))
    if a.view not in win.views:
        print(f"convlens: error: no view named '{a.view}' (views: {', '.join(win.views)})", file=sys.stderr)
        return 1
    w, h = (int(v) for v in a.size.lower().split("x"))
    win.resize(w, h)
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

    try:
        wait(lambda: win.session.predictions is not None and idle(), "model, images and predictions")
        sel = win.selection
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
        if errors:
            raise ConvLensError(errors[0])
        out = export_widget(win.views[a.view].export_target(), a.out, dpi=a.dpi)
    except (ConvLensError, TimeoutError, ValueError, OSError) as e:
        msg = f"timed out waiting for {e}" if isinstance(e, TimeoutError) else str(e)
        print(f"convlens: error: {msg}", file=sys.stderr)
        win.close()
        return 1
    print(f"wrote {out}", file=sys.stderr)
    win.close()
    return 0
