"""Choosing layers a person would want to look at first."""

from __future__ import annotations

from ..types import LayerInfo

_CONV_KINDS = ("Conv", "conv")


def has_extent(li: LayerInfo) -> bool:
    """Whether ``li`` has a spatial map larger than one position (``(units, h, w)`` with
    ``h * w > 1``): a 1x1 map (after global pooling, or a small input) has no spatial extent."""
    return li.is_spatial and li.shape[1] * li.shape[2] > 1


def default_layers(layers: list[LayerInfo], n: int = 3) -> list[str]:
    """Up to ``n`` spatial layers, evenly spread towards the top: top-level conv stages when the
    model has them (``layer1..4`` of a ResNet, ``conv1..3`` of RNet), else conv layers. Layers
    whose maps are 1x1 are never proposed (:func:`has_extent`): a unit of one there covers the
    whole image, so per-position analyses (dissection, heatmaps) have nothing to show."""
    spatial = [li for li in layers if has_extent(li)]
    top = [li for li in spatial if "." not in li.name and any(k in li.kind or k in li.name for k in ("Sequential", "layer", "conv", "Conv"))]
    convs = [li for li in spatial if any(k in li.kind for k in _CONV_KINDS)]
    pool = top if len(top) >= 2 else (convs or spatial)
    if len(pool) <= n:
        return [li.name for li in pool]
    step = len(pool) / n
    picks = [pool[min(len(pool) - 1, round(len(pool) - 1 - i * step))] for i in range(n)]
    return [li.name for li in sorted(set(picks), key=pool.index)]
