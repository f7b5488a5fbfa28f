"""Shared helpers of the GUI layout tests: a demo window at a screen size, and what runs off a view."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

JOB_MS = 180_000


def widgets_off_view(view: Any) -> list[str]:
    """The visible children of ``view`` that extend past its visible area, unless a scroll area
    holds them (a scroll area's contents may be larger than its viewport: that is what it is for)."""
    from PySide6.QtCore import QPoint, QRect
    from PySide6.QtWidgets import QAbstractScrollArea, QWidget

    def outside(w: QWidget) -> bool:
        p = w.parentWidget()
        while p is not None and p is not view:
            if isinstance(p, QAbstractScrollArea) and p.viewport().isAncestorOf(w):
                return False
            p = p.parentWidget()
        rect = QRect(w.mapTo(view, QPoint(0, 0)), w.size())
        return not view.rect().adjusted(-1, -1, 1, 1).contains(rect)

    return [f"{type(w).__name__} {w.objectName()}".strip() for w in view.findChildren(QWidget)
            if w.isVisibleTo(view) and w.isVisible() and outside(w)]


@contextlib.contextmanager
def demo_window(qtbot: Any, demo: Any, tmp_path: Path, monkeypatch: Any, view_name: str,
                size: tuple[int, int] = (1024, 640)) -> Iterator[tuple[Any, Any]]:
    """A MainWindow with the demo model and images loaded, resized to ``size``, with the dock of
    ``view_name`` raised and visible: yields (window, view); closes the window afterwards."""
    from PySide6.QtCore import QSettings

    from gui.main_window import MainWindow

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    win = MainWindow(settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    try:
        spec, images = demo
        win.session.load_model(spec)
        with qtbot.waitSignal(win.session.predictions_changed, timeout=JOB_MS, check_params_cb=lambda p: p is not None):
            win.session.open_images(str(images))
        win.resize(*size)
        view = win.views[view_name]
        win.docks[view_name].show()
        win.docks[view_name].raise_()
        qtbot.waitUntil(lambda: view.isVisible() and not view.visibleRegion().isEmpty(), timeout=5000)
        yield win, view
    finally:
        win.close()
