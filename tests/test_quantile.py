"""TopQuantile: streaming top-quantile thresholds of Network Dissection (Bau et al. 2017)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.dissection.quantile import TopQuantile
from engine.types import ConvLensError

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _stream(tq: TopQuantile, data: np.ndarray, sizes: list[int]) -> None:
    """Feed ``data`` (B, ...) in batches of the given sizes, cycling, until exhausted."""
    i, j = 0, 0
    while i < len(data):
        n = sizes[j % len(sizes)]
        tq.update(torch.from_numpy(data[i : i + n]))
        i, j = i + n, j + 1


def _reference(data: np.ndarray, q: float) -> np.ndarray:
    """numpy.quantile per unit over every image and position (the definition)."""
    per_unit = np.moveaxis(data, 1, 0).reshape(data.shape[1], -1).astype(np.float64)
    return np.quantile(per_unit, 1 - q, axis=1, method="linear")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q", [0.005, 0.2])
@pytest.mark.parametrize("shape", [(23, 4, 5, 3), (50, 3, 7, 7), (31, 6)])
@pytest.mark.parametrize("ties", [False, True])
def test_exact_matches_numpy(device: str, q: float, shape: tuple[int, ...], ties: bool) -> None:
    rng = np.random.default_rng(hash((q, shape, ties)) % 2**32)
    data = rng.normal(loc=-0.5, scale=2.0, size=shape).astype(np.float32)
    if ties:  # many equal values, negative ones included
        data = np.round(data * 2) / 2
    total = shape[0] * int(np.prod(shape[2:]))
    tq = TopQuantile(shape[1], total, q, device=device)
    _stream(tq, data, [1, 4, 7, 2])  # uneven batches; total not a multiple of any
    assert tq.exact
    t = tq.thresholds()
    assert t.dtype == np.float64 and t.shape == (shape[1],)
    # The same order statistics and numpy's own interpolation: equal bit for bit ...
    np.testing.assert_array_equal(t, _reference(data, q))
    # ... hence within float32 precision of numpy on the float32 data.
    f32 = np.quantile(np.moveaxis(data, 1, 0).reshape(shape[1], -1), 1 - q, axis=1)
    np.testing.assert_allclose(t, f32, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(tq.error_bound, 0.0)


def test_exact_keeps_only_top_m() -> None:
    tq = TopQuantile(2, 1000, 0.005)
    assert tq.m == int(0.005 * 999) + 2  # 6 values per unit
    tq.update(torch.randn(10, 2, 10, 10))
    assert tq._top.shape == (2, tq.m)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_approximate_within_bound(device: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_units, n_bins, q = 3, 64, 0.2
    data = rng.standard_t(df=3, size=(400, n_units, 6, 6)).astype(np.float32)
    # Grow the scale and shift batch by batch so the histogram range must grow both ways.
    data *= np.linspace(0.1, 30.0, 400, dtype=np.float32)[:, None, None, None]
    data[200:, 1] -= 50.0
    data[:, 2] = np.maximum(data[:, 2], 0)  # ReLU: many tied zeros
    total = 400 * 36
    tq = TopQuantile(n_units, total, q, device=device, max_bytes=16 * n_units * n_bins)
    assert not tq.exact and tq.n_bins == n_bins
    _stream(tq, data, [7, 13, 1])
    t, bound = tq.thresholds(), tq.error_bound
    ref = _reference(data, q)
    assert np.all(np.abs(t - ref) <= bound + 1e-9 * np.abs(ref))
    per_unit = np.moveaxis(data, 1, 0).reshape(n_units, -1).astype(np.float64)
    spread = per_unit.max(axis=1) - per_unit.min(axis=1)
    # The a-priori bound of the docstring (first batches have a nonzero range here).
    assert np.all(bound <= tq.bin_width / 2)
    assert np.all(tq.bin_width <= 2 * spread / (n_bins - 1))


def test_approximate_exact_on_ties_and_constant_start() -> None:
    """Bins holding one distinct value add no error; a constant first batch is handled."""
    n_units, total, q = 2, 10_000, 0.2
    rng = np.random.default_rng(5)
    data = np.zeros((100, n_units, 10, 10), dtype=np.float32)
    # Unit 0: 90% zeros, the rest in [5, 10]; its 0.8 quantile is a tied 0.
    data[:, 0] = np.where(rng.random((100, 10, 10)) < 0.9, 0, rng.uniform(5, 10, (100, 10, 10)))
    data[:10, 0] = 0  # first batch constant: the initial width is arbitrary
    # Unit 1: constant 3 for the first half, then spread values.
    data[:50, 1] = 3.0
    data[50:, 1] = rng.normal(3, 1, (50, 10, 10))
    tq = TopQuantile(n_units, total, q, max_bytes=16 * n_units * 32)
    assert not tq.exact
    _stream(tq, data, [10, 25, 65])
    t, bound = tq.thresholds(), tq.error_bound
    ref = _reference(data, q)
    assert t[0] == 0.0 and bound[0] == 0.0 and ref[0] == 0.0
    assert abs(t[1] - ref[1]) <= bound[1]
    spread = data[:, 1].max() - data[:, 1].min()
    assert bound[1] <= spread / (32 - 1)


def test_count_mismatch_raises() -> None:
    tq = TopQuantile(2, 5 * 3 * 3)
    tq.update(torch.randn(4, 2, 3, 3))
    with pytest.raises(ConvLensError, match="expected 45 .* saw 36"):
        tq.thresholds()
    with pytest.raises(ConvLensError, match="expect 45"):
        tq.update(torch.randn(2, 2, 3, 3))  # would overshoot; state unchanged
    tq.update(torch.randn(1, 2, 3, 3))
    assert tq.thresholds().shape == (2,)


@pytest.mark.parametrize("max_bytes", [256 * 2**20, 16 * 3 * 16])
def test_nan_raises_naming_unit(max_bytes: int) -> None:
    tq = TopQuantile(3, 10_000, 0.2, max_bytes=max_bytes)
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 0, 3] = float("nan")
    with pytest.raises(ConvLensError, match="Unit 2 has NaN"):
        tq.update(x)
    assert tq.count == 0


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConvLensError):
        TopQuantile(2, 100, q=0.0)
    with pytest.raises(ConvLensError, match="too small"):
        TopQuantile(100, 10**6, max_bytes=1000)
    tq = TopQuantile(2, 100)
    with pytest.raises(ConvLensError, match=r"\(B, 2, h, w\)"):
        tq.update(torch.randn(1, 3, 2, 2))
    with pytest.raises(ConvLensError, match="exact is True"):
        _ = tq.bin_width
