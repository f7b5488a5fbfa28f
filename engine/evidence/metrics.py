"""Does the evidence map point at what the model uses? Three checks, batched over images.

* **Causal check** (Kim & Canny, ICCV 2017, causal filtering): the map's top region (the
  ``top_fraction`` of pixels with the highest positive evidence) is split into connected blobs
  (8-connectivity, ``scipy.ndimage.label``); each blob is masked in turn (replaced by a
  baseline: the image's ``mean`` colour, a ``blur`` of it, ``zero`` or ``black``) and the change
  of the class probability is measured. A blob is **causal** when masking it lowers the
  probability by at least ``threshold`` (default 0.05: 5% of the probability's range); the
  others are non-causal (the map marks them, the model does not need them). The whole top
  region masked at once is reported too.
* **Deletion and insertion** (RISE, Petsiuk et al. 2018): pixels are removed (deletion: replaced
  by the ``zero`` input, the normalisation's mean colour) or inserted (insertion: into a
  blurred copy, by default RISE's own 11 x 11 kernel, ``gkern(11, 5)``) in the order of the map, highest first, in ``steps`` equal steps; the
  curve is the class's softmax probability against the fraction of pixels changed, and its area
  (trapezoid rule on [0, 1]) is the score: low is good for deletion, high for insertion.
* **Average Drop / Average Increase** (Chattopadhay et al., Grad-CAM++, WACV 2018): the image is
  multiplied pixel-wise by the map's positive part scaled to [0, 1] (``L = max(map, 0) / max``;
  ``E = L * I``, pixel values, so masked
  pixels go black); with ``Y`` the class probability on the image and ``O`` on ``E``, Average
  Drop is the mean of ``max(0, Y - O) / Y`` (in %) and Average Increase the share of images
  with ``O > Y`` (in %).

Probabilities: the softmax of the classifier output (or the output itself when the model gives
probabilities; ``spec.scores``), decided once on the unchanged images. A classifier with one
output (a single logit, a binary classifier) gets its sigmoid instead (a softmax over one
column is always 1), or the output itself when it gives probabilities (``auto``: every value in
[0, 1]); the result's ``score_kind`` is then ``sigmoid`` or ``probs``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..predict import to_probabilities
from .maps import EvidenceError, baseline_batch, black_input, classifier_scores


def score_kind(backend: Any, outputs: np.ndarray) -> str:
    """``logits``, ``probs`` or (one output: a single logit) ``sigmoid``: the spec's, or what the
    unchanged images' outputs look like."""
    kind = str(getattr(backend.spec, "scores", "auto"))
    outputs = outputs.reshape(len(outputs), -1)
    if outputs.shape[1] == 1:
        if kind == "auto":
            rows = outputs[~np.isnan(outputs).any(axis=1)]
            kind = "probs" if rows.size and bool((rows >= -1e-6).all() and (rows <= 1 + 1e-6).all()) else "logits"
        return "probs" if kind == "probs" else "sigmoid"
    if kind in ("logits", "probs"):
        return kind
    return to_probabilities(outputs, "auto")[1]


def probabilities(outputs: np.ndarray, kind: str) -> np.ndarray:
    """float32 (N, K): class probabilities of classifier outputs of kind ``kind``
    (:func:`score_kind`): a softmax of logits, the sigmoid of a single logit, or as given."""
    if kind == "sigmoid":
        with np.errstate(over="ignore"):
            return (1.0 / (1.0 + np.exp(-outputs.astype(np.float64)))).astype(np.float32)
    return to_probabilities(outputs, kind)[0]


def class_probability(backend: Any, batch: np.ndarray, targets: np.ndarray, kind: str,
                      batch_size: int = 256) -> np.ndarray:
    """float32 (N,): the probability of ``targets[i]`` for image ``batch[i]``."""
    if not len(batch):
        return np.zeros(0, np.float32)
    probs = probabilities(classifier_scores(backend, batch, batch_size), kind)
    return probs[np.arange(len(batch)), targets].astype(np.float32)


def _perturbed_probs(backend: Any, total: int, make: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
                     kind: str, batch_size: int) -> np.ndarray:
    """Probabilities of ``total`` perturbed inputs, built ``batch_size`` at a time by
    ``make(flat indices) -> (inputs, targets)``."""
    out = np.zeros(total, np.float32)
    for lo in range(0, total, batch_size):
        idx = np.arange(lo, min(total, lo + batch_size))
        x, t = make(idx)
        out[idx] = class_probability(backend, x, t, kind, batch_size)
    return out


# ----------------------------------------------------------------------------- blobs


@dataclass
class Blobs:
    """Connected blobs of the maps' top regions. Rows are blobs, image by image, largest
    evidence mass first; ``labels[i] == b`` is blob ``b`` (1-based) of image ``i``."""

    labels: np.ndarray  # int32 (N, H, W): 0 outside every kept blob
    region: np.ndarray  # bool (N, H, W): the top region (kept blobs and dropped small ones)
    image: np.ndarray  # int64 (B,): the image (row of the batch) each blob is in
    blob: np.ndarray  # int32 (B,): its label in ``labels``
    area: np.ndarray  # int64 (B,): pixels
    mass: np.ndarray  # float32 (B,): its share of the map's sum over the top region
    centroid: np.ndarray  # float32 (B, 2): (row, column)


