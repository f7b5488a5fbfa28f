"""QApplication set-up and the GUI entry point (``python main.py [--demo] [--open-project F]``)."""

from __future__ import annotations

import argparse
import os
import sys
import time

T0 = time.perf_counter()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="convlens", description="ConvLens desktop app")
    p.add_argument("--demo", action="store_true", help="open the demo model (RNet) and its face images")
    p.add_argument("--open-model", help="model file to open")
    p.add_argument("--open-images", help="image folder or CSV to open")
    p.add_argument("--open-project", "--project", dest="project", help="project file to open")
    p.add_argument("--screenshot", help="save a screenshot of the window to this PNG once everything has loaded, then quit")
    p.add_argument("--quit-after", type=float, help="quit after this many seconds (benchmarks, smoke tests)")
    return p.parse_args(argv)


def app_icon() -> object:
    """The application icon, from ``resources/icon.svg``."""
    from PySide6.QtCore import QByteArray
    from PySide6.QtGui import QIcon, QPixmap

    import resources

    pixmap = QPixmap()
    pixmap.loadFromData(QByteArray(resources.data("icon.svg")), "SVG")
    return QIcon(pixmap)


def apply_resources(app: object) -> None:
    """Window icon and style sheet from the packaged ``resources/`` folder."""
    import resources

    app.setWindowIcon(app_icon())  # type: ignore[attr-defined]
    app.setStyleSheet(resources.text("style.qss"))  # type: ignore[attr-defined]


def run(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("ConvLens")
    app.setOrganizationName("ConvLens")
    apply_resources(app)
    from .main_window import MainWindow

    win = MainWindow()
    win.show()
    win.startup_seconds = time.perf_counter() - T0
    if os.environ.get("CONVLENS_REPORT_STARTUP"):
        # after the first pass of the event loop: the window has been laid out and painted
        QTimer.singleShot(0, lambda: print(f"convlens-window-shown {time.time():.6f}", file=sys.stderr, flush=True))
    if args.demo:
        win.open_demo()
    if args.open_model:
        win.open_model_file(args.open_model)
    if args.open_images:
        win.session.open_images(args.open_images)
    if args.project:
        win.open_project(args.project)
    if args.screenshot:
        win.screenshot_when_idle(args.screenshot)
    if args.quit_after is not None:
        QTimer.singleShot(int(args.quit_after * 1000), win.close)
    return app.exec()
