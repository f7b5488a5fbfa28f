"""Inference graphs for CNN interpretation (Konforti, Shpigler, Lerner, Bar Hillel; ECCV 2020).

Per modelled layer a diagonal Gaussian mixture over the spatial columns (:mod:`.gmm`), visual
words and transition statistics between consecutive layers (:mod:`.transitions`), the fit job
and the explanations (:mod:`.model`), a static figure (:mod:`.figure`), the ``graph`` command
(:mod:`.cli`). Importing this package imports neither torch nor the submodules: the names below
load on first use (PEP 562), so the CLI can build its ``--help`` cheaply.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "GraphParams": "model", "GraphFit": "model", "LayerModel": "model", "GraphExplanation": "model",
    "run": "model", "explain": "model", "save_result": "model", "load_result": "model", "image_words": "model",
    "default_k": "model", "graph_key": "model", "CACHE_KIND": "model", "FORMAT_VERSION": "model",
    "Mixture": "gmm", "SuffStats": "gmm", "EMSettings": "gmm", "fit_gmm": "gmm", "assign": "gmm",
    "e_step": "gmm", "m_step": "gmm", "ArraySource": "gmm",
    "TransitionTable": "transitions", "transition_counts": "transitions", "window_bounds": "transitions",
    "select_nodes": "transitions", "build_graph": "transitions", "layout": "transitions",
    "render_graph": "figure",
}

__all__ = [str(name) for name in sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'engine.graphs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"engine.graphs.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
