"""Streaming per-unit top-quantile thresholds for Network Dissection.

Network Dissection (Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying
Interpretability of Deep Visual Representations", CVPR 2017) binarises unit ``k`` at the
threshold ``T_k`` such that ``P(a_k > T_k) = q`` (``q = 0.005``) over every spatial position of
every image of the dataset. This module computes ``T_k`` from activations streamed batch by
batch, without ever holding all of them.

Definition used here: ``T_k = numpy.quantile(values_k, 1 - q, method="linear")`` where
``values_k`` are all ``total`` values of unit ``k``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from engine.types import ConvLensError

_HIST_BYTES_PER_BIN = 16  # int64 count + float32 min + float32 max
_MIN_BINS = 16


def _rank_plan(total: int, q: float) -> tuple[int, int, float]:
    """Ascending ranks ``(lo, hi)`` and weight ``gamma`` of numpy's linear quantile ``1 - q``.

    Mirrors ``numpy.quantile(..., method="linear")``: virtual index ``h = (n - 1) * (1 - q)``,
    ``lo = floor(h)``, ``hi = lo + 1`` (both ``n - 1`` when ``h >= n - 1``), ``gamma = h - lo``.
    """
    h = (total - 1) * (1.0 - q)
    if h >= total - 1:
        return total - 1, total - 1, 0.0
    lo = math.floor(h)
    return lo, lo + 1, h - lo


def _pow2_ceil(x: np.ndarray) -> np.ndarray:
    """The least power of two >= each (positive) value, exactly."""
    m, e = np.frexp(x)  # x = m * 2**e with 0.5 <= m < 1
    return np.ldexp(1.0, (e - (m == 0.5)).astype(np.int64))


def _lerp(a: np.ndarray, b: np.ndarray, gamma: float) -> np.ndarray:
    """numpy's ``_lerp`` (the same float64 operations, so the same bits)."""
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1.0 - gamma)
    return a + diff * gamma


