"""A project keeps what it needs to show a dissection again: the dissection view's settings
(concept source, size, layers, thresholds, whether a result was shown) are saved; reopening the
project in a new window shows the result again from the engine's cache (nothing is recomputed),
and the model's output chosen by the rule is kept."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QSettings
from pytestqt.wait_signal import SignalBlocker

from gui.main_window import MainWindow

LOAD_MS = 180_000


def _wait(signal: object) -> list[object]:
    blocker = SignalBlocker(timeout=LOAD_MS, raising=True)
    blocker.connect(signal)
    blocker.wait()
    return blocker.args


def test_a_project_reopens_the_dissection_from_the_cache(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    spec, images = demo
    win = MainWindow(settings=QSettings(str(tmp_path / "s1.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win)
    win.show()
    with qtbot.waitSignal(win.session.predictions_changed, timeout=LOAD_MS, check_params_cb=lambda p: p is not None):
        win.session.load_model(spec)
        win.session.open_images(str(images))
    view = win.views["dissection"]
    view.set_builtin(48, 32)
    view.set_checked_layers(["conv3"])
    handle = view.run()
    assert handle is not None
    first = _wait(view.result_ready)[0]
    assert not first.from_cache and list(first.layers) == ["conv3"]
    proj = tmp_path / "study.convlens"
    win.save_project(str(proj))
    saved = json.loads(proj.read_text())
    assert saved["views"]["dissection"]["layers"] == ["conv3"] and saved["views"]["dissection"]["n_images"] == 48
    assert saved["model"]["output_index"] == win.session.model.spec.output_index  # the output the rule chose
    win.close()

    win2 = MainWindow(settings=QSettings(str(tmp_path / "s2.ini"), QSettings.Format.IniFormat))
    qtbot.addWidget(win2)
    win2.show()
    view2 = win2.views["dissection"]
    # reopening shows the result again by itself: the view reruns with the saved settings once
    # the model is loaded, and the engine's content-keyed cache answers (nothing is recomputed)
    with qtbot.waitSignal(view2.result_ready, timeout=LOAD_MS) as got:
        win2.open_project(str(proj))
    again = got.args[0]
    assert again.from_cache
    assert again.to_rows() == first.to_rows()
    assert view2.save_state() == saved["views"]["dissection"]  # the saved layers, not the model's defaults
    assert win2.session.model.spec.output_index == win.session.model.spec.output_index
    win2.close()