def find_blobs(maps: np.ndarray, top_fraction: float = 0.2, max_blobs: int = 8, min_area: int = 1) -> Blobs:
    """The ``top_fraction`` of each map's pixels with the highest positive values (ties broken
    by position), split into 8-connected blobs; per image the ``max_blobs`` of largest evidence
    mass with at least ``min_area`` pixels are kept."""
    from scipy import ndimage

    if not 0 < top_fraction <= 1:
        raise EvidenceError(f"top fraction must be in (0, 1], got {top_fraction}")
    n, h, w = maps.shape
    k = max(1, int(np.ceil(top_fraction * h * w)))
    flat = maps.reshape(n, -1)
    order = np.argsort(-flat, axis=1, kind="stable")[:, :k]
    region = np.zeros((n, h * w), bool)
    np.put_along_axis(region, order, True, axis=1)
    region &= flat > 0
    region = region.reshape(n, h, w)
    labels = np.zeros((n, h, w), np.int32)
    rows: list[tuple[int, int, int, float, float, float]] = []
    structure = np.ones((3, 3), bool)
    for i in range(n):
        lab, count = ndimage.label(region[i], structure=structure)
        if not count:
            continue
        ids = np.arange(1, count + 1)
        area = ndimage.sum_labels(np.ones_like(maps[i]), lab, ids)
        mass = ndimage.sum_labels(maps[i], lab, ids)
        cen = np.asarray(ndimage.center_of_mass(np.ones_like(maps[i]), lab, ids), dtype=np.float64).reshape(-1, 2)
        total = float(mass.sum()) or 1.0
        keep = [j for j in np.argsort(-mass, kind="stable") if area[j] >= min_area][:max_blobs]
        for b, j in enumerate(keep, start=1):
            labels[i][lab == ids[j]] = b
            rows.append((i, b, int(area[j]), float(mass[j] / total), float(cen[j, 0]), float(cen[j, 1])))
    arr = np.asarray(rows, dtype=np.float64).reshape(-1, 6)
    return Blobs(labels, region, arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int32), arr[:, 2].astype(np.int64),
                 arr[:, 3].astype(np.float32), arr[:, 4:6].astype(np.float32))


@dataclass
class CausalCheck:
    """Each blob masked alone: the class probability before and after, and the verdict."""

    blobs: Blobs
    base_prob: np.ndarray  # float32 (N,): on the unchanged image
    prob_after: np.ndarray  # float32 (B,): with the blob masked
    drop: np.ndarray  # float32 (B,): base_prob[image] - prob_after (positive: the blob mattered)
    causal: np.ndarray  # bool (B,): drop >= threshold
    region_prob: np.ndarray  # float32 (N,): with the whole top region masked
    threshold: float
    baseline: str


