"""Inference graphs: transitions, selection, graph and layout on hand-made data; the fit and
explanations on the real pretrained RNet (demo) and on a randomised copy of it."""

from __future__ import annotations

import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from engine.activations import extract
from engine.backends import open_backend
from engine.cache import DamagedEntry
from engine.data.images import open_image_set
from engine.graphs import (
    GraphParams,
    TransitionTable,
    build_graph,
    explain,
    layout,
    load_result,
    render_graph,
    run,
    save_result,
    select_nodes,
    transition_counts,
    window_bounds,
)
from engine.jobs import run_sync
from engine.models import load_model
from engine.models.receptive import ReceptiveField, receptive_fields
from engine.types import ConvLensError

LOW = np.array([[0, 1, 1, 2],
                [0, 0, 2, 2],
                [1, 1, 0, 0],
                [2, 1, 0, 1]])
UP = np.array([[0, 1],
               [1, 0]])
# lower layer: a 3x3 conv on the input; upper: a 2x2 stride-2 conv on the lower layer
RF_LOW = ReceptiveField((3, 3), (1, 1), (1.0, 1.0))
RF_UP = RF_LOW.then(2, 2)


def test_transition_counts_match_a_hand_computation() -> None:
    rows, cols = window_bounds(RF_UP, RF_LOW, (2, 2), (4, 4))
    np.testing.assert_array_equal(rows, [[0, 2], [2, 4]])
    np.testing.assert_array_equal(cols, [[0, 2], [2, 4]])
    n = transition_counts(UP[None], LOW[None], (rows, cols), 2, 3)
    # (0,0) s=0 sees {0,1,0,0}; (0,1) s=1 sees {1,2,2,2}; (1,0) s=1 {1,1,2,1}; (1,1) s=0 {0,0,0,1}
    np.testing.assert_array_equal(n, [[6, 2, 0], [0, 4, 4]])
    t = TransitionTable.of(n)
    np.testing.assert_allclose(t.p_t_given_s, [[0.75, 0.25, 0], [0, 0.5, 0.5]])
    np.testing.assert_allclose(t.p_t, [6 / 16, 6 / 16, 4 / 16])
    assert t.lr[0, 0] == pytest.approx(1.0) and t.lr[1, 2] == pytest.approx(1.0)
    assert t.lr[0, 1] == pytest.approx(math.log2(2 / 3)) and t.lr[1, 1] == pytest.approx(math.log2(4 / 3))
    assert t.lr[0, 2] == -np.inf and t.lr[1, 0] == -np.inf
    # the class layer counts every lower position; local counts of one image of two
    cls = transition_counts(np.array([1, 0]), np.stack([LOW, LOW.T]), None, 2, 3)
    np.testing.assert_array_equal(cls, [[6, 6, 4], [6, 6, 4]])  # LOW holds six 0s, six 1s, four 2s
    two = transition_counts(np.stack([UP, UP]), np.stack([LOW, np.zeros_like(LOW)]), (rows, cols), 2, 3)
    np.testing.assert_array_equal(two, n + np.array([[8, 0, 0], [8, 0, 0]]))
    np.testing.assert_array_equal(
        transition_counts(np.stack([UP, UP]), np.stack([LOW, np.zeros_like(LOW)]), (rows, cols), 2, 3, images=[0]), n)


def test_transition_counts_against_brute_force_with_clipped_windows() -> None:
    rng = np.random.default_rng(0)
    low_rf = ReceptiveField((5, 5), (2, 2), (1.0, 1.0))
    up_rf = low_rf.then(3, 2, padding=1)  # padded: border windows are clipped
    low = rng.integers(0, 4, (3, 7, 7))
    up = rng.integers(0, 3, (3, 4, 4))
    rows, cols = window_bounds(up_rf, low_rf, (4, 4), (7, 7))
    want = np.zeros((3, 4), dtype=np.int64)
    for img in range(3):
        for i in range(4):
            for j in range(4):
                for a in range(7):
                    for b in range(7):
                        # lower (a, b) is in the window when its field lies inside the upper field
                        tu, lu, bu, ru = up_rf.box(i, j)
                        tl, ll, bl, rl = low_rf.box(a, b)
                        if tu <= tl and bl <= bu and lu <= ll and rl <= ru:
                            want[up[img, i, j], low[img, a, b]] += 1
    np.testing.assert_array_equal(transition_counts(up, low, (rows, cols), 3, 4, chunk=2), want)
    assert rows[0, 0] == 0 and rows[0, 1] == 2  # position 0's 3x3 window starts in the padding


