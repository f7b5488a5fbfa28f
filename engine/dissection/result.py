"""Network Dissection's plain-data types: the settings, one dissected layer, a whole result, and
the per-layer summary (best label per unit, detectors)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from engine.dissection.masks import TIE_FACTOR
from engine.dissection.tally import LayerSummary, summarize
from engine.types import ConvLensError

FORMAT_VERSION = 2
"""2: per-unit tie fallback and P(A >= T), passes, notes and warnings."""


CACHE_KIND = "dissection"


MaskRule = Literal["paper", "lite"]


@dataclass(frozen=True)
class DissectionParams:
    """Settings of a dissection (Bau et al. 2017 defaults).

    ``quantile``: the top fraction ``q`` of activations that a unit's mask keeps (0.005).
    ``iou_threshold``: a unit is a detector when its best IoU is above this (0.04).
    ``mask_rule``: ``"paper"`` or ``"lite"`` union rule (see :class:`IoUTally`).
    ``strict_mask``: ``M = S > T`` (NetDissect-Lite) instead of ``S >= T`` (the paper).
    ``batch_size``: images per forward pass. ``top_k``: top images kept per unit.
    ``categories``: the concept categories to score (None: all of the data set).
    ``tie_factor``: a unit whose ``P(A_k >= T_k)`` exceeds ``tie_factor * quantile`` (a mass of
    activations ties with its threshold) uses ``S > T`` instead of ``S >= T`` (see
    :mod:`engine.dissection.masks`); None applies the paper's rule literally to every unit.
    ``device``: where thresholds and tallies are computed (None: the backend's device for
    torch models, CUDA if available else CPU for ONNX models).
    ``map_budget_mb``: when the dissected layers' float32 maps of all images fit in this many
    MB they are kept in memory and the model runs once; else it runs twice (the same result).
    """

    quantile: float = 0.005
    iou_threshold: float = 0.04
    mask_rule: MaskRule = "paper"
    strict_mask: bool = False
    batch_size: int = 32
    top_k: int = 10
    categories: tuple[str, ...] | None = None
    device: str | None = None
    tie_factor: float | None = TIE_FACTOR
    map_budget_mb: float = 1024.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["categories"] = None if self.categories is None else list(self.categories)
        return d

    def result_key(self) -> dict[str, Any]:
        """The settings that change the result (batch size, device and map budget do not)."""
        d = self.to_dict()
        del d["batch_size"], d["device"], d["map_budget_mb"]
        return d

    def check(self) -> None:
        """Raise :class:`ConvLensError` for settings outside their ranges."""
        if not 0.0 < self.quantile < 1.0:
            raise ConvLensError(f"quantile must be in (0, 1), got {self.quantile}.")
        if self.mask_rule not in ("paper", "lite"):
            raise ConvLensError(f'mask_rule must be "paper" or "lite", got {self.mask_rule!r}.')
        if not self.map_budget_mb >= 0:
            raise ConvLensError(f"map_budget_mb must be >= 0, got {self.map_budget_mb}.")
        if self.tie_factor is not None and not self.tie_factor >= 1.0:
            raise ConvLensError(f"tie_factor must be >= 1 (or None), got {self.tie_factor}.")
        if self.batch_size < 1 or self.top_k < 1:
            raise ConvLensError(
                f"batch_size and top_k must be >= 1, got {self.batch_size} and {self.top_k}."
            )


@dataclass
class LayerDissection:
    """One dissected layer (plain numpy data).

    ``thresholds[k]`` is ``T_k``; ``iou[k, c]`` the IoU of unit ``k`` with global label number
    ``c`` (column 0, unlabelled, and labels outside the scored categories are 0);
    ``summary`` the best label per unit and the layer's detector counts;
    ``top_images[k]`` the concept-data-set indices of the unit's ``top_k`` images by max
    activation, best first (-1 pads when fewer images), with those maxima in ``top_values``.
    """

    layer: str
    units: int
    shape: tuple[int, ...]  # (K, h, w)
    thresholds: np.ndarray  # (K,) float64
    iou: np.ndarray  # (K, L) float64
    summary: LayerSummary
    top_images: np.ndarray  # (K, top_k) int64
    top_values: np.ndarray  # (K, top_k) float32
    tie_fallback: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """(K,) bool: the units whose threshold tied with a mass of activations
    (``P(A_k >= T_k) > tie_factor * q``), so that their masks use ``S > T`` instead of the
    paper's ``S >= T`` (see :mod:`engine.dissection.masks`); all False with ``strict_mask``."""
    at_threshold: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """(K,) float64: ``P(A_k >= T_k)`` over all positions of all images (about ``q`` for a unit
    without ties)."""


