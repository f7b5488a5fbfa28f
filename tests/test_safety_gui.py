"""No file opened in the app runs code: crafted models and projects through the window's open paths
(File > Open model, a dropped file, a project), and the confirmation before a class file runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PySide6.QtCore import QSettings, QTimer
from PySide6.QtWidgets import QApplication, QMessageBox

from gui import project
from gui.main_window import MainWindow

from . import corpus

LOAD_MS = 60_000


@pytest.fixture
def window(qtbot, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    win = MainWindow(settings=QSettings(str(tmp_path / "settings.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    yield win
    win.close()


def _answer_code_question(button: QMessageBox.StandardButton, seen: list[str]) -> None:
    """Press ``button`` on the confirmation box once it is up (a real modal QMessageBox)."""

    def press() -> None:
        box = QApplication.activeModalWidget()
        if not isinstance(box, QMessageBox) or box.objectName() != "confirm_code":
            QTimer.singleShot(20, press)
            return
        seen.append(box.text())
        box.button(button).click()

    QTimer.singleShot(0, press)


def _fails(qtbot, win: MainWindow, open_it) -> str:
    with qtbot.waitSignal(win.session.model_failed, timeout=LOAD_MS) as blocker:
        open_it()
    return blocker.args[0]


@pytest.mark.parametrize("route", ["open", "drop"])
@pytest.mark.parametrize("vector", ["pickle", "pt2_sample_inputs", "pt2_sympy", "torchscript_setstate"])
def test_crafted_models_run_nothing_in_the_app(route: str, vector: str, qtbot, window: MainWindow,
                                              tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    marker_bytes = b"keep"
    if vector == "pickle":
        path = corpus.malicious_pickle(tmp_path, marker)
        (tmp_path / "evil.pt.toml").write_text('[model]\narch = "rnet"\n')
    elif vector == "pt2_sample_inputs":
        path = corpus.pt2_pickled_sample_inputs(tmp_path, marker)
    elif vector == "pt2_sympy":
        path = corpus.pt2_sympy_expression(tmp_path, marker)
    else:
        marker.write_bytes(marker_bytes)
        path = corpus.torchscript_writes_file(tmp_path, marker, "setstate")
    opener = window.open_model_file if route == "open" else window.open_path
    message = _fails(qtbot, window, lambda: opener(str(path)))
    assert str(path) in message and ("refused" in message or "pickled Python objects" in message)
    if vector.startswith("torchscript"):
        assert marker.read_bytes() == marker_bytes
    else:
        assert not marker.exists()
    assert window.session.model is None


@pytest.mark.parametrize("route", ["open", "drop"])
def test_a_project_never_grants_the_pickle_opt_in(route: str, qtbot, window: MainWindow, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    proj = corpus.project_granting_pickle(tmp_path, marker)
    state = project.load(proj)
    assert state["model"].allow_pickle is False
    opener = window.open_project if route == "open" else window.open_path
    message = _fails(qtbot, window, lambda: opener(str(proj)))
    assert "pickled Python objects" in message and not marker.exists()


@pytest.mark.parametrize("answer", ["no", "yes"])
def test_a_class_file_named_beside_the_model_runs_only_after_a_yes(answer: str, qtbot, window: MainWindow,
                                                                  tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    model = corpus.state_dict_with_code_toml(tmp_path / "m", marker)
    seen: list[str] = []
    button = QMessageBox.StandardButton.No if answer == "no" else QMessageBox.StandardButton.Yes
    _answer_code_question(button, seen)
    if answer == "no":
        window.open_model_file(str(model))
        assert seen and "arch/net.py:Net" in seen[0] and "model.pt.toml" in seen[0]
        qtbot.wait(50)
        assert not marker.exists() and window.session.model is None
        assert "not run" in window.statusBar().currentMessage()
    else:
        with qtbot.waitSignal(window.session.model_loaded, timeout=LOAD_MS):
            window.open_model_file(str(model))
        assert marker.exists() and window.session.model.format == "state_dict"


@pytest.mark.parametrize("answer", ["no", "yes"])
def test_a_project_naming_a_class_file_asks_first(answer: str, qtbot, window: MainWindow, tmp_path: Path) -> None:
    marker = tmp_path / "imported"
    model = corpus.state_dict_with_code_toml(tmp_path / "m", marker)
    (tmp_path / "m" / "model.pt.toml").unlink()
    proj = tmp_path / "p.convlens"
    proj.write_text(json.dumps({"convlens_project": 1, "images": None, "selection": {}, "views": {}, "layout": "",
                                "model": {"path": str(model), "arch": f"{tmp_path / 'm' / 'arch' / 'net.py'}:Net",
                                          "input_size": [12, 12]}}))
    seen: list[str] = []
    _answer_code_question(QMessageBox.StandardButton.No if answer == "no" else QMessageBox.StandardButton.Yes, seen)
    if answer == "no":
        window.open_project(str(proj))
        assert seen and "net.py:Net" in seen[0]
        qtbot.wait(50)
        assert not marker.exists() and window.session.model is None
    else:
        with qtbot.waitSignal(window.session.model_loaded, timeout=LOAD_MS):
            window.open_project(str(proj))
        assert marker.exists()


def test_the_open_model_dialog_shows_the_class_file_before_running_it(qtbot, window: MainWindow,
                                                                     tmp_path: Path) -> None:
    from gui.dialogs import OpenModelDialog

    marker = tmp_path / "imported"
    model = corpus.state_dict_with_code_toml(tmp_path / "m", marker)
    dlg = OpenModelDialog(window.session, window, path=str(model))
    qtbot.addWidget(dlg)
    assert dlg.arch.currentText().endswith("arch/net.py:Net")
    assert "it is imported and run when you press OK" in dlg.error.text()
    assert not marker.exists()


@pytest.mark.parametrize("vector", ["pickle", "pt2_sample_inputs", "torchscript_forward"])
def test_crafted_models_run_nothing_through_convlens_figure(vector: str, qapp, tmp_path: Path,
                                                           monkeypatch, capfd) -> None:
    import numpy as np
    from PIL import Image

    import main

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(images / "a.png")
    marker = tmp_path / "ran"
    if vector == "pickle":
        path = corpus.malicious_pickle(tmp_path, marker)
        extra = ["--arch", "rnet"]
    elif vector == "pt2_sample_inputs":
        path, extra = corpus.pt2_pickled_sample_inputs(tmp_path, marker), ["--input-size", "12"]
    else:
        marker.write_bytes(b"keep")
        path, extra = corpus.torchscript_writes_file(tmp_path, marker, "forward"), ["--input-size", "8"]
    code = main.main(["figure", "--view", "heatmaps", "--model", str(path), *extra, "--images", str(images),
                      "--out", str(tmp_path / "fig.png")])
    assert code == 1
    assert (marker.read_bytes() == b"keep") if vector.startswith("torchscript") else not marker.exists()
    assert not (tmp_path / "fig.png").exists()
    assert str(path) in capfd.readouterr().err

