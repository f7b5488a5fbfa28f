"""Bitsets, the SCSC greedy, semantic-distance ranking and the baselines (numpy only).

Images of the reference set R are bits ``0..N-1`` of a bitset: ``np.packbits`` (little bit
order) padded to whole 64-bit words, so popcounts run on ``uint64`` words
(``np.bitwise_count``). A candidate boundary's *sides* are one bitset (bit j set: image j is on
its positive side, margin > 0).

**SCSC greedy** (submodular cost submodular cover, METHODS.md section 3), for one image x:
``region[q]`` is the bitset of the images on x's side of boundary q, ``different`` is D(x) (the
images predicted as another class than x). Starting from P = {} (every image covered):

    while |cover(P) ∩ D(x)| > delta:
        add the q in Q \\ P with the smallest (lost + eps) / removed

where ``lost`` is the number of covered images *not* in D(x) that q would drop (same-class images
lost from the region), ``removed`` the number of covered images of D(x) it would drop; only
boundaries with ``removed > 0`` are considered (one that removes none cannot help), the epsilon
(``EPS`` = 1e-6) breaks ties between boundaries that lose nothing in favour of the one removing
the most, and remaining ties go to the lowest index. ``delta`` defaults to the smallest feasible
value: ``|cover(Q) ∩ D(x)|``, what is left when every boundary of Q is used. A delta below it
cannot be met (:class:`InfeasibleError`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.types import ConvLensError

EPS = 1e-6


class InfeasibleError(ConvLensError):
    """A delta below the smallest value that the candidate boundaries can reach."""


# ------------------------------------------------------------------------------ bitsets


def words_for(n: int) -> int:
    return (n + 63) // 64


def pack(bits: np.ndarray) -> np.ndarray:
    """Bool (..., N) -> uint64 (..., ceil(N/64)); bit j of the set is element j."""
    bits = np.asarray(bits, dtype=bool)
    n = bits.shape[-1]
    packed = np.packbits(bits, axis=-1, bitorder="little")
    pad = words_for(n) * 8 - packed.shape[-1]
    if pad:
        packed = np.concatenate([packed, np.zeros((*packed.shape[:-1], pad), np.uint8)], axis=-1)
    return np.ascontiguousarray(packed).view("<u8")


def unpack(words: np.ndarray, n: int) -> np.ndarray:
    """uint64 (..., W) -> bool (..., n)."""
    b = np.ascontiguousarray(words).view(np.uint8)
    return np.unpackbits(b, axis=-1, count=n, bitorder="little").astype(bool)


def valid_mask(n: int) -> np.ndarray:
    return pack(np.ones(n, bool))


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits along the last axis (int64)."""
    return np.bitwise_count(words).sum(axis=-1, dtype=np.int64)


def members(words: np.ndarray, n: int) -> np.ndarray:
    """The indices of the set bits of one bitset."""
    return np.flatnonzero(unpack(words, n))


