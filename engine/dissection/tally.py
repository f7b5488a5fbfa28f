"""Unit-concept IoU tallies for Network Dissection.

Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying Interpretability of Deep
Visual Representations", CVPR 2017, score unit ``k`` against concept (label) ``c`` by

    IoU_{k,c} = sum_x |M_k(x) ∩ L_c(x)| / sum_x |M_k(x) ∪ L_c(x)|

where ``M_k(x)`` is the unit's binary mask on image ``x`` (activation upsampled to the label
resolution and thresholded at the top-quantile level ``T_k``), ``L_c(x)`` the pixels labelled
``c``, and the sums run over the images that carry some label of ``c``'s category. Image-level
labels (scenes, textures) cover the whole mask.

Label number 0 means "unlabelled" and is never counted. The category a label counts toward
is always ``label_category[c]`` (its primary category, as NetDissect's ``labelcat``), even
when the label appears in a map given under another category.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from engine.dissection.masks import unit_masks as _unit_masks
from engine.types import ConvLensError

TallyMode = Literal["paper", "lite"]
LabelMap = torch.Tensor | np.ndarray


@dataclass(frozen=True)
class TallyResult:
    """Totals over the dataset; column ``c`` is global label number ``c`` (column 0 is zero).

    ``intersection[k, c] = sum_x |M_k(x) ∩ L_c(x)|``, ``union[k, c] = sum_x |M_k(x) ∪ L_c(x)|``
    over the images counted for ``c`` (see :class:`IoUTally`), ``iou = intersection / union``
    (0 where ``union == 0``).
    """

    intersection: np.ndarray  # (K, L) int64
    union: np.ndarray  # (K, L) int64
    iou: np.ndarray  # (K, L) float64


def unit_masks(
    acts: torch.Tensor,
    thresholds: torch.Tensor | np.ndarray,
    mask_size: tuple[int, int],
    *,
    strict: bool = False,
    tie_fallback: np.ndarray | None = None,
) -> torch.Tensor:
    """Binary unit masks ``M_k`` at label resolution, as in Bau et al. 2017: bool (B, K, H, W).

    :func:`engine.dissection.masks.unit_masks` (the one code path for masks) for (B, K, h, w)
    activations, with ``strict`` defaulting to the paper's ``S >= T``.
    """
    if acts.dim() != 4:
        raise ConvLensError(
            f"unit_masks expects (B, K, h, w) activations, got {tuple(acts.shape)}."
        )
    return _unit_masks(acts, thresholds, mask_size, strict=strict, tie_fallback=tie_fallback)


class IoUTally:
    """Accumulates unit/label intersections and unions image by image (or batch by batch).

    Per image, the labels present (a few) get a one-hot ``(P, C_present)`` matrix (a pixel
    carrying label ``c`` in several maps counts once: ``L_c(x)`` is a set; an image-level
    label's column is all ones), and one matmul with the flattened masks ``(K, P)`` gives all
    intersections. Running int64 sums (exact) are kept of the intersections, of each label's
    area ``|L_c(x)|``, and per (unit, category) of ``|M_k(x)|`` over the images counted for that
    category; :meth:`result` assembles

        ``union[k, c] = A[k, cat(c)] + sum_x |L_c(x)| - intersection[k, c]``.

    Modes (what ``A[k, g]`` sums, for category ``g``):

    - ``"paper"`` (Bau et al. 2017): ``|M_k(x)|`` over every image ``x`` in which category
      ``g`` is present, i.e. ``x`` has a nonzero pixel label or an image label of category ``g``.
    - ``"lite"`` (NetDissect-Lite, ``tally_units_cat``): ``|M_k(x)|`` only over the images
      where some activated pixel of unit ``k`` falls on a labelled pixel of category ``g``
      (``|M_k(x) ∩ ⋃_{c in g} L_c(x)| > 0``). For image-level labels this is the same as
      ``"paper"`` (the label covers the whole mask, and an empty mask adds 0). Unlike
      NetDissect-Lite's ``bincount``, a pixel with the same label in two maps counts once.

    The label area and intersection sums are the same in both modes (a label's area is
    nonzero only in images where its category is present).
    """

    def __init__(
        self,
        n_units: int,
        label_category: Sequence[int] | np.ndarray,
        n_categories: int,
        *,
        device: str | torch.device = "cpu",
        mode: TallyMode = "paper",
    ) -> None:
        if mode not in ("paper", "lite"):
            raise ConvLensError(f'IoUTally mode must be "paper" or "lite", got {mode!r}.')
        cats = np.asarray(label_category, dtype=np.int64).reshape(-1)
        if cats.size < 2:
            raise ConvLensError("label_category needs label 0 (unlabelled) and at least one label.")
        if cats[1:].min() < 0 or cats[1:].max() >= n_categories:
            raise ConvLensError(
                f"label_category holds categories outside 0..{n_categories - 1}."
            )
        self.n_units = n_units
        self.n_labels = int(cats.size)
        self.n_categories = n_categories
        self.mode: TallyMode = mode
        self.device = torch.device(device)
        self.n_images = 0
        self._label_category = torch.as_tensor(
            np.clip(cats, 0, n_categories - 1), device=self.device
        )
        self._inter = torch.zeros((n_units, self.n_labels), dtype=torch.int64, device=self.device)
        self._label_area = torch.zeros(self.n_labels, dtype=torch.int64, device=self.device)
        self._mask_area_cat = torch.zeros(
            (n_units, n_categories), dtype=torch.int64, device=self.device
        )

    def update(
        self,
        unit_masks: torch.Tensor,
        pixel_labels: Sequence[tuple[int, LabelMap]],
        image_labels: Sequence[tuple[int, int]],
    ) -> None:
        """Add ONE image.

        ``unit_masks``: bool (K, H, W). ``pixel_labels``: ``(category, map)`` pairs, each map an
        int (H, W) array of global label numbers (0 = none); several maps may share a category.
        ``image_labels``: ``(category, label)`` pairs covering the whole image.
        """
        self.update_batch(
            unit_masks[None],
            [(cat, _as_tensor(m, self.device)[None]) for cat, m in pixel_labels],
            [image_labels],
        )

    def update_batch(
        self,
        unit_masks: torch.Tensor,
        pixel_labels: Sequence[tuple[int, LabelMap]],
        image_labels: Sequence[Sequence[tuple[int, int]]],
    ) -> None:
        """Add B images at once (one batched matmul).

        ``unit_masks``: bool (B, K, H, W). ``pixel_labels``: ``(category, maps)`` pairs with
        maps int (B, H, W) (an image without that map passes zeros). ``image_labels``: for each
        of the B images, its ``(category, label)`` pairs.
        """
        if unit_masks.dim() != 4 or unit_masks.shape[1] != self.n_units:
            raise ConvLensError(
                f"Expected unit masks of shape (B, {self.n_units}, H, W), "
                f"got {tuple(unit_masks.shape)}."
            )
        b, k, h, w = unit_masks.shape
        p = h * w
        if len(image_labels) != b:
            raise ConvLensError(f"{len(image_labels)} image-label lists for {b} images.")
        dev = self.device
        maps = []
        for cat, m in pixel_labels:
            self._check_category(cat)
            t = _as_tensor(m, dev)
            if t.shape != (b, h, w):
                raise ConvLensError(
                    f"A label map of category {cat} has shape {tuple(t.shape)}; "
                    f"the unit masks need {(b, h, w)}."
                )
            maps.append(t.reshape(b, p).long())
        scalars = []  # (image, label)
        for i, labels in enumerate(image_labels):
            for cat, label in labels:
                self._check_category(cat)
                if label != 0:
                    scalars.append((i, int(label)))
        pix = torch.cat(maps, dim=1) if maps else torch.zeros((b, 0), dtype=torch.long, device=dev)
        if pix.numel() and (int(pix.min()) < 0 or int(pix.max()) >= self.n_labels):
            raise ConvLensError(
                f"Label maps hold label numbers outside 0..{self.n_labels - 1}."
            )
        for _, label in scalars:
            if not 0 < label < self.n_labels:
                raise ConvLensError(f"Image label {label} is outside 1..{self.n_labels - 1}.")
        scalar_labels = torch.tensor([s[1] for s in scalars], dtype=torch.long, device=dev)
        present = torch.unique(torch.cat((pix.flatten(), scalar_labels)))
        present = present[present != 0]
        self.n_images += b
        if present.numel() == 0:
            return
        cp = present.numel()
        # Column of each label number among the present ones; label 0 goes to a dropped column.
        column = torch.full((self.n_labels,), cp, dtype=torch.long, device=dev)
        column[present] = torch.arange(cp, device=dev)
        onehot = torch.zeros((b, p, cp + 1), dtype=torch.bool, device=dev)
        for m in maps:
            onehot.scatter_(2, column[m].unsqueeze(2), True)
        for i, label in scalars:
            onehot[i, :, column[label]] = True
        onehot = onehot[:, :, :cp]
        # 0/1 products summed in float32 are exact below 2**24 pixels per image.
        ftype = torch.float32 if p < 2**24 else torch.float64
        flat = unit_masks.to(dev, torch.bool).reshape(b, k, p).to(ftype)
        inter = torch.bmm(flat, onehot.to(ftype)).round().long()  # (B, K, Cp)
        label_area = onehot.sum(dim=1)  # (B, Cp)
        self._inter.index_add_(1, present, inter.sum(dim=0))
        self._label_area.index_add_(0, present, label_area.sum(dim=0))
        cat_of = self._label_category[present]
        mask_area = flat.sum(dim=2).round().long()  # (B, K)
        if self.mode == "paper":
            hit = torch.zeros((b, self.n_categories), dtype=torch.long, device=dev)
            hit.index_add_(1, cat_of, (label_area > 0).long())
            counted = (hit > 0)[:, None, :]  # (B, 1, G): category present in the image
        else:
            hit = torch.zeros((b, k, self.n_categories), dtype=torch.long, device=dev)
            hit.index_add_(2, cat_of, inter)
            counted = hit > 0  # (B, K, G): unit's mask touches the category's labels
        self._mask_area_cat += (mask_area[:, :, None] * counted).sum(dim=0)

    def merge(self, other: IoUTally) -> IoUTally:
        """The tally of both tallies' images together (neither is changed): every count is an
        int64 sum over images, so shards of a data set merged in any order equal one pass."""
        if (other.n_units, other.n_labels, other.n_categories, other.mode) != (
                self.n_units, self.n_labels, self.n_categories, self.mode) or not torch.equal(
                other._label_category.cpu(), self._label_category.cpu()):
            raise ConvLensError("IoUTally.merge needs tallies of the same units, labels, categories and mode.")
        out = IoUTally.__new__(IoUTally)
        out.__dict__.update(self.__dict__)
        out.n_images = self.n_images + other.n_images
        out._inter = self._inter + other._inter.to(self.device)
        out._label_area = self._label_area + other._label_area.to(self.device)
        out._mask_area_cat = self._mask_area_cat + other._mask_area_cat.to(self.device)
        return out

    def _check_category(self, cat: int) -> None:
        if not 0 <= cat < self.n_categories:
            raise ConvLensError(f"Category index {cat} is outside 0..{self.n_categories - 1}.")

    def result(self) -> TallyResult:
        """Intersections, unions and IoU (K, L) so far."""
        inter = self._inter.cpu().numpy().copy()
        area = self._mask_area_cat[:, self._label_category].cpu().numpy()
        union = area + self._label_area.cpu().numpy()[None, :] - inter
        union[:, 0] = 0  # label 0 is never counted (its intersections stay 0)
        iou = np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)
        return TallyResult(intersection=inter, union=union, iou=iou)


def _as_tensor(m: LabelMap, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(m) if isinstance(m, np.ndarray) else m
    return t.to(device)


@dataclass(frozen=True)
class LayerSummary:
    """What ``summarize`` finds in one layer's (K, L) IoU matrix (label 0 excluded).

    Per unit ``k``: ``label[k]`` its best label number (ties: the lowest number),
    ``label_name[k]``, ``category[k]`` / ``category_name[k]`` that label's category,
    ``iou[k]`` its IoU, ``is_detector[k] = iou[k] > threshold`` (strict, Bau et al. 2017 use
    0.04). Per unit and category ``g``: ``category_label[k, g]`` the best label of ``g``
    (-1 when ``g`` has no label) and ``category_iou[k, g]`` its IoU (0 when none).
    Per layer: ``n_detectors``, ``n_unique_concepts`` (distinct best labels among detectors),
    and per category (indexed like ``categories``) ``detectors_per_category`` (detectors whose
    best label is in it) and ``unique_concepts_per_category`` (their distinct labels).
    """

    label: np.ndarray  # (K,) int64
    label_name: tuple[str, ...]
    category: np.ndarray  # (K,) int64
    category_name: tuple[str, ...]
    iou: np.ndarray  # (K,) float64
    is_detector: np.ndarray  # (K,) bool
    category_label: np.ndarray  # (K, G) int64
    category_iou: np.ndarray  # (K, G) float64
    threshold: float
    categories: tuple[str, ...]
    n_detectors: int
    n_unique_concepts: int
    detectors_per_category: np.ndarray  # (G,) int64
    unique_concepts_per_category: np.ndarray  # (G,) int64


def summarize(
    iou: np.ndarray,
    label_names: Sequence[str],
    label_categories: Sequence[int] | np.ndarray,
    categories: Sequence[str],
    threshold: float = 0.04,
) -> LayerSummary:
    """Best concept per unit and the layer's detector counts (Bau et al. 2017, IoU > 0.04).

    ``iou`` is (K, L) over global label numbers (column 0, unlabelled, is ignored);
    ``label_names[c]`` and ``label_categories[c]`` describe label ``c``; ``categories[g]``
    names category ``g``.
    """
    iou = np.asarray(iou, dtype=np.float64)
    cats = np.asarray(label_categories, dtype=np.int64)
    k, n_labels = iou.shape
    n_cat = len(categories)
    if n_labels < 2 or len(label_names) != n_labels or cats.shape != (n_labels,):
        raise ConvLensError(
            f"summarize: IoU has {n_labels} labels, names {len(label_names)}, "
            f"categories {cats.shape[0]}; they must agree and include label 0."
        )
    scored = iou.copy()
    scored[:, 0] = -np.inf
    best = scored.argmax(axis=1)
    best_iou = iou[np.arange(k), best]
    best_cat = cats[best]
    detector = best_iou > threshold
    cat_label = np.full((k, n_cat), -1, dtype=np.int64)
    cat_iou = np.zeros((k, n_cat))
    for g in range(n_cat):
        members = np.flatnonzero(cats == g)
        members = members[members != 0]
        if members.size:
            j = iou[:, members].argmax(axis=1)
            cat_label[:, g] = members[j]
            cat_iou[:, g] = iou[np.arange(k), members[j]]
    det_labels, det_cats = best[detector], best_cat[detector]
    per_cat = np.bincount(det_cats, minlength=n_cat).astype(np.int64)
    unique = np.unique(det_labels)
    unique_per_cat = np.bincount(cats[unique], minlength=n_cat).astype(np.int64)
    return LayerSummary(
        label=best.astype(np.int64),
        label_name=tuple(label_names[c] for c in best),
        category=best_cat,
        category_name=tuple(categories[g] for g in best_cat),
        iou=best_iou,
        is_detector=detector,
        category_label=cat_label,
        category_iou=cat_iou,
        threshold=threshold,
        categories=tuple(categories),
        n_detectors=int(detector.sum()),
        n_unique_concepts=int(unique.size),
        detectors_per_category=per_cat,
        unique_concepts_per_category=unique_per_cat,
    )
