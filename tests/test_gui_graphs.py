"""The inference-graph canvas: a real fit of the demo RNet (conv1..conv3 + class layer, small K)
on the 200 demo faces, drawn from the engine's explanation; clicking, switching, the figure, the
1024x640 layout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from pytestqt.wait_signal import SignalBlocker

from gui.context import AppContext
from gui.figures import FigureOptions
from gui.views.graphs import SELECTION_KIND, GraphPicture, GraphView
from tests.figure_checks import check_figure, svg_images, svg_texts
from tests.gui_layout import demo_window, widgets_off_view

LAYERS, K, MAX_ITER, N = ["conv1", "conv2", "conv3"], 4, 15, 3
JOB_MS = 180_000


def _wait(signal: object, timeout: int = JOB_MS) -> list[object]:
    blocker = SignalBlocker(timeout=timeout, raising=True)
    blocker.connect(signal)
    blocker.wait()
    return blocker.args


def _engine_graph(view: GraphView, **what: object):
    from engine.graphs import explain

    return explain(view.fit, n=view.n_spin.value(), patches=16, **what)


def _ids(ex) -> tuple[list[str], list[tuple[str, str]]]:
    return [nd["id"] for nd in ex.nodes], [(e["source"], e["target"]) for e in ex.edges]


@pytest.fixture(scope="module")
def view(ctx: AppContext) -> Iterator[GraphView]:
    """A shown view after one fit (the first image's predicted class explained)."""
    ctx.selection.set_class_index(-1)
    ctx.selection.set_current_image(0)
    w = GraphView(ctx)
    w.resize(1200, 800)
    w.show()
    assert w.layers() == LAYERS  # the demo's default layers
    w.set_settings(LAYERS, K, n=N, max_iter=MAX_ITER)
    graph = SignalBlocker(timeout=JOB_MS, raising=True)
    graph.connect(w.graph_ready)
    handle = w.run()
    assert handle is not None and w.progress.isVisibleTo(w) and not w.fit_button.isEnabled(), w.status.text()
    graph.connect(handle.failed)
    graph.wait()
    assert handle.state == "done", handle.traceback
    yield w
    w.close()
    w.deleteLater()


def test_fit_draws_the_engine_graph_of_the_predicted_class(view: GraphView) -> None:
    fit = view.fit
    assert fit.layer_names == LAYERS and [lm.k for lm in fit.layers] == [K, K, K]
    assert not fit.from_cache and "Fitted conv1 K=4" in view.status.text()
    cls = fit.classes[int(fit.predicted[0])]  # nothing selected: the current image's predicted class
    ex = view.explanation
    assert ex.kind == "class" and ex.class_name == cls and view.class_combo.currentText() == cls
    nodes, edges = _ids(_engine_graph(view, class_name=cls))
    assert _ids(ex) == (nodes, edges)
    assert list(view.node_items) == nodes and sorted(view.edge_items) == sorted(edges)
    assert len(view.canvas.scene().items()) > len(nodes) + len(edges)
    assert nodes[0] == f"class:{cls}" and all(n.split(":")[0] in [*LAYERS, "class"] for n in nodes)
    # drawn where the engine's layout puts them: layers left to right, class node rightmost
    xs = {nd["id"]: view.node_scene_rect(nd["id"]).left() for nd in ex.nodes}
    by_layer = {nd["layer_index"]: xs[nd["id"]] for nd in ex.nodes}
    assert sorted(by_layer, key=by_layer.get) == sorted(by_layer)
    # edge width and opacity grow with LR
    strongest = max(ex.edges, key=lambda e: e["lr"])
    weakest = min(ex.edges, key=lambda e: e["lr"])
    a = view.edge_items[(strongest["source"], strongest["target"])].pen()
    b = view.edge_items[(weakest["source"], weakest["target"])].pen()
    assert a.widthF() > b.widthF() and a.color().alphaF() >= b.color().alphaF()
    tip = view.node_items[nodes[1]].toolTip()
    assert "visual word" in tip and "LR" in tip and "P(t|s)" in tip
    assert not view.progress.isVisibleTo(view) and view.fit_button.isEnabled()
    assert [label for label, _cb in view.analysis_actions()] == ["Fit inference graph"]
    # the log-likelihood curves: one per layer, the engine's values per iteration
    curves = view.ll_plot.getPlotItem().listDataItems()
    assert len(curves) == len(LAYERS)
    for curve, lm in zip(curves, fit.layers, strict=True):
        assert list(curve.yData) == pytest.approx(lm.loglik) and curve.name() == lm.name


def test_refit_comes_from_the_cache(view: GraphView) -> None:
    handle = view.run()
    assert handle is not None
    _wait(view.fit_ready)
    assert view.fit.from_cache and "from the cache" in view.status.text()
    _wait(view.graph_ready)


def test_clicking_a_node_publishes_it_and_shows_its_patches(view: GraphView, ctx: AppContext, qtbot) -> None:
    ex = view.explanation
    node = next(nd for nd in ex.nodes if nd["layer"] == "conv2")
    rect = view.node_scene_rect(node["id"])
    view.canvas.centerOn(rect.center())
    point = view.canvas.mapFromScene(rect.center())
    with qtbot.waitSignal(ctx.selection.item_changed, timeout=5000) as sig:
        qtbot.mouseClick(view.canvas.viewport(), Qt.MouseButton.LeftButton, pos=point)
    assert sig.args == [SELECTION_KIND, ("conv2", node["word"])]
    assert ctx.selection.item(SELECTION_KIND) == ("conv2", node["word"])
    assert view.current_node == node["id"] and view.node_title.text() == f"conv2 word {node['word']}"
    assert view.shown_patches() == [p["image"] for p in node["patches"]] and len(node["patches"]) > 0
    assert len(view.crops[node["id"]]) == len(node["patches"])
    # where the word occurs in the current image: its positions in the fit's word map
    words = view.fit.layers[node["layer_index"]].words[ctx.selection.current_image]
    assert view.occurrences() == int((words == node["word"]).sum())
    assert not view.where_label.pixmap().isNull() and f"at {view.occurrences()} of {words.size}" in \
        view.where_caption.text()


def test_changing_the_class_reselects_the_nodes(view: GraphView, ctx: AppContext) -> None:
    fit = view.fit
    other = 1 - view.explanation.class_index
    ctx.selection.set_class_index(other)
    ex = _wait(view.graph_ready)[0]
    assert ex.kind == "class" and ex.class_name == fit.classes[other]
    assert view.class_combo.currentIndex() == other
    assert _ids(ex) == _ids(_engine_graph(view, class_name=fit.classes[other]))
    assert list(view.node_items) == _ids(ex)[0]
    # the class node of the graph explains its class again when clicked (no change: no new job)
    view.click_node(f"class:{fit.classes[other]}")
    assert view.explanation is ex


def test_image_graph_and_clicking_a_patch_switches_images(view: GraphView, ctx: AppContext) -> None:
    view.set_mode("image")
    ex = _wait(view.graph_ready)[0]
    cur = ctx.selection.current_image
    assert ex.kind == "image" and ex.target == view.fit.image_paths[cur] and ex.images == 1
    assert _ids(ex) == _ids(_engine_graph(view, image=view.fit.image_paths[cur]))
    node = next(nd for nd in ex.nodes if nd["layer"] == "conv3")
    view.click_node(node["id"])
    target = next(i for i in view.shown_patches() if i != cur)
    view.patches.clicked.emit(target)
    ex2 = _wait(view.graph_ready)[0]
    assert ctx.selection.current_image == target and ex2.target == view.fit.image_paths[target]
    assert _ids(ex2) == _ids(_engine_graph(view, image=view.fit.image_paths[target]))
    # the class node switches back to the class graph
    view.click_node(ex2.nodes[0]["id"])
    ex3 = _wait(view.graph_ready)[0]
    assert ex3.kind == "class" and ex3.class_name == ex2.class_name and view.mode == "class"


def test_zoom_and_fit_view(view: GraphView) -> None:
    view.canvas.fit_all()
    before = view.canvas.transform().m11()
    view.canvas.zoom(2.0)
    assert view.canvas.transform().m11() == pytest.approx(2 * before)
    view.fit_view_button.click()
    assert view.canvas.transform().m11() == pytest.approx(before)


def test_bad_k_is_reported_and_nothing_runs(view: GraphView) -> None:
    view.k_edit.setText("4,x")
    assert view.run() is None and "K must be whole numbers" in view.status.text() and "'x'" in view.status.text()
    view.k_edit.setText("4,4")
    assert view.run() is None and "2 values of k for 3 layers" in view.status.text()
    view.k_edit.setText(str(K))


def test_cancel_a_running_fit(view: GraphView, qtbot) -> None:
    view.set_settings(LAYERS, 5, max_iter=MAX_ITER)  # not cached: a real fit to cancel
    handle = view.run()
    assert handle is not None and view.cancel_button.isEnabled()
    # running on the worker, the live log-likelihood curve of the first layer growing
    qtbot.waitUntil(lambda: len(view.ll_curves.get("conv1", {})) >= 2, timeout=JOB_MS)
    assert view.ll_plot.getPlotItem().listDataItems()[0].name() == "conv1"
    blocker = SignalBlocker(timeout=JOB_MS, raising=True)
    blocker.connect(handle.cancelled)
    view.cancel()
    blocker.wait()
    assert handle.state == "cancelled" and view.status.text() == "Fit cancelled."
    assert view.fit_button.isEnabled() and not view.cancel_button.isEnabled()
    assert [lm.k for lm in view.fit.layers] == [K, K, K]  # the shown fit stays, with its curves
    assert [c.name() for c in view.ll_plot.getPlotItem().listDataItems()] == LAYERS
    assert list(view.ll_curves["conv1"].values()) == pytest.approx(view.fit.layers[0].loglik)
    view.set_settings(LAYERS, K, max_iter=MAX_ITER)


def test_figure(view: GraphView, ctx: AppContext, tmp_path: Path) -> None:
    ex = view.explanation
    node = next(nd for nd in ex.nodes if nd["layer"] != "class")
    view.click_node(node["id"])
    options = FigureOptions(kind="graph", dpi=150)
    figure, root = check_figure(view, options, tmp_path, "graph")
    picture = next(e for e in figure.elements if isinstance(e, GraphPicture))
    assert [nd["id"] for nd in picture.nodes] == [nd["id"] for nd in ex.nodes]
    assert len(picture.edges) == len(ex.edges) and set(picture.montages) == {nd["id"] for nd in ex.nodes}
    texts = svg_texts(root)
    for nd in ex.nodes:  # node labels are text, not pixels
        label = nd["label"] if nd["layer"] == "class" else f"{nd['layer']} #{nd['word']}"
        assert label in texts
    assert sum("LR " in t for t in texts) >= len(ex.edges)
    images = svg_images(root)  # one raster per node montage, plus the clicked node's patches
    assert len(images) == len(ex.nodes) + len(view.crops[node["id"]])
    assert figure.title.startswith("Inference graph of")
    bare = view.figure(FigureOptions(kind="graph", include={"node_patches": False, "legend": False}))
    assert len(bare.elements) == 1
    with pytest.raises(ValueError, match="no 'unit' figure"):
        view.figure(FigureOptions(kind="unit"))


def test_state_round_trip(view: GraphView, ctx: AppContext) -> None:
    state = view.save_state()
    assert state["layers"] == ",".join(LAYERS) and state["k"] == str(K)
    other = GraphView(ctx)
    other.restore_state({**state, "n": 2, "mode": "image"})
    assert other.layers() == LAYERS and other.ks() == (K,) and other.n_spin.value() == 2 and other.mode == "image"
    other.deleteLater()


def test_dock_lays_out_at_1024x640(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    with demo_window(qtbot, demo, tmp_path, monkeypatch, "graphs") as (win, view):
        assert isinstance(view, GraphView)
        view.set_settings(LAYERS, 3, max_iter=5)
        with qtbot.waitSignal(view.graph_ready, timeout=JOB_MS):
            view.run()
        qtbot.wait(50)
        assert win.size().toTuple() == (1024, 640)
        win.grab().save(str(tmp_path / "graphs-1024x640.png"))
        assert widgets_off_view(view) == []
        assert view.canvas.viewport().width() >= 320 and view.canvas.viewport().height() >= 150
        assert len(view.node_items) == len(view.explanation.nodes) > 1
