"""The transformation probe (Worrall et al., ICCV 2017; Remelli et al., CVPR 2020): sweep a
rotation, translation, scale or brightness change over images and measure, per layer, the
features' invariance, the units' response curves, the predictions, and whether the change acts
as a linear map in feature space that composes.

Modules: :mod:`~engine.probes.transforms` (the image transformations; numpy and scipy),
:mod:`~engine.probes.run` (the job, its result, caching), :mod:`~engine.probes.figure` (PNG
figures, PIL), :mod:`~engine.probes.cli` (``convlens probe``). Names load on first use.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ProbeParams": "engine.probes.run",
    "ProbeResult": "engine.probes.run",
    "run": "engine.probes.run",
    "save_result": "engine.probes.run",
    "load_result": "engine.probes.run",
    "CACHE_KIND": "engine.probes.run",
    "FORMAT_VERSION": "engine.probes.run",
    "fit_map": "engine.probes.run",
    "sweep_views": "engine.probes.run",
    "TRANSFORMS": "engine.probes.transforms",
    "FILLS": "engine.probes.transforms",
    "apply": "engine.probes.transforms",
    "parse_range": "engine.probes.transforms",
}

__all__ = ["CACHE_KIND", "FILLS", "FORMAT_VERSION", "TRANSFORMS", "ProbeParams", "ProbeResult", "apply", "fit_map",
           "load_result", "parse_range", "run", "save_result", "sweep_views"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'engine.probes' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
