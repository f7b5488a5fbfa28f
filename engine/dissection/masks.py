"""Unit masks of Network Dissection: the one code path every caller uses.

Bau et al. (CVPR 2017) binarise unit ``k`` on image ``x`` as ``M_k(x) = S_k(x) >= T_k``, where
``S_k(x)`` is the activation map ``A_k(x)`` upsampled bilinearly to the label-mask size and
``T_k`` the unit's top-quantile threshold; NetDissect-Lite uses the strict ``S_k(x) > T_k``.
The tally (:mod:`engine.dissection.tally`, the sparse tally of a dissection run), the report,
the GUI view and anything else that draws a unit's mask call the functions here, so that they
all give the same pixels:

- :func:`unit_masks` ``(maps, thresholds, size, *, strict, tie_fallback=None)``: bool masks of
  ``(N, U, h, w)`` maps (thresholds per unit, ``(U,)``) or of ``(N, h, w)`` maps (one threshold
  per map, ``(N,)``), upsampled to ``size = (H, W)``, the **label-mask size** of the image
  (``ConceptDataset.sample(i).mask_size``, half the image size in Broden), not the image size.
- :func:`layer_masks` ``(result, layer, maps, size, units=None)``: the same masks with the
  rule, thresholds and tie fallback of a finished dissection (the simplest call for a view).
- :func:`mask_cuts` / :func:`float32_cut`: the float32 cut per unit that the comparison uses.

**Upsampling**: ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` (equal
to NetDissect-Lite's PIL bilinear on float maps), each map as its own one-channel item: PyTorch's
CPU kernel rounds multi-channel inputs differently (by an ulp, depending on the channel count),
which would flip pixels that tie with ``T_k`` depending on how maps share a call. So a mask is
the same whatever the batch, the number of units or the caller.

**Comparison**: the float64 threshold is turned into a float32 cut ``c_k`` with
``S >= T_k <=> S >= c_k`` and ``S > T_k <=> S >= c_k'`` exactly for float32 ``S`` (see
:func:`float32_cut`), so no threshold is rounded.

**Tie fallback** (degenerate thresholds): when a mass of a unit's activations ties with
``T_k`` (``T_k = 0`` on a sparse ReLU unit that is zero at more than 99.5% of positions, or any
value many positions share), the paper's ``S >= T`` would select every such position: for
``T_k = 0`` the whole image. A dissection therefore counts ``P(A_k >= T_k)`` over all positions
of all images (over the activations, as the quantile is: about ``q`` for a unit without ties)
and records per unit ``tie_fallback[k]`` (:func:`tie_fallback`), True when the paper's rule was
requested, ``P(A_k >= T_k) > tie_factor * q`` (``TIE_FACTOR = 2``, the dissection's
``DissectionParams.tie_factor``; None turns the rule off) and either

- some activation exceeds ``T_k`` (the tie is below the unit's top values: ``S > T`` keeps
  those, the top ``<= q`` of its activations), or
- ``T_k`` is the unit's largest activation and more than ``TOP_TIE_SHARE`` (half) of all
  positions take it (a constant or nearly constant unit): ``S > T`` is then empty.

Those units use ``S > T``. A unit saturated at its maximum on fewer positions (ReLU6, a
hard tanh) keeps ``S >= T``: its mask is the saturated region, its top activations. A unit
whose activations never exceed ``T_k`` under ``S > T`` has empty masks, IoU 0 with every
concept and no label. With ``strict=True`` every unit already uses ``S > T``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.types import ConvLensError

TIE_FACTOR = 2.0
"""A unit falls back to ``S > T`` when ``P(A_k >= T_k)`` exceeds this many times the top
quantile ``q`` (ties at the threshold would make its ``S >= T`` mask that much larger)."""

TOP_TIE_SHARE = 0.5
"""A unit whose threshold is its maximum keeps ``S >= T`` (its saturated region) unless more
than this share of all positions take that maximum."""


def tie_fallback(at_threshold: np.ndarray, positions: int, exceeds: np.ndarray, quantile: float,
                 factor: float = TIE_FACTOR) -> np.ndarray:
    """(K,) bool: which units use ``S > T`` instead of ``S >= T`` (see the module docstring).

    ``at_threshold``: per unit the count of activations ``A_k >= T_k`` over ``positions``
    positions (all images); ``exceeds``: whether some activation is ``> T_k``.
    """
    count = np.asarray(at_threshold, dtype=np.float64)
    tied = count > factor * quantile * positions
    flat_top = count > TOP_TIE_SHARE * positions
    return tied & (np.asarray(exceeds, dtype=bool) | flat_top)


def float32_cut(thresholds: np.ndarray, *, strict: bool) -> np.ndarray:
    """float32 cuts equivalent to float64 thresholds for float32 maps ``S``:
    ``S >= T  <=>  S >= cut`` (cut: the least float32 >= T) and, with ``strict``,
    ``S > T  <=>  S > cut`` (cut: the greatest float32 <= T)."""
    t = np.asarray(thresholds, dtype=np.float64)
    cut = t.astype(np.float32)
    if strict:
        return np.where(cut > t, np.nextafter(cut, np.float32(-np.inf)), cut)
    return np.where(cut < t, np.nextafter(cut, np.float32(np.inf)), cut)


def mask_cuts(thresholds: np.ndarray | torch.Tensor, *, strict: bool,
              tie_fallback: np.ndarray | None = None) -> np.ndarray:
    """(K,) float32 ``c_k`` such that the mask of unit ``k`` is exactly ``S >= c_k``.

    Unit ``k`` uses ``S > T_k`` when ``strict`` or ``tie_fallback[k]``, else ``S >= T_k``
    (``S > T <=> S >= nextafter(c, +inf)`` for the greatest float32 ``c <= T``).
    """
    t = np.asarray(thresholds.detach().cpu().numpy() if isinstance(thresholds, torch.Tensor)
                   else thresholds, dtype=np.float64).reshape(-1)
    gt = np.full(t.shape, bool(strict))
    if tie_fallback is not None:
        fb = np.asarray(tie_fallback, dtype=bool).reshape(-1)
        if fb.shape != t.shape:
            raise ConvLensError(f"{fb.size} tie-fallback flags for {t.size} thresholds.")
        gt |= fb
    ge_cut = float32_cut(t, strict=False)
    gt_cut = np.nextafter(float32_cut(t, strict=True), np.float32(np.inf))
    return np.where(gt, gt_cut, ge_cut).astype(np.float32)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """float32 ``(..., H, W)``: each ``(h, w)`` map of ``maps`` (``(..., h, w)``) upsampled
    bilinearly (``align_corners=False``) as its own one-channel item."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    if flat.shape[0] == 0:
        return torch.zeros((*lead, *size), dtype=torch.float32, device=maps.device)
    s = F.interpolate(flat, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    return s.reshape(*lead, int(size[0]), int(size[1]))


def cut_masks(maps: torch.Tensor, cuts: torch.Tensor | np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """bool ``(N, H, W)``: ``upsample(maps) >= cuts`` for ``(N, h, w)`` maps and ``(N,)`` float32
    cuts from :func:`mask_cuts` (the tally's inner step)."""
    c = torch.as_tensor(cuts, device=maps.device).to(torch.float32).reshape(-1, 1, 1)
    return upsample(maps, size) >= c


def unit_masks(maps: torch.Tensor, thresholds: torch.Tensor | np.ndarray, size: tuple[int, int], *,
               strict: bool, tie_fallback: np.ndarray | None = None) -> torch.Tensor:
    """Binary unit masks at label-mask resolution (see the module docstring for the rule).

    ``maps``: ``(N, U, h, w)`` activation maps with ``thresholds`` ``(U,)`` (one per unit), or
    ``(N, h, w)`` with ``thresholds`` ``(N,)`` (one per map: a chosen unit's maps, or
    (image, unit) pairs). ``size``: ``(H, W)``, the label-mask size. ``strict``: ``S > T``
    (NetDissect-Lite) instead of ``S >= T`` (the paper). ``tie_fallback``: per threshold, use
    ``S > T`` for that unit (a dissection's ``LayerDissection.tie_fallback``).
    Returns bool ``(N, U, H, W)`` or ``(N, H, W)`` on ``maps.device``.
    """
    if maps.dim() not in (3, 4):
        raise ConvLensError(f"unit_masks expects (N, U, h, w) or (N, h, w) maps, got {tuple(maps.shape)}.")
    cuts = torch.as_tensor(mask_cuts(thresholds, strict=strict, tie_fallback=tie_fallback), device=maps.device)
    per = maps.shape[1] if maps.dim() == 4 else maps.shape[0]
    if cuts.shape[0] != per:
        raise ConvLensError(f"{cuts.shape[0]} thresholds for {per} "
                            f"{'units' if maps.dim() == 4 else 'maps'}.")
    s = upsample(maps, size)
    return s >= (cuts.reshape(1, -1, 1, 1) if maps.dim() == 4 else cuts.reshape(-1, 1, 1))


def layer_masks(result: Any, layer: str, maps: torch.Tensor | np.ndarray, size: tuple[int, int],
                units: Any = None) -> torch.Tensor:
    """The masks a dissection ``result`` (a :class:`~engine.dissection.run.DissectionResult`)
    scores for ``layer``: its thresholds, ``result.params.strict_mask`` and the layer's
    ``tie_fallback``.

    ``maps``: ``(N, U, h, w)`` maps of the units ``units`` (default: every unit of the layer, in
    order; an int or a sequence of unit numbers), or ``(N, h, w)`` maps of the one unit
    ``units``. ``size``: the label-mask size ``(H, W)``. Returns bool masks shaped like ``maps``
    with ``(H, W)`` last.
    """
    ld = result.layers[layer]
    t = torch.as_tensor(np.ascontiguousarray(maps)) if isinstance(maps, np.ndarray) else maps
    sel = np.arange(ld.units) if units is None else np.atleast_1d(np.asarray(units, dtype=np.int64))
    fallback = getattr(ld, "tie_fallback", None)
    fb = None if fallback is None else np.asarray(fallback, dtype=bool)[sel]
    thr = np.asarray(ld.thresholds, dtype=np.float64)[sel]
    if t.dim() == 3:
        if sel.size != 1:
            raise ConvLensError(f"(N, h, w) maps are of one unit; got units {sel.tolist()}.")
        thr, fb = np.repeat(thr, t.shape[0]), None if fb is None else np.repeat(fb, t.shape[0])
    return unit_masks(t, thr, size, strict=bool(result.params.strict_mask), tie_fallback=fb)
