"""Numeric cores of Network Dissection (Bau et al., CVPR 2017): thresholds and IoU tallies."""

from engine.dissection.quantile import TopQuantile
from engine.dissection.tally import IoUTally, LayerSummary, TallyResult, summarize, unit_masks

__all__ = ["IoUTally", "LayerSummary", "TallyResult", "TopQuantile", "summarize", "unit_masks"]