@dataclass
class DissectionResult:
    """A whole dissection. ``concept_names[c]`` / ``concept_categories[c]`` describe global
    label number ``c`` ("" for numbers that are no scored concept); ``categories`` are the
    scored categories; ``n_images`` the images dissected, ``skipped`` the ``(path, cause)`` of
    those that could not be read; ``seconds`` the time per phase (see :func:`dissect`)."""

    model: str
    model_sha256: str
    concepts_root: str
    params: DissectionParams
    layers: dict[str, LayerDissection]
    concept_names: tuple[str, ...]
    concept_categories: tuple[str, ...]
    categories: tuple[str, ...]
    n_images: int
    seconds: dict[str, float]
    skipped: tuple[tuple[str, str], ...] = ()
    input_digests: np.ndarray | None = None
    """(F, 16) uint8: content digest of each of the concept set's ``content_files()`` as
    dissected (None for results saved without them)."""
    passes: int = 2
    """Forward passes over the images: 1 when the maps were kept for the tally (they fit
    ``params.map_budget_mb``), else 2."""
    notes: tuple[str, ...] = ()
    """How the run went beyond the numbers, as sentences (passes, tie fallbacks)."""
    warnings: tuple[str, ...] = ()
    """What the user should know about the result (e.g. a 1x1 layer scored image-level)."""
    from_cache: bool = False

    def summary_line(self, layer: str) -> str:
        """``"layer4: 12/512 units are detectors covering 9 concepts"`` (the paper's per-layer count)."""
        s = self.layers[layer].summary
        return (
            f"{layer}: {s.n_detectors}/{self.layers[layer].units} units are detectors covering "
            f"{s.n_unique_concepts} concept{'' if s.n_unique_concepts == 1 else 's'}"
        )

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (layer, unit): layer, unit, category, label, iou, detector, and per
        category ``best_<cat>`` (its best label) and ``iou_<cat>``."""
        rows: list[dict[str, Any]] = []
        for name, ld in self.layers.items():
            s = ld.summary
            for k in range(ld.units):
                row: dict[str, Any] = {
                    "layer": name,
                    "unit": k,
                    "category": s.category_name[k],
                    "label": s.label_name[k],
                    "iou": float(s.iou[k]),
                    "detector": bool(s.is_detector[k]),
                }
                for g, cat in enumerate(self.categories):
                    c = int(s.category_label[k, g])
                    row[f"best_{cat}"] = self.concept_names[c] if c >= 0 else ""
                    row[f"iou_{cat}"] = float(s.category_iou[k, g])
                rows.append(row)
        return rows


def summarize_layer(iou: np.ndarray, names: Sequence[str], category_index: np.ndarray,
                    categories: Sequence[str], threshold: float) -> LayerSummary:
    """:func:`summarize` over the scored labels only (``category_index >= 0``), with label
    numbers mapped back to global ones; a unit whose IoU is 0 with every concept gets no label
    (label 0, name and category ``""``, category -1)."""
    cols = np.concatenate(([0], np.flatnonzero(category_index >= 0)))
    s = summarize(iou[:, cols], [names[c] for c in cols],
                  np.where(cols == 0, 0, category_index[cols]), categories, threshold)
    none = s.iou <= 0  # IoU 0 with every concept (e.g. a mask that is always empty): no label
    return replace(
        s,
        label=np.where(none, 0, cols[s.label]),
        label_name=tuple("" if n else name for n, name in zip(none, s.label_name, strict=True)),
        category=np.where(none, -1, s.category),
        category_name=tuple("" if n else name for n, name in zip(none, s.category_name, strict=True)),
        category_label=np.where(s.category_label >= 0, cols[np.maximum(s.category_label, 0)], -1),
    )
