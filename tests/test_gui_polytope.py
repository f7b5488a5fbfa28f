"""The polytope neighbour gallery dock on the real demo session (pretrained RNet, 200 real faces):
the gallery of image 0 is the engine's covered set in rank order (each shown image on x's side of
every chosen boundary), clicking a neighbour selects it everywhere, delta and |Q| re-run the job
(newest request wins), the affine-head note, the ONNX refusal, the figure and the 1024x640 layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import Qt

from engine.polytope import scsc
from engine.polytope.run import PolytopeParams, digest
from gui.figures import FigureOptions, Text, TileGrid
from gui.views.polytope import ITEM_KIND, MAX_SHOWN, PolytopeView, framed

from .conftest import wait_job
from .figure_checks import check_figure, parts
from .gui_layout import demo_window, widgets_off_view

JOB_MS = 180_000


@pytest.fixture(scope="module")
def view(ctx, qapp):
    v = PolytopeView(ctx)
    v.resize(1000, 700)
    v.show()
    ctx.selection.current_image = 0
    yield v
    v.shutdown()
    v.close()


def _ready(qtbot, view: PolytopeView, **want: object) -> None:
    """Wait until the view shows a result of the current setting (params as ``want``)."""
    def ok() -> bool:
        r = view.result
        return r is not None and view._handle is None and all(getattr(r.params, k) == v for k, v in want.items()) \
            and r.layer == view.layer()
    qtbot.waitUntil(lambda: view.layer() != "", timeout=JOB_MS)
    qtbot.waitUntil(ok, timeout=JOB_MS)


def _engine_result(demo, tmp_path: Path, params):
    from engine.backends.torch_backend import TorchBackend
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.jobs import run_sync
    from engine.models import load_model
    from engine.polytope.run import run

    spec, images = demo
    loaded = load_model(spec)
    be = TorchBackend(loaded.module, spec, "cpu")
    return run_sync(run(be, loaded.cache_id, open_image_set(images), params, cache=Cache(tmp_path / "ref-cache")))


def test_gallery_of_image_0_is_the_covered_set_in_rank_order(qtbot, ctx, demo, view: PolytopeView,
                                                               tmp_path: Path) -> None:
    _ready(qtbot, view, delta=None, candidates=50)
    assert view.layer() == "prelu3"  # the engine's default: the last convolution's output (after its PReLU)
    assert "prelu3 (default)" in view.layer_combo.currentText()
    assert view.split_candidates()[:3] == ["conv1", "prelu1", "pool1"]
    assert view.query() == 0
    res = view.result
    j = view.result_index(0)
    assert j is not None and res.record_indices[j] == 0
    covered = scsc.members(res.covers[j], res.n)
    # the same gallery as the engine computes on its own (another backend, another cache)
    ref = _engine_result(demo, tmp_path, PolytopeParams())
    assert ref.layer == "prelu3" and digest(ref) == digest(res)
    shown = view.shown_neighbours()
    assert 0 < len(shown) <= MAX_SHOWN
    rows = [view.result_index(i) for i in shown]
    assert set(rows) <= set(covered.tolist()) and j not in rows
    idx, dist = res.gallery(j)
    assert rows == idx[:len(shown)].tolist()  # rank order
    assert np.all(np.diff(dist) >= 0)
    # independently: every shown image is on x's side of every chosen boundary
    chosen = res.boundaries(j)
    assert len(chosen) >= 1
    side = res.margins[j, chosen] >= 0
    assert np.all((res.margins[rows][:, chosen] >= 0) == side)
    # Dist is the sum over P(x) of |<W_h, psi(x)> - <W_h, psi(x')>|: margins differ by the same amounts
    np.testing.assert_allclose(dist[:len(shown)], np.abs(res.margins[rows][:, chosen] - res.margins[j, chosen]).sum(1),
                               rtol=1e-9, atol=1e-12)
    s = view.summary()
    assert s is not None
    text = view.numbers.text()
    assert f"<b>{s['n_boundaries']}</b> boundaries chosen" in text
    assert f"covered <b>{s['covered']}</b>" in text and f"{s['certificate_error']:.1e}" in text
    assert s["certificate_error"] < 1e-4 and s["covered"] == len(idx)
    # intruders are exactly the tiles predicted as another class, marked in the label
    bad = [bool(res.pred[r] != res.pred[j]) for r in rows]
    assert sum(bad) <= s["covered_different_class"] <= s["delta"]
    # the kNN strip: the engine's nearest images at the gallery's size (capped at the kept 64)
    k = view.knn_comparison()
    assert k is not None and k["k"] == min(len(idx), res.knn.shape[1])
    assert view.shown_knn() == res.record_indices[res.knn[j][:k["k"]]].tolist()[:MAX_SHOWN]
    assert "kNN (Euclidean on psi)" in view.knn_title.text()


def test_clicking_a_neighbour_selects_it_everywhere(qtbot, ctx, view: PolytopeView) -> None:
    _ready(qtbot, view)
    ctx.selection.current_image = 0
    shown = view.shown_neighbours()
    target = shown[2]
    with qtbot.waitSignal(ctx.selection.current_image_changed, timeout=5000):
        qtbot.mouseClick(view.gallery, Qt.MouseButton.LeftButton, pos=view.gallery.tile_rect(2).center())
    assert ctx.selection.current_image == target
    assert ctx.selection.item(ITEM_KIND) == target
    assert view.query() == 0 and view.shown_neighbours() == shown  # the gallery keeps its query
    assert view.query_button.isVisibleTo(view)
    view.show_selected()
    assert view.query() == target
    j = view.result_index(target)
    assert [view.result_index(i) for i in view.shown_neighbours()] == view.result.gallery(j)[0][:MAX_SHOWN].tolist()
    ctx.selection.current_image = 5  # chosen elsewhere: the gallery follows, the neighbour item goes
    assert view.query() == 5 and ctx.selection.item(ITEM_KIND) is None
    ctx.selection.current_image = 0


def test_changing_delta_reruns_and_changes_the_numbers(qtbot, ctx, view: PolytopeView) -> None:
    view.set_params(delta=None, candidates=50)
    _ready(qtbot, view, delta=None)
    ctx.selection.current_image = 0
    before, text_before = view.summary(), view.numbers.text()
    assert before is not None and before["covered_different_class"] == 0
    shown: list[object] = []
    view.result_ready.connect(shown.append)
    view.delta_spin.setValue(1)  # superseded at once by the next request: only delta 3 is shown
    view.delta_spin.setValue(3)
    assert view._handle is not None and view._handle_key == ("prelu3", 3, 50)
    _ready(qtbot, view, delta=3)
    view.result_ready.disconnect(shown.append)
    assert [r.params.delta for r in shown] == [3]
    after = view.summary()
    assert after is not None and after["delta"] == 3
    assert (after["covered"], after["n_boundaries"], after["covered_different_class"]) != \
        (before["covered"], before["n_boundaries"], before["covered_different_class"])
    assert 0 < after["covered_different_class"] <= 3
    assert view.numbers.text() != text_before and "delta 3" in view.numbers.text()
    res = view.result
    j = view.result_index(0)
    rows = [view.result_index(i) for i in view.shown_neighbours()]
    assert rows == res.gallery(j)[0][:MAX_SHOWN].tolist()
    # back to the smallest feasible delta: from memory, no job
    view.delta_spin.setValue(-1)
    assert view._handle is None and view.result.params.delta is None
    assert view.numbers.text() == text_before
    # |Q| re-runs too
    view.set_params(candidates=20)
    _ready(qtbot, view, candidates=20, delta=None)
    assert len(view.result.q_kind) <= 20


def test_affine_head_is_said(qtbot, ctx, view: PolytopeView) -> None:
    view.set_params(layer="prelu4", delta=None, candidates=50)
    _ready(qtbot, view, layer="prelu4")
    assert view.result.head["affine"]
    note = view.affine_note()
    assert "affine" in note and view.note_label.isVisibleTo(view) and view.note_label.text() == note
    # prelu4 is not spatial (after the flatten): the engine suggests the nearest earlier spatial layers
    assert view.result.head["suggested_layers"][0] == "prelu3"
    assert view.suggested_layers()[0] == "prelu3" and "Suggested earlier split layers: prelu3" in note
    assert view.suggest_button.isVisibleTo(view) and view.suggest_button.text() == "Split at prelu3"
    qtbot.mouseClick(view.suggest_button, Qt.MouseButton.LeftButton)
    assert view.layer() == "prelu3"
    _ready(qtbot, view, layer="prelu3")
    assert not view.suggest_button.isVisibleTo(view)
    assert view.affine_note() == "" and not view.note_label.isVisibleTo(view)
    with pytest.raises(ValueError, match="not a split point"):
        view.set_params(layer="no-such-layer")


def test_figure_renders_in_every_format(qtbot, ctx, view: PolytopeView, tmp_path: Path) -> None:
    view.set_params(layer="prelu3", delta=3, candidates=50)
    _ready(qtbot, view, delta=3)
    ctx.selection.current_image = 0
    assert [k.key for k in view.figure_kinds()] == ["gallery"]
    figure, _root = check_figure(view, FigureOptions(dpi=100), tmp_path, "polytope")
    res = view.result
    j = view.result_index(0)
    idx, dist = res.gallery(j)
    grids = [p for p in parts(figure) if isinstance(p, TileGrid)]
    assert len(grids) == 2  # the gallery and the kNN strip
    gallery = next(g for g in grids if all("d=" in t.caption for t in g.tiles))
    knn = next(g for g in grids if g is not gallery)
    assert len(knn.tiles) == min(16, view.knn_comparison()["k"])
    captions = [t.caption for t in gallery.tiles]
    assert len(captions) == min(16, len(idx))
    for cap, i, d in zip(captions, idx, dist, strict=False):
        assert cap.endswith(f"d={d:.3g}")
        assert cap.startswith("✗") == bool(res.pred[i] != res.pred[j])
    texts = figure.texts()
    s = view.summary()
    assert any(f"|P(x)| = {s['n_boundaries']} boundaries" in t for t in texts)
    assert any(f"{s['certificate_error']:.2e}" in t for t in texts)
    # without the kNN strip and the numbers
    small = view.figure(FigureOptions(include={"knn": False, "numbers": False}))
    assert len([p for p in parts(small) if isinstance(p, TileGrid)]) == 1
    assert not any(isinstance(p, Text) and "|P(x)|" in p.text for p in parts(small))


def test_hidden_view_waits_restores_its_state_and_can_be_cancelled(qtbot, ctx, view: PolytopeView) -> None:
    view.set_params(layer="prelu3", delta=2, candidates=30)
    _ready(qtbot, view, delta=2, candidates=30)
    state = view.save_state()
    assert state == {"layer": "prelu3", "delta": 2, "candidates": 30}
    other = PolytopeView(ctx)  # never shown: runs nothing, not even the list of split points
    qtbot.addWidget(other)
    other.restore_state({"layer": "pool2", "delta": None, "candidates": 7})
    qtbot.wait(300)
    assert other._layers_handle is None and other._handle is None and other.result is None
    assert other.layer_combo.count() == 0 and other.delta() is None and other.q_spin.value() == 7
    assert "split points and galleries are computed when this view is shown" in other.status.text()
    assert other.save_state() == {"layer": "pool2", "delta": None, "candidates": 7}  # kept for a project
    assert not [j for j in ctx.runner.jobs() if j.state in ("queued", "running") and j.title.startswith("Polytope")
                and j not in (view._handle, view._layers_handle)]
    other.restore_state(state)
    assert other.save_state() == state and other._handle is None
    with qtbot.waitSignal(other.layers_ready, timeout=JOB_MS):
        other.show()  # shown: lists the split points, then computes (the engine finds it in its disk cache)
    assert other.layer() == "prelu3" and other.delta() == 2
    qtbot.waitUntil(lambda: other._handle is not None or other.result is not None, timeout=JOB_MS)
    _ready(qtbot, other, delta=2, candidates=30)
    assert other.result.from_cache and digest(other.result) == digest(view.result)
    # a job cancelled from the jobs panel leaves the view saying so, not waiting forever
    other.set_params(candidates=31)
    handle = other._handle
    assert handle is not None
    with qtbot.waitSignal(handle.cancelled, timeout=JOB_MS):
        handle.cancel()
    assert other._handle is None and "cancelled" in other.status.text()
    other.shutdown()
    other.close()


def test_intruder_frame() -> None:
    img = np.full((24, 24, 3), 100, np.uint8)
    out = framed(img, 2)
    assert (out[0, 5] == [210, 30, 30]).all() and (out[23, 5] == [210, 30, 30]).all()
    assert (out[5, 1] == [210, 30, 30]).all() and (out[12, 12] == 100).all()
    assert (img == 100).all()


def test_onnx_model_says_splits_need_pytorch(qtbot, qapp, ocr_onnx, demo_images, tmp_path: Path,
                                             monkeypatch) -> None:
    from engine.types import ModelSpec
    from gui.context import AppContext
    from gui.jobs import JobRunner
    from gui.selection import Selection
    from gui.session import Session

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    selection, runner = Selection(), JobRunner()
    session = Session(selection, runner)
    try:
        wait_job(session.load_model(ModelSpec(path=str(ocr_onnx))))
        v = PolytopeView(AppContext(selection, runner, session))
        qtbot.addWidget(v)
        v.show()
        with qtbot.waitSignal(v.layers_ready, timeout=JOB_MS):
            wait_job(session.open_images(str(demo_images)))
        assert "PyTorch model" in v.status.text() and "onnx" in v.status.text().lower()
        assert v.result is None and v._handle is None and v.split_candidates() == []
        with pytest.raises(ValueError, match="PyTorch"):
            v.figure(FigureOptions())
    finally:
        runner.shutdown()
        session.shutdown()


def test_dock_lays_out_at_1024x640(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    with demo_window(qtbot, demo, tmp_path, monkeypatch, "polytope") as (win, view):
        assert isinstance(view, PolytopeView)
        _ready(qtbot, view)
        qtbot.waitUntil(lambda: len(view.shown_neighbours()) > 0, timeout=5000)
        qtbot.wait(50)
        assert win.size().toTuple() == (1024, 640)
        win.grab().save(str(tmp_path / "polytope-1024x640.png"))
        assert widgets_off_view(view) == []
        assert view.gallery_scroll.viewport().height() >= 64 and view.gallery_scroll.viewport().width() >= 64 * 3
        assert view.knn_scroll.isVisible()


def test_a_dock_tabbed_away_at_start_up_runs_nothing_until_raised(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
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
        view = win.views["polytope"]
        qtbot.wait(300)
        assert not view.on_screen()  # tabbed behind another dock: "visible", nothing on screen
        assert [j.title for j in win.runner.jobs() if j.title.startswith("Polytope")] == []
        assert view.layer_combo.count() == 0 and "computed when this view is shown" in view.status.text()
        with qtbot.waitSignal(view.layers_ready, timeout=JOB_MS):
            win.docks["polytope"].raise_()
        assert view.on_screen() and view.layer() == "prelu3"
        _ready(qtbot, view, layer="prelu3")
    finally:
        win.close()
