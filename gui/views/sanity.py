"""The weight-randomisation sanity check (Adebayo et al., NeurIPS 2018) of an explanation.

Choose the explanation (the list holds those the open model supports: the class evidence
methods for the predicted class, unit heatmaps, dissection labels, polytope galleries, filter
metrics, inference graphs; none for an ONNX or TorchScript model, whose weights cannot be randomised here), the
mode (cascading randomisation from the output layer down, or one layer at a time), the layer and
unit (they follow the shared selection), and press Run: one engine job
(:func:`engine.sanity.run.run`, cached on disk by the engine) on the inference worker, with
progress and Cancel; a new run supersedes the one under way. The plot shows the similarity of
the randomised explanation to the original against the layer randomised, one line per metric
(the mean over images, bars of one standard deviation); under it the strip of the original and
randomised maps of the selected image (maps explanations), and per metric the value at the last
step and the first layer whose randomisation takes it below 0.5. An explanation whose maps stay
similar when the weights are destroyed fails the check.

The images checked are the selected image and others spread evenly over the set; selecting
another image shows its strip when it was checked, else says to run again.

Other views can ask for a check without importing this one (views talk only through the
selection): ``ctx.selection.set_item("sanity_request", {"explanation": "heatmap", "layer":
"conv2", "unit": 3, "mode": "cascade"})`` fills in the settings that are given, raises this
dock and runs the check (see :data:`REQUEST_KIND`); the view clears the item once it has read it.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, QSize, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QPainter, QPen, QPolygonF
from PySide6.QtWidgets import (
    QDockWidget,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from engine.types import Progress

from ..colormaps import apply as colormap
from ..context import AppContext
from ..figures import Element, Figure, FigureKind, FigureOption, FigureOptions, Legend, Text, Tile, TileGrid
from ..figures.model import CAPTION_PT, INK, MUTED, font, metrics
from ..jobs import JobHandle, show_progress
from ..tiles import TileMosaic
from ..widgets.eliding_combo import ElidingComboBox
from .base import View

__all__ = ["REQUEST_KIND", "SanityView", "SimilarityChart"]

REQUEST_KIND = "sanity_request"
"""The generic selection item another view publishes to ask for a check: a dict with any of
``explanation``, ``layer``, ``unit``, ``mode``."""
COLOURS = [QColor(31, 119, 180), QColor(214, 39, 40), QColor(44, 160, 44), QColor(148, 103, 189),
           QColor(255, 127, 14), QColor(140, 86, 75)]
TILE = 56
"""Side of a map tile in the dock."""
NEED_MODEL = "Load a model and an image set to run the sanity check of an explanation."
NEED_TORCH = ("The sanity check randomises the model's weights, which needs an eager PyTorch model: {model} runs on "
              "{backend}. Load the PyTorch checkpoint (a state dict with an architecture, or a torch.export .pt2 "
              "archive) instead.")
MODES = (("cascade", "Cascading (top layer down)"), ("independent", "One layer at a time"))
METRIC_LABELS = {"spearman_abs": "Spearman of |map|", "spearman": "Spearman (signed)", "ssim": "SSIM of |map|",
                 "label_agreement": "units keeping their label", "iou_spearman": "Spearman of the units' best IoU",
                 "jaccard": "Jaccard of the gallery", "node_overlap": "node overlap"}
"""Metric names as shown (Spearman: rank correlation with the original; SSIM: structural similarity)."""


def metric_label(name: str) -> str:
    """A metric's name as a reader knows it (``spearman_abs`` -> ``Spearman of |map|``)."""
    if name in METRIC_LABELS:
        return METRIC_LABELS[name]
    if name.endswith("_spearman"):
        return f"Spearman of {name[:-len('_spearman')].replace('_', ' ')}"
    return name.replace("_", " ")


def line_width(m: int, count: int, base: float) -> float:
    """Earlier series are drawn wider, so that a later one lying on top of it (e.g. the two
    Spearman correlations of a non-negative map, which are equal) leaves it visible at its edges."""
    return base * (1.0 + 1.2 * (count - 1 - m) / max(1, count - 1)) if count > 1 else base


def heat_tile(m: np.ndarray, side: int = TILE) -> np.ndarray:
    """An (H, W) map as an RGB tile: the absolute value scaled by its own maximum, inferno,
    enlarged by whole pixels (nearest) to about ``side``."""
    a = np.abs(np.asarray(m, np.float32))
    top = float(a.max()) if a.size else 0.0
    rgb = colormap(a / top if top > 0 else a, "inferno")
    k = max(1, round(side / max(1, *a.shape)))
    return np.ascontiguousarray(np.repeat(np.repeat(rgb, k, axis=0), k, axis=1))


