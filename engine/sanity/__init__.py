"""The weight-randomisation sanity check (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018) for every explanation ConvLens makes.

:mod:`.randomise` (cascading and independent randomisation on a copy of the model),
:mod:`.similarity` (Spearman rank correlation, SSIM, label agreement, Jaccard; numpy only),
:mod:`.explanations` (one adapter per explanation: recompute it on a model, compare it),
:mod:`.run` (params, the cached job, the result, save/load), :mod:`.figure` (the
similarity-vs-randomised-layer figure, PIL), :mod:`.cli` (``convlens sanity``). Importing this
package imports neither torch nor its submodules: the names below load on first use (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SanityParams": "run", "SanityResult": "run", "run": "run", "save_result": "run", "load_result": "run",
    "CACHE_KIND": "run", "FORMAT_VERSION": "run",
    "EXPLANATIONS": "explanations", "EVIDENCE_METHODS": "explanations", "supported": "explanations",
    "unit_heatmaps": "explanations",
    "weight_layers": "randomise", "randomise_layer": "randomise", "randomised_backends": "randomise",
    "steps": "randomise",
    "map_similarity": "similarity", "rank_correlation": "similarity", "ssim_rows": "similarity",
    "sanity_figure": "figure",
}
__all__ = [str(name) for name in sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'engine.sanity' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
