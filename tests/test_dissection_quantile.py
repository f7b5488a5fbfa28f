"""TopQuantile additions for dissection: a smaller total after failed images, tie-count bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.dissection.quantile import TopQuantile


@pytest.mark.parametrize("max_bytes", [256 * 2**20, 16 * 16 * 3])
def test_shrunk_total_gives_the_threshold_of_the_values_seen(max_bytes: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(7, 3, 5, 5)).astype(np.float32)
    tq = TopQuantile(3, 10 * 25, 0.05, max_bytes=max_bytes)  # made for 10 images, 7 arrive
    tq.update(torch.from_numpy(x))
    tq.shrink_total(7 * 25)
    want = np.quantile(x.transpose(1, 0, 2, 3).reshape(3, -1).astype(np.float64), 0.95, axis=1)
    got = tq.thresholds()
    if tq.exact:
        np.testing.assert_array_equal(got, want)
    else:
        assert (np.abs(got - want) <= tq.error_bound + 1e-12).all()


def test_count_bound_is_exact_below_the_kept_values_and_unbounded_on_ties() -> None:
    x = torch.zeros((4, 2, 10, 10))
    x[:, 1] = torch.arange(400, dtype=torch.float32).reshape(4, 10, 10)  # unit 1: distinct values
    x[0, 0, 0, 0] = 5.0  # unit 0: zero almost everywhere
    tq = TopQuantile(2, 400, 0.01)
    tq.update(x)
    t = tq.thresholds()
    assert t[0] == 0.0
    bound = tq.count_bound(t)
    assert bound[0] == np.inf
    assert bound[1] == int((x[:, 1].numpy() >= t[1]).sum())
