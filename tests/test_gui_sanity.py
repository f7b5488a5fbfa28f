"""The Sanity check dock on the real demo session (pretrained RNet, 200 real faces): the
explanations offered for RNet, a heatmap check whose curves and strip are the engine's result
(the selected image first), following the selected layer and unit, a request through the
selection item another view would publish, cancel, the figure in PNG/SVG/PDF, the 1024x640
layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gui.figures import FigureOptions, Text, TileGrid
from gui.views.sanity import REQUEST_KIND, SanityView, SimilarityChart

from .conftest import wait_job
from .figure_checks import check_figure, parts
from .gui_layout import demo_window, widgets_off_view

JOB_MS = 180_000


@pytest.fixture(scope="module")
def view(ctx, qapp):
    v = SanityView(ctx)
    v.resize(900, 700)
    v.show()
    ctx.selection.current_image = 5
    yield v
    v.shutdown()
    v.close()


def _explanations(qtbot, view: SanityView) -> list[str]:
    qtbot.waitUntil(lambda: view.explanation_combo.count() > 0, timeout=JOB_MS)
    return [view.explanation_combo.itemData(i) for i in range(view.explanation_combo.count())]


def test_heatmap_check_shows_the_engine_result(qtbot, ctx, view: SanityView, demo, tmp_path: Path) -> None:
    names = _explanations(qtbot, view)
    # RNet: PReLUs, no nn.ReLU, so no guided backprop; the rest it supports
    assert "guided_backprop" not in names and {"heatmap", "dissection", "filters"} <= set(names)
    ctx.selection.layer = "conv2"
    ctx.selection.unit = 3
    assert view.layer() == "conv2" and view.unit_spin.value() == 3  # follows the selection
    view.set_params(explanation="heatmap", mode="cascade", images=8)
    handle = view.run_check()
    assert handle is not None
    wait_job(handle)
    res = view.result
    assert res is not None and res.explanation == "heatmap" and res.layer == "conv2" and res.unit == 3
    assert res.indices[0] == 5 and len(res.indices) == 8  # the selected image first
    assert res.steps == ("dense5_1", "dense4", "conv3", "conv2", "conv1")
    # the same numbers as the engine computes on its own
    from engine.backends.torch_backend import TorchBackend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.jobs import run_sync
    from engine.models import load_model
    from engine.sanity.run import run

    spec, images = demo
    loaded = load_model(spec)
    ref = run_sync(run(TorchBackend(loaded.module, spec, "cpu"), loaded.cache_id, open_image_set(images),
                       view.params(), cache=Cache(tmp_path / "ref")))
    np.testing.assert_allclose(ref.values, res.values)
    # the plot: one curve per metric, from 1 at "original" through each step's mean
    curves = list(view.plot.getPlotItem().listDataItems())
    # named as a reader knows them, not by the engine's keys
    assert [c.name() for c in curves] == ["Spearman of |map|", "Spearman (signed)", "SSIM of |map|"]
    assert res.metrics == ("spearman_abs", "spearman", "ssim")
    assert "SSIM of |map|" in view.numbers.text() and "spearman_abs" not in view.numbers.text()
    ys = curves[0].getData()[1]
    np.testing.assert_allclose(ys, np.concatenate([[1.0], res.mean()[:, 0]]))
    ticks = view.plot.getAxis("bottom")._tickLevels[0]
    assert [t[1] for t in ticks] == ["original", *res.steps]
    # the strip: the selected image's original and randomised maps
    assert view.strip_row() == 0 and view.strip.ids == list(range(1 + res.n_steps))
    assert "conv2" in view.numbers.text() and "below 0.5 from <b>conv2</b>" in view.numbers.text()
    # the verdict: passes when every metric of the engine's result drops below 0.5 at some step
    passes = all(ref.drop_step(m) is not None for m in ref.metrics)
    assert view.verdict().startswith("Passes" if passes else "Fails") and view.verdict() in view.numbers.text()
    ctx.selection.current_image = 150  # not checked: the strip says so
    assert view.strip_row() is None and "press Run" in view.strip_title.text()
    ctx.selection.current_image = 5
    assert view.strip_row() == 0
    # the figure: chart, outcome lines, the strip of the original and each step
    fig, _root = check_figure(view, FigureOptions(dpi=100), tmp_path, "sanity")
    chart = [p for p in parts(fig) if isinstance(p, SimilarityChart)]
    assert len(chart) == 1 and chart[0].steps == list(res.steps) and len(chart[0].series) == 3
    grids = [p for p in parts(fig) if isinstance(p, TileGrid)]
    assert len(grids) == 1 and [t.caption for t in grids[0].tiles] == ["original", *res.steps]
    assert any("below 0.5 from conv2" in t.text for t in parts(fig) if isinstance(t, Text))
    no_maps = view.figure(FigureOptions(include={"maps": False}))
    assert not [p for p in parts(no_maps) if isinstance(p, TileGrid)]
    state = view.save_state()
    assert state["explanation"] == "heatmap" and state["layer"] == "conv2" and state["unit"] == 3


def test_request_through_the_selection_and_cancel(qtbot, ctx, view: SanityView) -> None:
    _explanations(qtbot, view)
    with qtbot.waitSignal(view.result_ready, timeout=JOB_MS) as got:
        ctx.selection.set_item(REQUEST_KIND, {"explanation": "filters", "layer": "conv3", "mode": "independent"})
    res = got.args[0]
    assert res.explanation == "filters" and res.mode == "independent" and res.layer == "conv3"
    assert view.explanation() == "filters" and view.mode() == "independent"
    assert ctx.selection.item(REQUEST_KIND) is None  # read and cleared: the same request again runs again
    np.testing.assert_allclose(res.values[:2], 1.0)  # the dense layers do not change conv3's filters
    assert "No maps" in view.strip_title.text()
    view.set_params(explanation="heatmap", layer="conv1", unit=0, images=40)
    handle = view.run_check()
    assert handle is not None
    with qtbot.waitSignal(handle.cancelled, timeout=JOB_MS):
        view.cancel()
    assert "cancelled" in view.status.text() and view.result is res


def test_dock_lays_out_at_1024x640(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    with demo_window(qtbot, demo, tmp_path, monkeypatch, "sanity") as (win, view):
        assert isinstance(view, SanityView)
        _explanations(qtbot, view)
        view.set_params(explanation="heatmap", layer="conv2", unit=1, images=6)
        wait_job(view.run_check())
        qtbot.wait(50)
        # the dock itself fits beside the image browser at 1024 wide (other docks may widen the window)
        assert view.minimumSizeHint().width() <= 480
        assert win.size().height() == 640
        win.grab().save(str(tmp_path / "sanity-1024x640.png"))
        assert widgets_off_view(view) == []
        assert view.plot.height() >= 100 and view.strip.isVisible()
