"""The Probes dock on the real demo session (pretrained RNet, 200 real faces): a rotation probe
run as a job shows the engine's invariance curves per layer, the selected unit's response curve
(linked to the selection's layer and unit), the numbers, and the selected image along the sweep
with its predictions; cancelling, one image, the figures in every format, the 1024x640 layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.probes.run import ProbeParams
from engine.probes.transforms import parse_range
from gui.figures import FigureOptions, TileGrid
from gui.views.probes import ITEM_KIND, LineChart, ProbesView

from .conftest import wait_job
from .figure_checks import check_figure, parts
from .gui_layout import demo_window, widgets_off_view

JOB_MS = 180_000


@pytest.fixture(scope="module")
def view(ctx, qapp):
    v = ProbesView(ctx)
    v.resize(1000, 760)
    v.show()
    ctx.selection.current_image = 2
    yield v
    v.shutdown()
    v.close()


def _run(qtbot, view: ProbesView) -> None:
    handle = view.run_probe()
    assert handle is not None
    wait_job(handle)
    qtbot.waitUntil(lambda: view.result is not None and view._handle is None, timeout=JOB_MS)


def _engine_result(demo, tmp_path: Path, params: ProbeParams, images=None):
    from engine.backends.torch_backend import TorchBackend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.jobs import run_sync
    from engine.models import load_model
    from engine.probes.run import run

    spec, folder = demo
    loaded = load_model(spec)
    be = TorchBackend(loaded.module, spec, "cpu")
    iset = images if images is not None else open_image_set(folder)
    return run_sync(run(be, loaded.cache_id, iset, params, cache=Cache(tmp_path / "ref-cache")))


def test_rotation_probe_shows_the_engine_result(qtbot, ctx, demo, view: ProbesView, tmp_path: Path) -> None:
    assert view.layers() == ["conv1", "conv2", "conv3"]  # the demo's default layers
    view.set_params(transform="rotate", values="-30:30:10", fill="reflect", scope="set")
    _run(qtbot, view)
    res = view.result
    assert res.n == 200 and res.layers == ("conv1", "conv2", "conv3")
    ref = _engine_result(demo, tmp_path, ProbeParams(values=parse_range("-30:30:10"), layers=("conv1", "conv2", "conv3")))
    np.testing.assert_allclose(res.invariance(), ref.invariance(), rtol=1e-5)
    # the invariance plot holds one curve per layer, then the model input and the predictions kept
    items = view.inv_plot.getPlotItem().listDataItems()
    assert len(items) == 5
    for li in range(3):
        xs, ys = items[li].getData()
        np.testing.assert_allclose(xs, [-30, -20, -10, 0, 10, 20, 30])
        np.testing.assert_allclose(ys, ref.invariance()[li], rtol=1e-5)
    np.testing.assert_allclose(items[4].getData()[1], ref.agreement())
    assert "conv2" in view.inv_legend.text() and "model input" in view.inv_legend.text()
    # the numbers: the engine's linear-map errors, averaged over the non-identity values
    rows = view.numbers_rows()
    moved = [0, 1, 2, 4, 5, 6]
    assert rows[1]["linear"] == pytest.approx(float(ref.lin_test[1, moved].mean()), rel=1e-6)
    assert rows[2]["frobenius"] == pytest.approx(ref.composition_summary()[2]["frobenius_mean"], rel=1e-6)
    assert "held-out" in view.numbers.text() and "tested on 60" in view.numbers.toolTip()


def test_response_curve_follows_the_selected_layer_and_unit(qtbot, ctx, view: ProbesView) -> None:
    if view.result is None:
        _run(qtbot, view)
    res = view.result
    ctx.selection.layer = "conv2"
    ctx.selection.unit = 7
    assert view.response_layer() == "conv2" and view.unit() == 7
    items = view.resp_plot.getPlotItem().listDataItems()
    assert len(items) == 2  # the mean over the images and the selected image
    np.testing.assert_allclose(items[0].getData()[1], res.pooled[1].mean(axis=0)[:, 7], rtol=1e-6)
    j = view.result_row()
    assert j is not None and res.record_indices[j] == ctx.selection.current_image
    np.testing.assert_allclose(items[1].getData()[1], res.pooled[1][j, :, 7], rtol=1e-6)
    # picking a unit here selects it everywhere; "Most varying" picks the engine's top unit
    view.unit_spin.setValue(11)
    assert ctx.selection.unit == 11
    view.top_button.click()
    assert view.unit() == res.top_units("conv2", 1)[0] == ctx.selection.unit
    view.unit_layer_combo.setCurrentIndex(0)
    view.unit_layer_combo.activated.emit(0)
    assert ctx.selection.layer == "conv1" and view.unit_spin.maximum() == 27


def test_sweep_strip_shows_the_predictions(qtbot, ctx, view: ProbesView) -> None:
    if view.result is None:
        _run(qtbot, view)
    ctx.selection.current_image = 150  # a non-face
    qtbot.waitUntil(lambda: len(view.strip.ids) == len(view.result.values), timeout=JOB_MS)
    res = view.result
    j = view.result_row()
    assert j is not None and res.paths[j].startswith("non-face/")
    assert "untransformed: " + res.class_name(int(res.ref_pred[j])) in view.strip_title.text()
    tips = [view.strip._tips[k] for k in range(len(res.values))]
    for k, tip in enumerate(tips):
        assert tip.startswith(f"rotation angle {res.values[k]:g}: predicted {res.class_name(int(res.pred[j, k]))}")
    views = view.strip_views()
    assert views is not None and len(views) == 7 and views[3].shape == (24, 24, 3)
    # the untransformed view is the image as the model sees it; a rotated one differs
    from engine.data.images import load_image

    img = load_image(ctx.selection.images.records[150].path)
    seen = np.asarray(Image.fromarray(img).resize((24, 24), Image.Resampling.BILINEAR))
    assert np.abs(views[3].astype(int) - seen.astype(int)).max() <= 1
    from engine.probes.transforms import apply

    turned = np.asarray(Image.fromarray(apply(img, "rotate", -30.0, "reflect")).resize((24, 24), Image.Resampling.BILINEAR))
    assert np.abs(views[0].astype(int) - turned.astype(int)).max() <= 1
    assert np.abs(views[0].astype(int) - views[3].astype(int)).max() > 20
    view._tile_clicked(1)
    assert ctx.selection.item(ITEM_KIND) == -20.0


def test_cancel_and_one_image(qtbot, ctx, view: ProbesView) -> None:
    view.set_params(transform="scale", values="0.8:1.2:0.1", scope="set")
    assert view.range_edit.text() == "0.8:1.2:0.1"
    handle = view.run_probe()
    assert handle is not None and view.cancel_button.isEnabled()
    view.cancel()
    qtbot.waitUntil(lambda: handle.is_finished, timeout=JOB_MS)
    assert handle.state == "cancelled" and "cancelled" in view.status.text()
    ctx.selection.current_image = 4
    view.set_params(transform="brightness", values="-0.2,0,0.2", scope="image")
    _run(qtbot, view)
    res = view.result
    assert res.n == 1 and res.transform == "brightness" and res.lin_test is None
    assert "no linear maps" in view.numbers.text()
    assert len(view.resp_plot.getPlotItem().listDataItems()) == 1  # one image: its curve is the mean
    view.set_params(values="1:oops")
    assert view.run_probe() is None and "range" in view.status.text()


def test_figures_in_every_format(qtbot, ctx, view: ProbesView, tmp_path: Path) -> None:
    view.set_params(transform="rotate", values="-30:30:10", scope="set")
    _run(qtbot, view)
    ctx.selection.current_image = 0
    ctx.selection.layer = "conv3"
    ctx.selection.unit = 3
    assert [k.key for k in view.figure_kinds()] == ["summary", "unit"]
    figure, _root = check_figure(view, FigureOptions(dpi=100), tmp_path, "probe")
    charts = {p.title.split(":")[0].split(",")[0]: p for p in parts(figure) if isinstance(p, LineChart)}
    assert set(charts) == {"Invariance", "Linear map"}
    inv = charts["Invariance"]
    assert [n for n, *_ in inv.series] == ["conv1", "conv2", "conv3", "model input", "prediction kept"]
    np.testing.assert_allclose(inv.series[1][1], view.result.invariance()[1], rtol=1e-6)
    np.testing.assert_allclose(charts["Linear map"].series[2][1], view.result.lin_test[1], rtol=1e-6)
    grids = [p for p in parts(figure) if isinstance(p, TileGrid)]
    assert len(grids) == 1 and len(grids[0].tiles) == 7
    res = view.result
    for k, t in enumerate(grids[0].tiles):
        assert f"{res.values[k]:g}: {res.class_name(int(res.pred[0, k]))}" in t.caption
    assert any("M_theta held-out error" in t for t in figure.texts())
    unit, _ = check_figure(view, FigureOptions(kind="unit", dpi=100, include={"strip": False}), tmp_path, "probe-unit")
    uc = [p for p in parts(unit) if isinstance(p, LineChart)]
    assert len(uc) == 1 and "conv3 unit 3" in uc[0].title and not [p for p in parts(unit) if isinstance(p, TileGrid)]
    np.testing.assert_allclose(uc[0].series[0][1], res.pooled[2].mean(axis=0)[:, 3], rtol=1e-6)


def test_dock_lays_out_at_1024x640(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    with demo_window(qtbot, demo, tmp_path, monkeypatch, "probes") as (win, view):
        assert isinstance(view, ProbesView)
        view.set_params(values="-20:20:10")
        _run(qtbot, view)
        qtbot.waitUntil(lambda: len(view.strip.ids) == 5, timeout=JOB_MS)
        qtbot.wait(50)
        assert win.size().toTuple() == (1024, 640)
        win.grab().save(str(tmp_path / "probes-1024x640.png"))
        assert widgets_off_view(view) == []
        assert view.inv_plot.height() >= 90 and view.resp_plot.height() >= 90
        assert view.strip_scroll.viewport().height() >= 72


def test_state_round_trips(ctx, view: ProbesView) -> None:
    view.set_params(transform="translate-y", values="-2:2:1", fill="wrap", layers=["conv2", "prelu3"], scope="set",
                    features="flat")
    state = view.save_state()
    assert state == {"transform": "translate-y", "range": "-2:2:1", "fill": "wrap", "layers": ["conv2", "prelu3"],
                     "scope": "set", "features": "flat"}
    other = ProbesView(ctx)  # not shown: nothing runs
    try:
        other.restore_state(state)
        assert other.save_state() == state
        assert other.params() == ProbeParams(transform="translate-y", values=(-2.0, -1.0, 0.0, 1.0, 2.0), fill="wrap",
                                             layers=("conv2", "prelu3"), features="flat")
        assert other.result is None and other._handle is None
    finally:
        other.close()
    view.set_params(layers=["conv1", "conv2", "conv3"], features="pooled")


def test_a_tabbed_away_dock_probes_nothing_until_raised(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    """At start-up the Probes dock sits in a tab behind another: it runs no sweep until its tab
    is raised (then it probes the current settings by itself)."""
    from .gui_layout import JOB_MS, demo_window

    with demo_window(qtbot, demo, tmp_path, monkeypatch, "heatmaps", size=(1400, 900)) as (win, _heat):
        probes = win.views["probes"]
        qtbot.wait(200)  # any start-up timers of the hidden dock have fired
        assert probes.visibleRegion().isEmpty() and probes.result is None
        assert not [j for j in win.runner.jobs() if j.title.startswith("Probe")]
        with qtbot.waitSignal(probes.result_ready, timeout=JOB_MS):
            win.docks["probes"].raise_()
        assert probes.result is not None