@dataclass
class SimilarityChart(Element):
    """Similarity vs the layer randomised: categories on x ("original", then each step), one line
    per metric with a band of one standard deviation, the y axis from ``lo`` to 1."""

    steps: list[str]
    series: list[tuple[str, np.ndarray, np.ndarray, QColor]]  # (name, mean, spread), both len(steps)
    x_label: str = ""
    plot_height: float = 120.0
    y_label: str = "similarity to the original"

    def _lo(self) -> float:
        lows = [float(np.nanmin(m - s)) for _n, m, s, _c in self.series if np.isfinite(m - s).any()]
        return max(-1.0, min(-0.2, float(np.floor(min(lows, default=0.0) * 5) / 5)))

    def _bottom(self, width: float) -> float:
        fm = metrics(font(CAPTION_PT))
        widest = max((fm.horizontalAdvance(s) for s in ["original", *self.steps]), default=0)
        return widest * 0.72 + fm.height() + 6 + (fm.height() + 2 if self.x_label else 0)

    def height(self, width: float, dpi: int) -> float:
        legend = Legend([(n, c) for n, _m, _s, c in self.series])
        return self.plot_height + self._bottom(width) + legend.height(width, dpi) + 4

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        f = font(CAPTION_PT)
        fm = metrics(f)
        lo = self._lo()
        ticks = [round(lo + 0.2 * i, 1) for i in range(round((1.0 - lo) / 0.2) + 1)]
        left = max(fm.horizontalAdvance(f"{t:.1f}") for t in ticks) + 6
        axis = fm.height() + 2 if self.y_label else 0  # the rotated y label left of the tick labels
        left += axis
        plot = QRectF(rect.left() + left, rect.top() + 2, rect.width() - left - 8, self.plot_height)
        if self.y_label:
            painter.save()
            painter.setFont(f)
            painter.setPen(MUTED)
            painter.translate(rect.left(), plot.center().y())
            painter.rotate(-90)
            painter.drawText(QRectF(-plot.height() / 2, 0, plot.height(), fm.height() + 1),
                             int(Qt.AlignmentFlag.AlignHCenter), self.y_label)
            painter.restore()
        labels = ["original", *self.steps]
        n = len(labels)

        def to(i: float, v: float) -> QPointF:
            return QPointF(plot.left() + plot.width() * (i / max(1, n - 1)),
                           plot.bottom() - plot.height() * (v - lo) / (1.0 - lo))

        painter.setFont(f)
        for t in ticks:
            painter.setPen(QPen(QColor(225, 225, 225), 0.5))
            painter.drawLine(to(0, t), to(n - 1, t))
            painter.setPen(INK)
            p = to(0, t)
            painter.drawText(QRectF(rect.left() + axis, p.y() - fm.height() / 2, left - axis - 4, fm.height()),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"{t:.1f}")
        painter.setPen(QPen(INK, 0.7))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawRect(plot)
        for i, lab in enumerate(labels):
            p = to(i, lo)
            painter.drawLine(p, QPointF(p.x(), p.y() + 2))
            painter.save()
            painter.translate(p.x() + fm.height() * 0.3, p.y() + 4)
            painter.rotate(-45)
            w = fm.horizontalAdvance(lab)
            painter.drawText(QRectF(-w, 0, w + 1, fm.height()), int(Qt.AlignmentFlag.AlignRight), lab)
            painter.restore()
        bottom = plot.bottom() + self._bottom(rect.width())
        if self.x_label:
            painter.setPen(MUTED)
            painter.drawText(QRectF(plot.left(), bottom - fm.height() - 2, plot.width(), fm.height() + 1),
                             int(Qt.AlignmentFlag.AlignHCenter), self.x_label)
        for m, (_name, mean, spread, colour) in enumerate(self.series):
            ys = np.concatenate([[1.0], mean])
            sd = np.concatenate([[0.0], spread])
            ok = [i for i in range(n) if np.isfinite(ys[i])]
            if len(ok) > 1 and np.isfinite(sd[ok]).all() and float(np.max(sd[ok])) > 0:
                band = [to(i, min(1.0, ys[i] + sd[i])) for i in ok] + \
                       [to(i, max(lo, ys[i] - sd[i])) for i in reversed(ok)]
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(QColor(colour.red(), colour.green(), colour.blue(), 40))
                painter.drawPolygon(QPolygonF(band))
            painter.setPen(QPen(colour, line_width(m, len(self.series), 1.2)))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            pts = [to(i, float(ys[i])) for i in ok]
            if len(pts) > 1:
                painter.drawPolyline(QPolygonF(pts))
            painter.setBrush(colour)
            for p in pts:
                painter.drawEllipse(p, 1.5, 1.5)
        legend = Legend([(n_, c) for n_, _m, _s, c in self.series])
        painter.setBrush(Qt.BrushStyle.NoBrush)
        legend.paint(painter, QRectF(plot.left(), bottom + 2, plot.width(), legend.height(plot.width(), dpi)), dpi)


