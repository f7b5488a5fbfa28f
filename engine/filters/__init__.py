"""Interpretable CNNs (Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018).

* :mod:`.templates` — the templates and the mutual-information filter loss in numpy (direct
  evaluation, for metrics and tests); :mod:`.layer` — the interpretable filter layer
  (:class:`InterpretableMask`) and the differentiable loss :func:`filter_loss` in PyTorch;
* :mod:`.convert` — conversion of a loaded torch model at a top conv layer, on a copy;
* :mod:`.metrics` — per-filter metrics of any model and spatial layer (category, inter-category
  and spatial entropy, location instability, part interpretability), a cached job;
* :mod:`.train` — the training job (task loss + weighted filter loss; the same job without the
  filter loss is the ordinary baseline), checkpoints ConvLens opens;
* :mod:`.compare` — one filter of several models (the start model and the trained ones, each
  opened as its own backend) on the same images, side by side, a cached job;
* :mod:`.cli` — ``convlens filters metrics`` / ``convlens filters train``.

Importing this package imports neither torch nor its submodules: names are re-exported lazily
(PEP 562), so building the command line's ``--help`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FilterParams": "templates", "templates": "templates", "mi_terms": "templates",
    "InterpretableMask": "layer", "filter_loss": "layer",
    "ConversionSpec": "convert", "convert": "convert", "convert_copy": "convert", "rebuild": "convert",
    "MetricsParams": "metrics", "FilterMetrics": "metrics", "filter_metrics": "metrics",
    "save_result": "metrics", "load_result": "metrics", "CACHE_KIND": "metrics", "FORMAT_VERSION": "metrics",
    "TrainParams": "train", "train_filters": "train", "TrainResult": "train",
    "MapSource": "compare", "FilterMaps": "compare", "filter_maps": "compare",
}

__all__ = [
    "CACHE_KIND", "FORMAT_VERSION", "ConversionSpec", "FilterMaps", "FilterMetrics", "FilterParams",
    "InterpretableMask", "MapSource", "MetricsParams", "TrainParams", "TrainResult", "convert", "convert_copy",
    "filter_loss", "filter_maps", "filter_metrics",
    "load_result", "mi_terms", "rebuild", "save_result", "templates", "train_filters",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.filters' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