def causal_check(backend: Any, batch: np.ndarray, maps: np.ndarray, targets: np.ndarray, *,
                 top_fraction: float = 0.2, threshold: float = 0.05, baseline: str = "mean", max_blobs: int = 8,
                 min_area: int = 1, sigma: float | None = None, kind: str | None = None, blur: str = "rise",
                 batch_size: int = 256) -> CausalCheck:
    """Mask each blob of each map's top region (see :func:`find_blobs`) and measure the class
    probability; all masked copies of the batch go through the model ``batch_size`` at a time."""
    if not 0 <= threshold <= 1:
        raise EvidenceError(f"causal threshold must be in [0, 1] (a probability drop), got {threshold}")
    targets = np.asarray(targets, dtype=np.int64)
    blobs = find_blobs(maps, top_fraction, max_blobs, min_area)
    if kind is None:
        kind = score_kind(backend, classifier_scores(backend, batch, batch_size))
    base = class_probability(backend, batch, targets, kind, batch_size)
    fill = baseline_batch(batch, baseline, backend.spec.preprocess, sigma, blur)
    n, nb = len(batch), len(blobs.image)

    # rows 0..nb-1: one blob masked; rows nb..nb+n-1: the whole top region of each image
    img_of = np.concatenate([blobs.image, np.arange(n)])
    lab_of = np.concatenate([blobs.blob, np.zeros(n, np.int32)])

    def make(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        img, lab = img_of[idx], lab_of[idx][:, None, None]
        m = np.where(lab > 0, blobs.labels[img] == lab, blobs.region[img])[:, None].astype(np.float32)
        return batch[img] * (1 - m) + fill[img] * m, targets[img]

    probs = _perturbed_probs(backend, nb + n, make, kind, batch_size)
    after, region = probs[:nb], probs[nb:]
    drop = base[blobs.image] - after if nb else np.zeros(0, np.float32)
    return CausalCheck(blobs, base, after.astype(np.float32), drop.astype(np.float32), drop >= threshold,
                       region.astype(np.float32), float(threshold), baseline)


# ----------------------------------------------------------------------------- deletion / insertion


def auc(curve: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Area under each row of ``curve`` over ``fractions`` (trapezoid rule)."""
    dx = np.diff(fractions)
    return ((curve[..., 1:] + curve[..., :-1]) * 0.5 * dx).sum(axis=-1).astype(np.float32)


@dataclass
class Curves:
    """Deletion and insertion curves (RISE): class probability against the fraction of pixels
    removed / inserted in the order of the map."""

    fractions: np.ndarray  # float32 (S+1,)
    deletion: np.ndarray  # float32 (N, S+1)
    insertion: np.ndarray  # float32 (N, S+1)
    deletion_auc: np.ndarray  # float32 (N,)
    insertion_auc: np.ndarray  # float32 (N,)


def deletion_insertion(backend: Any, batch: np.ndarray, maps: np.ndarray, targets: np.ndarray, *, steps: int = 50,
                       deletion_baseline: str = "zero", insertion_baseline: str = "blur", sigma: float | None = None,
                       blur: str = "rise",
                       kind: str | None = None, batch_size: int = 256) -> Curves:
    """The curves for every image of ``batch`` (its ``maps`` ranking the pixels, highest first,
    ties by position): ``steps + 1`` points each, all perturbed copies batched together."""
    if steps < 1:
        raise EvidenceError(f"deletion/insertion steps must be at least 1, got {steps}")
    targets = np.asarray(targets, dtype=np.int64)
    n, _c, h, w = batch.shape
    hw = h * w
    if kind is None:
        kind = score_kind(backend, classifier_scores(backend, batch, batch_size))
    order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(hw)[None].repeat(n, axis=0), axis=1)
    fractions = np.linspace(0.0, 1.0, steps + 1).astype(np.float32)
    counts = np.rint(fractions.astype(np.float64) * hw).astype(np.int64)
    pts = steps + 1
    dele = baseline_batch(batch, deletion_baseline, backend.spec.preprocess, sigma, blur)
    ins = baseline_batch(batch, insertion_baseline, backend.spec.preprocess, sigma, blur)

    def maker(start: np.ndarray, end: np.ndarray) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
        def make(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            img, step = idx // pts, idx % pts
            m = (rank[img] < counts[step][:, None]).reshape(len(idx), 1, h, w).astype(np.float32)
            return start[img] * (1 - m) + end[img] * m, targets[img]
        return make

    d = _perturbed_probs(backend, n * pts, maker(batch, dele), kind, batch_size).reshape(n, pts)
    i = _perturbed_probs(backend, n * pts, maker(ins, batch), kind, batch_size).reshape(n, pts)
    return Curves(fractions, d, i, auc(d, fractions), auc(i, fractions))


# ----------------------------------------------------------------------------- average drop / increase


@dataclass
class DropIncrease:
    """Per image: the class probability on the image (Y) and on the image times the map (O)."""

    base_prob: np.ndarray  # float32 (N,)
    explanation_prob: np.ndarray  # float32 (N,)
    drop: np.ndarray  # float32 (N,): 100 * max(0, Y - O) / Y
    increase: np.ndarray  # bool (N,): O > Y


def normalise(maps: np.ndarray) -> np.ndarray:
    """Each map scaled to [0, 1] (min-max; a constant map becomes zeros)."""
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0).astype(np.float32)


def positive_scaled(maps: np.ndarray) -> np.ndarray:
    """Each map's positive part scaled to [0, 1]: ``max(map, 0) / max(map)`` (a map with no
    positive value becomes zeros). Grad-CAM++'s explanation map assumes non-negative evidence;
    a min-max scaling of a signed map (IG, saliency) would give zero-attribution pixels weight."""
    pos = np.maximum(maps, 0)
    top = pos.max(axis=(1, 2), keepdims=True)
    return np.where(top > 0, pos / np.where(top > 0, top, 1), 0).astype(np.float32)


def average_drop_increase(backend: Any, batch: np.ndarray, maps: np.ndarray, targets: np.ndarray, *,
                          kind: str | None = None, batch_size: int = 256) -> DropIncrease:
    """Grad-CAM++'s explanation image ``E = L * I`` (pixel values; ``L`` the map's positive part
    scaled to [0, 1], :func:`positive_scaled`) and the probabilities on the image and on ``E``."""
    targets = np.asarray(targets, dtype=np.int64)
    if kind is None:
        kind = score_kind(backend, classifier_scores(backend, batch, batch_size))
    y = class_probability(backend, batch, targets, kind, batch_size)
    lmap = positive_scaled(maps)[:, None]
    black = black_input(backend.spec.preprocess)[None]
    o = class_probability(backend, (batch * lmap + black * (1 - lmap)).astype(np.float32), targets, kind, batch_size)
    drop = 100.0 * np.maximum(0.0, y - o) / np.maximum(y, 1e-12)
    return DropIncrease(y, o, drop.astype(np.float32), o > y)
