"""Transition statistics between visual words of consecutive layers, node selection, the graph.

Konforti, Shpigler, Lerner, Bar Hillel, "Inference Graphs for CNN Interpretation", ECCV 2020
(``../shared/METHODS.md`` section 4). For a position of the *explained* (upper) layer with word
``s``, every position of the *explaining* (lower) layer inside its receptive field counts its
word ``t``: ``N[s, t]``. A non-spatial upper layer (the class layer) counts every lower
position. From the counts: ``P(t | s) = N[s, t] / sum_t N[s, t]``, ``P(t)`` the column margin
``sum_s N[s, t] / sum N``, and ``LR(s, t) = log2 P(t | s) / P(t)``. Local counts ``C[s, t]``
are the same counts over the images being explained (a class, one image), and
``score(s, t) = C[s, t] * LR(s, t)``.

Selection: from the class node down, ``score(t) = sum over selected s of score(s, t)``; the
words with a positive score, the ``n`` best per layer, are selected; recurse.

Everything here is numpy and networkx (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Bounds = tuple[np.ndarray, np.ndarray]
"""Per upper row ``i``: lower rows ``[rows[i, 0], rows[i, 1])``; likewise ``cols`` for columns."""


def window_bounds(up: Any, low: Any, up_hw: tuple[int, int], low_hw: tuple[int, int]) -> Bounds:
    """The lower-layer positions inside each upper position's receptive field.

    ``up`` and ``low`` are the two layers' :class:`~engine.models.receptive.ReceptiveField`
    (geometry in input pixels). The upper field is the lower one composed with a relative
    window of ``k = (size_up - size_low) / stride_low + 1`` lower positions, centred at
    ``(centre_up - offset_low) / stride_low``; it is clipped to the lower grid. A global
    upper field (``is_global``) or ``up=None`` covers the whole lower grid.
    """
    out = []
    for a in (0, 1):
        n_up, n_low = up_hw[a], low_hw[a]
        if up is None or getattr(up, "is_global", False):
            out.append(np.tile(np.array([[0, n_low]], dtype=np.int64), (n_up, 1)))
            continue
        k = (up.size[a] - low.size[a]) / low.stride[a] + 1
        half = (k - 1) / 2
        centre = (up.offset[a] + np.arange(n_up) * up.stride[a] - low.offset[a]) / low.stride[a]
        lo = np.clip(np.ceil(centre - half - 1e-9), 0, n_low).astype(np.int64)
        hi = np.clip(np.floor(centre + half + 1e-9) + 1, 0, n_low).astype(np.int64)
        out.append(np.stack([lo, np.maximum(hi, lo)], 1))
    return out[0], out[1]


def transition_counts(words_up: np.ndarray, words_low: np.ndarray, bounds: Bounds | None,
                      k_up: int, k_low: int, images: Sequence[int] | np.ndarray | None = None,
                      chunk: int = 256) -> np.ndarray:
    """``N[s, t]`` (k_up, k_low) int64 over ``images`` (default: all; rows with a word < 0, i.e.
    unreadable images, are left out).

    ``words_up`` is (N, h, w) for a spatial upper layer, (N,) for the class layer (then
    ``bounds`` is ignored: every lower position counts); ``words_low`` is (N, h', w').
    """
    idx = np.arange(len(words_low)) if images is None else np.asarray(images, dtype=np.int64)
    up_flat = words_up.reshape(len(words_up), -1)
    idx = idx[(up_flat[idx] >= 0).all(1) & (words_low.reshape(len(words_low), -1)[idx] >= 0).all(1)]
    counts = np.zeros((k_up, k_low), dtype=np.int64)
    eye_low = np.eye(k_low, dtype=np.int64)
    for lo in range(0, len(idx), chunk):
        ii = idx[lo:lo + chunk]
        oh = eye_low[np.asarray(words_low[ii])]  # (b, h', w', k_low)
        if words_up.ndim == 1:
            per_image = oh.sum((1, 2))  # (b, k_low)
            np.add.at(counts, np.asarray(words_up[ii]), per_image)
            continue
        rows, cols = bounds  # type: ignore[misc]
        sat = np.zeros((len(ii), oh.shape[1] + 1, oh.shape[2] + 1, k_low), dtype=np.int64)
        sat[:, 1:, 1:] = oh.cumsum(1).cumsum(2)
        r0, r1 = rows[:, 0][:, None], rows[:, 1][:, None]
        c0, c1 = cols[:, 0][None, :], cols[:, 1][None, :]
        win = sat[:, r1, c1] - sat[:, r0, c1] - sat[:, r1, c0] + sat[:, r0, c0]  # (b, h, w, k_low)
        wu = np.asarray(words_up[ii]).reshape(-1)
        np.add.at(counts, wu, win.reshape(-1, k_low))
    return counts


@dataclass
class TransitionTable:
    """Global statistics of one layer pair: counts ``n`` (K_up, K_low), ``p_t_given_s``, ``p_t``
    and ``lr`` (log2 likelihood ratio; -inf where ``N[s, t] = 0``)."""

    n: np.ndarray
    p_t_given_s: np.ndarray
    p_t: np.ndarray
    lr: np.ndarray

    @classmethod
    def of(cls, n: np.ndarray) -> TransitionTable:
        n = np.asarray(n, dtype=np.int64)
        rows = n.sum(1, keepdims=True)
        total = n.sum()
        p_ts = np.divide(n, rows, out=np.zeros(n.shape), where=rows > 0)
        p_t = n.sum(0) / total if total > 0 else np.zeros(n.shape[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            lr = np.where(n > 0, np.log2(p_ts / np.where(p_t > 0, p_t, 1.0)[None, :]), -np.inf)
        return cls(n, p_ts, p_t, lr)


def local_scores(local: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """``score(s, t) = C[s, t] * LR(s, t)``, 0 where ``C = 0`` (and -inf where C > 0 but the
    transition never occurs in the fitted statistics)."""
    with np.errstate(invalid="ignore"):
        return np.where(local > 0, local * lr, 0.0)


def select_nodes(scores: Sequence[np.ndarray], start: Sequence[int], n: int) -> list[list[tuple[int, float]]]:
    """Node selection from the top layer down.

    ``scores[j]`` is the (K_upper, K_lower) local score matrix of the j-th pair counted from the
    top (pair 0: class -> highest modelled layer). ``start`` are the selected top words (the
    class). Returns, per lower layer (top first), the selected ``(word, score)`` pairs, best
    first: positive score, at most ``n``, ties by word number. An empty layer ends the graph
    (the layers below it stay empty).
    """
    out: list[list[tuple[int, float]]] = []
    selected = list(start)
    for sc in scores:
        if not selected:
            out.append([])
            continue
        total = np.asarray(sc)[selected].sum(0)
        cand = [t for t in range(len(total)) if np.isfinite(total[t]) and total[t] > 0]
        cand.sort(key=lambda t: (-total[t], t))
        chosen = [(t, float(total[t])) for t in cand[:n]]
        out.append(chosen)
        selected = [t for t, _ in chosen]
    return out


def build_graph(layers: Sequence[str], class_name: str, class_index: int,
                tables: Sequence[TransitionTable], local: Sequence[np.ndarray], n: int,
                node_extra: Any = None) -> Any:
    """The inference graph as a networkx DiGraph (edges from explained to explaining node).

    ``layers`` are the modelled layers, lowest first; ``tables[j]``/``local[j]`` the pair whose
    lower layer is ``layers[j]`` (the last pair's upper layer is the class layer). Node
    attributes: ``layer`` (name, ``"class"`` for the class node), ``layer_index`` (0 = lowest,
    ``len(layers)`` = class), ``word``, ``score`` (selection score; the class node: its local
    column count), ``label``. Edge attributes: ``p_t_given_s``, ``p_t``, ``lr``, ``count`` (local
    C[s, t]), ``global_count`` (N[s, t]), ``score`` (C * LR). ``node_extra(layer_index, word)``
    may return more attributes per node (patches, ...). Positions from :func:`layout` are added
    as ``x`` and ``y``.
    """
    import networkx as nx

    g = nx.DiGraph()
    top = len(layers)
    cid = f"class:{class_name}"
    g.add_node(cid, layer="class", layer_index=top, word=int(class_index), score=float(local[-1][class_index].sum()),
               label=str(class_name), **(node_extra(top, class_index) if node_extra else {}))
    scores_top_down = [local_scores(local[j], tables[j].lr) for j in reversed(range(len(layers)))]
    picked = select_nodes(scores_top_down, [class_index], n)
    above = [(cid, class_index)]
    for depth, chosen in enumerate(picked):
        j = top - 1 - depth  # the lower layer of this pair
        here = []
        for t, sc in chosen:
            nid = f"{layers[j]}:{t}"
            g.add_node(nid, layer=layers[j], layer_index=j, word=int(t), score=sc, label=f"{layers[j]} #{t}",
                       **(node_extra(j, t) if node_extra else {}))
            here.append((nid, t))
        tab, loc = tables[j], local[j]
        for sid, s in above:
            for tid, t in here:
                if loc[s, t] <= 0 or not math.isfinite(tab.lr[s, t]):
                    continue
                g.add_edge(sid, tid, p_t_given_s=float(tab.p_t_given_s[s, t]), p_t=float(tab.p_t[t]),
                           lr=float(tab.lr[s, t]), count=int(loc[s, t]), global_count=int(tab.n[s, t]),
                           score=float(loc[s, t] * tab.lr[s, t]))
        above = here
    for node, (x, y) in layout(g).items():
        g.nodes[node]["x"], g.nodes[node]["y"] = x, y
    return g


def layout(g: Any) -> dict[str, tuple[float, float]]:
    """Layered, left to right (lowest layer left, class right), deterministic: networkx's
    multipartite layout over ``layer_index``; within a layer the nodes keep their insertion order
    (best score first, top to bottom). Coordinates rounded to 6 decimals."""
    import networkx as nx

    if g.number_of_nodes() == 0:
        return {}
    if g.number_of_nodes() == 1:
        return dict.fromkeys(g, (0.0, 0.0))
    layers: dict[int, list[Any]] = {}
    for node, li in g.nodes(data="layer_index"):
        layers.setdefault(int(li), []).append(node)  # insertion order (a mapping keeps it; the
        # attribute form groups nodes into sets, whose order is not deterministic)
    pos = nx.multipartite_layout(g, subset_key=dict(sorted(layers.items())), align="vertical")
    # multipartite_layout puts a layer's first node lowest; flip y so the best-scored one is on top
    return {n: (round(float(p[0]), 6) + 0.0, round(-float(p[1]), 6) + 0.0) for n, p in pos.items()}