def test_windows_on_the_real_rnet_are_the_contained_fields(rnet_spec) -> None:
    rf = receptive_fields(load_model(rnet_spec).module, (24, 24))
    shapes = {"conv1": (22, 22), "conv2": (9, 9), "conv3": (3, 3)}
    for lo, hi in (("conv1", "conv2"), ("conv2", "conv3")):
        rows, cols = window_bounds(rf[hi], rf[lo], shapes[hi], shapes[lo])
        for i in range(shapes[hi][0]):
            t, _l, b, _r = rf[hi].box(i, 0)
            inside = [a for a in range(shapes[lo][0]) if t <= rf[lo].box(a, 0)[0] and rf[lo].box(a, 0)[2] <= b]
            assert (rows[i, 0], rows[i, 1]) == (inside[0], inside[-1] + 1)
        np.testing.assert_array_equal(rows, cols)
    rows, _ = window_bounds(rf["conv2"], rf["conv1"], (9, 9), (22, 22))
    assert (rows[0] == [0, 7]).all() and (rows[8] == [16, 22]).all()  # conv2 sees 7 conv1 rows


def test_selection_on_a_hand_made_table() -> None:
    class_to_l1 = np.array([[5.0, -1.0, 3.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    l1_to_l0 = np.array([[1.0, -2.0, 0.5], [50.0, 50.0, 50.0], [1.0, 4.0, -1.0], [7.0, 7.0, 7.0]])
    got = select_nodes([class_to_l1, l1_to_l0], [0], 2)
    assert got == [[(0, 5.0), (2, 3.0)], [(0, 2.0), (1, 2.0)]]  # tie by word number
    assert select_nodes([class_to_l1, l1_to_l0], [0], 1) == [[(0, 5.0)], [(0, 1.0)]]
    # nothing positive: that layer and every layer below are empty
    assert select_nodes([-np.abs(class_to_l1), l1_to_l0], [0], 3) == [[], []]
    assert select_nodes([class_to_l1, -np.abs(l1_to_l0)], [0], 3)[1] == []


def test_graph_and_layout_from_hand_tables() -> None:
    n_low = np.array([[6, 2, 0], [0, 4, 4]])  # layer "b" (2 words) over layer "a" (3 words)
    n_cls = np.array([[3, 1], [1, 3]])  # class layer (2 classes) over "b"
    tables = [TransitionTable.of(n_low), TransitionTable.of(n_cls)]
    g = build_graph(["a", "b"], "cat", 0, tables, [n_low, np.array([[3, 1], [0, 0]])], 2)
    assert isinstance(g, nx.DiGraph)
    assert set(g) == {"class:cat", "b:0", "a:0"}  # b:1 has LR < 0 for the class: not selected
    e = g.edges["class:cat", "b:0"]
    assert e["p_t_given_s"] == pytest.approx(0.75) and e["lr"] == pytest.approx(math.log2(0.75 / 0.5))
    assert e["count"] == 3 and e["global_count"] == 3
    assert g.edges["b:0", "a:0"]["lr"] == pytest.approx(1.0)
    assert all("layer" in d and "layer_index" in d for _n, d in g.nodes(data=True))
    assert g.nodes["class:cat"]["x"] > g.nodes["b:0"]["x"] > g.nodes["a:0"]["x"]  # left to right
    assert layout(g) == layout(g.copy())
    # within a layer the best node is on top, whatever the insertion of other layers
    h = nx.DiGraph()
    for i, name in enumerate(["p", "q", "r"]):
        h.add_node(name, layer_index=0)
        h.add_node(f"u{i}", layer_index=1)
    pos = layout(h)
    assert pos["p"][1] > pos["q"][1] > pos["r"][1] and pos["u0"][0] > pos["p"][0]


# ----------------------------------------------------------------------------- the real RNet


@pytest.fixture(scope="module")
def rnet(demo):
    loaded = load_model(demo[0])
    return loaded, open_backend(loaded, device="cpu")


@pytest.fixture(scope="module")
def demo_fit(rnet, demo_images: Path, tmp_path_factory: pytest.TempPathFactory):
    from engine.cache import Cache

    loaded, be = rnet
    cache = Cache(tmp_path_factory.mktemp("graph-cache"))
    params = GraphParams(k=(8, 12, 16), max_iter=20, tol=1e-2, device="cpu")
    fit = run_sync(run(be, loaded.cache_id, open_image_set(demo_images), ["conv1", "conv2", "conv3"], params,
                       cache=cache))
    return fit, cache, params


def test_demo_fit_words_patches_and_cache(rnet, demo_fit, demo_images: Path, tmp_path: Path) -> None:
    loaded, be = rnet
    fit, cache, params = demo_fit
    assert not fit.from_cache and [m.k for m in fit.layers] == [8, 12, 16]
    assert fit.classes == ("non-face", "face")
    assert (fit.predicted[:100] == 1).all() and (fit.predicted[100:] == 0).all()  # the pretrained RNet
    images = open_image_set(demo_images)
    acts = run_sync(extract(be, loaded.cache_id, images, ["conv1", "conv2", "conv3"], cache=cache))
    for m in fit.layers:
        assert np.all(np.diff(m.loglik) > -1e-3 * max(1.0, abs(m.loglik[-1])))  # float32 EM: monotone
        maps = np.asarray(acts.maps(m.name), dtype=np.float64)  # (200, C, h, w)
        cols = maps.transpose(0, 2, 3, 1).reshape(-1, m.shape[0])
        lj = m.mixture.log_joint(cols)
        best = lj.argmax(1).reshape(200, *m.shape[1:])
        assert (best == m.words).mean() > 0.999  # float32 arithmetic may flip near-ties
        np.testing.assert_array_equal(m.counts, np.bincount(m.words.ravel(), minlength=m.k))
        for k in range(m.k):
            for img, i, j in m.top_columns[k][:4]:
                if img >= 0:
                    assert m.words[img, i, j] == k
        box = m.patch_boxes(int(np.argmax(m.counts)), fit.input_size, 1)[0]
        img, i, j = m.top_columns[int(np.argmax(m.counts)), 0]
        rf = receptive_fields(loaded.module, (24, 24))[m.name]
        assert box == {"image": int(img), "box": list(rf.clipped_box(int(i), int(j), (24, 24)))}
    # transitions: counts add up to positions x window sizes
    assert fit.pair_counts[-1].sum() == 200 * 9
    rows, cols = fit.pair_bounds[0]
    per_position = np.outer(rows[:, 1] - rows[:, 0], cols[:, 1] - cols[:, 0]).sum()
    assert fit.pair_counts[0].sum() == 200 * per_position
    # a second run comes from the cache; save/load keeps everything
    again = run_sync(run(be, loaded.cache_id, images, ["conv1", "conv2", "conv3"], params, cache=cache))
    assert again.from_cache
    save_result(fit, tmp_path / "fit")
    back = load_result(tmp_path / "fit")
    for a, b in zip(fit.layers, back.layers, strict=True):
        np.testing.assert_array_equal(a.words, b.words)
        np.testing.assert_array_equal(a.mixture.means, b.mixture.means)
        assert a.loglik == b.loglik and a.rf == b.rf
    for a, b in zip(fit.pair_counts, back.pair_counts, strict=True):
        np.testing.assert_array_equal(a, b)
    # a truncated array is a damaged entry naming the file
    p = tmp_path / "fit" / "layer1_words.npy"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(DamagedEntry, match="layer1_words"):
        load_result(tmp_path / "fit")


def test_demo_class_and_image_graphs(demo_fit, demo_images: Path, tmp_path: Path) -> None:
    fit, _cache, _params = demo_fit
    graphs = {c: explain(fit, class_name=c, n=3) for c in ("face", "non-face")}
    for c, g in graphs.items():
        assert g.kind == "class" and g.images == 100 and g.class_name == c
        nodes = {nd["id"]: nd for nd in g.nodes}
        assert f"class:{c}" in nodes
        per_layer = {name: [nd for nd in g.nodes if nd["layer"] == name] for name in ("conv1", "conv2", "conv3")}
        assert all(1 <= len(v) <= 3 for v in per_layer.values())
        assert all(nd["score"] > 0 for v in per_layer.values() for nd in v)
        assert all(e["lr"] == pytest.approx(math.log2(e["p_t_given_s"] / e["p_t"])) for e in g.edges)
        for nd in per_layer["conv3"]:  # every conv3 node hangs off the class node
            assert any(e["source"] == f"class:{c}" and e["target"] == nd["id"] for e in g.edges)
            assert nd["patches"] and all(Path(p["path"]).is_file() for p in nd["patches"])
    # the two classes are explained by different conv3 words
    words = {c: {nd["word"] for nd in g.nodes if nd["layer"] == "conv3"} for c, g in graphs.items()}
    assert words["face"] != words["non-face"]
    # an image of the set: local counts of that image alone
    face = fit.image_paths[0]
    gi = explain(fit, image=face, n=2)
    assert gi.kind == "image" and gi.images == 1 and gi.class_name == "face"
    cls_edges = [e for e in gi.edges if e["source"] == "class:face"]
    assert sum(e["count"] for e in cls_edges) <= 9
    # files: JSON node-link and GraphML with a layer on every node; the figure
    files = gi.write(tmp_path)
    h = nx.read_graphml(tmp_path / "graph.graphml")
    assert set(h) == {nd["id"] for nd in gi.nodes} and all("layer" in d for _n, d in h.nodes(data=True))
    assert nx.node_link_graph(__import__("json").loads(files[0].read_text()), edges="edges").number_of_edges() \
        == len(gi.edges)
    im = render_graph(graphs["face"], tmp_path / "face.png", preprocess=fit.preprocess)
    assert (tmp_path / "face.png").stat().st_size > 1000 and im.width > 400
    arr = np.asarray(im)
    assert arr.std() > 10  # patches and lines, not a blank page
    with pytest.raises(ConvLensError, match="no class 'cat'"):
        explain(fit, class_name="cat")
    with pytest.raises(ConvLensError, match="not an image of the fit"):
        explain(fit, image=tmp_path / "face.png")


def test_randomised_weights_give_a_different_graph(rnet_spec, demo_fit, demo_images: Path, tmp_path: Path) -> None:
    import torch

    fit, _cache, params = demo_fit
    state = torch.load(rnet_spec.path, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    rand = {k: torch.randn(v.shape, generator=gen) * v.float().std().clamp_min(1e-3) for k, v in state.items()}
    torch.save(rand, tmp_path / "random.pt")
    spec = rnet_spec.with_(path=str(tmp_path / "random.pt"))
    loaded = load_model(spec)
    be = open_backend(loaded, device="cpu")
    from engine.cache import Cache

    rfit = run_sync(run(be, loaded.cache_id, open_image_set(demo_images), ["conv1", "conv2", "conv3"], params,
                        cache=Cache(tmp_path / "cache")))
    assert rfit.model_sha256 != fit.model_sha256
    c = int(np.bincount(rfit.predicted[rfit.predicted >= 0]).argmax())
    ours = explain(fit, class_name=fit.classes[c])
    theirs = explain(rfit, class_name=rfit.classes[c])
    sig = [sorted(round(e["lr"], 6) for e in g.edges) for g in (ours, theirs)]
    assert sig[0] != sig[1]
    assert not np.array_equal(fit.layers[0].words, rfit.layers[0].words)


def test_bad_layers_and_k_are_errors(rnet, demo_images: Path, cache) -> None:
    loaded, be = rnet
    images = open_image_set(demo_images)
    with pytest.raises(ConvLensError, match="'dense4' has shape"):
        run_sync(run(be, loaded.cache_id, images, ["conv1", "dense4"], cache=cache))
    with pytest.raises(ConvLensError, match="no layer 'nope'"):
        run_sync(run(be, loaded.cache_id, images, ["nope"], cache=cache))
    with pytest.raises(ConvLensError, match="2 values of k for 3 layers"):
        run_sync(run(be, loaded.cache_id, images, ["conv1", "conv2", "conv3"], GraphParams(k=(4, 4)), cache=cache))