class SanityView(View):
    """The sanity check of one explanation; see the module docstring."""

    title = "Sanity check"
    object_name = "sanity"
    order = 70
    visible_by_default = False

    #: a result arrived and is shown (the engine's SanityResult)
    result_ready = Signal(object)
    #: the explanations the open model supports are known (or why there are none)
    explanations_ready = Signal()

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.result: Any = None
        self._handle: JobHandle | None = None
        self._list_handle: JobHandle | None = None
        self._error = ""
        self._unsupported = ""  # why the open model supports no explanation, else ""
        self._pending_state: dict[str, Any] = {}
        self._build()
        sel, session = ctx.selection, ctx.session
        session.model_loaded.connect(self._model_loaded)
        sel.images_changed.connect(self._images_changed)
        sel.current_image_changed.connect(lambda _i: self._render_strip())
        sel.layer_changed.connect(self._layer_selected)
        sel.unit_changed.connect(self._unit_selected)
        sel.item_changed.connect(self._item_changed)
        if session.model is not None:
            self._model_loaded(session.model)
        else:
            self._render()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.explanation_combo = ElidingComboBox(12)
        self.explanation_combo.setToolTip("The explanation to check (those the open model supports)")
        self.explanation_combo.currentIndexChanged.connect(lambda _i: self._update_controls())
        self.mode_combo = ElidingComboBox(10)
        for key, label in MODES:
            self.mode_combo.addItem(label, key)
        self.mode_combo.setToolTip("Cascading: step k randomises the top k layers; or each layer alone")
        self.layer_combo = ElidingComboBox(10)
        self.layer_combo.setToolTip("The layer the explanation looks at (Grad-CAM: its default when not set)")
        self.layer_combo.activated.connect(self._layer_chosen)
        self.unit_spin = QSpinBox()
        self.unit_spin.setRange(0, 0)
        self.unit_spin.setToolTip("The unit whose heatmap is checked (follows the selected unit)")
        self.images_spin = QSpinBox()
        self.images_spin.setRange(1, 10_000)
        self.images_spin.setValue(16)
        self.images_spin.setToolTip("Images checked: the selected one and others spread over the set")
        self.run_button = QPushButton("Run")
        self.run_button.setToolTip("Randomise the weights step by step and compare the explanation with the original")
        self.run_button.clicked.connect(self.run_check)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.hide()
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.hide()

        grid = QGridLayout()
        grid.addWidget(QLabel("Explanation"), 0, 0)
        grid.addWidget(self.explanation_combo, 0, 1)
        grid.addWidget(QLabel("Mode"), 0, 2)
        grid.addWidget(self.mode_combo, 0, 3)
        grid.addWidget(QLabel("Layer"), 1, 0)
        grid.addWidget(self.layer_combo, 1, 1)
        units = QHBoxLayout()
        units.addWidget(self.unit_spin)
        units.addWidget(QLabel("Images"))
        units.addWidget(self.images_spin)
        self.unit_label = QLabel("Unit")
        grid.addWidget(self.unit_label, 1, 2)
        grid.addLayout(units, 1, 3)
        grid.setColumnStretch(1, 1)
        grid.setColumnStretch(3, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        buttons.addWidget(self.progress, 1)

        self.status = QLabel()
        self.status.setWordWrap(True)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.plot = pg.PlotWidget(background="w")
        self.plot.setObjectName("sanity_plot")
        self.plot.setMinimumHeight(120)
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.setLabel("left", "similarity")
        self.plot.setToolTip("Similarity of the explanation after each step to the original one (1: the same; "
                             "Spearman: rank correlation, SSIM: structural similarity); mean over the images, bars: "
                             "one standard deviation")
        self.plot.showGrid(x=False, y=True, alpha=0.2)
        for side in ("left", "bottom"):
            axis = self.plot.getAxis(side)
            axis.setPen("k")
            axis.setTextPen("k")
        # the legend under the plot, not in it: curves that stay at 1 (a layer below the
        # explanation's) would run under it
        self.legend_label = QLabel()
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.legend_label.setWordWrap(True)
        self.legend_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.plot.setMouseEnabled(x=False, y=False)
        self.strip_title = QLabel()
        self.strip_title.setWordWrap(True)
        self.strip = TileMosaic(label_height=13)
        self.strip.setObjectName("sanity_strip")
        strip_scroll = QScrollArea()
        strip_scroll.setWidget(self.strip)
        strip_scroll.setWidgetResizable(False)
        strip_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        strip_scroll.setMinimumHeight(TILE + 40)
        strip_scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.strip_scroll = strip_scroll
        self.numbers = QLabel()
        self.numbers.setWordWrap(True)
        self.numbers.setTextFormat(Qt.TextFormat.RichText)
        self.numbers.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.numbers.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

        # the numbers and the maps under the plot scroll when the dock is short (a 1024x640
        # window): they never overlap the plot, which keeps the rest of the height
        details = QWidget()
        dl = QVBoxLayout(details)
        dl.setContentsMargins(0, 0, 0, 0)
        dl.addWidget(self.numbers)
        dl.addWidget(self.strip_title)
        dl.addWidget(strip_scroll)
        self.details_scroll = QScrollArea()
        self.details_scroll.setObjectName("sanity_details")
        self.details_scroll.setWidget(details)
        self.details_scroll.setWidgetResizable(True)
        self.details_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.details_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.details_scroll.setMinimumHeight(TILE + 40)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(grid)
        lay.addLayout(buttons)
        lay.addWidget(self.status)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.legend_label)
        lay.addWidget(self.details_scroll, 1)  # no taller than its contents: see _fit_details

    def sizeHint(self) -> QSize:
        return QSize(460, 520)

    def _fit_details(self) -> None:
        """The details under the plot take the height they need (up to half of what is left);
        the plot the rest."""
        body = self.details_scroll.widget()
        w = self.details_scroll.viewport().width()
        need = body.heightForWidth(w) if body.hasHeightForWidth() else body.sizeHint().height()
        self.details_scroll.setMaximumHeight(max(TILE + 40, need + 2))

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        QTimer.singleShot(0, self._fit_details)

    # ------------------------------------------------------------------ settings

    def explanation(self) -> str:
        return str(self.explanation_combo.currentData() or "")

    def mode(self) -> str:
        return str(self.mode_combo.currentData() or "cascade")

    def layer(self) -> str | None:
        data = self.layer_combo.currentData()
        return str(data) if data else None

    def set_params(self, *, explanation: str | None = None, mode: str | None = None, layer: str | None = None,
                   unit: int | None = None, images: int | None = None) -> None:
        """Set the controls (what is None stays); an explanation the model lacks is ignored."""
        if explanation is not None:
            i = self.explanation_combo.findData(explanation)
            if i >= 0:
                self.explanation_combo.setCurrentIndex(i)
        if mode is not None:
            i = self.mode_combo.findData(mode)
            if i >= 0:
                self.mode_combo.setCurrentIndex(i)
        if layer is not None:
            i = self.layer_combo.findData(layer)
            if i >= 0:
                self.layer_combo.setCurrentIndex(i)
                self._update_unit_range()
        if unit is not None:
            self.unit_spin.setValue(int(unit))
        if images is not None:
            self.images_spin.setValue(int(images))
        self._update_controls()

    def _needs(self) -> tuple[bool, bool]:
        """(the chosen explanation uses a layer, it uses a unit)."""
        e = self.explanation()
        return e in ("gradcam", "heatmap", "dissection", "filters"), e == "heatmap"

    def _update_controls(self) -> None:
        uses_layer, uses_unit = self._needs()
        self.layer_combo.setEnabled(uses_layer)
        self.unit_spin.setEnabled(uses_unit)
        self.unit_label.setEnabled(uses_unit)
        running = self._handle is not None
        self.run_button.setEnabled(bool(self.explanation()) and self.ctx.selection.images is not None)
        self.cancel_button.setVisible(running)

    def _update_unit_range(self) -> None:
        model, layer = self.ctx.session.model, self.layer()
        info = model.layer(layer) if model is not None and layer else None
        self.unit_spin.setRange(0, max(0, (info.units if info is not None else 1) - 1))

    # ------------------------------------------------------------------ state changes

    def _model_loaded(self, _info: Any = None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.result = None
        self._error = ""
        self._unsupported = ""
        self.explanation_combo.clear()
        self._fill_layers()
        self._list_explanations()
        self._render()

    def _fill_layers(self) -> None:
        model = self.ctx.session.model
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        if model is not None:
            self.layer_combo.addItem("default (Grad-CAM: last spatial layer)", "")
            for li in model.layers:
                if li.is_spatial:
                    self.layer_combo.addItem(f"{li.name} ({li.units})", li.name)
            sel = self.ctx.selection.layer
            i = self.layer_combo.findData(sel) if sel else -1
            if i < 0:
                spatial = [li.name for li in model.layers if li.is_spatial]
                default = [n for n in model.default_layers if n in spatial]
                i = self.layer_combo.findData(default[-1] if default else (spatial[-1] if spatial else ""))
            self.layer_combo.setCurrentIndex(max(0, i))
        self.layer_combo.blockSignals(False)
        self._update_unit_range()
        if model is not None:
            self.unit_spin.setValue(max(0, self.ctx.selection.unit))

    def _list_explanations(self) -> None:
        info = self.ctx.session.model
        if info is None:
            return

        def job(backend: Any, _loaded: Any) -> Generator[Progress, None, tuple[list[tuple[str, str]], str]]:
            from engine.sanity.explanations import EXPLANATIONS, supported

            yield Progress(None, "explanations")
            names = supported(backend)
            if not names:
                return [], NEED_TORCH.format(model=info.name, backend=backend.name +
                                             (" (TorchScript)" if getattr(backend, "is_script", False) else ""))
            return [(n, EXPLANATIONS[n].title) for n in names], ""

        self._list_handle = self.ctx.session.run("Sanity check: explanations", job, key="sanity-explanations",
                                                 on_done=self._explanations_known)

    def _explanations_known(self, value: tuple[list[tuple[str, str]], str]) -> None:
        names, why = value
        self._list_handle = None
        self._unsupported = why
        self.explanation_combo.blockSignals(True)
        self.explanation_combo.clear()
        for name, title in names:
            self.explanation_combo.addItem(title, name)
        want = self._pending_state.pop("explanation", "")
        i = self.explanation_combo.findData(want) if want else -1
        self.explanation_combo.setCurrentIndex(i if i >= 0 else 0 if names else -1)
        self.explanation_combo.blockSignals(False)
        if self._pending_state:
            self.restore_state(self._pending_state)
        self._update_controls()
        self.explanations_ready.emit()
        self._render()

    def _images_changed(self, *_args: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.result = None
        self._error = ""
        self._render()

    def _layer_selected(self, layer: str) -> None:
        i = self.layer_combo.findData(layer)
        if i >= 0 and i != self.layer_combo.currentIndex():
            self.layer_combo.setCurrentIndex(i)
            self._update_unit_range()

    def _unit_selected(self, unit: int) -> None:
        if unit >= 0:
            self.unit_spin.setValue(unit)

    def _layer_chosen(self, _i: int) -> None:
        self._update_unit_range()
        layer = self.layer()
        if layer and layer != self.ctx.selection.layer:
            self.ctx.selection.layer = layer

    def _item_changed(self, kind: str, value: Any) -> None:
        if kind != REQUEST_KIND or not isinstance(value, dict):
            return
        self.set_params(explanation=value.get("explanation"), mode=value.get("mode"), layer=value.get("layer"),
                        unit=value.get("unit"))
        dock = self.parentWidget()
        if isinstance(dock, QDockWidget):
            dock.show()
            dock.raise_()
        QTimer.singleShot(0, self.run_check)
        # a request is an event, not a state: cleared at once, so that the same request again
        # signals again and no project file stores it
        QTimer.singleShot(0, lambda: self.ctx.selection.clear_item(REQUEST_KIND))

    # ------------------------------------------------------------------ the job

    def image_indices(self) -> tuple[int, ...]:
        """The images checked: the selected one first, then others spread evenly over the set."""
        images = self.ctx.selection.images
        n = len(images.records) if images is not None else 0  # type: ignore[attr-defined]
        if not n:
            return ()
        cur = self.ctx.selection.current_image
        cur = cur if 0 <= cur < n else 0
        want = min(self.images_spin.value(), n)
        others = [int(i) for i in np.unique(np.linspace(0, n - 1, want).round().astype(int)) if i != cur]
        return (cur, *others[:want - 1])

    def params(self) -> Any:
        from engine.sanity.run import SanityParams

        uses_layer, _u = self._needs()
        return SanityParams(explanation=self.explanation(), mode=self.mode(),
                            layer=self.layer() if uses_layer else None, unit=self.unit_spin.value(),
                            indices=self.image_indices(), keep_maps=8)

    def run_check(self) -> JobHandle | None:
        """Run the check with the current settings (supersedes a run under way)."""
        session, images = self.ctx.session, self.ctx.selection.images
        if session.model is None or images is None or not self.explanation():
            self._render()
            return None
        params = self.params()

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, Any]:
            from engine.sanity.run import run

            return (yield from run(backend, loaded.cache_id, images, params))

        if self._handle is not None:
            self._handle.cancel()
        handle = session.run(f"Sanity check: {self.explanation_combo.currentText()}", job, key="sanity")
        if handle is None:
            return None
        self._handle = handle
        handle.finished.connect(lambda r, h=handle: self._done(h, r))
        handle.failed.connect(lambda e, h=handle: self._failed(h, e))
        handle.cancelled.connect(lambda h=handle: self._cancelled(h))
        handle.progress.connect(self._progress)
        self.progress.setValue(0)
        self.progress.show()
        self._error = ""
        self._update_controls()
        self._render_status()
        return handle

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _done(self, handle: JobHandle, result: Any) -> None:
        if handle is not self._handle:  # superseded by a newer run
            return
        self._handle = None
        self.progress.hide()
        self.result = result
        self._update_controls()
        self._render()
        self.result_ready.emit(result)

    def _failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is not self._handle:
            return
        from engine.types import ConvLensError

        self._handle = None
        self.progress.hide()
        self._error = str(error) if isinstance(error, ConvLensError) else f"{type(error).__name__}: {error}"
        self._update_controls()
        self._render()

    def _cancelled(self, handle: JobHandle) -> None:
        if handle is not self._handle:  # superseded: the newer job reports
            return
        self._handle = None
        self.progress.hide()
        self._error = "cancelled (press Run to compute it again)"
        self._update_controls()
        self._render()

    def _progress(self, p: Progress) -> None:
        show_progress(self.progress, p)

    # ------------------------------------------------------------------ rendering

    def _render(self) -> None:
        self._render_status()
        self._render_plot()
        self._render_numbers()
        self._render_strip()
        self._fit_details()

    def _render_status(self) -> None:
        model = self.ctx.session.model
        if model is None or self.ctx.selection.images is None:
            text = NEED_MODEL
        elif self._unsupported:
            text = self._unsupported
        elif self._error:
            text = f"Could not run the sanity check: {self._error}"
        elif self._handle is not None:
            text = "Randomising the weights layer by layer and recomputing the explanation…"
        elif self.result is None:
            text = ("Listing the explanations this model supports…" if self._list_handle is not None else
                    "Choose an explanation and press Run: its similarity to the original is measured as the "
                    "weights are randomised from the output layer down.")
        else:
            text = ""
        self.status.setText(text)
        self.status.setVisible(bool(text))

    def _render_plot(self) -> None:
        self.plot.clear()
        self.legend_label.setText("")
        res = self.result
        axis = self.plot.getAxis("bottom")
        if res is None or not res.n_steps:
            axis.setTicks([[]])
            return
        labels = ["original", *res.steps]
        axis.setTicks([[(i, lab) for i, lab in enumerate(labels)]])
        mean, spread = res.mean(), res.spread()
        x = np.arange(len(labels), dtype=float)
        for m, name in enumerate(res.metrics):
            c = COLOURS[m % len(COLOURS)]
            y = np.concatenate([[1.0], mean[:, m]])
            sd = np.concatenate([[0.0], np.nan_to_num(spread[:, m])])
            ok = np.isfinite(y)
            self.plot.plot(x[ok], y[ok], pen=pg.mkPen(c, width=line_width(m, len(res.metrics), 2.0)), symbol="o",
                           symbolSize=6, symbolBrush=c, symbolPen=c, name=metric_label(name))
            if res.values.shape[2] > 1:
                self.plot.addItem(pg.ErrorBarItem(x=x[ok], y=y[ok], height=2 * sd[ok], beam=0.1,
                                                  pen=pg.mkPen(QColor(c.red(), c.green(), c.blue(), 120))))
        lo = float(np.nanmin(np.concatenate([[0.0], (mean - spread).ravel()])))
        # room above 1 for the one-row legend: the curves start at 1 ("original")
        self.legend_label.setText(" &nbsp; ".join(
            f"<span style='color:{COLOURS[m % len(COLOURS)].name()}'>━━●━━</span>&nbsp;{html.escape(metric_label(n))}"
            for m, n in enumerate(res.metrics)))
        self.plot.setYRange(max(-1.05, min(-0.2, lo - 0.05)), 1.15, padding=0)  # room for the label of 1
        self.plot.getAxis("left").setTicks([[(v, f"{v:g}") for v in np.arange(-1.0, 1.01, 0.5)]])
        self.plot.setXRange(-0.3, len(labels) - 0.7, padding=0)
        self.plot.setLabel("bottom", "layers randomised, from the output down" if res.mode == "cascade"
                           else "the one layer randomised")

    def outcome(self) -> list[tuple[str, float | None, str | None]]:
        """Per metric: (name, the mean at the last step, the first layer whose step is below 0.5)."""
        res = self.result
        if res is None or not res.n_steps:
            return []
        out = []
        for name in res.metrics:
            last = float(res.series(name)[-1])
            d = res.drop_step(name)
            out.append((name, last if np.isfinite(last) else None, None if d is None else res.steps[d]))
        return out

    def verdict(self) -> str:
        """One sentence: does the explanation pass (every metric drops below 0.5 at some step)?"""
        out = self.outcome()
        if not out:
            return ""
        stays = [metric_label(n) for n, _last, drop in out if drop is None]
        if not stays:
            return "Passes: the explanation changes (every similarity falls below 0.5) when the weights are randomised."
        return (f"Fails for {', '.join(stays)}: it stays above 0.5 at every step of the randomisation, so the "
                "explanation depends little on what the model learned.")

    def _numbers_text(self) -> str:
        res = self.result
        if res is None:
            return ""
        parts = []
        for name, last, drop in self.outcome():
            v = "n/a" if last is None else f"{last:.3f}"
            parts.append(f"{html.escape(metric_label(name))}: <b>{v}</b> at the last step ({res.steps[-1]}), " +
                         (f"below 0.5 from <b>{drop}</b>" if drop else "<span style='color:#d21e1e'>never below "
                                                                       "0.5</span>"))
        items = f"{res.values.shape[2]} {res.item}{'s' if res.values.shape[2] != 1 else ''}"
        extra = f" · not randomised (no effect on the class output): {', '.join(res.dropped)}" if res.dropped else ""
        cached = " (from cache)" if res.from_cache else ""
        verdict = self.verdict()
        colour = "#1e8c32" if verdict.startswith("Passes") else "#d21e1e"
        head = f"<b style='color:{colour}'>{html.escape(verdict)}</b><br>" if verdict else ""
        return head + f"{res.title}, {items}{cached}: " + "; ".join(parts) + extra

    def _render_numbers(self) -> None:
        self.numbers.setText(self._numbers_text())
        self.numbers.setVisible(self.result is not None)

    def strip_row(self) -> int | None:
        """The row of the kept maps that is the selected image (None: not checked, or no maps)."""
        res = self.result
        if res is None or not len(res.original_maps):
            return None
        cur = self.ctx.selection.current_image
        hits = np.nonzero(res.indices[:len(res.original_maps)] == cur)[0]
        return int(hits[0]) if hits.size else None

    def _render_strip(self) -> None:
        res = self.result
        row = self.strip_row()
        if res is None or not len(res.original_maps):
            self.strip_title.setText("" if res is None else "No maps: this explanation is compared as values.")
            self.strip.set_placeholder("", QSize(200, 4))
            return
        if row is None:
            self.strip_title.setText("The selected image was not checked: press Run to check it.")
            self.strip.set_placeholder("", QSize(200, 4))
            return
        maps = [res.original_maps[row], *[res.step_maps[s, row] for s in range(res.n_steps)]]
        tiles = np.stack([heat_tile(m) for m in maps])
        labels = ["original", *res.steps]
        ids = list(range(len(maps)))
        zero = [not np.any(m) for m in maps]
        self.strip.set_tiles(tiles, ids, len(maps), labels=[lab[:9] for lab in labels],
                             tips=[f"{lab}: the map is zero everywhere" if z else f"{lab}: |map| scaled by its maximum"
                                   for lab, z in zip(labels, zero, strict=True)])
        self.strip_title.setText(f"{res.paths[row]}: the original map, then after each step (|map|, each scaled "
                                 "to its own maximum" + ("; black: zero everywhere" if any(zero) else "") + ")")

    # ------------------------------------------------------------------ figure

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("similarity", "Sanity check: similarity vs the layer randomised, and the maps strip")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("maps", "The original and randomised maps of the selected image", True),
                FigureOption("numbers", "Per metric: the last step and where it drops below 0.5", True)]

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """The similarity chart (one line per metric, a band of one standard deviation), the maps
        strip of the selected image, and per metric the outcome, composed from the result."""
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        res = self.result
        model = self.ctx.session.model
        if res is None or model is None or not res.n_steps:
            raise ValueError("Sanity check: nothing to export yet: choose an explanation and press Run")
        mean, spread = res.mean(), res.spread()
        series = [(metric_label(name), mean[:, m], spread[:, m] if res.values.shape[2] > 1 else np.zeros(res.n_steps),
                   COLOURS[m % len(COLOURS)]) for m, name in enumerate(res.metrics)]
        xlab = "layers randomised, from the output down" if res.mode == "cascade" else "the one layer randomised"
        elements: list[Any] = [SimilarityChart(list(res.steps), series, xlab)]
        if include.get("numbers", True):
            lines = [f"{metric_label(name)}: {('n/a' if last is None else f'{last:.3f}')} at the last step ({res.steps[-1]}); "
                     + (f"below 0.5 from {drop}" if drop else "never below 0.5")
                     for name, last, drop in self.outcome()]
            if res.dropped:
                lines.append(f"not randomised (the class output does not depend on them): {', '.join(res.dropped)}")
            if self.verdict():
                lines.insert(0, self.verdict())
            elements.append(Text("\n".join(lines)))
        row = self.strip_row()
        if include.get("maps", True) and row is not None:
            maps = [res.original_maps[row], *[res.step_maps[s, row] for s in range(res.n_steps)]]
            tiles = [Tile.of(heat_tile(m, max(m.shape)), lab if np.any(m) else f"{lab} (all zero)")
                     for m, lab in zip(maps, ["original", *res.steps], strict=True)]
            elements.append(Text(f"{res.paths[row]}: |map|, each scaled to its own maximum (inferno)", bold=True))
            elements.append(TileGrid(tiles, columns=min(len(tiles), 8), gap=3.0))
        mode = "cascading randomisation from the output layer down" if res.mode == "cascade" else \
            "independent randomisation, one layer at a time"
        where = f" at {res.layer}" if res.layer else ""
        unit = f" unit {res.unit}" if res.explanation == "heatmap" else ""
        items = f"{res.values.shape[2]} {res.item}{'s' if res.values.shape[2] != 1 else ''}"
        subtitle = (f"{os.path.basename(res.model)}{where}{unit}; {mode}; mean over {items} "
                    f"(band: one standard deviation); Adebayo et al., NeurIPS 2018")
        return Figure(f"Sanity check of {res.title} ({model.name})", subtitle, elements, options.width_pt, options.dpi)

    # ------------------------------------------------------------------ menus, state

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        return [("Run the sanity check (dock settings)", self._run_from_menu)]

    def _run_from_menu(self) -> None:
        dock = self.parentWidget()
        if isinstance(dock, QDockWidget):
            dock.show()
            dock.raise_()
        self.run_check()

    def save_state(self) -> dict[str, Any]:
        return {"explanation": self.explanation(), "mode": self.mode(), "layer": self.layer() or "",
                "unit": self.unit_spin.value(), "images": self.images_spin.value()}

    def restore_state(self, state: dict[str, Any]) -> None:
        if self.explanation_combo.count() == 0 and state.get("explanation"):
            self._pending_state = dict(state)  # applied once the explanations are known
            return
        self._pending_state = {}
        self.set_params(explanation=state.get("explanation") or None, mode=state.get("mode"),
                        layer=state.get("layer") or None, unit=state.get("unit"), images=state.get("images"))

    def shutdown(self) -> None:
        self.cancel()