def region_sets(sides: np.ndarray, x_side: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """For each boundary, the images on x's side: ``sides[q]`` where x is on the positive side,
    its complement (within the N images) otherwise. ``x_side``: bool (Q,)."""
    flip = np.where(np.asarray(x_side, bool), np.uint64(0), ~np.uint64(0))[:, None]
    return (sides ^ flip) & valid


# ------------------------------------------------------------------------------ greedy


@dataclass
class Cover:
    """The greedy's answer for one image: ``chosen`` boundaries (indices into Q, in the order
    picked), the bitset of covered images (x included), the delta used and the smallest
    feasible one."""

    chosen: np.ndarray
    cover: np.ndarray
    delta: int
    feasible: int


def scsc_greedy(region: np.ndarray, different: np.ndarray, valid: np.ndarray, delta: int | None = None,
                eps: float = EPS) -> Cover:
    """The SCSC greedy (see the module doc). ``region``: uint64 (Q, W); ``different``,
    ``valid``: uint64 (W,)."""
    region = np.asarray(region, dtype=np.uint64)
    q = region.shape[0]
    diff = different & valid
    same = valid & ~diff
    full = np.bitwise_and.reduce(region, axis=0) if q else valid.copy()
    feasible = int(popcount(full & diff))
    d = feasible if delta is None else int(delta)
    if d < feasible:
        raise InfeasibleError(f"delta {d} is below the smallest feasible value {feasible}: even all {q} candidate "
                         f"boundaries leave {feasible} different-class images covered")
    cover = valid.copy()
    chosen: list[int] = []
    cut = valid & ~region  # images each boundary would drop
    cut_same = cut & same
    cut_diff = cut & diff
    live = np.arange(q)
    while int(popcount(cover & diff)) > d:
        removed = popcount(cut_diff[live] & cover)
        keep = removed > 0
        live, removed = live[keep], removed[keep]
        if not len(live):  # cannot happen for d >= feasible; guard against a broken input
            raise InfeasibleError(f"no candidate boundary removes a different-class image, {d} allowed")
        lost = popcount(cut_same[live] & cover)
        score = (lost + eps) / removed
        best = int(np.argmin(score))
        h = int(live[best])
        chosen.append(h)
        cover &= region[h]
        live = np.delete(live, best)
    return Cover(np.asarray(chosen, dtype=np.int64), cover, d, feasible)


def semantic_distance(proj: np.ndarray, x: int, chosen: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Dist(x, x') = sum over h in P(x) of |<W_h, psi(x)> - <W_h, psi(x')>| for each x' in
    ``others``; ``proj`` (N, Q) holds <W_h, psi> (+ b_h, which cancels)."""
    if not len(chosen):
        return np.zeros(len(others))
    p = proj[:, chosen]
    return np.abs(p[others] - p[x]).sum(axis=1)


def rank(proj: np.ndarray, x: int, chosen: np.ndarray, cover: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The covered images other than x by ascending Dist (ties: by index), with their distances."""
    idx = members(cover, n)
    idx = idx[idx != x]
    d = semantic_distance(proj, x, chosen, idx)
    order = np.lexsort((idx, d))
    return idx[order], d[order]


# ------------------------------------------------------------------------------ baselines


def knn(features: np.ndarray, x: int, k: int, metric: str = "euclidean",
        norms: np.ndarray | None = None) -> np.ndarray:
    """The k nearest images to x (x excluded) by Euclidean or cosine distance; ties by index."""
    f = features
    if metric == "euclidean":
        d = ((f - f[x]) ** 2).sum(axis=1)
    elif metric == "cosine":
        nn_ = norms if norms is not None else np.linalg.norm(f, axis=1)
        d = 1.0 - (f @ f[x]) / np.maximum(nn_ * nn_[x], 1e-300)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    d = d.astype(np.float64)
    d[x] = np.inf
    order = np.lexsort((np.arange(len(d)), d))
    return order[:k]


def nearest(dist_row: np.ndarray, x: int, k: int) -> np.ndarray:
    """The k smallest entries of one row of a distance matrix, x excluded; ties by index."""
    d = np.array(dist_row, dtype=np.float64)
    d[x] = np.inf
    return np.lexsort((np.arange(len(d)), d))[:k]


def gallery_scores(pred: np.ndarray, x: int, gallery: np.ndarray) -> tuple[float | None, float | None]:
    """(precision, coverage) of one gallery: the share of it predicted as x's class, and the
    share of x's other same-class images it holds (None when undefined)."""
    same = pred == pred[x]
    n_same = int(same.sum()) - 1
    g = np.asarray(gallery, dtype=np.int64)
    hits = int(same[g].sum()) if len(g) else 0
    precision = hits / len(g) if len(g) else None
    coverage = hits / n_same if n_same > 0 else None
    return precision, coverage


def mean_or_none(values: list[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None
