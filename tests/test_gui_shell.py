"""The main window, through the same code paths a person's clicks take."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image
from PySide6.QtCore import QSettings

from gui.dialogs import OpenModelDialog
from gui.main_window import MainWindow

from .gui_layout import widgets_off_view

LOAD_MS = 120_000


@pytest.fixture
def window(qtbot, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    settings = QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat)
    win = MainWindow(settings=settings)
    qtbot.addWidget(win)
    win.show()
    yield win
    win.close()


def _open_demo(qtbot, win: MainWindow, spec, images: Path) -> None:
    """Open the model through the open-model dialog and the images like the folder dialog does."""
    dlg = OpenModelDialog(win.session, win, path=spec.path)
    assert "state dict" in dlg.format_label.text()
    assert dlg.arch.currentText() == "rnet"  # from rnet.toml beside the checkpoint
    assert (dlg.height.value(), dlg.width.value()) == (24, 24)
    assert dlg.classes.text() == "non-face, face"
    with qtbot.waitSignal(win.session.predictions_changed, timeout=LOAD_MS,
                          check_params_cb=lambda p: p is not None):
        dlg.load()
        win.session.open_images(str(images))
    assert dlg.result() == dlg.DialogCode.Accepted


def test_open_demo_through_dialog_paths_and_predict(qtbot, window: MainWindow, demo) -> None:
    spec, images = demo
    _open_demo(qtbot, window, spec, images)
    preds = window.session.predictions
    assert preds.accuracy == 1.0 and len(preds.paths) == 200
    assert window.status_images.text() == "200 images"
    assert "rnet.pt" in window.status_model.text() and "torch" in window.status_backend.text()
    assert window.selection.model is window.session.model
    assert {li.name for li in window.session.model.layers} >= {"conv1", "conv2", "conv3"}
    assert window.selection.layer == "conv3"  # the heatmaps start on the deepest layer of interest


def test_corrupt_model_error_shows_in_the_dialog(qtbot, window: MainWindow, demo, tmp_path: Path) -> None:
    bad = tmp_path / "broken.pt"
    bad.write_bytes(Path(demo[0].path).read_bytes()[:5000])  # truncated
    dlg = OpenModelDialog(window.session, window, path=str(bad))
    dlg.arch.setCurrentText("rnet")
    dlg.show()
    handle_failed = []
    dlg.load()
    dlg._handle.failed.connect(handle_failed.append)
    qtbot.waitUntil(lambda: bool(handle_failed) or "damaged" in dlg.error.text(), timeout=LOAD_MS)
    assert str(bad) in dlg.error.text() and "damaged or truncated" in dlg.error.text()
    assert "Traceback" not in dlg.error.text()
    assert dlg.isVisible() and dlg.buttons.button(dlg.buttons.StandardButton.Ok).isEnabled()
    assert window.session.model is None


def test_project_round_trip_restores_session_and_reuses_cache(qtbot, window: MainWindow, demo, tmp_path: Path) -> None:
    spec, images = demo
    work = tmp_path / "work"
    shutil.copytree(Path(spec.path).parent, work, ignore=shutil.ignore_patterns("lfw"))
    shutil.copytree(images, work / "faces")
    from engine.models import build_spec

    window.session.load_model(build_spec(str(work / "rnet.pt")))
    with qtbot.waitSignal(window.session.predictions_changed, timeout=LOAD_MS, check_params_cb=lambda p: p is not None):
        window.session.open_images(str(work / "faces"))
    window.selection.layer = "conv2"
    window.selection.unit = 7
    window.selection.current_image = 42
    proj = work / "study.convlens"
    window.save_project(str(proj))
    data = json.loads(proj.read_text())
    assert data["convlens_project"] == 1 and data["model"]["path"] == "rnet.pt" and data["images"] == "faces"
    assert data["selection"]["unit"] == 7 and data["model"]["arch"] == "rnet"

    # close, then move the whole study folder: relative paths follow it
    window.close()
    moved = tmp_path / "moved"
    shutil.move(str(work), moved)
    win2 = MainWindow(settings=QSettings(str(tmp_path / "s2.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win2)
    with qtbot.waitSignal(win2.session.predictions_changed, timeout=LOAD_MS, check_params_cb=lambda p: p is not None):
        win2.open_project(str(moved / "study.convlens"))
    qtbot.waitUntil(lambda: win2.selection.unit == 7, timeout=10_000)
    assert win2.selection.layer == "conv2" and win2.selection.current_image == 42
    assert win2.session.model.spec.path == str(moved / "rnet.pt")
    assert win2.session.predictions_from_cache  # same model hash and image fingerprint: nothing recomputed
    win2.close()


def test_project_with_a_moved_model_asks_for_it(qtbot, window: MainWindow, demo, tmp_path: Path) -> None:
    from gui import project

    spec, images = demo
    proj = tmp_path / "p.convlens"
    project.save(proj, project.make(model=spec.with_(path=str(tmp_path / "gone.pt")), images=str(images),
                                    selection={}, views={}))
    asked = []

    def locate(what: str, old: str) -> str:
        asked.append((what, old))
        return spec.path

    state = project.load(proj, locate=locate)
    assert asked == [("model", str(tmp_path / "gone.pt"))]
    assert state["model"].path == spec.path and state["images"] == str(images)
    proj.write_text("{ not json")
    with pytest.raises(project.ProjectError, match="not a ConvLens project"):
        project.load(proj)


def test_export_every_format_from_the_window(qtbot, window: MainWindow, tmp_path: Path) -> None:
    from gui.export import export_widget

    # a plain widget (the jobs panel) is rendered whole
    target = window.jobs_panel
    png, svg, pdf = (export_widget(target, tmp_path / f"fig.{ext}", dpi=150) for ext in ("png", "svg", "pdf"))
    with Image.open(png) as im:
        im.load()
        assert im.size[0] >= target.width() * 150 / 96 - 1
    assert ET.parse(svg).getroot().tag.endswith("svg")
    assert pdf.read_bytes().startswith(b"%PDF")
    # a view exports its composed figure, and says what is missing while it has none
    for view in window.views.values():
        assert view.export_target() is view and view.figure_kinds()
        with pytest.raises(ValueError, match="nothing to export yet"):
            export_widget(view.export_target(), tmp_path / f"{view.object_name}.png")
        assert not (tmp_path / f"{view.object_name}.png").exists()


def test_every_view_fits_a_1024x640_window(qtbot, window: MainWindow, demo, tmp_path: Path) -> None:
    """Screenshot at 1024x640 with the demo loaded: no child widget of a shown view runs past it."""

    spec, images = demo
    window.session.load_model(spec)
    with qtbot.waitSignal(window.session.predictions_changed, timeout=LOAD_MS, check_params_cb=lambda p: p is not None):
        window.session.open_images(str(images))
    window.resize(1024, 640)
    qtbot.waitUntil(lambda: window.views["heatmaps"].activations() is not None or True, timeout=1000)
    for name, view in window.views.items():
        window.docks[name].show()
        window.docks[name].raise_()
        qtbot.waitUntil(lambda v=view: v.isVisible() and not v.visibleRegion().isEmpty(), timeout=5000)
        if name == "heatmaps":
            qtbot.waitUntil(lambda v=view: v.activations() is not None, timeout=LOAD_MS)
        qtbot.wait(50)
        assert window.size().toTuple() == (1024, 640)
        shot = window.grab()
        shot.save(str(tmp_path / f"{name}-1024x640.png"))
        assert not shot.isNull() and shot.size().toTuple() == (1024 * shot.devicePixelRatio(), 640 * shot.devicePixelRatio())
        dock = window.docks[name]
        assert dock.rect().contains(view.geometry().translated(view.parentWidget().mapTo(dock, view.pos()) - view.pos())) \
            or view.width() <= dock.width()
        off = widgets_off_view(view)
        assert off == [], f"{name}: {off}"


def test_every_view_is_docked_and_listed(window: MainWindow) -> None:
    names = [a.text() for a in window.menuBar().actions()]
    assert names == ["&File", "&View", "&Analysis", "&Help"]
    for name, dock in window.docks.items():
        assert dock.objectName() == f"dock-{name}"
    view_menu = window.menuBar().actions()[1].menu()
    assert len([a for a in view_menu.actions() if a.isCheckable()]) == len(window.docks)
    window.docks["jobs"].setFloating(True)
    window.reset_layout()
    assert not window.docks["jobs"].isFloating()


def test_drop_of_an_unknown_file_is_explained(window: MainWindow, tmp_path: Path) -> None:
    odd = tmp_path / "notes.docx"
    odd.write_text("x")
    window.open_path(str(odd))
    assert "notes.docx" in window.statusBar().currentMessage()


def test_closing_with_a_running_job_cancels_it_cleanly(qtbot, window: MainWindow, demo) -> None:
    import time

    from engine.types import Progress

    state = {"started": False, "cleaned": False, "steps": 0, "after_cancel": 0}
    handles: list = []

    def long_job():
        state["started"] = True
        try:
            for i in range(10_000):
                time.sleep(0.01)
                state["steps"] += 1
                if handles and handles[0].cancel_requested:
                    state["after_cancel"] += 1  # steps finished once closing asked the job to stop
                yield Progress(i / 10_000, "working")
        finally:
            state["cleaned"] = True

    handles.append(window.runner.submit("Long job", long_job))
    qtbot.waitUntil(lambda: state["steps"] > 3, timeout=10_000)
    window.close()
    # closing asked the job to stop and waited for it: it stopped at its next yield (at most the
    # one step under way when the cancel came), its finally ran, and it is reported cancelled
    assert handles[0].cancel_requested and handles[0].state == "cancelled"
    assert state["cleaned"] and state["after_cancel"] <= 1 and state["steps"] < 10_000


def test_dropping_a_folder_opens_it_as_images(qtbot, window: MainWindow, demo_images: Path) -> None:
    with qtbot.waitSignal(window.selection.images_changed, timeout=LOAD_MS):
        window.open_path(str(demo_images))  # what dropEvent calls for each dropped URL
    assert len(window.selection.images) == 200 and window.status_images.text() == "200 images"


def test_selecting_in_the_browser_updates_the_other_views(qtbot, window: MainWindow, demo) -> None:
    spec, images = demo
    window.session.load_model(spec)
    with qtbot.waitSignal(window.session.predictions_changed, timeout=LOAD_MS, check_params_cb=lambda p: p is not None):
        window.session.open_images(str(images))
    browser, heatmaps = window.views["images"], window.views["heatmaps"]
    window.docks["heatmaps"].raise_()
    qtbot.waitUntil(lambda: heatmaps.activations() is not None, timeout=LOAD_MS)
    row = browser.proxy.mapFromSource(browser.model.index(150, 0))  # a non-face crop
    browser.view.setCurrentIndex(row)  # what a click in the grid does
    assert window.selection.current_image == 150
    qtbot.waitUntil(lambda: "non-face/150.png" in heatmaps.unit_label.text(), timeout=10_000)
    assert "non-face/150.png" in browser.detail.title.text() or browser.detail.title.text() == "150.png"


def test_file_export_is_one_dialog_that_writes_the_composed_figure(qtbot, window: MainWindow, demo,
                                                                   tmp_path: Path) -> None:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from gui.figures.dialog import ExportDialog

    spec, images = demo
    with qtbot.waitSignal(window.session.predictions_changed, timeout=LOAD_MS, check_params_cb=lambda p: p is not None):
        window.session.load_model(spec)
        window.session.open_images(str(images))
    window.docks["images"].raise_()
    out = tmp_path / "figs" / "browser.svg"
    out.parent.mkdir()
    seen: list[str] = []

    def fill() -> None:
        dlg = QApplication.activeModalWidget()
        if not isinstance(dlg, ExportDialog):
            QTimer.singleShot(20, fill)
            return
        seen.append(dlg.windowTitle())
        dlg.view_combo.setCurrentIndex(dlg.view_combo.findData("images"))
        dlg.format_combo.setCurrentIndex(dlg.format_combo.findData("svg"))
        dlg.path_edit.setText(str(out))
        dlg.export_button.click()

    QTimer.singleShot(0, fill)
    window.export_figure_dialog()
    assert seen == ["Export figure"]  # one dialog, not a chain of three
    assert out.is_file() and "<title>" in out.read_text()
    assert str(out) in window.statusBar().currentMessage()