class TopQuantile:
    """Per-unit threshold ``T_k`` with ``P(a_k > T_k) = q``, computed streaming.

    Feed every activation once with :meth:`update` (``(B, K, h, w)`` maps or ``(B, K)``
    vectors, on any device; they are moved to ``device`` and cast to float32), then call
    :meth:`thresholds`. ``total`` is the number of values per unit that will be seen
    (``n_images * h * w``); :meth:`thresholds` refuses to answer for any other count.

    **Exact mode** (``exact is True``): per unit only the ``m = floor(q * (total - 1)) + 2``
    largest values are kept (enough for both order statistics that numpy's linear
    interpolation needs), merged after each batch with ``torch.topk`` over
    ``cat(buffer, batch)``. Memory is ``K * m * 4`` bytes. The result equals
    ``numpy.quantile(values.astype(float64), 1 - q, method="linear")`` bit for bit, ties
    included (values are stored as float32, so float64 input is rounded to float32 first).
    ``min_keep`` keeps at least that many (a dissection keeps ``2 q total`` so that
    :meth:`count_bound` counts the ties at the threshold exactly up to its tie limit).

    **Approximate mode** (``exact is False``), used when ``K * m * 4 > max_bytes``: per unit a
    histogram of ``n_bins = max_bytes // (16 * K)`` bins of equal width ``w_k``, each holding
    its count and the exact minimum and maximum of the values that fell in it. ``w_k`` is a
    power of two and bin ``i`` holds ``[(s_k + i) w_k, (s_k + i + 1) w_k)`` for a per-unit
    integer start ``s_k`` (a grid anchored at 0, so any two sketches' bins nest and
    :meth:`merge` is exact). When a batch does not fit, ``w_k`` is doubled (pairs of bins
    merge exactly, counts and min/max included) until the whole range seen fits. Since bins
    are ordered like the values, the two order statistics ``a <= b`` that the quantile
    interpolates are located exactly in their bins; each lies within its bin's
    ``[min, max]`` (and equals the bin min/max when it is the bin's first/last rank). So
    ``T_k = (1 - gamma) a + gamma b`` lies in a known interval ``[L_k, U_k]``;
    :meth:`thresholds` returns its midpoint and :attr:`error_bound` its half-width:

        ``|T_hat_k - T_k| <= error_bound[k] <= w_k / 2``
        ``w_k / 2 <= max(w0_k / 2, (max_k - min_k) / (n_bins - 1))``

    (up to the float64 rounding of the final interpolation), where ``max_k - min_k`` is the
    range of all values of unit ``k`` and ``w0_k`` the initial width: the first batch's range
    divided by ``n_bins - 1``, or ``max(|min|, 1) * 2**-24`` when that range is zero, rounded
    up to a power of two (so ``w0_k / 2 <= range / (n_bins - 1)`` for a nonzero range; a width
    that is only kept while the unit's values all fit in ``n_bins`` such bins). A bin whose
    values are all equal (ties, e.g. ReLU zeros) contributes no error. ``max_bytes`` bounds
    the kept state, not the temporaries of one batch (a few times the batch size).
    """

    def __init__(
        self,
        n_units: int,
        total: int,
        q: float = 0.005,
        *,
        device: str | torch.device = "cpu",
        max_bytes: int = 256 * 2**20,
        min_keep: int = 0,
    ) -> None:
        if n_units < 1:
            raise ConvLensError(f"TopQuantile needs at least one unit, got n_units={n_units}.")
        if total < 1:
            raise ConvLensError(f"TopQuantile needs total >= 1 values per unit, got {total}.")
        if not 0.0 < q < 1.0:
            raise ConvLensError(f"The top quantile q must be in (0, 1), got {q}.")
        self.n_units = n_units
        self.total = total
        self.q = q
        self.device = torch.device(device)
        self.count = 0
        self._lo, self._hi, self._gamma = _rank_plan(total, q)
        # Descending positions needed: ascending rank r is descending position total - 1 - r.
        self.m = min(total, max(math.floor(q * (total - 1)) + 2, total - self._lo, min_keep))
        self.exact: bool = n_units * self.m * 4 <= max_bytes
        self._error_bound: np.ndarray | None = None
        if self.exact:
            self._kept = torch.empty((n_units, 0), dtype=torch.float32, device=self.device)
            # batches wait here until they hold m values per unit, then one topk merges them
            # all with the kept ones: each value takes part in O(1) merges (a topk per batch
            # over the kept buffer would cost O(q N) per batch, quadratic in the image count)
            self._pending: list[torch.Tensor] = []
            self._pending_n = 0
            return
        self.n_bins = max_bytes // (_HIST_BYTES_PER_BIN * n_units)
        if self.n_bins < _MIN_BINS:
            raise ConvLensError(
                f"max_bytes={max_bytes} is too small for {n_units} units: the approximate "
                f"quantile needs at least {_MIN_BINS * _HIST_BYTES_PER_BIN * n_units} bytes."
            )
        k, nb = n_units, self.n_bins
        self._counts = torch.zeros((k, nb), dtype=torch.int64, device=self.device)
        self._bmin = torch.full((k, nb), math.inf, dtype=torch.float32, device=self.device)
        self._bmax = torch.full((k, nb), -math.inf, dtype=torch.float32, device=self.device)
        # Per-unit geometry, on the CPU in float64: bin i covers absolute index start + i,
        # i.e. values v with floor(v / width) == start + i.
        self._width = np.zeros(k)
        self._start = np.zeros(k)
        self._occ_lo = np.full(k, math.inf)  # absolute indices of the occupied bins
        self._occ_hi = np.full(k, -math.inf)

    @property
    def bin_width(self) -> np.ndarray:
        """(K,) histogram bin widths ``w_k`` (approximate mode only)."""
        if self.exact:
            raise ConvLensError("bin_width exists only in approximate mode (exact is True).")
        return self._width.copy()

    @property
    def error_bound(self) -> np.ndarray:
        """(K,) float64: guaranteed ``|thresholds()[k] - T_k|``; zeros in exact mode.

        In approximate mode it is known once :meth:`thresholds` has been called.
        """
        if self.exact:
            return np.zeros(self.n_units)
        if self._error_bound is None:
            raise ConvLensError("error_bound is known after thresholds() has been called.")
        return self._error_bound.copy()

    def update(self, acts: torch.Tensor) -> None:
        """Add one batch: ``(B, K, h, w)`` or ``(B, K)`` float activations."""
        if acts.dim() not in (2, 4) or acts.shape[1] != self.n_units:
            raise ConvLensError(
                f"Expected activations of shape (B, {self.n_units}, h, w) or (B, {self.n_units}),"
                f" got {tuple(acts.shape)}."
            )
        x = acts.detach().to(self.device, torch.float32).transpose(0, 1).reshape(self.n_units, -1)
        n = x.shape[1]
        if self.count + n > self.total:
            raise ConvLensError(
                f"TopQuantile was told to expect {self.total} values per unit but this batch "
                f"brings the count to {self.count + n}."
            )
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            units = torch.nonzero(bad).flatten().tolist()
            kind = "NaN" if bool(torch.isnan(x[units[0]]).any()) else "infinite"
            raise ConvLensError(
                f"Unit {units[0]} has {kind} activations"
                + (f" (units with non-finite values: {units[:10]})" if len(units) > 1 else "")
                + "; the quantile threshold is undefined."
            )
        if n == 0:
            return
        if self.exact:
            self._pending.append(x)
            self._pending_n += n
            if self._pending_n >= self.m:
                self._flush()
        else:
            self._hist_update(x)
        self.count += n

    def _flush(self) -> None:
        """Merge the pending batches into the kept top values (exact mode)."""
        if not self._pending:
            return
        merged = torch.cat((self._kept, *self._pending), dim=1)
        self._pending, self._pending_n = [], 0
        if merged.shape[1] > self.m:
            merged = torch.topk(merged, self.m, dim=1, sorted=False).values
        self._kept = merged

    @property
    def _top(self) -> torch.Tensor:
        """The ``m`` largest values per unit seen so far (exact mode; pending batches merged)."""
        self._flush()
        return self._kept

    @_top.setter
    def _top(self, value: torch.Tensor) -> None:
        self._pending, self._pending_n = [], 0
        self._kept = value

    def _hist_update(self, x: torch.Tensor) -> None:
        nb = self.n_bins
        xmin = x.amin(dim=1).double().cpu().numpy()
        xmax = x.amax(dim=1).double().cpu().numpy()
        if self.count == 0:
            spread = xmax - xmin
            self._width = _pow2_ceil(np.where(
                spread > 0, spread / (nb - 1), np.maximum(np.abs(xmin), 1.0) * 2.0**-24
            ))
        # Doublings d_k so that old occupied bins and the batch fit in n_bins bins.
        d = np.zeros(self.n_units)
        while True:
            scale = np.ldexp(1.0, d.astype(np.int64))
            width = self._width * scale
            lo = np.minimum(np.floor(xmin / width), np.floor(self._occ_lo / scale))
            hi = np.maximum(np.floor(xmax / width), np.floor(self._occ_hi / scale))
            too_wide = hi - lo + 1 > nb
            if not too_wide.any():
                break
            d[too_wide] += 1
        start = np.minimum(np.maximum(np.floor(self._start / scale), hi - nb + 1), lo)
        if (d > 0).any() or (start != self._start).any():
            self._rebin(scale, start)
        self._width, self._start = width, start
        self._occ_lo, self._occ_hi = lo, hi
        dev = self.device
        w = torch.as_tensor(width, device=dev)[:, None]
        s = torch.as_tensor(start, device=dev)[:, None]
        idx = (torch.floor(x.double() / w) - s).long()
        self._counts.scatter_add_(1, idx, torch.ones_like(idx))
        self._bmin.scatter_reduce_(1, idx, x, reduce="amin")
        self._bmax.scatter_reduce_(1, idx, x, reduce="amax")

    def _rebin(self, scale: np.ndarray, start: np.ndarray) -> None:
        """Merge bins after widths grew by ``scale`` (powers of two) and starts moved."""
        dev = self.device
        old_abs = torch.as_tensor(self._start, device=dev)[:, None] + torch.arange(
            self.n_bins, device=dev, dtype=torch.float64
        )
        new_abs = torch.floor(old_abs / torch.as_tensor(scale, device=dev)[:, None])
        idx = (new_abs - torch.as_tensor(start, device=dev)[:, None]).long()
        # Empty old bins may map outside the new window; send them to bin 0 (they are neutral).
        idx = torch.where(self._counts > 0, idx, torch.zeros_like(idx))
        self._counts = torch.zeros_like(self._counts).scatter_add_(1, idx, self._counts)
        self._bmin = torch.full_like(self._bmin, math.inf).scatter_reduce_(
            1, idx, self._bmin, reduce="amin"
        )
        self._bmax = torch.full_like(self._bmax, -math.inf).scatter_reduce_(
            1, idx, self._bmax, reduce="amax"
        )

    def merge(self, other: TopQuantile) -> TopQuantile:
        """The sketch of both sketches' values together (neither is changed).

        Shards of one data set each build a ``TopQuantile`` with the same ``n_units``,
        ``total`` (the whole data set's count), ``q`` and ``max_bytes``, and see disjoint parts
        of the values; merging them in any order gives the sketch of all values. Exact mode:
        the same top values, so :meth:`thresholds` equals the one-pass result bit for bit.
        Approximate mode: the bins of both are coarsened onto the wider (power-of-two) grid,
        doubled until the union's range fits, then counts added and minima/maxima combined,
        all exactly; the class docstring's bound holds for the merged sketch, with ``w0_k``
        the larger of the shards' initial widths.
        """
        same = (self.n_units, self.total, self.q, self.exact) == (other.n_units, other.total, other.q,
                                                                  other.exact)
        if not same or (not self.exact and self.n_bins != other.n_bins):
            raise ConvLensError(
                "TopQuantile.merge needs sketches of the same units, total, q and size; got "
                f"{self.n_units}/{self.total}/{self.q} and {other.n_units}/{other.total}/{other.q}."
            )
        if self.count + other.count > self.total:
            raise ConvLensError(
                f"TopQuantile was told to expect {self.total} values per unit but the merge "
                f"brings the count to {self.count + other.count}."
            )
        out = copy.copy(self)
        out.count = self.count + other.count
        out._error_bound = None
        if self.exact:
            merged = torch.cat((self._top, other._top.to(self.device)), dim=1)
            if merged.shape[1] > self.m:
                merged = torch.topk(merged, self.m, dim=1, sorted=False).values
            out._top = merged
            return out
        parts = [s for s in (self, other) if s.count > 0]
        if len(parts) < 2:
            src = parts[0] if parts else self
            out._counts, out._bmin, out._bmax = (t.to(self.device).clone()
                                                 for t in (src._counts, src._bmin, src._bmax))
            out._width, out._start = src._width.copy(), src._start.copy()
            out._occ_lo, out._occ_hi = src._occ_lo.copy(), src._occ_hi.copy()
            return out
        nb, dev = self.n_bins, self.device
        base = np.maximum(self._width, other._width)
        d = np.zeros(self.n_units)
        while True:
            width = base * np.ldexp(1.0, d.astype(np.int64))
            ratios = [width / s._width for s in parts]  # powers of two >= 1
            lo = np.minimum(*(np.floor(s._occ_lo / r) for s, r in zip(parts, ratios, strict=True)))
            hi = np.maximum(*(np.floor(s._occ_hi / r) for s, r in zip(parts, ratios, strict=True)))
            too_wide = hi - lo + 1 > nb
            if not too_wide.any():
                break
            d[too_wide] += 1
        counts = torch.zeros_like(self._counts)
        bmin = torch.full_like(self._bmin, math.inf)
        bmax = torch.full_like(self._bmax, -math.inf)
        start_t = torch.as_tensor(lo, device=dev)[:, None]
        for s, r in zip(parts, ratios, strict=True):
            old_abs = torch.as_tensor(s._start, device=dev)[:, None] + torch.arange(
                nb, device=dev, dtype=torch.float64)
            idx = (torch.floor(old_abs / torch.as_tensor(r, device=dev)[:, None]) - start_t).long()
            c = s._counts.to(dev)
            idx = torch.where(c > 0, idx, torch.zeros_like(idx))
            counts.scatter_add_(1, idx, c)
            bmin.scatter_reduce_(1, idx, s._bmin.to(dev), reduce="amin")
            bmax.scatter_reduce_(1, idx, s._bmax.to(dev), reduce="amax")
        out._counts, out._bmin, out._bmax = counts, bmin, bmax
        out._width, out._start, out._occ_lo, out._occ_hi = width, lo, lo, hi
        return out

    def thresholds(self) -> np.ndarray:
        """(K,) float64 thresholds ``T_k`` (see the class docstring for exactness)."""
        if self.count != self.total:
            raise ConvLensError(
                f"TopQuantile expected {self.total} values per unit but saw {self.count}; "
                "the thresholds would be for a different dataset."
            )
        n = self.total
        if self.exact:
            desc = torch.sort(self._top, dim=1, descending=True).values.double().cpu().numpy()
            a = desc[:, n - 1 - self._lo]
            b = desc[:, n - 1 - self._hi]
            return _lerp(a, b, self._gamma)
        counts = self._counts.cpu().numpy()
        bmin = self._bmin.double().cpu().numpy()
        bmax = self._bmax.double().cpu().numpy()
        a_lo, a_hi = self._bracket(counts, bmin, bmax, self._lo)
        b_lo, b_hi = self._bracket(counts, bmin, bmax, self._hi)
        low = _lerp(a_lo, b_lo, self._gamma)
        high = _lerp(a_hi, b_hi, self._gamma)
        self._error_bound = (high - low) / 2.0
        return (low + high) / 2.0

    def shrink_total(self, total: int) -> None:
        """Expect ``total`` values per unit instead (fewer than announced: e.g. images that
        failed to load), so :meth:`thresholds` answers once ``total`` have been seen.

        Exact: the kept top values are at least as many as a smaller total needs (``m`` never
        decreases with ``total``), so the result is the same as a sketch made for ``total``.
        """
        if not self.count <= total <= self.total or total < 1:
            raise ConvLensError(f"TopQuantile can shrink its total from {self.total} to between "
                                f"max(1, {self.count}) values seen and itself, not to {total}.")
        self.total = total
        self._lo, self._hi, self._gamma = _rank_plan(total, self.q)
        self._error_bound = None

    def max_values(self) -> np.ndarray:
        """(K,) float64: each unit's largest value seen (-inf before any)."""
        if self.exact:
            top = self._top
            return (top.amax(dim=1).double().cpu().numpy() if top.shape[1]
                    else np.full(self.n_units, -np.inf))
        bmax = self._bmax.double().cpu().numpy()
        return bmax.max(axis=1)

    def count_bound(self, thresholds: np.ndarray) -> np.ndarray:
        """(K,) float64: an upper bound on the number of values ``>= thresholds[k]`` of each unit
        (``inf`` when the kept state cannot bound it).

        Exact mode: when the smallest kept value is below the threshold, every value at or above
        it is kept and the bound is their exact count; otherwise (ties or values reaching past
        the kept top values, e.g. ``T_k = 0`` on a sparse ReLU unit) it is ``inf``. Approximate
        mode: the count of the bins whose maximum reaches the threshold. A dissection counts the
        exact number in its second pass; this bound tells which units may need the tie
        fallback (see :mod:`engine.dissection.masks`).
        """
        t = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if t.shape != (self.n_units,):
            raise ConvLensError(f"{t.size} thresholds for {self.n_units} units.")
        if self.exact:
            top = self._top.double().cpu().numpy()
            if top.shape[1] == 0:
                return np.zeros(self.n_units)
            count = (top >= t[:, None]).sum(axis=1).astype(np.float64)
            return np.where(top.min(axis=1) >= t, np.inf, count)
        counts = self._counts.cpu().numpy()
        bmax = self._bmax.double().cpu().numpy()
        return np.where(bmax >= t[:, None], counts, 0).sum(axis=1).astype(np.float64)

    @staticmethod
    def _bracket(
        counts: np.ndarray, bmin: np.ndarray, bmax: np.ndarray, rank: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per unit, an interval ``[low, high]`` holding the value of ascending ``rank``."""
        cum = np.cumsum(counts, axis=1)
        rows = np.arange(counts.shape[0])
        j = (cum <= rank).sum(axis=1)  # first bin whose cumulative count exceeds rank
        before = cum[rows, j] - counts[rows, j]
        pos = rank - before
        low, high = bmin[rows, j].copy(), bmax[rows, j].copy()
        first, last = pos == 0, pos == counts[rows, j] - 1
        high[first] = low[first]
        low[last] = high[last]
        return low, high
