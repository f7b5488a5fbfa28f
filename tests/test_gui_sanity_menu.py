"""Analysis > "Sanity check of" > a view: the Sanity check view runs that view's explanation at
the selected layer (the request goes through the shared selection, not from view to view)."""

from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QMenu

from .gui_layout import JOB_MS, demo_window


def _submenu(win) -> QMenu:
    for menu in win.menuBar().findChildren(QMenu):
        if menu.title().replace("&", "") == "Sanity check of":
            return menu
    raise AssertionError("no 'Sanity check of' menu")


def test_every_view_with_an_explanation_is_listed_and_runs(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    with demo_window(qtbot, demo, tmp_path, monkeypatch, "sanity", size=(1400, 900)) as (win, sanity):
        menu = _submenu(win)
        listed = {a.text(): a for a in menu.actions()}
        expected = {v.title for v in win.views.values() if v.sanity_explanation}
        assert set(listed) == expected
        assert {"Heatmaps", "Network Dissection", "Class evidence", "Interpretable filters", "Polytope gallery",
                "Inference graph"} <= expected
        win.selection.layer = "conv3"
        with qtbot.waitSignal(sanity.result_ready, timeout=JOB_MS) as got:
            listed["Interpretable filters"].trigger()
        res = got.args[0]
        assert res.explanation == "filters" and res.layer == "conv3"
        assert sanity.explanation() == "filters"
        assert win.selection.item("sanity_request") is None  # an event, read and cleared
