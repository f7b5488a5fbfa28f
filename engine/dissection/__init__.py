"""Numeric cores of Network Dissection (Bau et al., CVPR 2017): thresholds and IoU tallies."""

from engine.dissection.quantile import TopQuantile
from engine.dissection.tally import IoUTally, LayerSummary, TallyResult, summarize, unit_masks

__all__ = ["IoUTally", "LayerSummary", "TallyResult", "TopQuantile", "summarize", "unit_masks"]

from engine.dissection.report import render_tiles, write_report
from engine.dissection.run import (
    DissectionParams,
    DissectionResult,
    LayerDissection,
    dissect,
    load_result,
    save_result,
)

__all__ += [
    "DissectionParams",
    "DissectionResult",
    "LayerDissection",
    "dissect",
    "load_result",
    "render_tiles",
    "save_result",
    "write_report",
]
