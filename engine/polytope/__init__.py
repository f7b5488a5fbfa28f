"""Representative Interpretations (Lam, Chu et al., ICCV 2021): the polytope neighbour gallery.

Modules: :mod:`~engine.polytope.head` (the head as a piecewise-linear program: checks, patterns,
local affine maps), :mod:`~engine.polytope.scsc` (bitsets, the SCSC greedy, ranking, baselines;
numpy only), :mod:`~engine.polytope.run` (the job, its result, caching), :mod:`~engine.polytope.figure`
(the gallery figure), :mod:`~engine.polytope.cli` (``convlens polytope``). This package imports
neither torch nor numpy-heavy modules at import time: the names below load on first use.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "PolytopeParams": "engine.polytope.run",
    "PolytopeResult": "engine.polytope.run",
    "run": "engine.polytope.run",
    "save_result": "engine.polytope.run",
    "load_result": "engine.polytope.run",
    "CACHE_KIND": "engine.polytope.run",
    "FORMAT_VERSION": "engine.polytope.run",
    "HeadProgram": "engine.polytope.head",
    "NotPiecewiseLinearError": "engine.polytope.head",
    "default_layer": "engine.polytope.head",
    "scsc_greedy": "engine.polytope.scsc",
    "gallery_figure": "engine.polytope.figure",
}

__all__ = ["CACHE_KIND", "FORMAT_VERSION", "HeadProgram", "NotPiecewiseLinearError", "PolytopeParams",
           "PolytopeResult", "default_layer", "gallery_figure", "load_result", "run", "save_result", "scsc_greedy"]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'engine.polytope' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value
