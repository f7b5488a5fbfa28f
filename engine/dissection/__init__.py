"""Network Dissection (Bau et al., CVPR 2017): thresholds and IoU tallies (numpy), the run over a
model's layers and its report.

A distributed driver (``engine.cluster``) runs :func:`dissect` with its own
:class:`PassStrategy` (where the two passes run) over the public pass functions of
:mod:`engine.dissection.passes` (``compute_device``, ``partial_pass1``, ``pass1``, ``pass2``).

The names load on first use (PEP 562): ``import engine.dissection`` imports neither torch nor the
report code, so the ``dissect`` command's parser (``engine.dissection.cli``) costs nothing until
the command runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "TopQuantile": "quantile",
    "IoUTally": "tally",
    "LayerSummary": "tally",
    "TallyResult": "tally",
    "summarize": "tally",
    "unit_masks": "tally",
    "layer_masks": "masks",
    "mask_cuts": "masks",
    "render_tiles": "report",
    "write_report": "report",
    "DissectionInputs": "run",
    "DissectionParams": "run",
    "DissectionResult": "run",
    "LayerDissection": "run",
    "LocalPasses": "run",
    "PassStrategy": "run",
    "dissect": "run",
    "load_result": "run",
    "save_result": "run",
}

__all__ = [
    "DissectionInputs",
    "DissectionParams",
    "DissectionResult",
    "IoUTally",
    "LayerDissection",
    "LayerSummary",
    "LocalPasses",
    "PassStrategy",
    "TallyResult",
    "TopQuantile",
    "dissect",
    "layer_masks",
    "load_result",
    "mask_cuts",
    "render_tiles",
    "save_result",
    "summarize",
    "unit_masks",
    "write_report",
]

if TYPE_CHECKING:  # the same names for type checkers, imported eagerly
    from engine.dissection.masks import layer_masks as layer_masks
    from engine.dissection.masks import mask_cuts as mask_cuts
    from engine.dissection.quantile import TopQuantile as TopQuantile
    from engine.dissection.report import render_tiles as render_tiles
    from engine.dissection.report import write_report as write_report
    from engine.dissection.run import DissectionInputs as DissectionInputs
    from engine.dissection.run import DissectionParams as DissectionParams
    from engine.dissection.run import DissectionResult as DissectionResult
    from engine.dissection.run import LayerDissection as LayerDissection
    from engine.dissection.run import LocalPasses as LocalPasses
    from engine.dissection.run import PassStrategy as PassStrategy
    from engine.dissection.run import dissect as dissect
    from engine.dissection.run import load_result as load_result
    from engine.dissection.run import save_result as save_result
    from engine.dissection.tally import IoUTally as IoUTally
    from engine.dissection.tally import LayerSummary as LayerSummary
    from engine.dissection.tally import TallyResult as TallyResult
    from engine.dissection.tally import summarize as summarize
    from engine.dissection.tally import unit_masks as unit_masks


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
