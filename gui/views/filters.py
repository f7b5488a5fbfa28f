"""Interpretable filters (Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018).

The dock runs the engine's filter metrics (:mod:`engine.filters.metrics`) on one spatial layer
of the open model, and the training job (:mod:`engine.filters.train`) that fine-tunes a
converted copy with the filter loss, and the ordinary baseline from the same start.

*Data*: the open image set (with an optional landmark CSV ``image,landmark,x,y`` for location
instability and an optional Broden-layout folder with a ``part`` category for part
interpretability), or the built-in part data set (:mod:`engine.concepts.parts`, generated on
first use into the cache; metrics on its ``val.csv`` with its landmarks and part masks,
training on ``train.csv`` with ``val.csv`` for validation accuracy).

*Metrics*: "Run metrics" submits one job through ``ctx.session.run`` (key
``"filters-metrics"``; a new run supersedes the previous one). The result fills a sortable
table with one row per filter (category, inter-category entropy, spatial entropy, location
instability, best part and its IoU), headline numbers and a histogram of both entropies.
Clicking a row sets ``ctx.selection.layer`` / ``unit`` so the Heatmaps view shows the filter;
a filter selected elsewhere selects its row.

*Training*: the start model is the open model (a PyTorch model whose classes the training
images carry) or a new PartNet (:mod:`engine.filters.partnet`, seeded random start, 48 px,
converted at its top conv layer ``relu4``) for the built-in part data. One job measures the
start model, trains the interpretable CNN and then the ordinary baseline (same start, data
order and budget) into ``<cache>/filters-train/<settings hash>/{interpretable,ordinary}``
(resumable: the engine resumes from a matching checkpoint), and measures both trained models
at the converted layer (``<layer>.mask``) on the same data. Live curves (pyqtgraph): the task
and filter loss per batch of each run and the train / validation accuracy per epoch, from the
engine's typed progress (:class:`engine.jobs.DataProgress` ``data``, see
:func:`engine.filters.train.train_filters`; nothing is parsed from progress text). "Cancel" stops
between batches. The comparison tab shows the three models' headline numbers and, per filter
index, the start model's metrics beside both trained ones (the side-by-side table). The session
holds one model, so a trained model is not opened beside the original: "Open interpretable" /
"Open ordinary" / "Back to the start model" open it *in place of* the model now open (its
TorchScript file) and select the same image, the measured layer and the same filter index, so
the heatmaps show that filter in each model in turn. The status line names the checkpoint
folders, each with a ``model.toml`` that File > Open model reads.

*Side by side* (the tab beside the curves): the selected filter (comparison row, or the
selection's unit at the trained layer) on the selected image in the start model (``<layer>``) and
the trained ones (``<layer>.mask``), computed by :func:`engine.filters.compare.filter_maps` on the
runner (key ``"filters-side"``, cancellable, cached), each model opened as its own backend from
the files the job measured (the session's model stays), with each panel's own max or one shared
max as the colour scale (:data:`SCALES`, stated on the panels) and the filter's metrics in each
model as captions.

*Figures*: ``metrics`` (headline numbers, histograms of the entropies and of part IoU, the
most interpretable filters), ``training`` (the loss and accuracy curves, the comparison table
and the side-by-side panels) and ``side`` (the side-by-side panels with their colour bars).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPaintEvent, QPen, QPolygonF
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from engine.types import ConvLensError, Progress

from .. import colormaps
from ..context import AppContext
from ..figures import BarChart, Element, Figure, FigureKind, FigureOption, FigureOptions, Legend, Row, Stack, Text
from ..figures.model import CAPTION_PT, INK, MUTED, ColorBar, Picture, font, metrics, resample
from ..jobs import JobHandle
from ..tiles import decode_view, to_qimage, upsample
from ..widgets.result_table import Column, ResultTable
from .base import View

__all__ = ["COLUMNS", "COMPARISON_COLUMNS", "SCALES", "SIDE_RUNS", "FiltersView", "LineChart", "TrainProgress"]

COLUMNS: tuple[Column, ...] = (
    Column("filter", "Filter", "int"),
    Column("category", "Category", searchable=True),
    Column("inter", "Inter-cat. H", "float", format=".4f",
           tooltip="H(T'|X): how much the filter fires on images of other categories (lower: one category)"),
    Column("spatial", "Spatial H", "float", format=".4f",
           tooltip="How spread the filter's activation is over positions (lower: one place)"),
    Column("instability", "Instab.", "float", format=".4f",
           tooltip="Std of the landmark-to-peak distance / image diagonal over the top images (needs landmarks)"),
    Column("part", "Part", searchable=True),
    Column("part_iou", "Part IoU", "float", format=".3f", tooltip="IoU of the filter's mask with its best part"),
)
"""The per-filter table's columns."""

RUNS = ("original", "ordinary", "interpretable")
_SHORT = {"original": "start", "ordinary": "ord.", "interpretable": "interp."}
COMPARED: dict[str, str] = {"spatial": "spatial entropy", "inter": "inter-category entropy",
                            "instability": "location instability", "part_iou": "part IoU"}
"""The metrics the comparison table can show, key -> name."""
COMPARISON_COLUMNS: tuple[Column, ...] = (
    Column("filter", "Filter", "int"),
    Column("original", "Start", "float", format=".4f", tooltip="The start model at the chosen layer"),
    Column("ordinary", "Ordinary", "float", format=".4f", tooltip="Trained without the filter loss, at <layer>.mask"),
    Column("interpretable", "Interp.", "float", format=".4f",
           tooltip="Trained with the filter loss, at <layer>.mask"),
    Column("change", "Δ i − o", "float", format="+.4f"),
)
"""The comparison table: per filter index, the start model's and both trained models' metrics."""

BUILTIN_SIZE = 48
PARTNET_LAYER = "relu4"
NEED_MODEL = "Load a model to measure its filters."
_RUN_COLORS: dict[str, str] = {"interpretable": "#d62728", "ordinary": "#1f77b4", "original": "#7f7f7f"}
SIDE_RUNS = ("original", "interpretable", "ordinary")
"""The side-by-side panels' order: the start model, then the trained ones."""
_SIDE_LABEL = {"original": "start model", "interpretable": "interpretable", "ordinary": "ordinary"}
SCALES: dict[str, str] = {"own": "each panel its own max", "shared": "one max shared by the panels"}
"""The side-by-side colour scales: 0 to each map's max on the image, or to the largest of them."""
SIDE_CMAP = "inferno"
SIDE_OPACITY = 0.6


# --------------------------------------------------------------------------------------------
# training progress: what the job reports beside the engine's Progress
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainProgress(Progress):
    """Progress of the training job with the curves so far (a snapshot: the runner may drop
    intermediate reports, each one carries everything up to now)."""

    run: str = ""
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _empty_curves() -> dict[str, list[float]]:
    return {"task_loss": [], "filter_loss": [], "train_accuracy": [], "val_accuracy": []}


