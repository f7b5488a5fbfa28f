"""engine.dissection.masks: one code path for unit masks (rule, upsampling, tie fallback)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.dissection.masks import layer_masks, mask_cuts, unit_masks
from engine.types import ConvLensError


def _maps(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn((3, 5, 4, 6), generator=g))


@pytest.mark.parametrize("strict", [False, True])
def test_masks_equal_float64_comparison_of_the_bilinear_upsampling(strict: bool) -> None:
    maps = _maps()
    t = np.array([0.3, 0.0, 1.0, 0.5, 2.0]) + 1e-9
    s = F.interpolate(maps[:, :, None].reshape(-1, 1, 4, 6), size=(9, 11), mode="bilinear",
                      align_corners=False).reshape(3, 5, 9, 11).double()
    tt = torch.as_tensor(t)[None, :, None, None]
    expected = s > tt if strict else s >= tt
    got = unit_masks(maps, t, (9, 11), strict=strict)
    assert got.dtype == torch.bool and got.shape == (3, 5, 9, 11)
    assert torch.equal(got, expected)


def test_a_unit_gets_the_same_mask_alone_as_among_all_units() -> None:
    maps = _maps(1)
    t = np.quantile(maps.numpy(), 0.9, axis=(0, 2, 3))
    all_units = unit_masks(maps, t, (7, 13), strict=False)
    for k in range(maps.shape[1]):
        one = unit_masks(maps[:, k], np.repeat(t[k], maps.shape[0]), (7, 13), strict=False)
        assert torch.equal(one, all_units[:, k])


def test_tie_fallback_makes_a_zero_threshold_mask_strict() -> None:
    maps = torch.zeros((2, 2, 4, 4))
    maps[0, 0, 1, 1] = 3.0  # unit 0: zero almost everywhere, T = 0
    maps[:, 1] = 1.0
    t = np.array([0.0, 0.5])
    paper = unit_masks(maps, t, (8, 8), strict=False)
    assert paper[:, 0].all()  # S >= 0 everywhere: the whole image
    fb = unit_masks(maps, t, (8, 8), strict=False, tie_fallback=np.array([True, False]))
    assert 0 < int(fb[0, 0].sum()) < 64 and not fb[1, 0].any()
    assert torch.equal(fb[:, 1], paper[:, 1])
    assert np.array_equal(mask_cuts(t, strict=True), mask_cuts(t, strict=False, tie_fallback=np.array([True, True])))
    with pytest.raises(ConvLensError, match="tie-fallback"):
        mask_cuts(t, strict=False, tie_fallback=np.array([True]))


_LAYER = SimpleNamespace(units=2, thresholds=np.array([0.0, 0.5]), tie_fallback=np.array([True, False]))
_RESULT = SimpleNamespace(layers={"l": _LAYER}, params=SimpleNamespace(strict_mask=False))


def test_layer_masks_use_the_results_rule() -> None:
    maps = torch.zeros((2, 2, 4, 4))
    maps[0, 0, 1, 1] = 3.0
    maps[:, 1] = 1.0
    full = layer_masks(_RESULT, "l", maps, (8, 8))
    assert torch.equal(full, unit_masks(maps, _LAYER.thresholds, (8, 8), strict=False, tie_fallback=_LAYER.tie_fallback))
    one = layer_masks(_RESULT, "l", maps[:, 0].numpy(), (8, 8), units=0)
    assert torch.equal(one, full[:, 0])
