"""The exact sparse IoU tally of a dissection: only the (image, unit) pairs whose mask can be
non-empty are upsampled and counted; tie candidates are counted under both rules."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from engine.dissection.labels import Labels, _GroupLabels, _ImageLabels
from engine.dissection.masks import cut_masks, mask_cuts, tie_fallback
from engine.dissection.result import DissectionParams
from engine.dissection.timing import Clock
from engine.types import ConvLensError

_CHUNK_ELEMENTS = 2**24
"""Pass 2 upsamples at most this many mask elements (unit maps x pixels) at once, which bounds
the temporary float32/bool masks to about 100 MB whatever the layer."""


_SKIP_MARGIN = 2.0**-20
"""Relative margin of the empty-mask test: bilinear upsampling in float32 can exceed the
largest input by a few float32 ulps (2**-24 each), far below this."""


def pair_masks(maps: torch.Tensor, cuts: torch.Tensor, mask_size: tuple[int, int], *,
               strict: bool) -> torch.Tensor:
    """Masks of N unit maps ``(N, h, w)`` with their own :func:`float32_cut` cuts ``(N,)``:
    bool (N, H, W) (kept for callers of the former name; see :mod:`engine.dissection.masks`)."""
    c = cuts.to(maps.device, torch.float32)
    if strict:
        c = torch.nextafter(c, torch.tensor(float("inf"), device=c.device))
    return cut_masks(maps, c, mask_size)


class SparseTally:
    """Exact IoU sums that upsample only the (image, unit) pairs whose mask can be non-empty.

    Bilinear upsampling (``align_corners=False``) makes every output value a convex
    combination of input values, so ``max S_k(x) <= max A_k(x)``: when a unit's largest
    activation on an image is below ``T_k`` its mask is empty (NetDissect-Lite skips these
    pairs the same way). With ``q = 0.005`` most pairs are empty, which makes this far cheaper
    than upsampling every map. The test keeps a margin of ``2**-20 max|A_k(x)|`` against
    float32 rounding, so no non-empty mask is ever skipped.

    The sums are those of :class:`IoUTally` (the same ``L_c(x)`` as a set of pixels, an
    image-level label covering the whole mask, each label counted in its primary category,
    the ``"paper"`` and ``"lite"`` union rules), and tests check that the result equals one
    :class:`IoUTally` fed every unit's :func:`unit_masks`. They are computed from the masked
    pixels of the active pairs only (one ``bincount`` per chunk): per image and unit,
    ``union = |M| [counted] + |L_c| - |M ∩ L_c|``, so over the data set
    ``union[k, c] = sum_x |L_c(x)| + sum_{x active for k} (|M_k(x)| [counted] - |M ∩ L_c|)``:
    an empty mask contributes only ``|L_c(x)|``.

    Tie fallback (see :mod:`engine.dissection.masks`): units in ``fallback`` (known from pass 1
    to fall back) are counted with ``S > T``; each unit in ``candidates`` (undecided by pass 1)
    is counted under both rules, and :meth:`iou` keeps the row that its exact count
    ``P(A_k >= T_k)`` (summed here over every position) calls for. With neither given every
    unit is a candidate.
    """

    def __init__(self, units: int, labels: Labels, thresholds: np.ndarray,
                 params: DissectionParams, device: torch.device,
                 candidates: np.ndarray | None = None, fallback: np.ndarray | None = None) -> None:
        n_labels = len(labels.names)
        self.n_labels = n_labels
        self.units = units
        self.params = params
        self.device = device
        self.label_category = torch.as_tensor(
            np.where(labels.scored, labels.category_index, 0), device=device)
        self.n_categories = len(labels.categories)
        # Rows: one per unit with its rule (S > T for the units known to fall back), then one per
        # undecided tie candidate with S > T (the row the unit takes if its tie count calls for it).
        off = params.strict_mask or params.tie_factor is None
        known = np.zeros(units, dtype=bool) if off or fallback is None else np.asarray(fallback, dtype=bool)
        self.known_fallback = known
        cand = np.zeros(0, dtype=np.int64) if off else (
            np.arange(units) if candidates is None and fallback is None
            else np.flatnonzero(np.zeros(units, dtype=bool) if candidates is None
                                else np.asarray(candidates, dtype=bool) & ~known))
        self.candidates = cand
        self.row_unit = torch.as_tensor(np.concatenate((np.arange(units), cand)), device=device)
        t = np.asarray(thresholds, dtype=np.float64)
        self.thresholds = torch.as_tensor(t, device=device)
        cut = np.concatenate((mask_cuts(t, strict=params.strict_mask, tie_fallback=known),
                              mask_cuts(t[cand], strict=True)))
        self.cut = torch.as_tensor(cut, device=device)
        self.ge_cut = torch.as_tensor(mask_cuts(t, strict=False), device=device)
        rows = units + len(cand)
        self.inter = torch.zeros((rows, n_labels), dtype=torch.int64, device=device)
        self.extra_union = torch.zeros((rows, n_labels), dtype=torch.int64, device=device)
        self.label_area = torch.zeros(n_labels, dtype=torch.int64, device=device)
        self.at_threshold = torch.zeros(units, dtype=torch.int64, device=device)  # count A_k >= T_k
        self.positions = 0  # positions per unit seen (images x h x w)
        self.unit_max = torch.full((units,), -torch.inf, dtype=torch.float64, device=device)
        self.scored = labels.scored

    def update(self, acts: torch.Tensor, images: Sequence[_ImageLabels], clock: Clock,
               name: str) -> None:
        """Add a batch: ``acts`` (B, K, h, w) and the B images' labels."""
        acts = acts.to(self.device)
        self.at_threshold += (acts >= self.ge_cut[None, :, None, None]).sum(dim=(0, 2, 3))
        self.positions += acts.shape[0] * acts.shape[2] * acts.shape[3]
        hi = acts.amax(dim=(2, 3)).double()
        lo = acts.amin(dim=(2, 3)).double()
        if len(hi):
            self.unit_max = torch.maximum(self.unit_max, hi.amax(dim=0))
        margin = _SKIP_MARGIN * torch.maximum(hi.abs(), lo.abs())
        active = (hi + margin >= self.thresholds[None])[:, self.row_unit].cpu().numpy()  # (B, R)
        by_size: dict[tuple[int, int], list[int]] = {}
        for b, im in enumerate(images):
            by_size.setdefault(im.mask_size, []).append(b)
        for size, rows in by_size.items():
            group = _GroupLabels.of([images[b] for b in rows], self.n_labels, self.device)
            self.label_area += group.area.sum(dim=0)
            present = self._categories_present(group.area)  # (n, G)
            pairs = [(j, np.flatnonzero(active[b])) for j, b in enumerate(rows)]
            step = max(1, _CHUNK_ELEMENTS // (size[0] * size[1]))  # pairs per upsampling
            start = 0
            while start < len(pairs):
                chunk: list[tuple[int, np.ndarray]] = []
                count = 0
                while start < len(pairs) and (not chunk or count + len(pairs[start][1]) <= step):
                    chunk.append(pairs[start])
                    count += len(pairs[start][1])
                    start += 1
                self._tally_chunk(acts[torch.as_tensor(rows, device=acts.device)], chunk,
                                  group, present, size, clock, name)

    def _categories_present(self, area: torch.Tensor) -> torch.Tensor:
        """(n, G) bool: the image has a label of the category (positive area)."""
        hit = torch.zeros((area.shape[0], self.n_categories), dtype=torch.int64,
                          device=self.device)
        hit.index_add_(1, self.label_category, (area > 0).long())
        return hit > 0

    def _tally_chunk(self, acts: torch.Tensor, chunk: list[tuple[int, np.ndarray]],
                     group: _GroupLabels, present: torch.Tensor, size: tuple[int, int],
                     clock: Clock, name: str) -> None:
        dev = self.device
        img = torch.as_tensor(np.concatenate([np.full(len(u), j) for j, u in chunk]),
                              dtype=torch.int64, device=dev)
        unit = torch.as_tensor(np.concatenate([u for _, u in chunk]), dtype=torch.int64,
                               device=dev)  # rows (see __init__)
        masks = cut_masks(acts[img.to(acts.device), self.row_unit[unit].to(acts.device)],
                          self.cut[unit].to(acts.device), size).to(dev).flatten(1)  # (N, P)
        clock.lap(f"masks[{name}]")
        n, lab = len(unit), self.n_labels
        if n == 0:
            return
        pair, pixel = torch.nonzero(masks, as_tuple=True)
        area = torch.bincount(pair, minlength=n)  # (N,) |M|
        labels = group.maps[img[pair], pixel]  # (nnz, M), de-duplicated per pixel
        key = (pair[:, None] * lab + labels).flatten()
        inter = torch.bincount(key, minlength=n * lab).reshape(n, lab)
        inter[:, 0] = 0
        inter = torch.where(group.whole[img], area[:, None], inter)  # image-level labels
        if self.params.mask_rule == "paper":
            counted = present[img]  # (N, G)
        else:
            touched = torch.zeros((n, self.n_categories), dtype=torch.int64, device=dev)
            touched.index_add_(1, self.label_category, inter)
            counted = touched > 0
        union_part = area[:, None] * counted[:, self.label_category] - inter
        self.inter.index_add_(0, unit, inter)
        self.extra_union.index_add_(0, unit, union_part)
        clock.lap(f"tally[{name}]")

    def merge(self, other: SparseTally) -> SparseTally:
        """The tally of both tallies' images together (int64 sums: any split and order of the
        images gives the one-pass counts exactly); neither is changed."""
        if other.inter.shape != self.inter.shape or not torch.equal(other.cut.cpu(), self.cut.cpu()) \
                or not np.array_equal(other.candidates, self.candidates) \
                or not np.array_equal(other.known_fallback, self.known_fallback) \
                or other.params.result_key() != self.params.result_key():
            raise ConvLensError("cannot merge IoU tallies of different layers, labels, thresholds or settings.")
        out = copy.copy(self)
        out.inter = self.inter + other.inter.to(self.device)
        out.extra_union = self.extra_union + other.extra_union.to(self.device)
        out.label_area = self.label_area + other.label_area.to(self.device)
        out.at_threshold = self.at_threshold + other.at_threshold.to(self.device)
        out.positions = self.positions + other.positions
        out.unit_max = torch.maximum(self.unit_max, other.unit_max.to(self.device))
        return out

    def at_threshold_fraction(self) -> np.ndarray:
        """(K,) float64 ``P(A_k >= T_k)`` over the positions seen."""
        return self.at_threshold.cpu().numpy() / max(self.positions, 1)

    def tie_fallback(self) -> np.ndarray:
        """(K,) bool: the units whose ``S >= T`` mask falls back to ``S > T`` (never with
        ``strict_mask``): :func:`engine.dissection.masks.tie_fallback` of the counts."""
        out = self.known_fallback.copy()
        if self.params.tie_factor is not None and len(self.candidates):
            c = self.candidates
            out[c] = tie_fallback(self.at_threshold.cpu().numpy()[c], self.positions,
                                  self.unit_max.cpu().numpy()[c] > self.thresholds.cpu().numpy()[c],
                                  self.params.quantile, self.params.tie_factor)
        return out

    def iou(self) -> np.ndarray:
        """(K, L) float64 IoU over the data set (0 for unscored labels and empty unions), each
        unit by its rule (the tie fallback applied)."""
        inter = self.inter.cpu().numpy()
        union = self.label_area.cpu().numpy()[None] + self.extra_union.cpu().numpy()
        union[:, 0] = 0
        union[:, ~self.scored] = 0
        rows = np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)
        out = rows[:self.units].copy()
        fallback = self.tie_fallback() & ~self.known_fallback  # known ones: their own row is S > T
        if fallback.any():
            row_of = np.full(self.units, -1)
            row_of[self.candidates] = self.units + np.arange(len(self.candidates))
            out[fallback] = rows[row_of[fallback]]
        return out