def _snapshot(curves: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    return {run: {k: list(v) for k, v in c.items()} for run, c in curves.items()}


# --------------------------------------------------------------------------------------------
# a line chart element for figures
# --------------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, count: int = 4, integer: bool = False) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    if integer:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


@dataclass
class LineChart(Element):
    """Line series on shared axes (x: 1-based index unless ``xs`` given), ticks, labels, legend."""

    series: Sequence[tuple[str, Sequence[float], QColor]]
    x_label: str = ""
    y_label: str = ""
    title: str = ""
    plot_height: float = 90.0
    xs: Sequence[Sequence[float]] | None = None
    dashed: Sequence[bool] = ()  # per series

    def _points(self) -> list[list[tuple[float, float]]]:
        out = []
        for j, (_n, ys, _c) in enumerate(self.series):
            xs = self.xs[j] if self.xs is not None else [i + 1.0 for i in range(len(ys))]
            out.append([(float(x), float(y)) for x, y in zip(xs, ys, strict=False) if math.isfinite(y)])
        return out

    def _legend(self) -> Legend:
        return Legend([(n, c) for n, _v, c in self.series])

    def height(self, width: float, dpi: int) -> float:
        fm = metrics(font(CAPTION_PT))
        title = fm.height() + 3 if self.title else 0
        bottom = fm.height() + 3 + (fm.height() + 2 if self.x_label else 0)
        return title + self.plot_height + bottom + self._legend().height(width, dpi) + 3

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        f, fb = font(CAPTION_PT), font(CAPTION_PT, True)
        fm = metrics(f)
        y = rect.top()
        painter.setFont(fb)
        painter.setPen(INK)
        if self.title:
            painter.drawText(QRectF(rect.left(), y, rect.width(), fm.height() + 1), int(Qt.AlignmentFlag.AlignLeft),
                             self.title)
            y += fm.height() + 3
        pts = self._points()
        flat = [p for s in pts for p in s]
        xlo, xhi = (min(p[0] for p in flat), max(p[0] for p in flat)) if flat else (0.0, 1.0)
        ylo, yhi = (min(p[1] for p in flat), max(p[1] for p in flat)) if flat else (0.0, 1.0)
        if xhi - xlo < 1e-12:
            xlo, xhi = xlo - 0.5, xhi + 0.5
        if yhi - ylo < 1e-12:
            ylo, yhi = ylo - 0.5, yhi + 0.5
        pad = (yhi - ylo) * 0.05
        ylo, yhi = ylo - pad, yhi + pad
        yt = _ticks(ylo, yhi)
        xt = _ticks(xlo, xhi, integer=all(float(p[0]).is_integer() for p in flat))
        left = max(fm.horizontalAdvance(f"{t:.3g}") for t in yt) + 5 + (fm.height() + 2 if self.y_label else 0)
        plot = QRectF(rect.left() + left, y, rect.width() - left - 4, self.plot_height)

        def to(px: float, py: float) -> QPointF:
            return QPointF(plot.left() + plot.width() * (px - xlo) / (xhi - xlo),
                           plot.bottom() - plot.height() * (py - ylo) / (yhi - ylo))

        painter.setFont(f)
        painter.setPen(QPen(QColor(225, 225, 225), 0.5))
        for t in yt:
            painter.drawLine(to(xlo, t), to(xhi, t))
        painter.setPen(QPen(INK, 0.7))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawRect(plot)
        for t in yt:
            p = to(xlo, t)
            painter.drawText(QRectF(rect.left(), p.y() - fm.height() / 2, left - 4, fm.height()),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"{t:.3g}")
        for t in xt:
            p = to(t, ylo)
            painter.drawLine(p, QPointF(p.x(), p.y() + 2))
            painter.drawText(QRectF(p.x() - 30, plot.bottom() + 2, 60, fm.height()),
                             int(Qt.AlignmentFlag.AlignHCenter), f"{t:.4g}")
        if self.x_label:
            painter.setPen(MUTED)
            painter.drawText(QRectF(plot.left(), plot.bottom() + fm.height() + 3, plot.width(), fm.height() + 1),
                             int(Qt.AlignmentFlag.AlignHCenter), self.x_label)
        if self.y_label:
            painter.save()
            painter.setPen(MUTED)
            painter.translate(rect.left(), plot.center().y())
            painter.rotate(-90)
            painter.drawText(QRectF(-plot.height() / 2, 0, plot.height(), fm.height() + 1),
                             int(Qt.AlignmentFlag.AlignHCenter), self.y_label)
            painter.restore()
        for j, (s, (_n, _v, color)) in enumerate(zip(pts, self.series, strict=True)):
            pen = QPen(color, 1.2)
            if j < len(self.dashed) and self.dashed[j]:
                pen.setStyle(Qt.PenStyle.DashLine)
            painter.setPen(pen)
            if len(s) > 1:
                painter.drawPolyline(QPolygonF([to(px, py) for px, py in s]))
            elif s:
                painter.setBrush(color)
                painter.drawEllipse(to(*s[0]), 1.5, 1.5)
                painter.setBrush(Qt.BrushStyle.NoBrush)
        bottom = plot.bottom() + fm.height() + 3 + (fm.height() + 2 if self.x_label else 0)
        legend = self._legend()
        legend.paint(painter, QRectF(plot.left(), bottom, plot.width(), legend.height(plot.width(), dpi)), dpi)


class MapPanel(QWidget):
    """One side-by-side panel: an image scaled to fit (aspect kept, whole area), no interpolation
    of the map beyond what :func:`side_overlay` did."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.image: QImage | None = None
        self.setMinimumSize(56, 56)

    def set_rgb(self, rgb: np.ndarray | None) -> None:
        self.image = None if rgb is None else to_qimage(rgb)
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        if self.image is None:
            painter.fillRect(self.rect(), QColor(235, 235, 235))
            return
        iw, ih = self.image.width(), self.image.height()
        scale = min(self.width() / iw, self.height() / ih)
        w, h = iw * scale, ih * scale
        target = QRectF((self.width() - w) / 2, (self.height() - h) / 2, w, h)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        painter.drawImage(target, self.image)


# --------------------------------------------------------------------------------------------
# the view
# --------------------------------------------------------------------------------------------


class FiltersView(View):
    """Filter metrics, interpretable training and the comparison; see the module docstring."""

    title = "Interpretable filters"
    object_name = "filters"
    sanity_explanation = "filters"
    order = 40

    #: filter metrics finished and are shown (engine FilterMetrics)
    metrics_ready = Signal(object)
    #: the curves changed (a TrainProgress arrived)
    curves_changed = Signal()
    #: training and the comparison finished (dict, see :meth:`_train_finished`)
    training_done = Signal(object)
    #: the side-by-side maps of the selected filter and image are shown (engine FilterMaps)
    side_ready = Signal(object)

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.result: Any = None  # engine FilterMetrics on the table
        self.data_note = ""  # what data the metrics ran on
        self.curves: dict[str, dict[str, list[float]]] = {}
        self.comparison: dict[str, Any] | None = None
        self.opened_run = ""  # which model of the comparison the session has open ("" none of them)
        self._handle: JobHandle | None = None
        self._train_handle: JobHandle | None = None
        self._syncing = False
        self._result_model = ""  # sha256 of the model the shown metrics measured
        self.side_filter: int | None = None  # the filter index the side-by-side panels show
        self.side_maps: Any = None  # engine FilterMaps on the panels
        self._side_image = ""  # the path of the image the panels show
        self._side_handle: JobHandle | None = None
        self._side_timer = QTimer(self)
        self._side_timer.setSingleShot(True)
        self._side_timer.setInterval(0)
        self._side_timer.timeout.connect(self.refresh_side_by_side)
        self._build()
        ctx.session.model_loaded.connect(self._model_loaded)
        ctx.selection.unit_changed.connect(self._selection_changed)
        ctx.selection.layer_changed.connect(self._selection_changed)
        ctx.selection.unit_changed.connect(self._side_selection_changed)
        ctx.selection.layer_changed.connect(self._side_selection_changed)
        ctx.selection.current_image_changed.connect(self._side_selection_changed)
        ctx.selection.images_changed.connect(self._side_selection_changed)
        if ctx.session.model is not None:
            self._model_loaded(ctx.session.model)
        self._update_controls()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.layer_combo = QComboBox()
        self.layer_combo.setToolTip("The spatial layer whose filters are measured (and, for the open model, trained)")
        self.layer_combo.setMinimumContentsLength(12)
        self.layer_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.data_combo = QComboBox()
        self.data_combo.addItem("Open image set", "images")
        self.data_combo.addItem("Built-in part data", "builtin")
        self.data_combo.currentIndexChanged.connect(lambda _i: self._update_controls())
        self.n_images_spin = QSpinBox()
        self.n_images_spin.setRange(3, 100_000)
        self.n_images_spin.setSingleStep(100)
        self.n_images_spin.setValue(300)
        self.n_images_spin.setSuffix(" images")
        self.n_images_spin.setToolTip(f"Images of the built-in part set ({BUILTIN_SIZE} px; every fifth is val)")
        self.landmarks_edit = QLineEdit()
        self.landmarks_edit.setPlaceholderText("optional: CSV image,landmark,x,y")
        self.landmarks_button = QPushButton("…")
        self.landmarks_button.setToolTip("Choose a landmark CSV")
        self.landmarks_button.clicked.connect(self._choose_landmarks)
        self.parts_edit = QLineEdit()
        self.parts_edit.setPlaceholderText("optional: Broden folder with a 'part' category")
        self.parts_button = QPushButton("…")
        self.parts_button.setToolTip("Choose a part-mask folder")
        self.parts_button.clicked.connect(self._choose_parts)
        self.run_button = QPushButton("Run metrics")
        self.run_button.clicked.connect(self.run_metrics)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_metrics)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel()
        self.status.setWordWrap(True)

        lm = QHBoxLayout()
        lm.addWidget(self.landmarks_edit, 1)
        lm.addWidget(self.landmarks_button)
        pm = QHBoxLayout()
        pm.addWidget(self.parts_edit, 1)
        pm.addWidget(self.parts_button)
        data_row = QHBoxLayout()
        data_row.addWidget(self.data_combo, 1)
        data_row.addWidget(self.n_images_spin)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)
        metrics_box = QWidget()
        mg = QGridLayout(metrics_box)  # two columns: the dock stays short enough for 1024x640
        mg.addWidget(QLabel("Layer"), 0, 0)
        mg.addWidget(self.layer_combo, 0, 1)
        mg.addWidget(QLabel("Data"), 0, 2)
        mg.addLayout(data_row, 0, 3)
        mg.addLayout(buttons, 1, 0, 1, 4)  # Run stays visible without scrolling
        mg.addWidget(QLabel("Landmarks"), 2, 0)
        mg.addLayout(lm, 2, 1)
        mg.addWidget(QLabel("Parts"), 2, 2)
        mg.addLayout(pm, 2, 3)
        mg.addWidget(self.status, 3, 0, 1, 4)
        mg.setColumnStretch(1, 1)
        mg.setColumnStretch(3, 1)

        self.start_combo = QComboBox()
        self.start_combo.addItem("Open model", "model")
        self.start_combo.addItem("New PartNet", "partnet")
        self.start_combo.setToolTip("The common start of both runs: the open PyTorch model, or a new seeded "
                                    f"PartNet converted at {PARTNET_LAYER}")
        self.start_combo.currentIndexChanged.connect(lambda _i: self._update_controls())
        self.epochs_spin = QSpinBox()
        self.epochs_spin.setRange(1, 1000)
        self.epochs_spin.setValue(5)
        self.batch_spin = QSpinBox()
        self.batch_spin.setRange(1, 4096)
        self.batch_spin.setValue(32)
        self.lr_spin = QDoubleSpinBox()
        self.lr_spin.setDecimals(5)
        self.lr_spin.setRange(1e-5, 1.0)
        self.lr_spin.setSingleStep(1e-4)
        self.lr_spin.setValue(1e-3)
        self.weight_spin = QDoubleSpinBox()
        self.weight_spin.setDecimals(3)
        self.weight_spin.setRange(0.0, 1e4)
        self.weight_spin.setValue(1.0)
        self.weight_spin.setToolTip("Filter loss weight before the paper's 1/t schedule")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.train_button = QPushButton("Train")
        self.train_button.setToolTip("Train the interpretable CNN and the ordinary baseline from the same start")
        self.train_button.clicked.connect(self.train)
        self.train_cancel = QPushButton("Cancel")
        self.train_cancel.clicked.connect(self.cancel_training)
        self.train_progress = QProgressBar()
        self.train_progress.setRange(0, 1000)
        self.train_status = QLabel()
        self.train_status.setWordWrap(True)
        self.train_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        tgrid = QGridLayout()
        for i, (label, w) in enumerate((("Start", self.start_combo), ("Epochs", self.epochs_spin),
                                        ("Batch", self.batch_spin), ("LR", self.lr_spin),
                                        ("Weight", self.weight_spin), ("Seed", self.seed_spin))):
            r, c = divmod(i, 3)
            tgrid.addWidget(QLabel(label), r, 2 * c)
            tgrid.addWidget(w, r, 2 * c + 1)
        for w in (self.epochs_spin, self.batch_spin, self.lr_spin, self.weight_spin, self.seed_spin):
            w.setMaximumWidth(110)
        tgrid.addWidget(self.train_button, 0, 6)  # beside the settings: visible without scrolling
        tgrid.addWidget(self.train_cancel, 1, 6)
        for col in (1, 3, 5):
            tgrid.setColumnStretch(col, 1)
        tbuttons = QHBoxLayout()
        tbuttons.addWidget(self.train_progress, 1)
        train_box = QWidget()
        tv = QVBoxLayout(train_box)
        tv.setContentsMargins(0, 0, 0, 0)
        tv.addLayout(tgrid)
        tv.addLayout(tbuttons)
        tv.addWidget(self.train_status)
        settings = metrics_box

        # metrics tab: headline numbers, entropy histogram, the table
        self.summary_label = QLabel()
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.hist = _plot("filters", "entropy (bits)")
        self.hist.setTitle("<span style='color:#1f77b4'>inter-category</span> and "
                           "<span style='color:#ff7f0e'>spatial</span> entropy", color="k", size="9pt")
        self.filter_table = ResultTable(COLUMNS, row_id="filter", placeholder="Filter by category or part…",
                                        sort=("filter", False))
        self.filter_table.row_selected.connect(self._row_selected)
        self.table, self.model, self.proxy = self.filter_table.view, self.filter_table.model, self.filter_table.proxy
        top = QWidget()
        tl = QHBoxLayout(top)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addWidget(self.summary_label, 1)
        tl.addWidget(self.hist, 1)
        metrics_tab = QSplitter(Qt.Orientation.Vertical)
        metrics_tab.addWidget(top)
        metrics_tab.addWidget(self.filter_table)
        metrics_tab.setStretchFactor(0, 1)
        metrics_tab.setStretchFactor(1, 2)
        metrics_tab.setChildrenCollapsible(False)

        # training tab: curves, the comparison
        self.loss_plot = _plot("task loss", "batch")
        self.loss_plot.setTitle("Loss per batch", color="k", size="9pt")
        self.acc_plot = _plot("accuracy", "epoch")
        self.acc_plot.setTitle("Accuracy per epoch", color="k", size="9pt")
        self._lines: dict[tuple[str, str], pg.PlotDataItem] = {}
        for run in ("interpretable", "ordinary"):
            color = _RUN_COLORS[run]
            self._lines[(run, "task_loss")] = self.loss_plot.plot([], [], pen=pg.mkPen(color, width=1.5),
                                                                  name=f"{run}: task")
            self._lines[(run, "filter_loss")] = self.loss_plot.plot(
                [], [], pen=pg.mkPen(color, width=1, style=Qt.PenStyle.DashLine), name=f"{run}: filter")
            self._lines[(run, "train_accuracy")] = self.acc_plot.plot(
                [], [], pen=pg.mkPen(color, width=1.5), symbol="o", symbolSize=5, symbolBrush=color,
                name=f"{run}: train")
            self._lines[(run, "val_accuracy")] = self.acc_plot.plot(
                [], [], pen=pg.mkPen(color, width=1, style=Qt.PenStyle.DashLine), symbol="t", symbolSize=5,
                symbolBrush=color, name=f"{run}: val")
        curves = QWidget()
        cl = QHBoxLayout(curves)
        cl.setContentsMargins(0, 0, 0, 0)
        cl.addWidget(self.loss_plot, 1)
        cl.addWidget(self.acc_plot, 1)
        self.curves_legend = QLabel(
            f"<span style='color:{_RUN_COLORS['interpretable']}'>■ interpretable</span> &nbsp; "
            f"<span style='color:{_RUN_COLORS['ordinary']}'>■ ordinary</span> &nbsp; solid: task loss, train "
            "acc. &nbsp; dashed: filter loss, val acc.")
        self.curves_legend.setWordWrap(True)
        curves_box = QWidget()
        cbl = QVBoxLayout(curves_box)
        cbl.setContentsMargins(0, 0, 0, 0)
        cbl.addWidget(curves, 1)
        cbl.addWidget(self.curves_legend)
        self.compare_label = QLabel("Train to compare the start model with both trained models, filter by filter.")
        self.compare_label.setWordWrap(True)
        self.compare_label.setTextFormat(Qt.TextFormat.RichText)
        self.compare_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # the session holds one model: "open" replaces it, keeping the image, the filter index and
        # the layer, so that the heatmaps show the same filter of the same image in each model in turn
        self.open_buttons: dict[str, QPushButton] = {}
        open_row = QHBoxLayout()
        open_row.setContentsMargins(0, 0, 0, 0)
        for run, text in (("interpretable", "Open interpretable"), ("ordinary", "Open ordinary"),
                          ("original", "Back to the start model")):
            b = QPushButton(text)
            b.setToolTip(f"Open the {run} model in place of the model now open (the session holds one model), "
                         "keeping the selected image, layer and filter index")
            b.clicked.connect(lambda _c=False, r=run: self.open_run_model(r))
            b.setEnabled(False)
            self.open_buttons[run] = b
            open_row.addWidget(b)
        open_row.addStretch(1)
        compare_box = QWidget()
        cbox = QVBoxLayout(compare_box)
        cbox.setContentsMargins(0, 0, 0, 0)
        cbox.addLayout(open_row)
        cbox.addWidget(self.compare_label)
        cbox.addStretch(1)
        compare_scroll = QScrollArea()
        compare_scroll.setWidget(compare_box)
        compare_scroll.setWidgetResizable(True)
        compare_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        compare_scroll.setMinimumHeight(36)
        self.compare_combo = QComboBox()
        for key, name in COMPARED.items():
            self.compare_combo.addItem(name, key)
        self.compare_combo.setToolTip("The metric the table shows for the three models")
        self.compare_combo.currentIndexChanged.connect(lambda _i: self._fill_comparison())
        self.compare_table = ResultTable(COMPARISON_COLUMNS, row_id="filter", sort=("filter", False))
        self.compare_table.add_filter_widget(self.compare_combo)
        self.compare_table.row_selected.connect(self._compare_selected)
        lower = QSplitter(Qt.Orientation.Horizontal)
        lower.addWidget(compare_scroll)
        lower.addWidget(self.compare_table)
        lower.setStretchFactor(0, 1)
        lower.setStretchFactor(1, 1)
        lower.setChildrenCollapsible(False)
        # side by side: the selected filter on the selected image in each model, as its own backend
        self.scale_combo = QComboBox()
        for key, name in SCALES.items():
            self.scale_combo.addItem(name, key)
        self.scale_combo.setToolTip("Colour scale of the side-by-side maps: 0 to each map's own max on this image, "
                                    "or 0 to the largest of them (values below 0 show as 0)")
        self.scale_combo.currentIndexChanged.connect(lambda _i: self._render_side())
        self.side_cancel = QPushButton("Cancel")
        self.side_cancel.setToolTip("Stop computing the side-by-side maps")
        self.side_cancel.clicked.connect(self.cancel_side_by_side)
        self.side_progress = QProgressBar()
        self.side_progress.setRange(0, 1000)
        self.side_status = QLabel("Train (or pick a filter in the comparison) to see one filter of the selected "
                                  "image in each model, side by side.")
        self.side_status.setWordWrap(True)
        self.side_status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.side_panels: dict[str, MapPanel] = {}
        self.side_captions: dict[str, QLabel] = {}
        panels = QWidget()
        pl = QHBoxLayout(panels)
        pl.setContentsMargins(0, 0, 0, 0)
        for run in SIDE_RUNS:
            box = QWidget()
            bl = QVBoxLayout(box)
            bl.setContentsMargins(0, 0, 0, 0)
            bl.setSpacing(2)
            panel = MapPanel()
            caption = QLabel()
            caption.setWordWrap(True)
            caption.setAlignment(Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop)
            caption.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            small = caption.font()
            small.setPointSizeF(max(6.5, small.pointSizeF() - 1))
            caption.setFont(small)
            bl.addWidget(panel, 1)
            bl.addWidget(caption)
            self.side_panels[run], self.side_captions[run] = panel, caption
            box.setVisible(False)
            pl.addWidget(box, 1)
        side_top = QHBoxLayout()
        side_top.addWidget(QLabel("Colour scale"))
        side_top.addWidget(self.scale_combo)
        side_top.addWidget(self.side_cancel)
        side_top.addWidget(self.side_progress, 1)
        side_top.addStretch(1)
        side_box = QWidget()
        sbl = QVBoxLayout(side_box)
        sbl.setContentsMargins(0, 0, 0, 0)
        sbl.setSpacing(3)
        sbl.addLayout(side_top)
        sbl.addWidget(self.side_status)
        side_scroll = QScrollArea()  # a short dock scrolls the panels rather than squeezing the captions
        side_scroll.setWidget(panels)
        side_scroll.setWidgetResizable(True)
        side_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        sbl.addWidget(side_scroll, 1)
        self.body_tabs = QTabWidget()
        self.body_tabs.addTab(curves_box, "Curves")
        self.body_tabs.addTab(side_box, "Side by side")
        self.side_progress.setVisible(False)
        self.side_cancel.setEnabled(False)
        body = QSplitter(Qt.Orientation.Vertical)
        body.addWidget(self.body_tabs)
        body.addWidget(lower)
        body.setStretchFactor(0, 3)
        body.setStretchFactor(1, 2)
        body.setChildrenCollapsible(False)
        train_scroll = QScrollArea()
        train_scroll.setWidget(train_box)
        train_scroll.setWidgetResizable(True)
        train_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        train_scroll.setMinimumHeight(56)
        train_tab = QSplitter(Qt.Orientation.Vertical)
        train_tab.addWidget(train_scroll)
        train_tab.addWidget(body)
        train_tab.setStretchFactor(0, 0)
        train_tab.setStretchFactor(1, 1)
        train_tab.setChildrenCollapsible(False)

        self.tabs = QTabWidget()
        self.tabs.addTab(metrics_tab, "Metrics")
        self.tabs.addTab(train_tab, "Training and comparison")

        self.settings_scroll = QScrollArea()
        self.settings_scroll.setWidget(settings)
        self.settings_scroll.setWidgetResizable(True)
        self.settings_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.settings_scroll.setMinimumHeight(64)
        self.outer = QSplitter(Qt.Orientation.Vertical)
        self.outer.addWidget(self.settings_scroll)
        self.outer.addWidget(self.tabs)
        self.outer.setStretchFactor(0, 0)
        self.outer.setStretchFactor(1, 1)
        self.outer.setChildrenCollapsible(False)
        layout = QVBoxLayout(self)
        layout.addWidget(self.outer, 1)

    # ------------------------------------------------------------------ View API

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        return [("Run filter metrics", self._metrics_action), ("Train interpretable filters", self._train_action)]

    def _metrics_action(self) -> None:
        self.run_metrics()

    def _train_action(self) -> None:
        self.train()

    def save_state(self) -> dict[str, Any]:
        return {"layer": self.layer_combo.currentText(), "data": self.data_combo.currentData(),
                "n_images": self.n_images_spin.value(), "landmarks": self.landmarks_edit.text(),
                "parts": self.parts_edit.text(), "start": self.start_combo.currentData(),
                "epochs": self.epochs_spin.value(), "batch_size": self.batch_spin.value(),
                "lr": self.lr_spin.value(), "weight": self.weight_spin.value(), "seed": self.seed_spin.value(),
                "scale": self.scale_combo.currentData()}

    def restore_state(self, state: dict[str, Any]) -> None:
        for key, combo in (("data", self.data_combo), ("start", self.start_combo), ("scale", self.scale_combo)):
            i = combo.findData(state.get(key))
            if i >= 0:
                combo.setCurrentIndex(i)
        if isinstance(state.get("layer"), str) and self.layer_combo.findText(state["layer"]) >= 0:
            self.layer_combo.setCurrentText(state["layer"])
        for key, spin in (("n_images", self.n_images_spin), ("epochs", self.epochs_spin),
                          ("batch_size", self.batch_spin), ("seed", self.seed_spin)):
            if isinstance(state.get(key), int) and not isinstance(state.get(key), bool):
                spin.setValue(state[key])
        for key, dspin in (("lr", self.lr_spin), ("weight", self.weight_spin)):
            if isinstance(state.get(key), (int, float)) and not isinstance(state.get(key), bool):
                dspin.setValue(float(state[key]))
        for key, edit in (("landmarks", self.landmarks_edit), ("parts", self.parts_edit)):
            if isinstance(state.get(key), str):
                edit.setText(state[key])
        self._update_controls()

    def shutdown(self) -> None:
        self._side_timer.stop()
        for h in (self._handle, self._train_handle, self._side_handle):
            if h is not None:
                h.cancel()

    # ------------------------------------------------------------------ settings

    def set_layer(self, layer: str) -> None:
        """Measure ``layer`` (a spatial layer of the open model)."""
        i = self.layer_combo.findText(layer)
        if i < 0:
            raise ValueError(f"no spatial layer '{layer}' in the open model")
        self.layer_combo.setCurrentIndex(i)

    def set_data(self, data: str, n_images: int | None = None) -> None:
        """``"images"`` (the open image set) or ``"builtin"`` (the part set of ``n_images``)."""
        self.data_combo.setCurrentIndex(self.data_combo.findData(data))
        if n_images is not None:
            self.n_images_spin.setValue(n_images)
        self._update_controls()

    def set_training(self, *, start: str = "model", epochs: int = 5, batch_size: int = 32, lr: float = 1e-3,
                     weight: float = 1.0, seed: int = 0) -> None:
        self.start_combo.setCurrentIndex(self.start_combo.findData(start))
        self.epochs_spin.setValue(epochs)
        self.batch_spin.setValue(batch_size)
        self.lr_spin.setValue(lr)
        self.weight_spin.setValue(weight)
        self.seed_spin.setValue(seed)
        self._update_controls()

    def _choose_landmarks(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Landmark CSV (image,landmark,x,y)", self.landmarks_edit.text(),
                                              "CSV (*.csv);;All files (*)")
        if path:
            self.landmarks_edit.setText(path)

    def _choose_parts(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Broden-layout folder with a 'part' category",
                                                  self.parts_edit.text())
        if folder:
            self.parts_edit.setText(folder)

    def _model_loaded(self, info: Any) -> None:
        if self.result is not None and self._result_model != info.sha256:
            # the table measured another model: its layer names may mean nothing now
            self.result, self.data_note = None, ""
            self.filter_table.set_rows([])
            self.summary_label.clear()
            self.hist.clear()
            self.status.setText("")
        spatial = [li.name for li in info.layers if li.is_spatial]
        current = self.layer_combo.currentText()
        self.layer_combo.clear()
        for li in info.layers:
            if li.is_spatial:
                self.layer_combo.addItem(li.name)
                self.layer_combo.setItemData(self.layer_combo.count() - 1,
                                             f"{li.name}: {' x '.join(str(s) for s in li.shape)}",
                                             Qt.ItemDataRole.ToolTipRole)
        defaults = [n for n in info.default_layers if n in spatial]
        pick = current if current in spatial else (defaults[-1] if defaults else (spatial[-1] if spatial else ""))
        if pick:
            self.layer_combo.setCurrentText(pick)
        self._update_controls()

    def _update_controls(self) -> None:
        builtin = self.data_combo.currentData() == "builtin"
        self.n_images_spin.setVisible(builtin)
        for w in (self.landmarks_edit, self.landmarks_button, self.parts_edit, self.parts_button):
            w.setEnabled(not builtin)
        running, training = self._handle is not None, self._train_handle is not None
        has_model = self.ctx.session.model is not None
        self.run_button.setEnabled(not running and has_model)
        self.cancel_button.setEnabled(running)
        self.progress.setVisible(running)
        partnet = self.start_combo.currentData() == "partnet"
        self.train_button.setEnabled(not training and (has_model or partnet))
        self.train_cancel.setEnabled(training)
        self.train_progress.setVisible(training)
        if not has_model and not running:
            self.status.setText(NEED_MODEL)
        elif self.status.text() in ("", NEED_MODEL):
            self.status.setText("Choose a layer and the data, then press Run metrics.")
        if not training and not self.train_status.text():
            self.train_status.setText("Trains on the labelled data chosen above (built-in: train.csv, val.csv).")

    def _data_plan(self) -> tuple[str, int, str | None, str | None]:
        """(data kind, built-in images, landmark CSV, part folder) of the controls."""
        lm, parts = self.landmarks_edit.text().strip() or None, self.parts_edit.text().strip() or None
        return self.data_combo.currentData(), self.n_images_spin.value(), lm, parts

    def _metrics_params(self) -> Any:
        from engine.filters.metrics import MetricsParams

        return MetricsParams()

    # ------------------------------------------------------------------ metrics

    def run_metrics(self) -> JobHandle | None:
        """Measure the chosen layer on the chosen data (superseding a run under way)."""
        session = self.ctx.session
        layer = self.layer_combo.currentText()
        if session.model is None:
            self.status.setText(NEED_MODEL)
            return None
        if not layer:
            self.status.setText("The open model has no spatial layer: filter metrics need (filters, h, w) maps.")
            return None
        kind, n_images, lm, parts_dir = self._data_plan()
        images = self.ctx.selection.images
        if kind == "images" and images is None:
            self.status.setText("Open an image folder first (or choose the built-in part data).")
            return None
        params = self._metrics_params()

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, tuple[Any, str]]:
            from engine.filters.metrics import filter_metrics
            from engine.jobs import subjob

            data, landmarks, parts, note, share = yield from _open_data(kind, n_images, lm, parts_dir, images, "val")
            result = yield from subjob(filter_metrics(backend, loaded.cache_id, data, layer, params,
                                                      landmarks=landmarks, parts=parts), share, 1.0)
            return result, note

        model_sha = session.model.sha256

        def done(value: tuple[Any, str]) -> None:
            self._result_model = model_sha
            self._metrics_done(value)

        handle = session.run(f"Filter metrics: {layer}", job, key="filters-metrics", on_done=done)
        if handle is None:
            return None
        if self._handle is not None:
            self._handle.cancel()
        self._handle = handle
        handle.progress.connect(lambda p: _show_progress(self.progress, p))
        handle.failed.connect(lambda e, h=handle: self._metrics_failed(h, e))
        handle.cancelled.connect(lambda h=handle: self._metrics_cancelled(h))
        self.progress.setValue(0)
        self.progress.setFormat("starting…")
        self.status.setText(f"Measuring the filters of {layer}…")
        self._update_controls()
        return handle

    def cancel_metrics(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _metrics_failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is self._handle:
            self._handle = None
            self.status.setText(f"Filter metrics failed: {_message(error)}")
            self._update_controls()

    def _metrics_cancelled(self, handle: JobHandle) -> None:
        if handle is self._handle:
            self._handle = None
            self.status.setText("Filter metrics cancelled.")
            self._update_controls()

    def _metrics_done(self, value: tuple[Any, str]) -> None:
        self._handle = None
        self.set_result(*value)
        self._update_controls()

    def set_result(self, result: Any, note: str = "") -> None:
        """Show an engine ``FilterMetrics``."""
        self.result, self.data_note = result, note
        self.filter_table.set_rows(table_rows(result))
        self.summary_label.setText("\n".join(self.summary_lines()))
        took = " (from the cache)" if result.from_cache else ""
        self.status.setText(f"Measured {result.units} filters of {result.layer} on {result.n_images} images{took}.")
        self._draw_hist()
        self._selection_changed()
        self.metrics_ready.emit(result)

    def summary_lines(self) -> list[str]:
        """The headline numbers of the shown metrics."""
        if self.result is None:
            return []
        return headline(self.result, self.data_note)

    def _draw_hist(self) -> None:
        r = self.result
        self.hist.clear()
        vals = np.concatenate([r.inter, r.spatial])
        vals = vals[np.isfinite(vals)]
        if not len(vals):
            return
        edges = np.histogram_bin_edges(vals, bins=16)
        for name, data, color in (("inter-category", r.inter, "#1f77b4"), ("spatial", r.spatial, "#ff7f0e")):
            counts, _ = np.histogram(data[np.isfinite(data)], bins=edges)
            self.hist.plot(edges, counts, stepMode="center", fillLevel=0, fillOutline=True,
                           brush=pg.mkBrush(QColor(color).red(), QColor(color).green(), QColor(color).blue(), 90),
                           pen=pg.mkPen(color), name=name)

    def visible_rows(self) -> list[dict[str, Any]]:
        return self.filter_table.visible_rows()

    def _row_selected(self, row_id: Any) -> None:
        if self.result is None:
            return
        self._select(self.result.layer, int(row_id))

    def _compare_selected(self, row_id: Any) -> None:
        comp = self.comparison
        self.set_side_filter(int(row_id))
        if comp and self.opened_run in ("interpretable", "ordinary"):
            self._select(comp["measured_layer"], int(row_id))  # the trained model is open
        elif comp and (comp.get("layer_in_session") or self.opened_run == "original"):
            self._select(comp["layer"], int(row_id))

    def _select(self, layer: str, unit: int) -> None:
        sel = self.ctx.selection
        self._syncing = True
        try:
            sel.layer = layer
            sel.unit = unit
        finally:
            self._syncing = False

    def _selection_changed(self, *_args: object) -> None:
        if self._syncing:
            return
        sel = self.ctx.selection
        if self.result is not None and sel.layer == self.result.layer:
            self.filter_table.select_id(sel.unit)
        if self.comparison and self.comparison.get("layer_in_session") and sel.layer == self.comparison["layer"]:
            self.compare_table.select_id(sel.unit)

    # ------------------------------------------------------------------ training

    def train_params(self) -> Any:
        from engine.filters.train import TrainParams

        layer = PARTNET_LAYER if self.start_combo.currentData() == "partnet" else self.layer_combo.currentText()
        return TrainParams(layer=layer, epochs=self.epochs_spin.value(), batch_size=self.batch_spin.value(),
                           lr=self.lr_spin.value(), weight=self.weight_spin.value(), seed=self.seed_spin.value())

    def train(self) -> JobHandle | None:
        """Measure the start model, train both runs, measure both; one job (see the module docstring)."""
        session = self.ctx.session
        start = self.start_combo.currentData()
        kind, n_images, lm, parts_dir = self._data_plan()
        images: Any = self.ctx.selection.images
        if start == "model" and session.model is None:
            self.train_status.setText("Load a PyTorch model first, or start from a new PartNet.")
            return None
        if start == "model" and not self.layer_combo.currentText():
            self.train_status.setText("The open model has no spatial layer to convert.")
            return None
        if kind == "images" and images is None:
            self.train_status.setText("Open a labelled image folder first (or choose the built-in part data).")
            return None
        try:
            params = self.train_params()
            params.check()
        except ConvLensError as e:
            self.train_status.setText(str(e))
            return None
        mparams = self._metrics_params()
        from engine.cache import default_cache_root

        digest = hashlib.sha256(json.dumps(
            [start, session.model.sha256 if start == "model" and session.model else "", kind, n_images, lm, parts_dir,
             images.fingerprint() if kind == "images" and images is not None else "", params.result_key()],
            sort_keys=True, default=str).encode()).hexdigest()[:16]
        out = default_cache_root() / "filters-train" / digest
        layer_in_session = start == "model"

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, dict[str, Any]]:
            return (yield from _train_job(backend, loaded, start, params, mparams, kind, n_images, lm, parts_dir,
                                          images, out, layer_in_session))

        title = "Interpretable filters: training"
        if start == "model":
            handle = session.run(title, job, key="filters-train", on_done=self._train_finished)
        else:
            handle = self.ctx.runner.submit(title, lambda: job(None, None), key="filters-train")
            handle.finished.connect(self._train_finished)
        if handle is None:
            return None
        if self._train_handle is not None:
            self._train_handle.cancel()
        self._train_handle = handle
        self.curves = {}
        self.comparison = None
        self._draw_curves()
        handle.progress.connect(self._train_progress)
        handle.failed.connect(lambda e, h=handle: self._train_failed(h, e))
        handle.cancelled.connect(lambda h=handle: self._train_cancelled(h))
        self.train_progress.setValue(0)
        self.train_progress.setFormat("starting…")
        self.train_status.setText(f"Training at {params.layer} into {out}…")
        self.tabs.setCurrentIndex(1)
        self._update_controls()
        return handle

    def cancel_training(self) -> None:
        if self._train_handle is not None:
            self._train_handle.cancel()

    def _train_progress(self, p: Progress) -> None:
        _show_progress(self.train_progress, p)
        if isinstance(p, TrainProgress) and p.curves:
            self.curves = p.curves
            self._draw_curves()
            self.curves_changed.emit()

    def _draw_curves(self) -> None:
        for (run, key), line in self._lines.items():
            ys = np.asarray(self.curves.get(run, {}).get(key, []), dtype=float)
            line.setData(np.arange(1, len(ys) + 1, dtype=float), ys)

    def _train_failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is self._train_handle:
            self._train_handle = None
            self.train_status.setText(f"Training failed: {_message(error)}")
            self._update_controls()

    def _train_cancelled(self, handle: JobHandle) -> None:
        if handle is self._train_handle:
            self._train_handle = None
            self.train_status.setText("Training cancelled (the last finished epoch's checkpoint is kept; "
                                      "Train again with the same settings resumes from it).")
            self._update_controls()

    def _train_finished(self, value: dict[str, Any]) -> None:
        self._train_handle = None
        self.set_comparison(value)
        self._update_controls()

    def set_comparison(self, comp: dict[str, Any]) -> None:
        """Show a finished training job's curves and the three models' metrics."""
        self.comparison = comp
        self.curves = comp["curves"]
        self._draw_curves()
        self._fill_comparison()
        self.compare_label.setText("<br>".join(self.comparison_lines()))
        self.opened_run = "original" if comp.get("start") == "model" else ""
        self._update_open_buttons()
        runs = comp["runs"]
        self.train_status.setText(f"Trained at {comp['layer']} (measured at {comp['measured_layer']}); "
                                  f"checkpoints in {comp['out_dir']}")
        self.train_status.setToolTip("\n".join(f"{name}: {r['out_dir']}" for name, r in runs.items()))
        self._selection_changed()
        sel = self.ctx.selection
        follows = sel.layer in (comp["layer"], comp["measured_layer"]) and sel.unit is not None and sel.unit >= 0
        self.side_filter = int(sel.unit) if follows else 0
        self.side_maps, self._side_image = None, ""
        self._side_timer.start()
        self.training_done.emit(comp)

    def run_spec(self, run: str) -> Any:
        """The ModelSpec that opens model ``run`` of the comparison ("interpretable", "ordinary":
        the trained TorchScript, which opens with nothing else; "original": the start model), or
        None."""
        comp = self.comparison
        if not comp:
            return None
        if run == "original":
            return comp.get("start_spec")
        r = comp["runs"].get(run)
        start = comp.get("start_spec")
        if r is None or start is None:
            return None
        from engine.types import ModelSpec

        files = r["files"]
        if "torchscript" in files:
            return ModelSpec(path=files["torchscript"], preprocess=start.preprocess, classes=r.get("classes") or
                             start.classes, output_index=start.output_index)
        return None  # no TorchScript (see files["torchscript_error"]): open model.toml from File > Open model

    def open_run_model(self, run: str) -> Any:
        """Open model ``run`` of the comparison in place of the session's model, then select the
        same image, the measured layer (``<layer>.mask`` in a trained model, ``<layer>`` in the
        start model) and the same filter index. Returns the load job's handle (None: nothing to
        open)."""
        spec = self.run_spec(run)
        comp = self.comparison
        if spec is None or comp is None:
            if comp:
                why = comp["runs"].get(run, {}).get("files", {}).get("torchscript_error", "")
                self.train_status.setText(f"The {run} model has no TorchScript file to open{f' ({why})' if why else ''}: "
                                          f"open {comp['runs'].get(run, {}).get('out_dir', '')}/model.toml with "
                                          "File > Open model.")
            return None
        sel = self.ctx.selection
        image, unit = sel.current_image, sel.unit
        layer = comp["layer"] if run == "original" else comp["measured_layer"]
        handle = self.ctx.session.load_model(spec)

        def reselect(_r: Any = None) -> None:
            model = self.ctx.session.model
            if model is not None and model.layer(layer) is not None:
                sel.layer = layer
            if unit is not None and unit >= 0:
                sel.unit = unit
            if image is not None and image >= 0 and sel.images is not None and image < len(sel.images):
                sel.current_image = image
            self.opened_run = run
            self.train_status.setText(f"Opened the {run} model ({Path(spec.path).name}) in place of the previous one; "
                                      f"the heatmaps show filter {unit} at {layer}. Switch back with the buttons above.")
            self._update_open_buttons()

        handle.finished.connect(lambda _r: QTimer.singleShot(0, reselect))
        handle.failed.connect(lambda e: self.train_status.setText(f"Could not open the {run} model: {_message(e)}"))
        return handle

    def _update_open_buttons(self) -> None:
        for run, b in self.open_buttons.items():
            b.setEnabled(self.run_spec(run) is not None and self.opened_run != run)

    def _fill_comparison(self) -> None:
        if self.comparison:
            self.compare_table.set_rows(comparison_rows(self.comparison, self.compare_combo.currentData()))

    def comparison_lines(self) -> list[str]:
        """One line per model: accuracy and the headline metrics."""
        comp = self.comparison
        if not comp:
            return []
        out = []
        for name in RUNS:
            m = comp["metrics"].get(name)
            if m is None:
                continue
            s = m.summary()
            acc = "" if name == "original" else _acc(comp["runs"][name]["final"])
            where = comp["layer"] if name == "original" else comp["measured_layer"]
            text = (f"{name} ({where}){acc}: inter-category entropy {s['mean_inter_category_entropy']:.4f}, "
                    f"spatial entropy {s['mean_spatial_entropy']:.4f}")
            if s.get("mean_location_instability") is not None:
                text += f", location instability {s['mean_location_instability']:.4f}"
            if "part_interpretability" in s:
                text += f", part interpretability {s['part_interpretability']:.3f} (mean IoU {s['mean_part_iou']:.3f})"
            out.append(text)
        return out

    # ------------------------------------------------------------------ side by side

    def side_sources(self) -> list[Any]:
        """The models of the side-by-side panels (engine ``MapSource``: name, spec, layer): the
        start model at the trained layer, each trained model with a file that opens at
        ``<layer>.mask``; empty before training."""
        from engine.filters.compare import MapSource

        comp = self.comparison
        if not comp:
            return []
        out = []
        for run in SIDE_RUNS:
            spec = self.measured_spec(run)
            if spec is not None:
                out.append(MapSource(run, spec, comp["layer"] if run == "original" else comp["measured_layer"]))
        return out

    def measured_spec(self, run: str) -> Any:
        """The ModelSpec the training job measured model ``run`` with: for a trained model the
        state dict with the class file ConvLens wrote beside it (its module tree has
        ``<layer>.mask`` in both runs; a traced ordinary model drops its disabled masks), else
        :meth:`run_spec` (the TorchScript file; the start model)."""
        comp = self.comparison
        r = comp["runs"].get(run) if comp and run != "original" else None
        start = comp.get("start_spec") if comp else None
        if r is None or start is None or "class_file" not in r["files"]:
            return self.run_spec(run)
        from engine.types import ModelSpec

        files = r["files"]
        return ModelSpec(path=files["state_dict"], arch=f"{files['class_file']}:InterpretableNet",
                         preprocess=start.preprocess, classes=r.get("classes") or start.classes,
                         output_index=start.output_index)

    def side_image(self) -> int:
        """The image the panels show: the selected image (the first when none is), -1 without images."""
        sel = self.ctx.selection
        images: Any = sel.images
        if images is None or not len(images):
            return -1
        return sel.current_image if 0 <= sel.current_image < len(images) else 0

    def set_side_filter(self, unit: int) -> None:
        """Show filter ``unit`` side by side (computed when the comparison is there)."""
        if unit != self.side_filter:
            self.side_filter = unit
            self._side_timer.start()

    def _side_selection_changed(self, *_args: object) -> None:
        comp = self.comparison
        if not comp:
            return
        sel = self.ctx.selection
        if sel.layer in (comp["layer"], comp["measured_layer"]) and sel.unit is not None and sel.unit >= 0:
            self.side_filter = int(sel.unit)
        self._side_timer.start()

    def refresh_side_by_side(self) -> JobHandle | None:
        """Compute the selected filter of the selected image in each model of the comparison (a
        cancellable job through :func:`engine.filters.compare.filter_maps`; each model is opened as
        its own backend, the session's model is left as it is). None when nothing is to be done
        (shown already, or nothing to compare)."""
        self._side_timer.stop()
        sources = self.side_sources()
        images: Any = self.ctx.selection.images
        image, unit = self.side_image(), self.side_filter
        if not sources or image < 0 or unit is None:
            if self.comparison and image < 0:
                self.side_status.setText("Open an image set to see the filter side by side.")
            return None
        path = images.records[image].path
        if self.side_maps is not None and self.side_maps.unit == unit and self._side_image == path and \
                self.side_maps.names == tuple(s.name for s in sources) and self._side_handle is None:
            return None
        from engine.filters.compare import filter_maps

        device = getattr(self.ctx.session.model, "device", None)  # where the session's model runs
        handle = self.ctx.runner.submit(
            f"Interpretable filters: filter {unit} side by side",
            lambda: filter_maps(sources, images, [image], unit, device=device), key="filters-side")
        if self._side_handle is not None:
            self._side_handle.cancel()
        self._side_handle = handle
        name = Path(path).name
        handle.progress.connect(lambda p: _show_progress(self.side_progress, p))
        handle.finished.connect(lambda r, h=handle, pth=path: self._side_done(h, r, pth))
        handle.failed.connect(lambda e, h=handle: self._side_ended(h, f"Side by side failed: {_message(e)}"))
        handle.cancelled.connect(lambda h=handle: self._side_ended(h, "Side by side cancelled."))
        self.side_progress.setValue(0)
        self.side_progress.setFormat("starting…")
        self.side_progress.setVisible(True)
        self.side_cancel.setEnabled(True)
        self.side_status.setText(f"Computing filter {unit} of {name} in {len(sources)} models…")
        return handle

    def cancel_side_by_side(self) -> None:
        if self._side_handle is not None:
            self._side_handle.cancel()

    def _side_ended(self, handle: JobHandle, text: str) -> None:
        if handle is self._side_handle:
            self._side_handle = None
            self.side_progress.setVisible(False)
            self.side_cancel.setEnabled(False)
            self.side_status.setText(text)

    def _side_done(self, handle: JobHandle, result: Any, path: str) -> None:
        if handle is not self._side_handle:
            return
        self._side_handle = None
        self.side_progress.setVisible(False)
        self.side_cancel.setEnabled(False)
        self.side_maps, self._side_image = result, path
        self._render_side()
        self.side_ready.emit(result)

    def side_scale(self) -> str:
        """``"own"`` or ``"shared"`` (:data:`SCALES`)."""
        return str(self.scale_combo.currentData())

    def side_panels_data(self) -> list[dict[str, Any]]:
        """Per shown model: name, label, layer, the (h, w) map, its max on the image, the colour
        scale's max (``vmax``) and the caption lines (the model, the filter's metrics, the scale)."""
        res, comp = self.side_maps, self.comparison
        if res is None or not comp:
            return []
        shared = res.shared_max(0)
        out = []
        for name in res.names:
            m = np.asarray(res.maps[name][0], dtype=np.float32)
            mx = float(res.image_max[name][0])
            vmax = shared if self.side_scale() == "shared" else mx
            out.append({"name": name, "label": _SIDE_LABEL.get(name, name), "layer": res.layers[name], "map": m,
                        "max": mx, "vmax": vmax,
                        "lines": side_caption(comp, name, res.unit, res.layers[name], mx, vmax)})
        return out

    def side_statement(self) -> str:
        """What the panels show and the colour scale in words."""
        res = self.side_maps
        if res is None:
            return ""
        scale = ("0 to each map's own max on this image" if self.side_scale() == "own"
                 else f"0 to {res.shared_max(0):.4g}, the largest value of the maps on this image, in every panel")
        return (f"Filter {res.unit} on {Path(res.paths[0]).name}: {SIDE_CMAP}, opacity {SIDE_OPACITY:.0%} over the "
                f"image; colour scale {scale} (values below 0 show as 0).")

    def _render_side(self) -> None:
        data = self.side_panels_data()
        shown = {d["name"] for d in data}
        for run in SIDE_RUNS:
            box = self.side_panels[run].parentWidget()
            assert box is not None
            box.setVisible(run in shown)
        if not data:
            return
        res = self.side_maps
        pre = self._side_preprocess()
        base = decode_view(res.paths[0], pre, _SIDE_SIZE) if pre is not None else None
        for d in data:
            self.side_panels[d["name"]].set_rgb(side_overlay(base, d["map"], d["vmax"], _SIDE_SIZE))
            self.side_captions[d["name"]].setText("\n".join(d["lines"]))
        scale = "each its own max" if self.side_scale() == "own" else f"shared max {res.shared_max(0):.4g}"
        self.side_status.setText(f"Filter {res.unit} of {Path(res.paths[0]).name}, colour scale: {scale}"
                                 + (" (from the cache)" if res.from_cache else ""))
        self.side_status.setToolTip(self.side_statement())
        self.body_tabs.setTabText(1, f"Side by side: filter {res.unit}")

    def _side_preprocess(self) -> Any:
        comp = self.comparison
        start = comp.get("start_spec") if comp else None
        return start.preprocess if start is not None else None

    def _side_elements(self, options: FigureOptions, include: dict[str, bool]) -> list[Element]:
        data = self.side_panels_data()
        if not data:
            return []
        res = self.side_maps
        pre = self._side_preprocess()
        native = tuple(pre.input_size) if pre is not None else (64, 64)
        longer = max(native)
        native = (max(native[0], round(96 * native[0] / longer)), max(native[1], round(96 * native[1] / longer)))
        panel_w = min(150.0, (options.width_pt - 10 * (len(data) - 1)) / len(data))
        lut = colormaps.lut(SIDE_CMAP)
        path = res.paths[0]
        cols: list[Element] = []
        for d in data:
            def render(size: tuple[int, int], d: dict[str, Any] = d) -> np.ndarray:
                base = decode_view(path, pre, size) if pre is not None else None
                return side_overlay(base, d["map"], d["vmax"], size)

            caption = "\n".join(d["lines"]) if include.get("captions", True) else ""
            parts: list[Element] = [Picture(native, render, caption, max_width=panel_w)]  # type: ignore[arg-type]
            if include.get("colorbar", True) and self.side_scale() == "own":
                parts.append(ColorBar(lut, max(d["vmax"], 1e-12), f"{d['label']}: {d['layer']} filter {res.unit}",
                                      max_width=panel_w))
            cols.append(Stack(parts, gap=3))
        elements: list[Element] = [Text(self.side_statement()), Row(cols, gap=10)]
        if include.get("colorbar", True) and self.side_scale() == "shared":
            elements.append(ColorBar(lut, max(res.shared_max(0), 1e-12),
                                     f"activation of filter {res.unit}, one scale for every panel", max_width=240.0))
        return elements

    # ------------------------------------------------------------------ figures

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("metrics", "Filter metrics: headline numbers and entropy histograms"),
                FigureKind("training", "Training curves and the comparison of the three models"),
                FigureKind("side", "Side by side: the selected filter on the selected image in each model")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("summary", "Headline numbers", True),
                FigureOption("histograms", "Histograms of the entropies and part IoU", True, ("metrics",)),
                FigureOption("top", "The filters with the lowest spatial entropy", True, ("metrics",)),
                FigureOption("curves", "Loss and accuracy curves", True, ("training",)),
                FigureOption("table", "Per-filter comparison (first filters)", True, ("training",)),
                FigureOption("side", "The selected filter side by side in each model", True, ("training",)),
                FigureOption("captions", "Captions: model, layer, the filter's metrics", True, ("side",)),
                FigureOption("colorbar", "Colour bar(s)", True, ("side",))]

    def figure(self, options: FigureOptions | None = None) -> Figure:
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        model = self.ctx.session.model
        name = model.name if model is not None else "the model"
        if kind == "training":
            return self._training_figure(options, include)
        if kind == "side":
            return self._side_figure(options, include)
        r = self.result
        if r is None:
            raise ValueError("Interpretable filters: nothing to export yet: run the filter metrics first")
        elements: list[Element] = []
        if include.get("summary", True):
            elements.append(Text("\n".join(self.summary_lines())))
        if include.get("histograms", True):
            charts: list[Element] = [_histogram(r.inter, "inter-category entropy (bits)", QColor("#1f77b4")),
                                     _histogram(r.spatial, "spatial entropy (bits)", QColor("#ff7f0e"))]
            if r.has_parts:
                _idx, iou = r.best_part()
                charts.append(_histogram(iou, "best part IoU", QColor("#2ca02c")))
            elements.append(Row(charts, gap=10))
        if include.get("top", True):
            rows = sorted(table_rows(r), key=lambda d: d["spatial"])[:8]
            lines = [f"filter {d['filter']}: category {d['category'] or '-'}, inter {d['inter']:.3f}, "
                     f"spatial {d['spatial']:.3f}"
                     + (f", instability {d['instability']:.3f}" if math.isfinite(d["instability"]) else "")
                     + (f", {d['part']} IoU {d['part_iou']:.3f}" if d["part"] else "") for d in rows]
            elements.append(Stack([Text("Filters with the lowest spatial entropy", bold=True), Text("\n".join(lines))]))
        subtitle = (f"Zhang, Wu, Zhu (CVPR 2018) filter metrics · {self.data_note or f'{r.n_images} images'} · "
                    f"entropies in bits, from p(T|x) with n² positive templates and the negative one")
        return Figure(f"Filter metrics of {name}: {r.layer}", subtitle, elements, options.width_pt, options.dpi)

    def _training_figure(self, options: FigureOptions, include: dict[str, bool]) -> Figure:
        curves, comp = self.curves, self.comparison
        if not any(any(v) for c in curves.values() for v in c.values()):
            raise ValueError("Interpretable filters: no training curves yet: press Train first")
        elements: list[Element] = []
        if include.get("summary", True) and comp:
            elements.append(Text("\n".join(self.comparison_lines())))
        if include.get("curves", True):
            second = {"filter_loss", "val_accuracy"}  # dashed, as in the dock
            lk = [(run, k) for run, c in curves.items() for k in ("task_loss", "filter_loss") if c.get(k)]
            ak = [(run, k) for run, c in curves.items() for k in ("train_accuracy", "val_accuracy") if c.get(k)]

            def series(keys: list[tuple[str, str]]) -> list[tuple[str, Sequence[float], QColor]]:
                return [(f"{run}: {k.replace('_', ' ')}{' (dashed)' if k in second else ''}", curves[run][k],
                         QColor(_RUN_COLORS[run])) for run, k in keys]

            charts: list[Element] = [LineChart(series(lk), x_label="batch", y_label="loss", title="Loss per batch",
                                               dashed=[k in second for _r, k in lk])]
            if ak:
                charts.append(LineChart(series(ak), x_label="epoch", y_label="accuracy", title="Accuracy per epoch",
                                        dashed=[k in second for _r, k in ak]))
            elements.append(Row(charts, gap=10))
        if include.get("table", True) and comp:
            per = {k: comparison_rows(comp, k) for k in ("spatial", "instability", "part_iou")}
            n = min(12, len(per["spatial"]))
            cols: list[Element] = [Text("filter\n" + "\n".join(str(f) for f in range(n)), size=5.5, align="right")]
            short = {"spatial": "spatial H", "instability": "instab.", "part_iou": "part IoU"}
            for k, rows in per.items():
                for r in RUNS:
                    vals = [f"{d[r]:.3f}" if math.isfinite(d[r]) else "-" for d in rows[:n]]
                    cols.append(Text(f"{short[k]} {_SHORT[r]}\n" + "\n".join(vals), size=5.5, align="right"))
            elements.append(Stack([Text(f"Per filter (first {n} of {len(per['spatial'])}): the start model, the "
                                        "ordinary and the interpretable one", bold=True),
                                   Row(cols, weights=[0.6] + [1.0] * (len(cols) - 1), gap=2)]))
        if include.get("side", True) and self.side_maps is not None and comp:
            side = self._side_elements(options, {"captions": True, "colorbar": True})
            if side:
                elements.append(Stack([Text(f"Filter {self.side_maps.unit} side by side", bold=True), *side]))
        where = f" at {comp['layer']}" if comp else ""
        model = self.ctx.session.model
        start = comp.get("start_name") if comp else (model.name if model is not None else "the model")
        subtitle = "ordinary (no filter loss) and interpretable (task + filter loss, 1/t schedule) from the same start"
        return Figure(f"Interpretable training of {start}{where}", subtitle, elements, options.width_pt, options.dpi)

    def _side_figure(self, options: FigureOptions, include: dict[str, bool]) -> Figure:
        comp, res = self.comparison, self.side_maps
        if not comp or res is None:
            raise ValueError("Interpretable filters: nothing to export yet: train, then pick a filter and an image to see "
                             "it side by side")
        elements: list[Element] = []
        if include.get("summary", True):
            elements.append(Text("\n".join(self.comparison_lines())))
        elements.extend(self._side_elements(options, include))
        subtitle = (f"{comp['start_name']} at {comp['layer']} and the trained models at {comp['measured_layer']}, "
                    f"each opened as its own model; filter {res.unit}, image {Path(res.paths[0]).name}")
        return Figure(f"Filter {res.unit} side by side: start, interpretable, ordinary", subtitle, elements,
                      options.width_pt, options.dpi)


# --------------------------------------------------------------------------------------------
# plain functions (worker side and data shaping)
# --------------------------------------------------------------------------------------------

_SIDE_SIZE = (160, 160)


def side_overlay(base: np.ndarray | None, fmap: np.ndarray, vmax: float, size: tuple[int, int]) -> np.ndarray:
    """The map ``fmap`` (h, w) upsampled bilinearly to ``size``, divided by ``vmax``, clipped to
    [0, 1], coloured (:data:`SIDE_CMAP`) and blended at :data:`SIDE_OPACITY` over ``base`` (the
    image as the model sees it, at ``size``; grey when None). (H, W, 3) uint8."""
    up = upsample(np.asarray(fmap, dtype=np.float32), size)
    scaled = np.clip(up / vmax, 0.0, 1.0) if vmax > 0 else np.zeros(size, dtype=np.float32)
    heat = colormaps.apply(scaled, SIDE_CMAP).astype(np.float32)
    shown = (np.full((*size, 3), 128.0, dtype=np.float32) if base is None
             else resample(base, size).astype(np.float32))
    return np.rint(shown * (1 - SIDE_OPACITY) + heat * SIDE_OPACITY).astype(np.uint8)


def side_caption(comp: Mapping[str, Any], run: str, unit: int, layer: str, mx: float, vmax: float) -> list[str]:
    """A panel's caption: the model and layer, the filter's metrics in that model (category,
    entropies, instability, part IoU, from the comparison's metrics) and its scale."""
    lines = [f"{_SIDE_LABEL.get(run, run)} · {layer} · filter {unit}"]
    m = comp.get("metrics", {}).get(run)
    if m is not None and 0 <= unit < m.units:
        d = table_rows(m)[unit]
        inst = f"{d['instability']:.3f}" if math.isfinite(d["instability"]) else "-"
        iou = f"{d['part_iou']:.3f}" + (f" ({d['part']})" if d["part"] else "") if math.isfinite(d["part_iou"]) else "-"
        lines.append(f"category {d['category'] or '-'}")
        lines.append(f"inter H {d['inter']:.3f} · spatial H {d['spatial']:.3f}")
        lines.append(f"instab. {inst} · part IoU {iou}")
    lines.append(f"max here {mx:.3g} · scale 0–{vmax:.3g}")
    return lines


def _plot(y: str, x: str) -> pg.PlotWidget:
    p = pg.PlotWidget(background="w")
    p.setMinimumHeight(90)
    p.setMenuEnabled(False)
    p.hideButtons()
    p.setLabel("left", y)
    p.setLabel("bottom", x)
    for side in ("left", "bottom"):
        axis = p.getAxis(side)
        axis.setPen("k")
        axis.setTextPen("k")
        axis.enableAutoSIPrefix(False)
    return p


def _show_progress(bar: QProgressBar, p: Progress) -> None:
    if p.fraction is None:
        bar.setRange(0, 0)
    else:
        bar.setRange(0, 1000)
        bar.setValue(round(1000 * p.fraction))
    bar.setFormat(f"%p% {p.message}" if p.message else "%p%")


def _message(e: BaseException) -> str:
    return str(e) if isinstance(e, ConvLensError) else f"{type(e).__name__}: {e}"


def _acc(final: dict[str, Any]) -> str:
    parts = [f"{k.split('_')[0]} acc. {final[k]:.3f}" for k in ("train_accuracy", "val_accuracy") if k in final]
    return f", {', '.join(parts)}" if parts else ""


def _histogram(values: np.ndarray, label: str, color: QColor, bins: int = 8) -> BarChart:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return BarChart(["-"], [(label, [0.0], color)], y_label="filters", x_label=label)
    counts, edges = np.histogram(v, bins=bins)
    step = float(edges[1] - edges[0])
    digits = max(0, min(6, 1 - math.floor(math.log10(step)))) if step > 0 else 3
    cats = [f"{edges[i]:.{digits}f}–{edges[i + 1]:.{digits}f}" for i in range(bins)]
    return BarChart(cats, [(label, [float(c) for c in counts], color)], y_label="filters", x_label=label,
                    plot_height=70)


def table_rows(result: Any) -> list[dict[str, Any]]:
    """The per-filter table's rows of an engine ``FilterMetrics``."""
    idx, iou = result.best_part()
    inst = result.instability if result.has_landmarks else np.full(result.units, np.nan)
    rows = []
    for f in range(result.units):
        c = int(result.category[f])
        rows.append({"filter": f, "category": result.classes[c] if c >= 0 else "",
                     "inter": float(result.inter[f]), "spatial": float(result.spatial[f]),
                     "instability": float(inst[f]),
                     "part": result.part_names[int(idx[f])] if result.has_parts else "",
                     "part_iou": float(iou[f]) if result.has_parts else float("nan")})
    return rows


def comparison_rows(comp: dict[str, Any], metric: str = "spatial") -> list[dict[str, Any]]:
    """Per filter index: ``metric`` (a :data:`COMPARED` key) of the three models, and the
    interpretable model's minus the ordinary one's."""
    per = {name: table_rows(m) for name, m in comp["metrics"].items()}
    n = min(len(rows) for rows in per.values())
    out = []
    for f in range(n):
        row: dict[str, Any] = {"filter": f}
        for run in RUNS:
            row[run] = float(per[run][f][metric]) if run in per else float("nan")
        row["change"] = row["interpretable"] - row["ordinary"]
        out.append(row)
    return out


def headline(result: Any, note: str = "") -> list[str]:
    s = result.summary()
    lines = [f"{s['layer']}: {s['filters']} filters of {' x '.join(str(v) for v in s['shape'][1:])} on "
             f"{s['images']} images{f' ({note})' if note else ''}",
             f"mean inter-category entropy {s['mean_inter_category_entropy']:.4f}, "
             f"mean spatial entropy {s['mean_spatial_entropy']:.4f}, mean -MI {s['mean_loss']:.4f}"]
    if s["filters_per_category"]:
        lines.append("filters per category: " + ", ".join(f"{c} {n}" for c, n in s["filters_per_category"].items()))
    if "mean_location_instability" in s:
        v = s["mean_location_instability"]
        lines.append(f"location instability {'-' if v is None else f'{v:.4f}'} "
                     f"({s['filters_with_instability']} filters with landmarks: {', '.join(s['landmarks'])})")
    if "part_interpretability" in s:
        lines.append(f"part interpretability {s['part_interpretability']:.3f}: {s['part_detectors']} filters "
                     f"with part IoU > {result.params.iou_threshold:g} (mean best IoU {s['mean_part_iou']:.3f}, "
                     f"{s['part_images']} part images)")
    return lines


def _open_data(kind: str, n_images: int, landmarks: str | None, parts_dir: str | None, images: Any,
               split: str) -> Generator[Progress, None, tuple[Any, str | None, Any, str, float]]:
    """(image set, landmark CSV, part dataset, a note, progress share used) on the worker."""
    from engine.concepts import open_broden
    from engine.data.images import open_image_set
    from engine.jobs import subjob

    if kind == "builtin":
        from engine.concepts.parts import builtin_parts

        ds = yield from subjob(builtin_parts(n_images, BUILTIN_SIZE), 0.0, 0.2, "built-in parts: ")
        root = Path(ds.root)
        data = open_image_set(str(root / f"{split}.csv"))
        return (data, str(root / "landmarks.csv"), open_broden(str(root), split="val"),
                f"built-in part data, {split}.csv of {n_images}", 0.2)
    if landmarks is not None and not Path(landmarks).is_file():
        raise ConvLensError(f"{landmarks}: the landmark CSV does not exist")
    parts = open_broden(parts_dir) if parts_dir else None
    yield Progress(0.0, "data ready")
    return images, landmarks, parts, Path(images.source).name if getattr(images, "source", None) else "", 0.0


def _add_training_step(c: dict[str, list[float]], data: Mapping[str, Any]) -> None:
    """Extend the curves ``c`` of one run by the engine's typed progress payload
    (:class:`engine.jobs.DataProgress` ``data`` of :func:`engine.filters.train.train_filters`):
    a batch's task and filter loss, an epoch's train / validation accuracy, or on a resume the
    history so far."""
    kind = data.get("kind")
    if kind == "batch":
        c["task_loss"].append(float(data["task_loss"]))
        c["filter_loss"].append(float(data["filter_loss"]))
    elif kind == "epoch":
        c["train_accuracy"].append(float(data.get("train_accuracy", float("nan"))))
        if "val_accuracy" in data:
            c["val_accuracy"].append(float(data["val_accuracy"]))
    elif kind == "resume":
        _fill_from_history(c, list(data.get("history", [])), list(data.get("batches", [])))


def _fill_from_history(c: dict[str, list[float]], history: list[dict[str, Any]],
                       batches: list[dict[str, Any]]) -> None:
    if batches:
        c["task_loss"] = [float(b["task_loss"]) for b in batches]
        c["filter_loss"] = [float(b["filter_loss"]) for b in batches]
    c["train_accuracy"] = [float(h.get("train_accuracy", float("nan"))) for h in history]
    c["val_accuracy"] = [float(h["val_accuracy"]) for h in history if "val_accuracy" in h]


def _train_job(backend: Any, loaded: Any, start: str, params: Any, mparams: Any, kind: str, n_images: int,
               lm: str | None, parts_dir: str | None, images: Any, out: Path,
               layer_in_session: bool) -> Generator[Progress, None, dict[str, Any]]:
    """The training job (worker side): start model, its metrics, both runs, their metrics."""
    import torch

    from engine.backends.torch_backend import TorchBackend
    from engine.data.images import open_image_set
    from engine.filters.metrics import filter_metrics
    from engine.filters.train import train_filters
    from engine.jobs import subjob
    from engine.models.loading import load_model
    from engine.types import ModelSpec, Preprocess

    out.mkdir(parents=True, exist_ok=True)
    train, landmarks, parts, _note, _s = yield from subjob(_open_data(kind, n_images, lm, parts_dir, images, "train"),
                                                          0.0, 0.05, "data: ")
    if kind == "builtin":
        root = Path(train.source).parent
        val = open_image_set(str(root / "val.csv"))
        measure = val
    else:
        val, measure = None, train
    if start == "partnet":
        from engine.filters.partnet import PARTNET_ARCH, PartNet

        if not train.has_labels:
            raise ConvLensError(f"{train.source}: the images have no labels; training needs class subfolders")
        classes = train.labels
        torch.manual_seed(params.seed)
        net = PartNet(len(classes))
        start_path = out / "start.pt"
        buf = __import__("io").BytesIO()
        torch.save(net.state_dict(), buf)
        from engine.cache import atomic_write_bytes

        atomic_write_bytes(start_path, buf.getvalue())
        spec = ModelSpec(path=str(start_path), arch=PARTNET_ARCH, classes=classes,
                         preprocess=Preprocess(input_size=(BUILTIN_SIZE, BUILTIN_SIZE), mean=(0.5,) * 3,
                                               std=(0.25,) * 3))
        loaded = load_model(spec)
        backend = TorchBackend(loaded.module, spec, "cpu")
        start_name = "a new PartNet"
    else:
        if getattr(backend, "name", "") != "torch" or not hasattr(backend, "trainable_copy"):
            raise ConvLensError(f"{backend.spec.path}: training needs the PyTorch backend (a torch model on "
                                "PyTorch, not ONNX Runtime)")
        start_name = Path(backend.spec.path).name
    sha = loaded.cache_id
    metrics: dict[str, Any] = {}
    metrics["original"] = yield from subjob(filter_metrics(backend, sha, measure, params.layer, mparams,
                                                           landmarks=landmarks, parts=parts), 0.05, 0.1,
                                            "start model metrics: ")
    curves: dict[str, dict[str, list[float]]] = {}
    runs: dict[str, Any] = {}
    plan = [("interpretable", params), ("ordinary", params.baseline())]
    for j, (name, p) in enumerate(plan):
        lo, hi = 0.1 + 0.4 * j, 0.1 + 0.4 * (j + 1)
        c = curves.setdefault(name, _empty_curves())
        folder = out / name
        gen = train_filters(backend, sha, train, p, folder, val_images=val, source_format=loaded.format)
        try:
            while True:
                try:
                    prog = next(gen)
                except StopIteration as stop:
                    res = stop.value
                    break
                _add_training_step(c, getattr(prog, "data", None) or {})
                f = None if prog.fraction is None else lo + (hi - lo) * 0.9 * prog.fraction
                yield TrainProgress(f, f"{name}: {prog.message}", run=name, curves=_snapshot(curves))
        finally:
            gen.close()  # a cancelled job closes the engine's run too (its finally blocks)
        _fill_from_history(c, res.history, _batch_rows(folder, res))
        yield TrainProgress(lo + (hi - lo) * 0.9, f"{name}: measuring the trained model", run=name,
                            curves=_snapshot(curves))
        if "class_file" in res.files:
            tspec = ModelSpec(path=res.files["state_dict"], arch=f"{res.files['class_file']}:InterpretableNet",
                              preprocess=backend.spec.preprocess, classes=res.classes,
                              output_index=backend.spec.output_index)
        else:
            tspec = ModelSpec(path=res.files["torchscript"], preprocess=backend.spec.preprocess, classes=res.classes,
                              output_index=backend.spec.output_index)
        trained = load_model(tspec)
        tb = TorchBackend(trained.module, trained.spec, backend.device)
        metrics[name] = yield from subjob(filter_metrics(tb, trained.cache_id, measure, res.measured_layer, mparams,
                                                         landmarks=landmarks, parts=parts),
                                          lo + (hi - lo) * 0.9, hi, f"{name} metrics: ")
        runs[name] = {"out_dir": res.out_dir, "final": res.final, "files": res.files, "history": res.history,
                      "resumed_from": res.resumed_from, "classes": tuple(res.classes)}
    yield TrainProgress(1.0, "done", curves=_snapshot(curves))
    return {"layer": params.layer, "measured_layer": f"{params.layer}.mask", "start_name": start_name,
            "layer_in_session": layer_in_session, "metrics": metrics, "runs": runs, "curves": curves,
            "out_dir": str(out), "params": params.to_dict(), "start": start,
            "start_spec": spec if start == "partnet" else backend.spec}


def _batch_rows(folder: Path, res: Any) -> list[dict[str, Any]]:
    """The per-batch rows of a finished run (its batches.csv)."""
    import csv

    path = Path(res.files.get("batches", folder / "batches.csv"))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            return [{"task_loss": float(r["task_loss"]), "filter_loss": float(r["filter_loss"])}
                    for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError):
        return []
