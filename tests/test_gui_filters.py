"""The Interpretable filters dock: real filter metrics of the demo RNet, a real tiny training run on
the built-in part data (a new PartNet), cancel, the figures and the 1024x640 layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt
from pytestqt.wait_signal import SignalBlocker

from gui.context import AppContext
from gui.views.filters import COLUMNS, FiltersView, LineChart
from tests.conftest import wait_job

from .gui_layout import demo_window, widgets_off_view

LAYER = "conv3"  # RNet conv3: 64 filters of 3 x 3
N_PARTS = 30  # built-in part images: 24 train, 6 val
JOB_MS = 300_000


def _wait(signal: object, timeout: int = JOB_MS) -> list[object]:
    blocker = SignalBlocker(timeout=timeout, raising=True)
    blocker.connect(signal)
    blocker.wait()
    return blocker.args


@pytest.fixture(scope="module")
def view(ctx: AppContext) -> Iterator[FiltersView]:
    """A shown view after the metrics of LAYER on the open demo images."""
    w = FiltersView(ctx)
    w.resize(1200, 800)
    w.show()
    assert w.layer_combo.currentText() == LAYER  # the demo's last default layer
    w.set_data("images")
    handle = w.run_metrics()
    assert handle is not None and not w.run_button.isEnabled() and w.cancel_button.isEnabled()
    handle.failed.connect(lambda _e: pytest.fail(handle.traceback))
    _wait(w.metrics_ready)
    yield w
    w.close()
    w.deleteLater()


def test_metrics_fill_the_table_with_the_engine_result(view: FiltersView, demo, tmp_path: Path) -> None:
    from engine.backends import open_backend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.filters.metrics import filter_metrics
    from engine.jobs import run_sync
    from engine.models import load_model

    spec, images = demo
    loaded = load_model(spec)
    backend = open_backend(loaded)
    try:
        expected = run_sync(filter_metrics(backend, loaded.cache_id, open_image_set(str(images)), LAYER,
                                           cache=Cache(tmp_path / "c")))
    finally:
        backend.close()
    assert view.model.rowCount() == expected.units == 64 and view.proxy.rowCount() == 64
    rows = sorted(view.visible_rows(), key=lambda r: r["filter"])
    assert [r["filter"] for r in rows] == list(range(64))
    np.testing.assert_allclose([r["inter"] for r in rows], expected.inter, rtol=1e-9)
    np.testing.assert_allclose([r["spatial"] for r in rows], expected.spatial, rtol=1e-9)
    assert [r["category"] for r in rows] == [expected.classes[c] for c in expected.category]
    assert all(np.isnan(r["instability"]) and np.isnan(r["part_iou"]) for r in rows)  # no landmarks, no parts
    assert f"{LAYER}: 64 filters of 3 x 3 on 200 images" in view.summary_label.text()
    assert f"{expected.summary()['mean_spatial_entropy']:.4f}" in view.summary_label.text()
    assert [c.key for c in COLUMNS] == ["filter", "category", "inter", "spatial", "instability", "part", "part_iou"]
    # sortable: by spatial entropy, numerically
    view.table.sortByColumn(3, Qt.SortOrder.AscendingOrder)
    spatial = [r["spatial"] for r in view.visible_rows()]
    assert spatial == sorted(spatial) and spatial[0] == expected.spatial.min()
    assert not view.progress.isVisibleTo(view) and view.run_button.isEnabled()


def test_clicking_a_row_selects_the_filter(qtbot, view: FiltersView, ctx: AppContext) -> None:
    ctx.selection.layer = "conv1"
    row = 3
    expected = view.visible_rows()[row]
    rect = view.table.visualRect(view.proxy.index(row, 0))
    qtbot.mouseClick(view.table.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert (ctx.selection.layer, ctx.selection.unit) == (LAYER, expected["filter"])
    # a filter chosen elsewhere (the Heatmaps view) selects its row
    ctx.selection.unit = 7
    current = view.table.currentIndex()
    assert view.model.row_data(view.proxy.mapToSource(current).row())["filter"] == 7


def test_metrics_figure(view: FiltersView, tmp_path: Path) -> None:
    from gui.figures import BarChart, FigureOptions
    from tests.figure_checks import check_figure, svg_texts

    fig, root = check_figure(view, FigureOptions(kind="metrics", size="full", dpi=100), tmp_path, "filters-metrics")
    assert fig.title.endswith(f": {LAYER}")
    texts = " ".join(svg_texts(root))
    assert "inter-category entropy (bits)" in texts and "spatial entropy (bits)" in texts
    charts = [p for p in __import__("tests.figure_checks").figure_checks.parts(fig) if isinstance(p, BarChart)]
    assert len(charts) == 2 and sum(charts[1].series[0][1]) == 64  # every filter in the histogram
    assert view.summary_lines()[1].split(",")[0] in texts


def test_metrics_on_the_builtin_parts_have_instability_and_part_iou(view: FiltersView) -> None:
    view.set_data("builtin", N_PARTS)
    view.run_metrics()
    result = _wait(view.metrics_ready)[0]
    assert result.has_landmarks and result.has_parts and result.n_images == N_PARTS // 5
    rows = sorted(view.visible_rows(), key=lambda r: r["filter"])
    _idx, iou = result.best_part()
    np.testing.assert_allclose([r["part_iou"] for r in rows], iou)
    np.testing.assert_array_equal(np.isnan([r["instability"] for r in rows]), np.isnan(result.instability))
    assert "part interpretability" in view.summary_label.text()
    view.set_data("images")


def test_training_can_be_cancelled(qtbot, view: FiltersView) -> None:
    view.set_data("builtin", N_PARTS)
    view.set_training(start="partnet", epochs=50, batch_size=4, seed=3)
    handle = view.train()
    assert handle is not None and view.train_cancel.isEnabled() and not view.train_button.isEnabled()
    qtbot.waitUntil(lambda: len(view.curves.get("interpretable", {}).get("task_loss", [])) >= 2, timeout=JOB_MS)
    with qtbot.waitSignal(handle.cancelled, timeout=JOB_MS):
        view.cancel_training()
    assert handle.state == "cancelled" and "cancelled" in view.train_status.text()
    steps = 50 * 6
    assert 2 <= len(view.curves["interpretable"]["task_loss"]) < steps and not view.curves.get("ordinary")
    assert view.train_button.isEnabled() and not view.train_progress.isVisibleTo(view)
    view.set_data("images")


def test_tiny_training_updates_the_curves_and_compares(qtbot, view: FiltersView, tmp_path: Path) -> None:
    from gui.figures import FigureOptions
    from tests.figure_checks import check_figure, parts, svg_texts

    view.set_data("builtin", N_PARTS)
    view.set_training(start="partnet", epochs=2, batch_size=8, seed=1)
    changes: list[int] = []
    view.curves_changed.connect(lambda: changes.append(len(view.curves.get("interpretable", {}).get("task_loss", []))))
    handle = view.train()
    assert handle is not None
    handle.failed.connect(lambda _e: pytest.fail(handle.traceback))
    comp = _wait(view.training_done)[0]
    steps = 2 * 3  # 24 training images in batches of 8, two epochs
    assert changes and changes[0] < steps  # the curves grew while training ran
    for run in ("interpretable", "ordinary"):
        c = view.curves[run]
        assert len(c["task_loss"]) == len(c["filter_loss"]) == steps
        assert len(c["train_accuracy"]) == len(c["val_accuracy"]) == 2
        assert all(0 <= a <= 1 for a in c["val_accuracy"])
        _xs, ys = view._lines[(run, "task_loss")].getData()
        np.testing.assert_allclose(ys, c["task_loss"])
        assert (Path(comp["runs"][run]["out_dir"]) / "model.pt").is_file()
    assert max(view.curves["interpretable"]["filter_loss"]) != 0 and not any(view.curves["ordinary"]["filter_loss"])
    # the same filter index of the three models side by side
    assert set(comp["metrics"]) == {"original", "ordinary", "interpretable"}
    assert comp["measured_layer"] == "relu4.mask"
    assert view.compare_table.model.rowCount() == 64
    rows = sorted(view.compare_table.visible_rows(), key=lambda r: r["filter"])
    np.testing.assert_allclose([r["interpretable"] for r in rows], comp["metrics"]["interpretable"].spatial)
    np.testing.assert_allclose([r["original"] for r in rows], comp["metrics"]["original"].spatial)
    np.testing.assert_allclose([r["change"] for r in rows], comp["metrics"]["interpretable"].spatial
                               - comp["metrics"]["ordinary"].spatial)
    view.compare_combo.setCurrentIndex(view.compare_combo.findData("part_iou"))
    rows = sorted(view.compare_table.visible_rows(), key=lambda r: r["filter"])
    np.testing.assert_allclose([r["ordinary"] for r in rows], comp["metrics"]["ordinary"].best_part()[1])
    assert len(view.comparison_lines()) == 3 and "val acc." in view.comparison_lines()[2]
    # side by side from a new PartNet (not the session's model): its relu4 and both trained relu4.mask
    qtbot.waitUntil(lambda: (view.side_maps is not None and view._side_handle is None)
                    or "failed" in view.side_status.text(), timeout=JOB_MS)
    side = view.side_maps
    assert side is not None, view.side_status.text()
    assert side.layers == {"original": "relu4", "interpretable": "relu4.mask", "ordinary": "relu4.mask"}
    assert all(side.maps[n].shape == (1, 6, 6) for n in side.names)

    fig, root = check_figure(view, FigureOptions(kind="training", size="full", dpi=100), tmp_path, "training")
    charts = [p for p in parts(fig) if isinstance(p, LineChart)]
    assert len(charts) == 2 and len(charts[0].series) == 4
    texts = " ".join(svg_texts(root))
    assert "Loss per batch" in texts and "interpretable: task loss" in texts and "accuracy" in texts


def test_state_round_trip(view: FiltersView, ctx: AppContext) -> None:
    view.set_training(start="partnet", epochs=3, batch_size=16, lr=0.002, weight=0.5, seed=9)
    state = view.save_state()
    other = FiltersView(ctx)
    try:
        other.restore_state(state)
        assert other.save_state() == state
        p = other.train_params()
        assert (p.layer, p.epochs, p.batch_size, p.lr, p.weight, p.seed) == ("relu4", 3, 16, 0.002, 0.5, 9)
    finally:
        other.deleteLater()


def test_bad_landmarks_say_which_file(view: FiltersView, tmp_path: Path) -> None:
    view.set_data("images")
    view.landmarks_edit.setText(str(tmp_path / "missing.csv"))
    handle = view.run_metrics()
    assert handle is not None
    _wait(handle.failed)
    assert "missing.csv" in view.status.text() and "does not exist" in view.status.text()
    view.landmarks_edit.clear()


def test_dock_lays_out_at_1024x640(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    with demo_window(qtbot, demo, tmp_path, monkeypatch, "filters") as (win, view):
        assert isinstance(view, FiltersView)
        wait_job(view.run_metrics())
        qtbot.wait(50)
        assert win.size().toTuple() == (1024, 640)
        win.grab().save(str(tmp_path / "filters-1024x640.png"))
        assert widgets_off_view(view) == []
        assert view.table.viewport().height() >= 60 and view.model.rowCount() == 64


def test_training_the_open_model_on_the_open_images(qtbot, view: FiltersView, ctx: AppContext) -> None:
    """The open RNet, converted at conv3, trained one epoch on the 200 labelled demo faces: the
    comparison is at the session's layer, so its rows select the filter like the metrics table."""
    view.set_data("images")
    view.set_layer(LAYER)
    view.set_training(start="model", epochs=1, batch_size=50, seed=0)
    handle = view.train()
    assert handle is not None
    handle.failed.connect(lambda _e: pytest.fail(handle.traceback))
    comp = _wait(view.training_done)[0]
    assert comp["layer"] == LAYER and comp["measured_layer"] == f"{LAYER}.mask" and comp["layer_in_session"]
    assert comp["start_name"] == "rnet.pt"
    for run in ("interpretable", "ordinary"):
        assert len(view.curves[run]["task_loss"]) == 4 and len(view.curves[run]["train_accuracy"]) == 1
        assert not view.curves[run]["val_accuracy"]  # no validation set for the open images
    assert comp["metrics"]["original"].units == comp["metrics"]["interpretable"].units == 64
    assert comp["metrics"]["original"].n_images == comp["metrics"]["interpretable"].n_images == 200
    # the start model measured by the job is the open model: the same numbers as the metrics table's run
    view.run_metrics()
    shown = _wait(view.metrics_ready)[0]
    np.testing.assert_allclose(comp["metrics"]["original"].spatial, shown.spatial)
    np.testing.assert_allclose(comp["metrics"]["original"].inter, shown.inter)
    view.compare_table.select_id(5)
    rect = view.compare_table.view.visualRect(view.compare_table.view.currentIndex())
    ctx.selection.layer = "conv1"
    qtbot.mouseClick(view.compare_table.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert (ctx.selection.layer, ctx.selection.unit) == (LAYER, 5)
    from gui.figures import FigureOptions

    assert view.figure(FigureOptions(kind="training")).title == f"Interpretable training of rnet.pt at {LAYER}"


def test_open_the_trained_model_in_place_and_back(qtbot, view: FiltersView, ctx: AppContext, demo) -> None:
    """After training the open model (the test above): "Open interpretable" replaces the session's
    model by the trained TorchScript and selects the same image and filter at the measured layer;
    the comparison stays; "Back to the start model" reopens the demo RNet."""
    comp = view.comparison
    assert comp is not None and comp["start"] == "model" and view.opened_run == "original"
    assert view.open_buttons["interpretable"].isEnabled() and view.open_buttons["ordinary"].isEnabled()
    assert not view.open_buttons["original"].isEnabled()  # it is the one open
    sel = ctx.selection
    sel.current_image, sel.layer, sel.unit = 7, LAYER, 5
    with qtbot.waitSignal(ctx.session.model_loaded, timeout=JOB_MS):
        qtbot.mouseClick(view.open_buttons["interpretable"], Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: view.opened_run == "interpretable", timeout=JOB_MS)
    info = ctx.session.model
    assert info.format == "torchscript" and info.spec.path == comp["runs"]["interpretable"]["files"]["torchscript"]
    assert info.layer(f"{LAYER}.mask") is not None and info.spec.classes == comp["start_spec"].classes
    assert (sel.layer, sel.unit, sel.current_image) == (f"{LAYER}.mask", 5, 7)
    assert view.comparison is comp and view.compare_table.model.rowCount() == 64
    assert not view.open_buttons["interpretable"].isEnabled() and view.open_buttons["original"].isEnabled()
    assert "in place of the previous one" in view.train_status.text()
    # a comparison row now selects the filter in the trained model
    view.compare_table.select_id(3)
    rect = view.compare_table.view.visualRect(view.compare_table.view.currentIndex())
    qtbot.mouseClick(view.compare_table.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    assert (sel.layer, sel.unit) == (f"{LAYER}.mask", 3)
    with qtbot.waitSignal(ctx.session.model_loaded, timeout=JOB_MS):
        qtbot.mouseClick(view.open_buttons["original"], Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: view.opened_run == "original", timeout=JOB_MS)
    assert ctx.session.model.spec.path == demo[0].path and ctx.session.model.format == "state_dict"
    assert (sel.layer, sel.unit, sel.current_image) == (LAYER, 3, 7)


def _direct_unit(source, path: str, unit: int) -> np.ndarray:
    """Filter ``unit`` of ``source`` (an engine MapSource) on one image, through a backend of its own."""
    from engine.backends import open_backend
    from engine.data.images import load_image, preprocess
    from engine.models import load_model

    batch = preprocess(load_image(path), source.spec.preprocess)[None]
    with open_backend(load_model(source.spec), device="cpu") as b:
        return b.forward(batch, [source.layer]).activations[source.layer][0, unit]


def _side_shows(view: FiltersView, unit: int, image: int) -> bool:
    res, images = view.side_maps, view.ctx.selection.images
    return (res is not None and view._side_handle is None and res.unit == unit
            and res.paths[0] == images.records[image].path)


def test_side_by_side_shows_the_filter_in_each_model(qtbot, view: FiltersView, ctx: AppContext, demo,
                                                      tmp_path: Path) -> None:
    """After training the open model (above): the selected filter of the selected image in the start
    model (conv3) and both trained ones (conv3.mask), each opened as its own backend; following the
    comparison table and the selection; both colour scales; cancel; the figure."""
    from gui.figures import FigureOptions
    from gui.views.filters import side_caption, table_rows
    from tests.figure_checks import check_figure, parts, svg_texts

    comp = view.comparison
    assert comp is not None and comp["start"] == "model" and view.opened_run == "original"
    session_model = ctx.session.model
    view.tabs.setCurrentIndex(1)
    view.body_tabs.setCurrentIndex(1)
    sel = ctx.selection
    sel.current_image = 4
    view.compare_table.select_id(9)
    rect = view.compare_table.view.visualRect(view.compare_table.view.currentIndex())
    qtbot.mouseClick(view.compare_table.view.viewport(), Qt.MouseButton.LeftButton, pos=rect.center())
    qtbot.waitUntil(lambda: _side_shows(view, 9, 4) or "failed" in view.side_status.text(), timeout=JOB_MS)
    assert _side_shows(view, 9, 4), view.side_status.text()
    res = view.side_maps
    assert res.names == ("original", "interpretable", "ordinary")
    assert res.layers == {"original": LAYER, "interpretable": f"{LAYER}.mask", "ordinary": f"{LAYER}.mask"}
    path = sel.images.records[4].path
    sources = {s.name: s for s in view.side_sources()}
    assert sources["interpretable"].spec.path == comp["runs"]["interpretable"]["files"]["state_dict"]
    for name in res.names:
        np.testing.assert_allclose(res.maps[name][0], _direct_unit(sources[name], path, 9), rtol=1e-5, atol=1e-6)
    assert not np.allclose(res.maps["original"], res.maps["interpretable"])
    assert ctx.session.model is session_model  # the session's model is not replaced
    # the panels and their captions: model, layer, the filter's metrics, its own scale
    assert all(view.side_panels[r].isVisibleTo(view) and view.side_panels[r].image is not None for r in res.names)
    m = table_rows(comp["metrics"]["interpretable"])[9]
    caption = view.side_captions["interpretable"].text()
    assert f"interpretable · {LAYER}.mask · filter 9" in caption and f"spatial H {m['spatial']:.3f}" in caption
    assert f"category {m['category']}" in caption
    data = {d["name"]: d for d in view.side_panels_data()}
    assert all(d["vmax"] == d["max"] for d in data.values()) and "own max" in view.side_status.text()
    assert "each map's own max" in view.side_status.toolTip() and "conv3" not in view.side_status.text()
    view.scale_combo.setCurrentIndex(view.scale_combo.findData("shared"))
    data = {d["name"]: d for d in view.side_panels_data()}
    shared = max(float(res.maps[n][0].max()) for n in res.names)
    assert all(d["vmax"] == pytest.approx(shared) for d in data.values()) and "largest value" in view.side_status.toolTip()
    assert f"shared max {shared:.4g}" in view.side_status.text()
    assert view.side_captions["ordinary"].text() == "\n".join(
        side_caption(comp, "ordinary", 9, f"{LAYER}.mask", float(res.maps["ordinary"][0].max()), data["ordinary"]["vmax"]))
    # another image, then another filter chosen elsewhere (the heatmaps' selection at the start layer)
    sel.current_image = 11
    qtbot.waitUntil(lambda: _side_shows(view, 9, 11), timeout=JOB_MS)
    assert not np.allclose(view.side_maps.maps["original"], res.maps["original"])
    sel.layer, sel.unit = LAYER, 12
    qtbot.waitUntil(lambda: _side_shows(view, 12, 11), timeout=JOB_MS)
    np.testing.assert_allclose(view.side_maps.maps["ordinary"][0],
                               _direct_unit(sources["ordinary"], sel.images.records[11].path, 12), rtol=1e-5, atol=1e-6)
    # the figure: a side-by-side kind, and part of the training figure
    fig, root = check_figure(view, FigureOptions(kind="side", size="full", dpi=100), tmp_path, "filters-side")
    texts = " ".join(svg_texts(root))
    assert fig.title.startswith("Filter 12 side by side") and "largest value" in texts and "conv3.mask" in texts
    from gui.figures import ColorBar, Picture

    assert len([p for p in parts(fig) if isinstance(p, Picture)]) == 3
    assert len([p for p in parts(fig) if isinstance(p, ColorBar)]) == 1  # shared: one bar
    view.scale_combo.setCurrentIndex(view.scale_combo.findData("own"))
    fig = view.figure(FigureOptions(kind="side"))
    assert len([p for p in parts(fig) if isinstance(p, ColorBar)]) == 3
    fig = view.figure(FigureOptions(kind="training"))
    assert len([p for p in parts(fig) if isinstance(p, Picture)]) == 3
    # cancel: a new filter's maps stop; the shown ones stay
    view.set_side_filter(20)
    handle = view.refresh_side_by_side()
    assert handle is not None and view.side_cancel.isEnabled()
    with qtbot.waitSignal(handle.cancelled, timeout=JOB_MS):
        qtbot.mouseClick(view.side_cancel, Qt.MouseButton.LeftButton)
    assert "cancelled" in view.side_status.text() and not view.side_cancel.isEnabled()
    assert view.side_maps.unit == 12
    state = view.save_state()
    assert state["scale"] == "own"


def test_another_model_clears_the_table(view: FiltersView, ctx: AppContext, demo, tmp_path: Path) -> None:
    """Last in the module (it replaces the module's model): metrics of one model are not shown
    as another's."""
    import dataclasses

    import torch

    spec, _images = demo
    if view.result is None:
        view.run_metrics()
        _wait(view.metrics_ready)
    assert view.model.rowCount() == 64
    sd = torch.load(spec.path, weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key] + 0.01
    other = tmp_path / "rnet-other.pt"
    torch.save(sd, other)
    wait_job(ctx.session.load_model(dataclasses.replace(spec, path=str(other))))
    assert view.result is None and view.model.rowCount() == 0 and view.summary_label.text() == ""
    assert view.layer_combo.currentText() == LAYER and view.run_button.isEnabled()
