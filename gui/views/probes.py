"""The transformation probe (Worrall et al., ICCV 2017; Remelli et al., CVPR 2020): how the
features of the chosen layers move when a known transformation is applied to the input.

Controls: the transformation (rotation, translation x / y, scale, brightness), its range
(``start:stop:step`` or a list; degrees, model-input pixels, factors or fractions of full range),
the fill for the pixels a geometric transformation brings in, the layers (the model's default
spatial layers to start with), and whether to probe the whole image set or only the selected
image. The probe of the current settings starts when the view is first shown (so ``convlens figure --view
probes`` has something to export); after that "Run" starts :func:`engine.probes.run.run` on the inference worker through
``ctx.session.run`` (key ``"probe"``: a new run supersedes the one under way), with progress;
"Cancel" stops it. The engine caches results on disk, so running a setting again is immediate.

Shown, from the engine's result:

* **invariance curves**: per layer, the mean normalised feature distance
  ``||psi(T_theta x) - psi(x)|| / ||psi(x)||`` vs theta, beside the same distance on the model
  input (dashed black) and the share of images whose prediction is kept (dashed grey);
* **response curve of the selected unit**: the selected layer's unit (``ctx.selection`` layer and
  unit, when the layer was probed; else the first probed layer and its most varying unit), its
  spatially averaged activation vs theta, mean over the images (solid) and for the selected
  image (dashed); picking a layer or unit here selects it everywhere;
* the numbers per layer: the linear map's held-out relative error (and the identity map's), and
  how well the maps compose (``||M_a M_b - M_(a+b)||_F / ||M_(a+b)||_F``);
* the **sweep strip**: the selected image as the model sees it at each value, with the predicted
  class and its probability under each (a changed prediction in red). Clicking a tile publishes
  the generic selection item ``("probe_value", theta)``.

Figures: ``summary`` (invariance curves, the linear maps' errors, the numbers, the strip) and
``unit`` (the selected unit's response curve and the strip).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QAction, QColor, QPainter, QPen, QPolygonF, QShowEvent
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QSpinBox,
    QSplitter,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from engine.types import Progress

from ..context import AppContext
from ..figures import Element, Figure, FigureKind, FigureOption, FigureOptions, Legend, Row, Text, Tile, TileGrid, resample
from ..figures.model import CAPTION_PT, INK, MUTED, font, metrics
from ..jobs import JobHandle, show_progress
from ..tiles import TileMosaic, display_size
from .base import View

__all__ = ["ITEM_KIND", "LineChart", "ProbesView"]

ITEM_KIND = "probe_value"
"""The generic selection item a click on a strip tile publishes: the sweep value (float)."""
STRIP_SIDE = 56
"""Longer side of a strip tile in the dock."""
CAPTION_PX = 26
"""Height of the two caption lines under a strip tile (value; class and probability)."""
RED = np.array([210, 30, 30], dtype=np.uint8)
NEED_MODEL = "Load a model and an image set, choose a transformation and press Run."
_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207),
            (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34)]
_LABELS = {"rotate": "Rotation", "translate-x": "Translation x", "translate-y": "Translation y", "scale": "Scale",
           "brightness": "Brightness"}
_QUANTITIES = {"rotate": "rotation angle", "translate-x": "shift along x", "translate-y": "shift along y",
               "scale": "scale factor", "brightness": "brightness change"}


def _colour(i: int) -> QColor:
    return QColor(*_COLOURS[i % len(_COLOURS)])


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None or not math.isfinite(v) else format(v, spec)


# --------------------------------------------------------------------------------------------
# a line chart element for the figures
# --------------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


@dataclass
class LineChart(Element):
    """Line series over shared x values: axes with ticks and labels, grid, legend; a series is
    (name, ys, colour, dashed); NaN points are left out."""

    xs: Sequence[float]
    series: Sequence[tuple[str, Sequence[float], QColor, bool]]
    x_label: str = ""
    y_label: str = ""
    title: str = ""
    plot_height: float = 95.0
    y_from_zero: bool = True

    def _legend(self) -> Legend:
        return Legend([(f"{n} (dashed)" if d else n, c) for n, _v, c, d in self.series])

    def _range(self) -> tuple[float, float, float, float]:
        ys = [float(y) for _n, v, _c, _d in self.series for y in v if math.isfinite(float(y))]
        ylo = 0.0 if self.y_from_zero else (min(ys) if ys else 0.0)
        yhi = max(ys) if ys else 1.0
        if self.y_from_zero:
            ylo = min(ylo, min(ys, default=0.0))
        if yhi - ylo < 1e-12:
            yhi = ylo + (abs(ylo) or 1.0) * 0.1
        pad = (yhi - ylo) * 0.05
        ylo = ylo if (self.y_from_zero and ylo == 0) else ylo - pad
        xlo, xhi = (min(self.xs), max(self.xs)) if len(self.xs) else (0.0, 1.0)
        if xhi - xlo < 1e-12:
            xlo, xhi = xlo - 0.5, xhi + 0.5
        return xlo, xhi, ylo, yhi + pad

    def height(self, width: float, dpi: int) -> float:
        fm = metrics(font(CAPTION_PT))
        title = fm.height() + 3 if self.title else 0
        bottom = fm.height() + 3 + (fm.height() + 2 if self.x_label else 0)
        return title + self.plot_height + bottom + self._legend().height(width, dpi) + 3

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        f, fb = font(CAPTION_PT), font(CAPTION_PT, True)
        fm = metrics(f)
        y = rect.top()
        if self.title:
            painter.setFont(fb)
            painter.setPen(INK)
            painter.drawText(QRectF(rect.left(), y, rect.width(), fm.height() + 1), int(Qt.AlignmentFlag.AlignLeft),
                             self.title)
            y += fm.height() + 3
        xlo, xhi, ylo, yhi = self._range()
        yt = _ticks(ylo, yhi)
        xt = _ticks(xlo, xhi, 6)
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
                             int(Qt.AlignmentFlag.AlignHCenter), f"{t:g}")
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
        painter.save()
        painter.setClipRect(plot.adjusted(-2, -2, 2, 2))
        for _n, ys, color, dashed in self.series:
            pts = [to(float(px), float(py)) for px, py in zip(self.xs, ys, strict=False) if math.isfinite(float(py))]
            pen = QPen(color, 1.1)
            if dashed:
                pen.setStyle(Qt.PenStyle.DashLine)
            painter.setPen(pen)
            if len(pts) > 1:
                painter.drawPolyline(QPolygonF(pts))
            painter.setBrush(color)
            painter.setPen(Qt.PenStyle.NoPen)
            for p in pts:
                painter.drawEllipse(p, 1.1, 1.1)
            painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.restore()
        bottom = plot.bottom() + fm.height() + 3 + (fm.height() + 2 if self.x_label else 0)
        legend = self._legend()
        legend.paint(painter, QRectF(plot.left(), bottom, plot.width(), legend.height(plot.width(), dpi)), dpi)


# --------------------------------------------------------------------------------------------
# the view
# --------------------------------------------------------------------------------------------


def _framed(rgb: np.ndarray, width: int = 2) -> np.ndarray:
    out = np.array(rgb[..., :3], dtype=np.uint8, copy=True)
    b = max(1, min(width, out.shape[0] // 2, out.shape[1] // 2))
    out[:b], out[-b:], out[:, :b], out[:, -b:] = RED, RED, RED, RED
    return out


class ProbesView(View):
    """Transformation probes: invariance, unit responses, linear maps, the sweep strip."""

    title = "Probes"
    object_name = "probes"
    order = 45

    #: a result arrived and is shown (its ProbeResult)
    result_ready = Signal(object)
    #: the sweep strip of the selected image was drawn
    strip_ready = Signal()

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.result: Any = None  # engine ProbeResult shown
        self._handle: JobHandle | None = None
        self._strip_handle: JobHandle | None = None
        self._strip_key: tuple[Any, ...] | None = None
        self._strip: list[np.ndarray] | None = None  # model views of the selected image along the sweep
        self._error = ""
        self._layers: list[str] = []  # chosen layers
        self._pending_layers: list[str] = []  # restored before the model's layers were known
        self._build()
        sel, session = ctx.selection, ctx.session
        session.model_loaded.connect(self._model_loaded)
        sel.images_changed.connect(self._images_changed)
        sel.current_image_changed.connect(lambda _i: self._image_changed())
        sel.layer_changed.connect(self._selection_layer)
        sel.unit_changed.connect(self._selection_unit)
        if session.model is not None:
            self._model_loaded(session.model)
        self._render()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        from engine.probes.transforms import DEFAULT_RANGES, FILLS, TRANSFORMS

        self.transform_combo = QComboBox()
        for t in TRANSFORMS:
            self.transform_combo.addItem(_LABELS[t], t)
        self.transform_combo.setToolTip("The transformation applied to each image before the model's preprocessing")
        self.transform_combo.currentIndexChanged.connect(self._transform_changed)
        self.range_edit = QLineEdit(DEFAULT_RANGES["rotate"])
        self.range_edit.setToolTip("start:stop:step or a comma-separated list: degrees (rotation), model-input pixels "
                                   "(translation), factors (scale), fractions of the full range (brightness)")
        self.range_edit.setMaximumWidth(120)
        self.range_edit.returnPressed.connect(self.run_probe)
        self.fill_combo = QComboBox()
        for fill in FILLS:
            self.fill_combo.addItem(fill, fill)
        self.fill_combo.setToolTip("Pixels a geometric transformation brings in from outside the image: reflect "
                                   "(mirrored), mean colour, black, edge (nearest border pixel), wrap (periodic)")
        self.layer_button = QToolButton()
        self.layer_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.layer_button.setToolTip("The layers probed (one forward pass captures them all)")
        self.layer_menu = QMenu(self)
        self.layer_button.setMenu(self.layer_menu)
        self.scope_combo = QComboBox()
        self.scope_combo.addItem("all images", "set")
        self.scope_combo.addItem("selected image", "image")
        self.scope_combo.setToolTip("Probe the whole image set (linear maps are fitted on 70% and tested on the rest) "
                                    "or only the selected image")
        self.features_combo = QComboBox()
        self.features_combo.addItem("pooled", "pooled")
        self.features_combo.addItem("flat", "flat")
        self.features_combo.setToolTip("Features of the linear maps M_theta: each unit's spatial mean (pooled), or the "
                                       "whole map flattened (randomly projected to 256 dimensions when larger)")
        self.run_button = QPushButton("Run")
        self.run_button.clicked.connect(self.run_probe)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setMaximumWidth(160)
        self.progress.hide()

        top = QHBoxLayout()
        for label, w in (("", self.transform_combo), ("Range", self.range_edit), ("Fill", self.fill_combo),
                         ("", self.layer_button)):
            if label:
                top.addWidget(QLabel(label))
            top.addWidget(w)
        top.addStretch(1)
        second = QHBoxLayout()
        for label, w in (("Images", self.scope_combo), ("Maps on", self.features_combo)):
            second.addWidget(QLabel(label))
            second.addWidget(w)
        self.status = QLabel()
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        second.addWidget(self.status, 1)
        second.addWidget(self.progress)
        second.addWidget(self.run_button)
        second.addWidget(self.cancel_button)

        self.inv_plot = self._plot("distance", "")
        self.inv_plot.setToolTip("||psi(T x) - psi(x)|| / ||psi(x)|| per layer, mean over the images; dashed black: the "
                                 "model input itself; dashed grey: share of images whose prediction is kept")
        self.resp_plot = self._plot("activation", "")
        self.resp_plot.setToolTip("The selected unit's spatially averaged activation: mean over the images (solid) "
                                  "and for the selected image (dashed)")
        self.unit_layer_combo = QComboBox()
        self.unit_layer_combo.setToolTip("Layer of the unit whose response curve is shown (selects it everywhere)")
        self.unit_layer_combo.activated.connect(self._pick_layer)
        self.unit_spin = QSpinBox()
        self.unit_spin.setRange(0, 0)
        self.unit_spin.setKeyboardTracking(False)
        self.unit_spin.setToolTip("The unit (channel) whose response curve is shown (selects it everywhere)")
        self.unit_spin.valueChanged.connect(self._pick_unit)
        self.top_button = QPushButton("Most varying")
        self.top_button.setToolTip("Show the unit whose mean response varies most along the sweep")
        self.top_button.clicked.connect(self._pick_top_unit)
        unit_row = QHBoxLayout()
        unit_row.setContentsMargins(0, 0, 0, 0)
        unit_row.addWidget(QLabel("Unit"))
        unit_row.addWidget(self.unit_layer_combo)
        unit_row.addWidget(self.unit_spin)
        unit_row.addWidget(self.top_button)
        unit_row.addStretch(1)
        resp_box = QWidget()
        rl = QVBoxLayout(resp_box)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addLayout(unit_row)
        rl.addWidget(self.resp_plot, 1)
        self.inv_legend = _legend_label()
        self.resp_legend = _legend_label()
        rl.addWidget(self.resp_legend)
        inv_box = QWidget()
        il = QVBoxLayout(inv_box)
        il.setContentsMargins(0, 0, 0, 0)
        self.inv_title = QLabel("Invariance per layer")
        # a long axis name (brightness change (fraction of full range)) must not widen the dock
        self.inv_title.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        il.addWidget(self.inv_title)
        il.addWidget(self.inv_plot, 1)
        il.addWidget(self.inv_legend)
        self.inv_title.setFixedHeight(self.unit_spin.sizeHint().height())
        self.plots = QSplitter(Qt.Orientation.Horizontal)
        self.plots.addWidget(inv_box)
        self.plots.addWidget(resp_box)
        self.plots.setChildrenCollapsible(False)

        self.numbers = QLabel()
        self.numbers.setWordWrap(True)
        self.numbers.setTextFormat(Qt.TextFormat.RichText)
        self.numbers.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.numbers.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.numbers_scroll = QScrollArea()
        self.numbers_scroll.setWidget(self.numbers)
        self.numbers_scroll.setWidgetResizable(True)
        self.numbers_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.numbers_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.numbers_scroll.setMinimumHeight(40)
        self.strip_title = QLabel()
        self.strip_title.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.strip = TileMosaic(label_height=0)
        self.strip.clicked.connect(self._tile_clicked)
        self.strip_scroll = QScrollArea()
        self.strip_scroll.setWidget(self.strip)
        self.strip_scroll.setWidgetResizable(False)
        self.strip_scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        bar = self.strip_scroll.horizontalScrollBar().sizeHint().height()
        self.strip_scroll.setFixedHeight(STRIP_SIDE + CAPTION_PX + 2 * self.strip.gap + bar + 4)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.setSpacing(4)
        layout.addLayout(top)
        layout.addLayout(second)
        layout.addWidget(self.plots, 1)
        layout.addWidget(self.numbers_scroll)
        layout.addWidget(self.strip_title)
        layout.addWidget(self.strip_scroll)

    @staticmethod
    def _plot(left: str, bottom: str) -> pg.PlotWidget:
        p = pg.PlotWidget(background="w")
        p.setMinimumHeight(80)
        p.setMinimumWidth(160)
        p.setMenuEnabled(False)
        p.hideButtons()
        p.showGrid(x=True, y=True, alpha=0.15)
        p.setLabel("left", left)
        p.setLabel("bottom", bottom)
        for sd in ("left", "bottom"):
            p.getAxis(sd).setPen("k")
            p.getAxis(sd).setTextPen("k")
            p.getAxis(sd).enableAutoSIPrefix(False)
        return p

    # ------------------------------------------------------------------ View API

    def save_state(self) -> dict[str, Any]:
        return {"transform": self.transform(), "range": self.range_edit.text(), "fill": self.fill_combo.currentData(),
                "layers": list(self._layers), "scope": self.scope_combo.currentData(),
                "features": self.features_combo.currentData()}

    def restore_state(self, state: dict[str, Any]) -> None:
        for combo, key in ((self.transform_combo, "transform"), (self.fill_combo, "fill"), (self.scope_combo, "scope"),
                           (self.features_combo, "features")):
            v = state.get(key)
            if isinstance(v, str) and combo.findData(v) >= 0:
                combo.blockSignals(True)
                combo.setCurrentIndex(combo.findData(v))
                combo.blockSignals(False)
        if isinstance(state.get("range"), str):
            self.range_edit.setText(state["range"])
        layers = state.get("layers")
        if isinstance(layers, list) and all(isinstance(x, str) for x in layers) and layers:
            self.set_layers(layers)

    def shutdown(self) -> None:
        for h in (self._handle, self._strip_handle):
            if h is not None:
                h.cancel()

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        return [("Transformation probe", self._raise_and_run)]

    def _raise_and_run(self) -> None:
        dock = self.parentWidget()
        if dock is not None:
            dock.show()
            dock.raise_()
        self.run_probe()

    # ------------------------------------------------------------------ settings

    def transform(self) -> str:
        return str(self.transform_combo.currentData())

    def layers(self) -> list[str]:
        return list(self._layers)

    def set_layers(self, names: Sequence[str]) -> None:
        """Probe ``names`` (layers of the loaded model; unknown names are ignored)."""
        known = [a.data() for a in self.layer_menu.actions()]
        if not known:
            self._pending_layers = list(names)
        want = [n for n in names if n in known] if known else list(names)
        self._check_layers(want)

    def set_params(self, *, transform: str | None = None, values: str | None = None, fill: str | None = None,
                   layers: Sequence[str] | None = None, scope: str | None = None, features: str | None = None) -> None:
        """Change the settings as the controls do (nothing runs until :meth:`run_probe`)."""
        if transform is not None:
            self.transform_combo.setCurrentIndex(self.transform_combo.findData(transform))
        if values is not None:
            self.range_edit.setText(values)
        for combo, v in ((self.fill_combo, fill), (self.scope_combo, scope), (self.features_combo, features)):
            if v is not None:
                i = combo.findData(v)
                if i < 0:
                    raise ValueError(f"unknown setting {v!r}")
                combo.setCurrentIndex(i)
        if layers is not None:
            self.set_layers(layers)

    def _transform_changed(self, _i: int) -> None:
        from engine.probes.transforms import DEFAULT_RANGES, GEOMETRIC

        self.range_edit.setText(DEFAULT_RANGES[self.transform()])
        self.fill_combo.setEnabled(self.transform() in GEOMETRIC)

    def _layer_text(self) -> None:
        n = len(self._layers)
        text = ", ".join(self._layers) if n <= 3 else f"{', '.join(self._layers[:2])} +{n - 2}"
        self.layer_button.setText(f"Layers: {text or 'none'}")

    def _check_layers(self, names: list[str]) -> None:
        self._layers = list(names)
        for a in self.layer_menu.actions():
            a.blockSignals(True)
            a.setChecked(a.data() in names)
            a.blockSignals(False)
        self._layer_text()

    def _toggle_layer(self) -> None:
        self._layers = [a.data() for a in self.layer_menu.actions() if a.isChecked()]
        self._layer_text()

    def params(self) -> Any:
        """The engine's ProbeParams of the controls (raises ConvLensError for a bad range)."""
        from engine.probes.run import ProbeParams
        from engine.probes.transforms import parse_range

        return ProbeParams(transform=self.transform(), values=parse_range(self.range_edit.text()),
                           fill=str(self.fill_combo.currentData()), layers=tuple(self._layers),
                           features=str(self.features_combo.currentData()))

    # ------------------------------------------------------------------ state changes

    def _model_loaded(self, info: Any) -> None:
        self._forget()
        self.layer_menu.clear()
        defaults = info.default_layers
        for li in info.layers:
            if len(li.shape) not in (1, 3):
                continue
            act = QAction(f"{li.name}  ({'×'.join(map(str, li.shape))})", self.layer_menu)
            act.setData(li.name)
            act.setCheckable(True)
            act.setChecked(li.name in defaults)
            act.toggled.connect(lambda _on: self._toggle_layer())
            self.layer_menu.addAction(act)
        known = [a.data() for a in self.layer_menu.actions()]
        want = [n for n in self._pending_layers if n in known] or defaults
        self._pending_layers = []
        self._check_layers([n for n in want if n in known])
        self._render()
        self._auto()

    def _images_changed(self, *_args: object) -> None:
        self._forget()
        self._render()
        self._auto()

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self.when_on_screen(self._auto)

    def _auto(self) -> None:
        """Shown with nothing computed (and nothing failed or cancelled): probe the current settings."""
        if self.on_screen() and self.result is None and self._handle is None and not self._error and self._layers:
            self.run_probe()

    def _forget(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self.result = None
        self._strip = None
        self._strip_key = None
        self._error = ""
        self.progress.hide()

    def _image_changed(self) -> None:
        self._strip = None
        self._render_responses()
        self._render_strip()

    def _selection_layer(self, layer: str) -> None:
        if self.result is not None and layer in self.result.layers:
            self.unit_layer_combo.blockSignals(True)
            self.unit_layer_combo.setCurrentIndex(self.result.layers.index(layer))
            self.unit_layer_combo.blockSignals(False)
            self._sync_unit_range()
            self._render_responses()

    def _selection_unit(self, unit: int) -> None:
        if self.result is not None and 0 <= unit <= self.unit_spin.maximum():
            self.unit_spin.blockSignals(True)
            self.unit_spin.setValue(unit)
            self.unit_spin.blockSignals(False)
            self._render_responses()

    def _pick_layer(self, _i: int) -> None:
        self._sync_unit_range()
        layer = self.response_layer()
        if layer:
            self.ctx.selection.layer = layer
        self._render_responses()

    def _pick_unit(self, unit: int) -> None:
        if self.result is not None:
            self.ctx.selection.unit = unit
        self._render_responses()

    def _pick_top_unit(self) -> None:
        layer = self.response_layer()
        if self.result is not None and layer:
            self.unit_spin.setValue(self.result.top_units(layer, 1)[0])

    def _sync_unit_range(self) -> None:
        layer = self.response_layer()
        if self.result is None or not layer:
            return
        units = self.result.pooled[self.result.layer_index(layer)].shape[2]
        self.unit_spin.blockSignals(True)
        self.unit_spin.setRange(0, max(0, units - 1))
        self.unit_spin.blockSignals(False)

    def response_layer(self) -> str:
        return str(self.unit_layer_combo.currentData() or "")

    def unit(self) -> int:
        return self.unit_spin.value()

    def _tile_clicked(self, k: int) -> None:
        if self.result is not None and 0 <= k < len(self.result.values):
            self.ctx.selection.set_item(ITEM_KIND, float(self.result.values[k]))
            self.strip.set_current(k)

    # ------------------------------------------------------------------ the job

    def run_probe(self) -> JobHandle | None:
        """Start the probe of the current settings (superseding one under way)."""
        from engine.types import ConvLensError

        session, images = self.ctx.session, self.ctx.selection.images
        if session.model is None or images is None:
            self._error = ""
            self._render_status()
            return None
        try:
            params = self.params()
            params.check()
            if not params.layers:
                raise ConvLensError("choose at least one layer")
        except ConvLensError as e:
            self._error = str(e)
            self._render_status()
            return None
        data = images
        if self.scope_combo.currentData() == "image":
            cur = self.ctx.selection.current_image
            if cur < 0:
                self._error = "select an image first (or probe all images)"
                self._render_status()
                return None
            from engine.data.images import ImageSet

            data = ImageSet(images.root, (images.records[cur],))  # type: ignore[attr-defined]

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, Any]:
            from engine.probes.run import run

            return (yield from run(backend, loaded.cache_id, data, params))

        what = _LABELS.get(params.transform, params.transform).lower()
        handle = session.run(f"Probe: {what} {self.range_edit.text()}", job, key="probe", on_done=self._done)
        if handle is None:
            return None
        if self._handle is not None:
            self._handle.cancel()
        self._handle = handle
        handle.failed.connect(lambda e, h=handle: self._failed(h, e))
        handle.cancelled.connect(lambda h=handle: self._cancelled(h))
        handle.progress.connect(self._progress)
        self.progress.setValue(0)
        self.progress.show()
        self._error = ""
        self._render_status()
        return handle

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _done(self, result: Any) -> None:
        self._handle = None
        self.progress.hide()
        self.result = result
        self._strip = None
        self._strip_key = None
        self.unit_layer_combo.blockSignals(True)
        self.unit_layer_combo.clear()
        for name in result.layers:
            self.unit_layer_combo.addItem(name, name)
        sel = self.ctx.selection
        layer = sel.layer if sel.layer in result.layers else result.layers[0]
        self.unit_layer_combo.setCurrentIndex(result.layers.index(layer))
        self.unit_layer_combo.blockSignals(False)
        self._sync_unit_range()
        unit = sel.unit if layer == sel.layer and 0 <= sel.unit <= self.unit_spin.maximum() else \
            result.top_units(layer, 1)[0]
        self.unit_spin.blockSignals(True)
        self.unit_spin.setValue(unit)
        self.unit_spin.blockSignals(False)
        self._render()
        self.result_ready.emit(result)

    def _failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is not self._handle:
            return
        from engine.types import ConvLensError

        self._handle = None
        self.progress.hide()
        self._error = str(error) if isinstance(error, ConvLensError) else f"{type(error).__name__}: {error}"
        self._render_status()

    def _cancelled(self, handle: JobHandle) -> None:
        if handle is not self._handle:  # superseded: the newer job reports
            return
        self._handle = None
        self.progress.hide()
        self._error = "cancelled (press Run to compute it again)"
        self._render_status()

    def _progress(self, p: Progress) -> None:
        show_progress(self.progress, p)

    # ------------------------------------------------------------------ the strip

    def result_row(self, image: int | None = None) -> int | None:
        """The result's row of image-set index ``image`` (default: the selected image)."""
        image = self.ctx.selection.current_image if image is None else image
        if self.result is None or image < 0:
            return None
        images = self.ctx.selection.images
        if images is None or image >= len(images.records):  # type: ignore[attr-defined]
            return None
        path = images.records[image].path  # type: ignore[attr-defined]
        for j, p in enumerate(self.result.paths):
            if os.path.abspath(os.path.join(self.result.image_source, p)) == os.path.abspath(path):
                return j
        return None

    def _strip_request(self) -> tuple[Any, ...] | None:
        res, model, images = self.result, self.ctx.session.model, self.ctx.selection.images
        cur = self.ctx.selection.current_image
        if res is None or model is None or images is None or cur < 0 or cur >= len(images.records):  # type: ignore[attr-defined]
            return None
        path = images.records[cur].path  # type: ignore[attr-defined]
        return (path, res.transform, tuple(float(v) for v in res.values), res.params.fill, model.spec.preprocess)

    def strip_views(self, wait: bool = False) -> list[np.ndarray] | None:
        """The selected image as the model sees it at each sweep value (decoded on the light
        worker unless ``wait``)."""
        key = self._strip_request()
        if key is None:
            return None
        if self._strip is not None and self._strip_key == key:
            return self._strip
        if wait:
            self._strip, self._strip_key = _views(*key), key
            return self._strip
        if self._strip_handle is not None:
            self._strip_handle.cancel()

        def job() -> Generator[Progress, None, tuple[tuple[Any, ...], list[np.ndarray]]]:
            yield Progress(None, "sweep strip")
            return key, _views(*key)

        self._strip_handle = self.ctx.runner.submit("Probe: sweep strip", job, kind="light", key="probe-strip")
        self._strip_handle.finished.connect(self._strip_done)
        return None

    def _strip_done(self, value: tuple[tuple[Any, ...], list[np.ndarray]]) -> None:
        self._strip_handle = None
        key, views = value
        if key == self._strip_request():
            self._strip, self._strip_key = views, key
            self._render_strip()
            self.strip_ready.emit()

    # ------------------------------------------------------------------ rendering

    def _render(self) -> None:
        self._render_status()
        self._render_invariance()
        self._render_responses()
        self._render_numbers()
        self._render_strip()

    def _render_status(self) -> None:
        session = self.ctx.session
        self.run_button.setEnabled(session.model is not None and self.ctx.selection.images is not None)
        self.cancel_button.setEnabled(self._handle is not None)
        if session.model is None or self.ctx.selection.images is None:
            text = NEED_MODEL
        elif self._error:
            text = f"Probe: {self._error}"
        elif self._handle is not None:
            text = f"Probing {', '.join(self._layers)}…"
        elif self.result is None:
            text = "Choose a transformation, its range and the layers, then press Run."
        else:
            r = self.result
            text = (f"{r.n} image{'s' if r.n != 1 else ''}, {_LABELS[r.transform].lower()} over "
                    f"{r.values[0]:g}…{r.values[-1]:g} ({len(r.values)} values{_fill_note(r, ', ')})"
                    f"{' (from cache)' if r.from_cache else ''}")
        self.status.setText(text)
        self.status.setToolTip(text)

    def _x_label(self) -> str:
        from engine.probes.transforms import UNITS

        if self.result is None:
            return ""
        t = self.result.transform
        return f"{_QUANTITIES.get(t, t)} ({UNITS[t]})"

    def invariance_series(self) -> list[tuple[str, np.ndarray, QColor, bool]]:
        """What the invariance plot shows: (name, ys over the values, colour, dashed)."""
        r = self.result
        if r is None:
            return []
        inv = r.invariance()
        out = [(name, inv[i], _colour(i), False) for i, name in enumerate(r.layers)]
        out.append(("model input", r.input_invariance(), QColor(0, 0, 0), True))
        out.append(("prediction kept", r.agreement(), QColor(130, 130, 130), True))
        return out

    def response_series(self) -> list[tuple[str, np.ndarray, QColor, bool]]:
        """What the response plot shows: the selected unit's mean curve and the selected image's."""
        r, layer = self.result, self.response_layer()
        if r is None or not layer:
            return []
        li, u = r.layer_index(layer), self.unit()
        out = [(f"{layer} unit {u}: mean of {r.n}", r.pooled[li].mean(axis=0)[:, u], _colour(li), False)]
        j = self.result_row()
        if j is not None and r.n > 1:
            out.append((f"this image ({r.paths[j]})", r.pooled[li][j, :, u], _colour(li), True))
        return out

    def _draw(self, plot: pg.PlotWidget, series: list[tuple[str, np.ndarray, QColor, bool]], legend: QLabel) -> None:
        item = plot.getPlotItem()
        item.clear()
        legend.setText(" &nbsp; ".join(
            f"<span style='color:{c.name()}'>{'╌╌' if d else '━━'}</span>&nbsp;{html.escape(n)}" for n, _y, c, d in series))
        legend.setToolTip("\n".join(f"{'dashed' if d else 'solid'}: {n}" for n, _y, _c, d in series))
        if self.result is None:
            return
        xs = np.asarray(self.result.values, dtype=float)
        for name, ys, colour, dashed in series:
            pen = pg.mkPen(colour, width=1.6, style=Qt.PenStyle.DashLine if dashed else Qt.PenStyle.SolidLine)
            item.plot(xs, np.asarray(ys, dtype=float), name=name, pen=pen, symbol="o", symbolSize=4,
                      symbolBrush=colour, symbolPen=None)
        plot.setLabel("bottom", "")

    def _render_invariance(self) -> None:
        self._draw(self.inv_plot, self.invariance_series(), self.inv_legend)
        self.inv_title.setText(f"Invariance vs {self._x_label()}" if self.result is not None else
                               "Invariance per layer")
        self.inv_title.setToolTip(self.inv_title.text())

    def _render_responses(self) -> None:
        self._draw(self.resp_plot, self.response_series(), self.resp_legend)
        on = self.result is not None
        for w in (self.unit_layer_combo, self.unit_spin, self.top_button):
            w.setEnabled(on)

    def numbers_rows(self) -> list[dict[str, Any]]:
        """Per layer: the invariance at the sweep's ends, the linear map's and the identity map's
        mean held-out errors over the non-identity values, the mean composition errors."""
        from engine.probes.transforms import identity

        r = self.result
        if r is None:
            return []
        inv = r.invariance()
        moved = [t for t, v in enumerate(r.values) if v != identity(r.transform)]
        comp = {d["layer"]: d for d in r.composition_summary()}
        rows = []
        for li, name in enumerate(r.layers):
            row: dict[str, Any] = {"layer": name, "first": float(inv[li, 0]), "last": float(inv[li, -1]),
                                   "linear": None, "identity": None, "frobenius": None, "composed": None}
            if r.lin_test is not None and moved:
                row["linear"] = float(r.lin_test[li, moved].mean())
                row["identity"] = float(r.lin_identity[li, moved].mean())
            c = comp.get(name, {})
            row["frobenius"], row["composed"] = c.get("frobenius_mean"), c.get("composed_test_mean")
            rows.append(row)
        return rows

    def _render_numbers(self) -> None:
        r = self.result
        if r is None:
            self.numbers.setText("")
            self.numbers_scroll.setMaximumHeight(40)
            return
        # short headers (the dock may be narrow); the tooltip says what each is. One image has no
        # linear maps: its table has only the invariance columns, under the note saying why
        maps = r.lin_test is not None
        heads = ["layer", f"inv. at {r.values[0]:g}", f"inv. at {r.values[-1]:g}"]
        keys = ["first", "last"]
        if maps:
            heads += ["M_θ held-out err.", "identity map", "‖M_a M_b − M_(a∘b)‖/‖M‖", "composed err."]
            keys += ["linear", "identity", "frobenius", "composed"]
        head = "<tr>" + "".join(f"<th align={'left' if i == 0 else 'right'}>{'&nbsp;&nbsp;' if i else ''}{h}</th>"
                                for i, h in enumerate(heads)) + "</tr>"
        body = "".join(f"<tr><td>{x['layer']}</td>" + "".join(f"<td align=right>{_fmt(x[k])}</td>" for k in keys)
                       + "</tr>" for x in self.numbers_rows())
        note = (f"Linear maps on {r.feature_note}; fitted on {r.n_train} images, tested on {r.n_test}; "
                f"{len(r.comp_pairs)} composition pairs." if maps else
                "One image: no linear maps (they are fitted on part of a set and tested on the rest).")
        self.numbers.setText(("" if maps else f"<small>{note}</small>")
                             + f"<table cellspacing=0 cellpadding=1>{head}{body}</table>")
        self.numbers.setToolTip(note + " inv.: the normalised feature distance at the sweep's ends; M_θ held-out err.: the "
                                "linear map's held-out error on the test images, identity map: the same for no map (M = I); "
                                "‖M_a M_b − M_(a∘b)‖/‖M‖: how well the maps compose, composed err.: the composed "
                                "map's held-out error. Errors are relative (||Y - X M^T|| / ||Y||), means over the non-identity "
                                "values; the composition columns are means over the pairs.")
        self._fit_numbers()

    def _fit_numbers(self) -> None:
        """The numbers' scroll area no taller than the table needs at its width (nor, room allowing, shorter)."""
        if self.numbers.text():
            width = max(200, self.numbers_scroll.viewport().width())
            need = max(40, self.numbers.heightForWidth(width) + 6)
            self.numbers_scroll.setMaximumHeight(need)
            # and as tall as that where the dock has the room (an eighth of its height), so that a
            # tall dock shows the whole table rather than giving every pixel to the plots
            self.numbers_scroll.setMinimumHeight(min(need, max(40, self.height() // 8)))

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        self._fit_numbers()

    def _render_strip(self) -> None:
        r, model = self.result, self.ctx.session.model
        j = self.result_row()
        if r is None or model is None:
            self.strip_title.setText("")
            self.strip.set_placeholder("No probe yet.", QSize(260, 30))
            return
        if j is None:
            self.strip_title.setText("The selected image was not probed: select one of the probed images.")
            self.strip.set_placeholder("", QSize(260, 30))
            return
        views = self.strip_views()
        self.strip_title.setText(f"{r.paths[j]} along the sweep (untransformed: "
                                 f"{r.class_name(int(r.ref_pred[j]))}; p: its probability; red: prediction changed)")
        if views is None:
            self.strip.set_placeholder("…", QSize(260, 30))
            return
        size = display_size(model.spec.preprocess, STRIP_SIDE)
        tiles, tips = [], []
        for k, v in enumerate(r.values):
            p = int(r.pred[j, k])
            changed = p != int(r.ref_pred[j])
            tile = resample(views[k], size)
            # the class is named only where it changed (the title names the untransformed one):
            # a long class name would be cut off under a small tile
            tiles.append(_captioned(_framed(tile) if changed else tile, f"{v:g}",
                                    f"{r.class_name(p)} {r.prob[j, k]:.2f}" if changed else f"p {r.prob[j, k]:.2f}",
                                    changed, self.font()))
            tips.append(f"{_QUANTITIES.get(r.transform, r.transform)} {v:g}: predicted {r.class_name(p)} ({r.prob[j, k]:.3f}); "
                        f"{r.class_name(int(r.ref_pred[j]))} {r.ref_prob[j, k]:.3f}")
        self.strip.set_tiles(np.stack(tiles), list(range(len(views))), len(views), tips=tips)

    # ------------------------------------------------------------------ figure

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("summary", "Probe: invariance curves per layer, linear maps, the sweep strip"),
                FigureKind("unit", "Probe: the selected unit's response curve and the sweep strip")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("linear", "The linear maps' held-out error per layer", True, ("summary",)),
                FigureOption("numbers", "The numbers per layer (invariance, linear maps, composition)", True,
                             ("summary",)),
                FigureOption("strip", "The selected image along the sweep, with its predictions", True)]

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """Composed from the engine's result: see :meth:`figure_kinds`."""
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        r, model = self.result, self.ctx.session.model
        if r is None or model is None:
            raise ValueError("Probes: nothing to export yet: run a probe first")
        xs = [float(v) for v in r.values]
        x_label = self._x_label()
        elements: list[Element] = []
        if kind == "summary":
            inv = LineChart(xs, [(n, list(map(float, y)), c, d) for n, y, c, d in self.invariance_series()], x_label,
                            "normalised distance / share", "Invariance: ||psi(Tx) - psi(x)|| / ||psi(x)||")
            charts: list[Element] = [inv]
            if include.get("linear", True) and r.lin_test is not None:
                series = []
                for i, name in enumerate(r.layers):
                    series.append((f"{name} M_theta", list(map(float, r.lin_test[i])), _colour(i), False))
                    series.append((f"{name} identity", list(map(float, r.lin_identity[i])), _colour(i), True))
                charts.append(LineChart(xs, series, x_label, "relative error",
                                        f"Linear map, held-out error ({r.n_test} images)"))
            elements.append(Row(charts) if len(charts) > 1 else charts[0])
            if include.get("numbers", True):
                lines = []
                for x in self.numbers_rows():
                    lines.append(f"{x['layer']}: invariance {_fmt(x['first'])} at {xs[0]:g}, {_fmt(x['last'])} at "
                                 f"{xs[-1]:g}; M_theta held-out error {_fmt(x['linear'])} (identity map "
                                 f"{_fmt(x['identity'])}); composition ||M_a M_b - M_ab|| / ||M_ab|| "
                                 f"{_fmt(x['frobenius'])}, composed held-out error {_fmt(x['composed'])}")
                if r.lin_test is not None:
                    lines.append(f"Linear maps on {r.feature_note}; fitted on {r.n_train} images, tested on "
                                 f"{r.n_test}; means over the non-identity values and the {len(r.comp_pairs)} "
                                 "composition pairs.")
                elements.append(Text("\n".join(lines)))
        else:
            layer = self.response_layer()
            if not layer:
                raise ValueError("Probes: no unit selected")
            elements.append(LineChart(xs, [(n, list(map(float, y)), c, d) for n, y, c, d in self.response_series()],
                                      x_label, "mean activation", f"{layer} unit {self.unit()}: response along the sweep",
                                      y_from_zero=False))
        j = self.result_row()
        if include.get("strip", True) and j is not None:
            views = self.strip_views(wait=True)
            assert views is not None
            tiles = []
            for k, v in enumerate(r.values):
                p = int(r.pred[j, k])
                cap = f"{v:g}: {r.class_name(p)} {r.prob[j, k]:.2f}"
                if p != int(r.ref_pred[j]):
                    def render(size: tuple[int, int], a: np.ndarray = views[k]) -> np.ndarray:
                        return _framed(resample(a, size), max(1, size[0] // 24))

                    tiles.append(Tile((views[k].shape[0], views[k].shape[1]), render, f"✗ {cap}"))
                else:
                    tiles.append(Tile.of(views[k], cap))
            elements.append(Text(f"{r.paths[j]} along the sweep (untransformed: {r.class_name(int(r.ref_pred[j]))}); "
                                 "✗ red frame: the prediction changed", bold=True))
            elements.append(TileGrid(tiles, columns=min(10, len(tiles)), gap=3.0))
        what = "all" if r.n > 1 else "one"
        subtitle = (f"{os.path.basename(r.model)}; {what} {r.n} image{'s' if r.n != 1 else ''} of "
                    f"{os.path.basename(r.image_source.rstrip(os.sep)) or r.image_source}; {_LABELS[r.transform].lower()} over "
                    f"{xs[0]:g}..{xs[-1]:g} ({len(xs)} values){_fill_note(r, ', ')}; transformation probe "
                    "(Worrall et al., ICCV 2017)")
        title = (f"Transformation probe: {_LABELS[r.transform].lower()} ({model.name})" if kind == "summary" else
                 f"Unit response to {_LABELS[r.transform].lower()} ({model.name}, {self.response_layer()})")
        return Figure(title, subtitle, elements, options.width_pt, options.dpi)


def _fill_note(r: Any, sep: str) -> str:
    """``sep`` + "<fill> fill" for a geometric transformation (brightness brings no pixels in)."""
    from engine.probes.transforms import GEOMETRIC

    return f"{sep}{r.params.fill} fill" if r.transform in GEOMETRIC else ""


def _legend_label() -> QLabel:
    label = QLabel()
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
    label.setWordWrap(True)  # a narrow dock wraps the legend rather than cutting its last entries off
    return label


def _captioned(rgb: np.ndarray, first: str, second: str, alert: bool, base_font: Any) -> np.ndarray:
    """``rgb`` with two caption lines painted under it (the second in red when ``alert``)."""
    from PySide6.QtGui import QFont, QImage

    h, w = rgb.shape[:2]
    img = QImage(w, h + CAPTION_PX, QImage.Format.Format_RGB888)
    img.fill(QColor(255, 255, 255))
    painter = QPainter(img)
    arr = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    painter.drawImage(0, 0, QImage(arr.data, w, h, 3 * w, QImage.Format.Format_RGB888))
    f = QFont(base_font)
    f.setPixelSize(10)
    painter.setFont(f)
    fm = painter.fontMetrics()
    painter.setPen(QColor(90, 90, 90))
    align = Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignTop
    painter.drawText(QRectF(0, h + 1, w, 12), align, first)
    painter.setPen(QColor(200, 30, 30) if alert else QColor(20, 20, 20))
    painter.drawText(QRectF(0, h + 13, w, 12), align, fm.elidedText(second, Qt.TextElideMode.ElideMiddle, w))
    painter.end()
    ptr = img.constBits()
    out = np.frombuffer(ptr, dtype=np.uint8, count=img.sizeInBytes()).reshape(img.height(), img.bytesPerLine())
    return out[:, :3 * w].reshape(img.height(), w, 3).copy()  # a copy: the QImage's buffer goes with it


def _views(path: str, transform: str, values: tuple[float, ...], fill: str, pre: Any) -> list[np.ndarray]:
    """The sweep views of one image file (mid-grey when it cannot be read)."""
    from engine.data.images import load_image
    from engine.probes.run import sweep_views
    from engine.types import ConvLensError

    try:
        img = load_image(path)
    except ConvLensError:
        return [np.full((*pre.input_size, 3), 128, np.uint8) for _ in values]
    return sweep_views(img, transform, values, fill, pre)
