"""Similarity of an explanation to the original (numpy / scipy / scikit-image only).

Maps (N, H, W), compared image by image, as in Adebayo et al. (NeurIPS 2018):

* ``spearman_abs``: Spearman rank correlation of the absolute maps;
* ``spearman``: Spearman rank correlation of the signed maps;
* ``ssim``: structural similarity (``skimage.metrics.structural_similarity``) of the absolute
  maps, each scaled to [0, 1] by its own maximum (``data_range=1``; a 7-pixel window, or the
  largest odd window that fits a smaller map).

A map that is constant has no ranks: a randomised map that is constant (Grad-CAM's ReLU at zero
everywhere) correlates 0 with the original; when the original itself is constant the rank
correlation is undefined (NaN) and left out of means.

Other explanations: ``label_agreement`` (fraction of units whose label is unchanged),
``jaccard`` (|A & B| / |A | B| of two sets, 1 for two empty sets), ``pearson`` / Spearman of
per-unit values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

MAP_METRICS = ("spearman_abs", "spearman", "ssim")


def _rank_rows(a: np.ndarray) -> np.ndarray:
    return rankdata(a.reshape(len(a), -1).astype(np.float64), axis=1)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Spearman correlation of two (N, ...) arrays (see the module note on constant rows)."""
    if a.shape != b.shape:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
    ra, rb = _rank_rows(a), _rank_rows(b)
    return _pearson_rows(ra, rb)


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na, nb = np.sqrt((a * a).sum(axis=1)), np.sqrt((b * b).sum(axis=1))
    out = np.zeros(len(a), np.float64)
    ok = (na > 0) & (nb > 0)
    out[ok] = (a[ok] * b[ok]).sum(axis=1) / (na[ok] * nb[ok])
    out[na == 0] = np.nan
    return np.clip(out, -1.0, 1.0)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors (NaN when the first is constant; 0 when only the second is)."""
    return float(_pearson_rows(np.asarray(a, np.float64).reshape(1, -1), np.asarray(b, np.float64).reshape(1, -1))[0])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two vectors (NaN values dropped pairwise)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 2:
        return float("nan")
    return float(rank_correlation(a[ok][None], b[ok][None])[0])


def _unit_scale(m: np.ndarray) -> np.ndarray:
    top = np.abs(m).reshape(len(m), -1).max(axis=1)
    top[top == 0] = 1.0
    return np.abs(m) / top.reshape(-1, *([1] * (m.ndim - 1)))


def ssim_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """SSIM of each pair of (H, W) maps of two (N, H, W) stacks, on the absolute maps scaled to [0, 1]."""
    from skimage.metrics import structural_similarity

    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"maps of shapes {a.shape} and {b.shape} cannot be compared")
    side = min(a.shape[1:])
    win = min(7, side if side % 2 else side - 1)
    if win < 3:
        return np.full(len(a), np.nan)
    sa, sb = _unit_scale(a.astype(np.float64)), _unit_scale(b.astype(np.float64))
    return np.array([structural_similarity(x, y, data_range=1.0, win_size=win) for x, y in zip(sa, sb, strict=True)])


def map_similarity(original: np.ndarray, other: np.ndarray) -> dict[str, np.ndarray]:
    """Every map metric, one value per image: ``{metric: (N,) float64}``."""
    return {
        "spearman_abs": rank_correlation(np.abs(original), np.abs(other)),
        "spearman": rank_correlation(original, other),
        "ssim": ssim_rows(original, other),
    }


def jaccard(a: Sequence[int] | np.ndarray, b: Sequence[int] | np.ndarray) -> float:
    sa, sb = {int(v) for v in np.asarray(a).ravel()}, {int(v) for v in np.asarray(b).ravel()}
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


def label_agreement(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """1.0 where the two label lists agree, else 0.0 (one value per unit)."""
    if len(a) != len(b):
        raise ValueError(f"{len(a)} and {len(b)} labels cannot be compared")
    return np.array([1.0 if x == y else 0.0 for x, y in zip(a, b, strict=True)])
