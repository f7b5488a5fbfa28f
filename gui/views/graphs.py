"""Inference graphs (Konforti, Shpigler, Lerner, Bar Hillel; ECCV 2020): the graph canvas.

Controls choose the modelled layers (lowest first), K per layer (one value for every layer, or
one per layer), the nodes kept per layer (n) and the EM iteration cap. "Fit" runs
:func:`engine.graphs.run` through ``ctx.session.run`` (key ``"graphs-fit"``: a new fit
supersedes the one under way; cancellable; progress in the bar; the engine caches the fit, so
fitting again with the same settings is immediate).

The canvas (a ``QGraphicsView``) draws the engine's :class:`~engine.graphs.GraphExplanation`
of the selected class (``ctx.selection.class_index``; by default the predicted class of the
current image) or of the current image, at the positions the engine's layout gives (layers left
to right, the class node on the right): each node a 2x2 montage of its visual word's patches
(the receptive fields of its best columns, as the model saw them) with its label, each edge a
curve whose width and opacity grow with its LR (red: LR > 0, blue: LR < 0). Hover shows a
node's or an edge's statistics; clicking a node shows its representative patches in the side
panel, marks where its word occurs in the current image, and publishes
``("graph_node", (layer, word))`` on the shared selection; clicking the
class node explains that class; clicking a patch there explains that patch's image. Wheel:
zoom; drag: pan; "Fit view" shows the whole graph.

Explanations and patch crops are computed on the light worker (key ``"graphs-explain"``: the
newest request wins). The figure (kind ``"graph"``) is vector: nodes, edges, labels as text,
the patch thumbnails as images.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QFont, QPainter, QPainterPath, QPen, QPixmap, QWheelEvent
from PySide6.QtWidgets import (
    QComboBox,
    QGraphicsPathItem,
    QGraphicsPixmapItem,
    QGraphicsRectItem,
    QGraphicsScene,
    QGraphicsSceneMouseEvent,
    QGraphicsSimpleTextItem,
    QGraphicsView,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.types import Progress

from ..context import AppContext
from ..figures import Element, Figure, FigureKind, FigureOption, FigureOptions, Legend, Text
from ..figures.model import CAPTION_PT, INK, MUTED, _draw_text, _qimage, font, metrics, resample, text_height
from ..jobs import JobHandle
from ..tiles import TileMosaic, to_qimage
from .base import View

__all__ = ["GraphPicture", "GraphView", "edge_width", "lr_colour"]

SELECTION_KIND = "graph_node"
"""The generic selection item a clicked node is published under: ``(layer, word)``."""

CELL = 40  # canvas pixels per patch of a node montage
GRID = 2  # a montage is GRID x GRID patches
PAD = 3
LABEL_H = 30
COL_GAP = 170
ROW_GAP = 30
SIDE_PATCH = 56  # side-panel patch size
SIDE_PATCHES = 16  # patches asked of the engine per node (the side panel shows them all)

_EM_MESSAGE = re.compile(r"^(?P<layer>[^:]+): EM iteration (?P<it>\d+), log-likelihood (?P<ll>-?[0-9.]+(?:e[-+]?\d+)?)$")
"""The engine's EM progress message (``fit_gmm`` through the fit job): the running mean
log-likelihood of an iteration; its last report is the iteration's value."""
_CURVE_COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]

NEED_MODEL = "Open a model and an image folder first."
NEED_FIT = "Choose the layers and K, then Fit."


def lr_colour(lr: float, top: float) -> QColor:
    """Grey at LR 0, towards red for LR > 0 and blue for LR < 0 (saturated at ``|LR| = top``)."""
    t = max(-1.0, min(1.0, lr / top)) if top > 0 else 0.0
    grey = np.array([150.0, 150.0, 150.0])
    end = np.array([200.0, 30.0, 30.0]) if t >= 0 else np.array([40.0, 70.0, 200.0])
    c = grey + (end - grey) * abs(t)
    return QColor(int(c[0]), int(c[1]), int(c[2]))


def edge_width(lr: float, top: float, thin: float, thick: float) -> float:
    """Width growing linearly with positive LR from ``thin`` (LR <= 0) to ``thick`` (LR = top)."""
    return thin + (thick - thin) * (max(lr, 0.0) / top if top > 0 else 0.0)


def edge_opacity(lr: float, top: float) -> float:
    return 0.3 + 0.7 * (min(1.0, abs(lr) / top) if top > 0 else 0.0)


def _top_lr(edges: Sequence[dict[str, Any]]) -> float:
    return max((abs(e["lr"]) for e in edges), default=1.0) or 1.0


def node_name(node: dict[str, Any]) -> str:
    return str(node["label"]) if node["layer"] == "class" else f"{node['layer']} word {node['word']}"


def node_tip(node: dict[str, Any], edges: Sequence[dict[str, Any]], images: int) -> str:
    """The hover text of a node: its word statistics and its incoming edges."""
    if node["layer"] == "class":
        lines = [f"<b>class '{node['label']}'</b>", f"{node['columns']} images predicted as it",
                 f"{node['score']:.4g} local columns explained"]
    else:
        lines = [f"<b>{node['layer']} visual word {node['word']}</b>",
                 f"{node['columns']} columns assigned to it (all images)",
                 f"selection score {node['score']:.4g} (sum of C·LR over its parents, {images} image(s))"]
    incoming = [e for e in edges if e["target"] == node["id"]]
    for e in sorted(incoming, key=lambda e: -e["score"]):
        lines.append(f"from {e['source']}: P(t|s) {e['p_t_given_s']:.3f}, P(t) {e['p_t']:.3f}, "
                     f"LR {e['lr']:.3f}, count {e['count']}")
    return "<br>".join(lines)


def edge_tip(e: dict[str, Any]) -> str:
    return (f"<b>{e['source']} → {e['target']}</b><br>P(t|s) {e['p_t_given_s']:.3f}, P(t) {e['p_t']:.3f}<br>"
            f"LR {e['lr']:.3f} (log2 P(t|s)/P(t))<br>local count {e['count']} (all images {e['global_count']})<br>"
            f"score C·LR {e['score']:.4g}")


def _grid_positions(nodes: Sequence[dict[str, Any]], node_w: float, node_h: float, col_gap: float,
                    row_gap: float) -> tuple[dict[str, tuple[float, float]], float, float]:
    """Top-left corners of the nodes from the engine's layout ``x``/``y`` (y up), scaled so that
    neighbours are ``node_w + col_gap`` / ``node_h + row_gap`` apart; and the total size."""
    xs = sorted({float(nd["x"]) for nd in nodes})
    dx = min((b - a for a, b in itertools.pairwise(xs) if b > a), default=1.0) or 1.0
    gaps: list[float] = []
    for li in {nd["layer_index"] for nd in nodes}:
        ys = sorted(float(nd["y"]) for nd in nodes if nd["layer_index"] == li)
        gaps += [b - a for a, b in itertools.pairwise(ys) if b > a + 1e-9]
    dy = min(gaps, default=1.0)
    sx, sy = (node_w + col_gap) / dx, (node_h + row_gap) / dy
    x0 = xs[0]
    y_top = max(float(nd["y"]) for nd in nodes)
    y_bottom = min(float(nd["y"]) for nd in nodes)
    at = {nd["id"]: ((float(nd["x"]) - x0) * sx, (y_top - float(nd["y"])) * sy) for nd in nodes}
    return at, (xs[-1] - x0) * sx + node_w, (y_top - y_bottom) * sy + node_h


def montage(crops: Sequence[np.ndarray], cell: int = CELL, grid: int = GRID, pad: int = PAD) -> np.ndarray:
    """A grid x grid montage (uint8 RGB) of the first crops, each fitted into a cell."""
    side = grid * cell + (grid + 1) * pad
    out = np.full((side, side, 3), 235, dtype=np.uint8)
    for n, crop in enumerate(list(crops)[: grid * grid]):
        r, c = divmod(n, grid)
        y, x = pad + r * (cell + pad), pad + c * (cell + pad)
        fitted = _fit(crop, cell)
        h, w = fitted.shape[:2]
        oy, ox = y + (cell - h) // 2, x + (cell - w) // 2
        out[oy:oy + h, ox:ox + w] = fitted
    return out


def _fit(crop: np.ndarray, side: int) -> np.ndarray:
    h, w = crop.shape[:2]
    s = side / max(h, w, 1)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    if s >= 1 and abs(s - round(s)) < 1e-9:
        return resample(crop, size)
    from PIL import Image

    mode = Image.Resampling.NEAREST if s >= 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size[1], size[0]), mode))


def _crops(explanation: Any, preprocess: dict[str, Any]) -> dict[str, list[np.ndarray]]:
    """Each node's patches cut from its images as the model saw them (on a worker)."""
    from engine.graphs.figure import _Images

    images = _Images(preprocess, tuple(explanation.input_size))
    out: dict[str, list[np.ndarray]] = {}
    for nd in explanation.nodes:
        crops = []
        for p in nd.get("patches", []):
            arr = images.get(p["path"])
            t, left, b, right = p["box"]
            if arr is None or b <= t or right <= left:
                crops.append(np.full((max(1, b - t), max(1, right - left), 3), 180, dtype=np.uint8))
            else:
                crops.append(np.ascontiguousarray(arr[t:b, left:right]))
        out[nd["id"]] = crops
    return out


# ----------------------------------------------------------------------------- canvas items


class _NodeItem(QGraphicsRectItem):
    """A node: its montage, a frame and its label; clicking it calls back."""

    def __init__(self, node: dict[str, Any], pixmap: QPixmap, on_click: Callable[[str], None]) -> None:
        side = pixmap.width()
        super().__init__(0, 0, side, side + LABEL_H)
        self.node_id = str(node["id"])
        self._on_click = on_click
        self.setPen(QPen(Qt.PenStyle.NoPen))
        self.setBrush(QBrush(Qt.BrushStyle.NoBrush))
        self.setAcceptHoverEvents(True)
        self.setCursor(Qt.CursorShape.PointingHandCursor)
        self.setZValue(1)
        pix = QGraphicsPixmapItem(pixmap, self)
        pix.setTransformationMode(Qt.TransformationMode.FastTransformation)
        self.frame = QGraphicsRectItem(0, 0, side, side, self)
        self.frame.setPen(QPen(QColor(90, 90, 90), 1))
        label = QGraphicsSimpleTextItem(node_name(node), self)
        f = QFont(label.font())
        f.setPointSizeF(8.5)
        f.setBold(node["layer"] == "class")
        label.setFont(f)
        label.setPos(0, side + 2)
        score = QGraphicsSimpleTextItem(f"score {node['score']:.3g}" if math.isfinite(node["score"]) else "", self)
        f2 = QFont(f)
        f2.setBold(False)
        f2.setPointSizeF(7.5)
        score.setFont(f2)
        score.setBrush(QColor(90, 90, 90))
        score.setPos(0, side + 15)

    def set_selected_look(self, on: bool) -> None:
        self.frame.setPen(QPen(QColor(255, 140, 0), 3) if on else QPen(QColor(90, 90, 90), 1))

    def mousePressEvent(self, event: QGraphicsSceneMouseEvent) -> None:
        if event.button() == Qt.MouseButton.LeftButton:
            self._on_click(self.node_id)
            event.accept()
            return
        super().mousePressEvent(event)


class _EdgeItem(QGraphicsPathItem):
    def __init__(self, path: QPainterPath, source: str, target: str) -> None:
        super().__init__(path)
        self.source, self.target = source, target
        self.setAcceptHoverEvents(True)
        self.setZValue(0)


class GraphCanvas(QGraphicsView):
    """Zoom (wheel) and pan (drag) over the graph scene."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setScene(QGraphicsScene(self))
        self.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        self.setDragMode(QGraphicsView.DragMode.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.ViewportAnchor.AnchorUnderMouse)
        self.setBackgroundBrush(QColor(255, 255, 255))
        self.setMinimumSize(200, 150)
        self.placeholder: QGraphicsSimpleTextItem | None = None

    def zoom(self, factor: float) -> None:
        current = self.transform().m11()
        factor = max(0.05 / current, min(factor, 8.0 / current))
        self.scale(factor, factor)

    def wheelEvent(self, event: QWheelEvent) -> None:
        steps = event.angleDelta().y() / 120.0
        if steps:
            self.zoom(1.15 ** steps)
            event.accept()
        else:
            super().wheelEvent(event)

    def fit_all(self) -> None:
        rect = self.scene().itemsBoundingRect()
        if not rect.isEmpty():
            self.resetTransform()
            self.fitInView(rect.adjusted(-10, -10, 10, 10), Qt.AspectRatioMode.KeepAspectRatio)
            if self.transform().m11() > 1.5:
                self.resetTransform()
                self.scale(1.5, 1.5)
                self.centerOn(rect.center())


# ----------------------------------------------------------------------------- figure element


@dataclass
class GraphPicture(Element):
    """The inference graph as a vector drawing: edges (width and colour by LR), nodes as framed
    patch montages (raster thumbnails at whole-pixel scale), labels as text."""

    nodes: Sequence[dict[str, Any]]
    edges: Sequence[dict[str, Any]]
    montages: dict[str, np.ndarray] = field(default_factory=dict)
    edge_labels: bool = True
    max_node: float = 56.0

    def _geometry(self, width: float) -> tuple[float, float, float, dict[str, tuple[float, float]], float]:
        cols = len({nd["layer_index"] for nd in self.nodes}) or 1
        # nodes take about 40% of the width, the gaps between layers the rest
        side = max(18.0, min(self.max_node, 0.4 * width / cols))
        label_h = text_height("Ag", font(CAPTION_PT), 100) * 2 + 2
        col_gap = (width - cols * side) / max(1, cols - 1) if cols > 1 else 0.0
        at, w, h = _grid_positions(self.nodes, side, side + label_h, col_gap, 8.0)
        scale = min(1.0, width / w) if w > 0 else 1.0
        return side, label_h, scale, at, h

    def height(self, width: float, dpi: int) -> float:
        if not self.nodes:
            return 0.0
        _side, _lh, _scale, _at, h = self._geometry(width)
        return h

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        if not self.nodes:
            return
        side, label_h, _scale, at, _h = self._geometry(rect.width())
        ox, oy = rect.left(), rect.top()
        pos = {k: (ox + x, oy + y) for k, (x, y) in at.items()}
        top = _top_lr(self.edges)
        small = font(CAPTION_PT - 1.0)
        for e in self.edges:
            (ax, ay), (bx, by) = pos[e["source"]], pos[e["target"]]
            p, q = QPointF(ax, ay + side / 2), QPointF(bx + side, by + side / 2)
            path = QPainterPath(p)
            mid = (p.x() + q.x()) / 2
            path.cubicTo(QPointF(mid, p.y()), QPointF(mid, q.y()), q)
            colour = lr_colour(e["lr"], top)
            colour.setAlphaF(edge_opacity(e["lr"], top))
            painter.setPen(QPen(colour, edge_width(e["lr"], top, 0.4, 3.0), Qt.PenStyle.SolidLine,
                                Qt.PenCapStyle.RoundCap))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawPath(path)
        if self.edge_labels:  # near the explained (source, right) end, where the edges fan out
            for e in self.edges:
                (ax, ay), (bx, by) = pos[e["source"]], pos[e["target"]]
                t = 0.35
                s3 = 3 * t * t - 2 * t ** 3
                x = ax + (bx + side - ax) * t
                y = ay + side / 2 + (by - ay) * s3
                text = f"LR {e['lr']:.2f}"
                tw = metrics(small).horizontalAdvance(text) + 2
                th = metrics(small).height()
                box = QRectF(x - tw / 2, y - th / 2, tw, th)
                painter.fillRect(box, QColor(255, 255, 255, 210))
                _draw_text(painter, box, text, small, color=MUTED, align=Qt.AlignmentFlag.AlignHCenter, wrap=False)
        f_label, f_bold = font(CAPTION_PT), font(CAPTION_PT, True)
        for nd in self.nodes:
            x, y = pos[nd["id"]]
            target = QRectF(x, y, side, side)
            mont = self.montages.get(nd["id"])
            if mont is not None:
                px = max(1, int(side * dpi / 72.0))
                k = max(1, px // mont.shape[0])
                img = resample(mont, (mont.shape[0] * k, mont.shape[1] * k)) if k > 1 else mont
                painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, img.shape[0] > px)
                image = _qimage(img)
                painter.drawImage(target, image, QRectF(0, 0, image.width(), image.height()))
            painter.setPen(QPen(QColor(90, 90, 90), 0.5))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(target)
            cls = nd["layer"] == "class"
            name = node_name(nd) if cls else f"{nd['layer']} #{nd['word']}"
            _draw_text(painter, QRectF(x - 6, y + side + 1, side + 12, label_h), name, f_bold if cls else f_label,
                       color=INK, align=Qt.AlignmentFlag.AlignHCenter, wrap=False)
            sc = float(nd["score"])
            _draw_text(painter, QRectF(x - 6, y + side + 1 + label_h / 2, side + 12, label_h / 2),
                       f"score {sc:.3g}" if math.isfinite(sc) else "", small, color=MUTED,
                       align=Qt.AlignmentFlag.AlignHCenter, wrap=False)

    def texts(self) -> list[str]:
        return [node_name(nd) for nd in self.nodes]


# ----------------------------------------------------------------------------- the view


class GraphView(View):
    """Fit inference graphs and explore them; see the module docstring."""

    title = "Inference graph"
    object_name = "graphs"
    sanity_explanation = "graphs"
    order = 40
    visible_by_default = False

    #: a fit finished (GraphFit)
    fit_ready = Signal(object)
    #: the canvas shows a new explanation (GraphExplanation)
    graph_ready = Signal(object)
    #: the side panel shows the patches of a node (node id)
    node_shown = Signal(str)

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.fit: Any = None  # engine GraphFit
        self.explanation: Any = None  # engine GraphExplanation on the canvas
        self.crops: dict[str, list[np.ndarray]] = {}
        self.node_items: dict[str, _NodeItem] = {}
        self.edge_items: dict[tuple[str, str], _EdgeItem] = {}
        self.current_node = ""
        self.mode = "class"  # or "image"
        self._handle: JobHandle | None = None
        self._explain_handle: JobHandle | None = None
        self._syncing = False
        self._fit_text = ""
        self._current_image: tuple[int, np.ndarray] | None = None
        self._occurrences = -1
        self._build()
        ctx.session.model_loaded.connect(self._model_loaded)
        ctx.selection.images_changed.connect(self._images_changed)
        ctx.selection.class_changed.connect(self._class_selected)
        ctx.selection.current_image_changed.connect(self._image_selected)
        if ctx.session.model is not None:
            self._model_loaded(ctx.session.model)
        self._update_controls()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.layers_edit = QLineEdit()
        self.layers_edit.setPlaceholderText("conv1,conv2,conv3")
        self.layers_edit.setToolTip("Modelled layers, lowest first, comma-separated (spatial layers only)")
        self.k_edit = QLineEdit("8")
        self.k_edit.setMaximumWidth(90)
        self.k_edit.setToolTip("Visual words (GMM components) per layer: one value for every layer, "
                               "or one per layer (e.g. 8,8,16)")
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 20)
        self.n_spin.setValue(3)
        self.n_spin.setToolTip("Nodes kept per layer (the best-scored words)")
        self.iter_spin = QSpinBox()
        self.iter_spin.setRange(1, 1000)
        self.iter_spin.setValue(100)
        self.iter_spin.setToolTip("EM iterations at most (stops earlier on tolerance)")
        self.fit_button = QPushButton("Fit")
        self.fit_button.setToolTip("Fit the visual-word dictionaries and transitions (cached: the same settings "
                                   "again come from the cache)")
        self.fit_button.clicked.connect(self.run)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.mode_combo = QComboBox()
        self.mode_combo.addItem("Class", "class")
        self.mode_combo.addItem("Current image", "image")
        self.mode_combo.setToolTip("Explain the selected class (the images predicted as it) or the current image")
        self.mode_combo.activated.connect(lambda _i: self.set_mode(self.mode_combo.currentData()))
        self.class_combo = QComboBox()
        self.class_combo.setToolTip("Class to explain (shared with the other views)")
        self.class_combo.activated.connect(self._class_activated)
        self.fit_view_button = QPushButton("Fit view")
        self.fit_view_button.setToolTip("Zoom to show the whole graph (wheel: zoom, drag: pan)")
        self.status = QLabel()
        self.status.setWordWrap(True)

        row1 = QHBoxLayout()
        row1.addWidget(QLabel("Layers"))
        row1.addWidget(self.layers_edit, 3)
        row1.addWidget(QLabel("K"))
        row1.addWidget(self.k_edit, 1)
        row1.addWidget(QLabel("n"))
        row1.addWidget(self.n_spin)
        row1.addWidget(QLabel("EM iter."))
        row1.addWidget(self.iter_spin)
        row1.addWidget(self.fit_button)
        row1.addWidget(self.cancel_button)
        row2 = QHBoxLayout()
        row2.addWidget(QLabel("Explain"))
        row2.addWidget(self.mode_combo)
        row2.addWidget(self.class_combo, 1)
        row2.addWidget(self.fit_view_button)
        row2.addWidget(self.progress, 2)

        self.canvas = GraphCanvas()
        self.fit_view_button.clicked.connect(self.canvas.fit_all)

        self.node_title = QLabel()
        self.node_title.setWordWrap(True)
        f = self.node_title.font()
        f.setBold(True)
        self.node_title.setFont(f)
        self.node_stats = QLabel()
        self.node_stats.setWordWrap(True)
        self.node_stats.setTextFormat(Qt.TextFormat.RichText)
        self.patches = TileMosaic()
        self.patches.set_placeholder("Click a node to see its patches.", QSize(130, 60))
        self.patches.clicked.connect(self._patch_clicked)
        self.patches.setToolTip("")
        side = QWidget()
        side_layout = QVBoxLayout(side)
        side_layout.setContentsMargins(0, 0, 0, 0)
        self.ll_plot = pg.PlotWidget(background="w")
        self.ll_plot.setFixedHeight(110)
        self.ll_plot.setMenuEnabled(False)
        self.ll_plot.hideButtons()
        self.ll_plot.setLabel("left", "log-lik.")
        self.ll_plot.setLabel("bottom", "EM iteration")
        self.ll_plot.setToolTip("Mean log-likelihood per column, per layer and EM iteration (live while fitting)")
        self.ll_plot.addLegend(offset=(-4, 4), labelTextSize="7pt")
        for sd in ("left", "bottom"):
            self.ll_plot.getAxis(sd).setPen("k")
            self.ll_plot.getAxis(sd).setTextPen("k")
        self.ll_curves: dict[str, dict[int, float]] = {}
        side_layout.addWidget(self.ll_plot)
        side_layout.addWidget(self.node_title)
        side_layout.addWidget(self.node_stats)
        self.where_label = QLabel()
        self.where_label.setToolTip("Where the clicked word occurs in the current image (its columns' "
                                    "receptive-field centres, one stride cell each)")
        self.where_caption = QLabel()
        self.where_caption.setWordWrap(True)
        side_layout.addWidget(self.where_label)
        side_layout.addWidget(self.where_caption)
        side_layout.addWidget(self.patches)
        side_layout.addStretch(1)
        # the whole side panel scrolls (statistics, where the word occurs, patches)
        side_scroll = QScrollArea()
        side_scroll.setWidget(side)
        side_scroll.setWidgetResizable(True)
        side_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        side_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scrollbar = side_scroll.verticalScrollBar().sizeHint().width()
        side_scroll.setMinimumWidth(2 * (SIDE_PATCH + self.patches.gap) + self.patches.gap + scrollbar + 12)
        self.side_scroll = side_scroll

        self.body = QSplitter(Qt.Orientation.Horizontal)
        self.body.addWidget(self.canvas)
        self.body.addWidget(side_scroll)
        self.body.setStretchFactor(0, 4)
        self.body.setStretchFactor(1, 1)
        self.body.setChildrenCollapsible(False)

        layout = QVBoxLayout(self)
        layout.addLayout(row1)
        layout.addLayout(row2)
        layout.addWidget(self.status)
        layout.addWidget(self.body, 1)
        self._show_placeholder(NEED_FIT)

    # ------------------------------------------------------------------ View API

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        return [("Fit inference graph", self._fit_action)]

    def _fit_action(self) -> None:
        self.run()

    def save_state(self) -> dict[str, Any]:
        return {"layers": self.layers_edit.text(), "k": self.k_edit.text(), "n": self.n_spin.value(),
                "max_iter": self.iter_spin.value(), "mode": self.mode}

    def restore_state(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("layers"), str):
            self.layers_edit.setText(state["layers"])
        if isinstance(state.get("k"), str):
            self.k_edit.setText(state["k"])
        for key, spin in (("n", self.n_spin), ("max_iter", self.iter_spin)):
            if isinstance(state.get(key), int) and not isinstance(state.get(key), bool):
                spin.setValue(state[key])
        if state.get("mode") in ("class", "image"):
            self.mode = state["mode"]
            self.mode_combo.setCurrentIndex(self.mode_combo.findData(self.mode))
        self._update_controls()

    def shutdown(self) -> None:
        self.cancel()

    # ------------------------------------------------------------------ settings

    def layers(self) -> list[str]:
        return [s.strip() for s in self.layers_edit.text().split(",") if s.strip()]

    def ks(self) -> tuple[int, ...]:
        """K per layer from the K field (ValueError naming the bad entry)."""
        out = []
        for raw in self.k_edit.text().split(","):
            s = raw.strip()
            if not s:
                continue
            if not s.isdigit() or int(s) < 1:
                raise ValueError(f"K must be whole numbers >= 1 separated by commas, not {s!r}")
            out.append(int(s))
        return tuple(out)

    def params(self) -> Any:
        from engine.graphs import GraphParams

        return GraphParams(k=self.ks(), max_iter=self.iter_spin.value(), top_patches=SIDE_PATCHES)

    def set_settings(self, layers: Sequence[str], k: Sequence[int] | int, *, n: int | None = None,
                     max_iter: int | None = None) -> None:
        self.layers_edit.setText(",".join(layers))
        self.k_edit.setText(str(k) if isinstance(k, int) else ",".join(str(v) for v in k))
        if n is not None:
            self.n_spin.setValue(n)
        if max_iter is not None:
            self.iter_spin.setValue(max_iter)

    def _model_loaded(self, info: Any) -> None:
        self.layers_edit.setText(",".join(info.default_layers))
        spatial = [f"{li.name} {tuple(li.shape)}" for li in info.layers if li.is_spatial]
        self.layers_edit.setToolTip("Modelled layers, lowest first, comma-separated. Spatial layers: "
                                    + ", ".join(spatial))
        self._clear_fit()
        self._update_controls()

    def _images_changed(self, _images: object) -> None:
        self._clear_fit()
        self._update_controls()

    def _clear_fit(self) -> None:
        self.fit = None
        self.explanation = None
        self.crops = {}
        self.class_combo.clear()
        self._show_placeholder(NEED_FIT)
        self._show_node("")

    def _update_controls(self) -> None:
        running = self._handle is not None
        ready = self.ctx.session.model is not None and self.ctx.selection.images is not None
        self.fit_button.setEnabled(ready and not running)
        self.cancel_button.setEnabled(running)
        self.progress.setVisible(running)
        self.class_combo.setEnabled(self.fit is not None and self.mode == "class")
        self.mode_combo.setEnabled(self.fit is not None)
        if not ready and not running:
            self.status.setText(NEED_MODEL)
        elif self.status.text() in ("", NEED_MODEL):
            self.status.setText(NEED_FIT)

    # ------------------------------------------------------------------ fitting

    def run(self) -> JobHandle | None:
        """Fit with the current settings (superseding a fit under way)."""
        session, images = self.ctx.session, self.ctx.selection.images
        if session.model is None or images is None:
            self.status.setText(NEED_MODEL)
            return None
        layers = self.layers()
        if not layers:
            self.status.setText("Name at least one spatial layer to model.")
            return None
        try:
            params = self.params()
            params.check()
            if len(params.k) not in (0, 1, len(layers)):
                raise ValueError(f"{len(params.k)} values of k for {len(layers)} layers ({', '.join(layers)}): "
                                 "give one per layer, or one for all")
        except Exception as e:  # noqa: BLE001 - ValueError from the field, ConvLensError from the engine
            self.status.setText(f"Cannot fit: {e}")
            return None

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, Any]:
            from engine.graphs import run

            return (yield from run(backend, loaded.cache_id, images, layers, params))

        handle = session.run("Inference graph fit", job, key="graphs-fit", on_done=self._fitted)
        if handle is None:
            return None
        if self._handle is not None:
            self._handle.cancel()
        self._handle = handle
        handle.progress.connect(self._progress)
        handle.failed.connect(lambda e, h=handle: self._fit_failed(h, e))
        handle.cancelled.connect(lambda h=handle: self._fit_cancelled(h))
        self.progress.setValue(0)
        self.progress.setFormat("starting…")
        self.ll_curves = {}
        self._draw_ll()
        self.status.setText(f"Fitting {', '.join(layers)} (K {self.k_edit.text() or 'default'})…")
        self._update_controls()
        return handle

    def _fit_curves(self) -> None:
        """The shown fit's log-likelihood per layer and iteration (none: empty)."""
        layers = self.fit.layers if self.fit is not None else []
        self.ll_curves = {lm.name: {i + 1: float(v) for i, v in enumerate(lm.loglik)} for lm in layers}
        self._draw_ll()

    def _draw_ll(self) -> None:
        plot = self.ll_plot.getPlotItem()
        plot.clear()
        for j, (name, points) in enumerate(self.ll_curves.items()):
            its = sorted(points)
            plot.plot(its, [points[i] for i in its], name=name,
                      pen=pg.mkPen(_CURVE_COLOURS[j % len(_CURVE_COLOURS)], width=1.5))

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()

    def _progress(self, p: Progress) -> None:
        m = _EM_MESSAGE.match(p.message)
        if m is not None:
            self.ll_curves.setdefault(m["layer"], {})[int(m["it"])] = float(m["ll"])
            self._draw_ll()
        if p.fraction is None:
            self.progress.setRange(0, 0)
        else:
            self.progress.setRange(0, 1000)
            self.progress.setValue(round(1000 * p.fraction))
        self.progress.setFormat(f"%p% {p.message}" if p.message else "%p%")

    def _fit_failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is self._handle:
            self._handle = None
            self.status.setText(f"Fit failed: {error}")
            self._fit_curves()
            self._update_controls()

    def _fit_cancelled(self, handle: JobHandle) -> None:
        if handle is self._handle:
            self._handle = None
            self.status.setText("Fit cancelled.")
            self._fit_curves()
            self._update_controls()

    def _fitted(self, fit: Any) -> None:
        self._handle = None
        self.set_fit(fit)

    def set_fit(self, fit: Any) -> None:
        """Show ``fit`` (an engine GraphFit): fill the class list and explain."""
        self.fit = fit
        total = fit.seconds.get("total")
        took = "from the cache" if fit.from_cache else (f"in {total:.1f} s" if total is not None else "")
        words = ", ".join(f"{lm.name} K={lm.k} ({lm.n_iter} it., LL {lm.final_loglik:.2f})" for lm in fit.layers)
        self._fit_curves()
        self._fit_text = f"Fitted {words} on {len(fit.image_paths)} images {took}."
        self.status.setText(self._fit_text)
        self._syncing = True
        self.class_combo.clear()
        for c in fit.classes:
            self.class_combo.addItem(str(c))
        self._syncing = False
        self._update_controls()
        self.fit_ready.emit(fit)
        self.explain_now()

    # ------------------------------------------------------------------ what to explain

    def target_class(self) -> int:
        """The class to explain: the selection's, else the current image's predicted class."""
        fit = self.fit
        ci = self.ctx.selection.class_index
        if 0 <= ci < len(fit.classes):
            return ci
        cur = self.ctx.selection.current_image
        if 0 <= cur < len(fit.predicted) and fit.predicted[cur] >= 0:
            return int(fit.predicted[cur])
        counts = np.bincount(fit.predicted[fit.predicted >= 0], minlength=len(fit.classes))
        return int(np.argmax(counts))

    def set_mode(self, mode: str) -> None:
        """Explain the selected class (``"class"``) or the current image (``"image"``)."""
        if mode not in ("class", "image"):
            raise ValueError(f"mode is 'class' or 'image', not {mode!r}")
        self.mode = mode
        self.mode_combo.setCurrentIndex(self.mode_combo.findData(mode))
        self._update_controls()
        self.explain_now()

    def _class_activated(self, index: int) -> None:
        if not self._syncing and index >= 0:
            self.ctx.selection.set_class_index(index)  # -> _class_selected

    def _class_selected(self, _ci: int) -> None:
        if self.fit is None:
            return
        self.mode = "class"
        self.mode_combo.setCurrentIndex(self.mode_combo.findData("class"))
        self._update_controls()
        self.explain_now()

    def _image_selected(self, _i: int) -> None:
        if self.fit is None:
            return
        if self.mode == "image" or self.ctx.selection.class_index < 0:
            self.explain_now()

    def _patch_clicked(self, image_index: int) -> None:
        """A patch of the side panel: explain its image."""
        self.mode = "image"
        self.mode_combo.setCurrentIndex(self.mode_combo.findData("image"))
        self._update_controls()
        if self.ctx.selection.current_image != image_index:
            self.ctx.selection.set_current_image(image_index)  # -> _image_selected
        else:
            self.explain_now()

    def explain_now(self) -> JobHandle | None:
        """Explain the selected class or the current image on the light worker."""
        fit = self.fit
        if fit is None:
            return None
        n = self.n_spin.value()
        if self.mode == "image":
            cur = self.ctx.selection.current_image
            if not 0 <= cur < len(fit.image_paths):
                self._show_placeholder("Select an image to explain it.")
                return None
            kwargs: dict[str, Any] = {"image": fit.image_paths[cur]}
            what = Path(fit.image_paths[cur]).name
        else:
            ci = self.target_class()
            self._syncing = True
            self.class_combo.setCurrentIndex(ci)
            self._syncing = False
            kwargs = {"class_name": fit.classes[ci]}
            what = f"class '{fit.classes[ci]}'"
        preprocess = fit.preprocess
        cur = self.ctx.selection.current_image
        cur_path = fit.image_paths[cur] if 0 <= cur < len(fit.image_paths) else None

        def job() -> Generator[Progress, None, tuple[Any, dict[str, list[np.ndarray]], Any]]:
            from engine.graphs import explain
            from engine.graphs.figure import _Images

            yield Progress(None, f"explaining {what}")
            ex = explain(fit, n=n, patches=SIDE_PATCHES, **kwargs)
            yield Progress(0.5, "cutting the patches")
            crops = _crops(ex, preprocess)
            rgb = _Images(preprocess, tuple(fit.input_size)).get(cur_path) if cur_path is not None else None
            return ex, crops, (cur, rgb) if rgb is not None else None

        handle = self.ctx.runner.submit(f"Inference graph of {what}", job, kind="light", key="graphs-explain")
        handle.finished.connect(lambda value: self.set_explanation(*value))
        handle.failed.connect(lambda e, h=handle: self._explain_failed(h, e))
        self._explain_handle = handle
        return handle

    def _explain_failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is self._explain_handle:
            from engine.types import ConvLensError

            msg = str(error) if isinstance(error, ConvLensError) else f"{type(error).__name__}: {error}"
            self.explanation = None
            self._show_placeholder(f"No graph: {msg}")

    # ------------------------------------------------------------------ the canvas

    def _show_placeholder(self, text: str) -> None:
        scene = self.canvas.scene()
        scene.clear()
        self.node_items, self.edge_items = {}, {}
        item = scene.addSimpleText(text)
        item.setBrush(QColor(90, 90, 90))
        self.canvas.placeholder = item
        scene.setSceneRect(item.boundingRect().adjusted(-20, -20, 20, 20))

    def set_explanation(self, explanation: Any, crops: dict[str, list[np.ndarray]],
                        current: tuple[int, np.ndarray] | None = None) -> None:
        """Draw ``explanation`` (an engine GraphExplanation) with its nodes' patch crops;
        ``current``: (index, model-input RGB) of the current image, where clicked words are shown."""
        self.explanation, self.crops, self._current_image = explanation, crops, current
        scene = self.canvas.scene()
        scene.clear()
        self.canvas.placeholder = None
        self.node_items, self.edge_items = {}, {}
        nodes = explanation.nodes
        side = GRID * CELL + (GRID + 1) * PAD
        at, _w, _h = _grid_positions(nodes, side, side + LABEL_H, COL_GAP, ROW_GAP)
        top = _top_lr(explanation.edges)
        for e in explanation.edges:
            (ax, ay), (bx, by) = at[e["source"]], at[e["target"]]
            p, q = QPointF(ax, ay + side / 2), QPointF(bx + side, by + side / 2)
            path = QPainterPath(p)
            mid = (p.x() + q.x()) / 2
            path.cubicTo(QPointF(mid, p.y()), QPointF(mid, q.y()), q)
            item = _EdgeItem(path, e["source"], e["target"])
            colour = lr_colour(e["lr"], top)
            colour.setAlphaF(edge_opacity(e["lr"], top))
            item.setPen(QPen(colour, edge_width(e["lr"], top, 1.0, 8.0), Qt.PenStyle.SolidLine,
                             Qt.PenCapStyle.RoundCap))
            item.setToolTip(edge_tip(e))
            scene.addItem(item)
            self.edge_items[(e["source"], e["target"])] = item
        for nd in nodes:
            pixmap = QPixmap.fromImage(to_qimage(montage(crops.get(nd["id"], []))))
            node_item = _NodeItem(nd, pixmap, self.click_node)
            node_item.setPos(*at[nd["id"]])
            node_item.setToolTip(node_tip(nd, explanation.edges, explanation.images))
            scene.addItem(node_item)
            self.node_items[nd["id"]] = node_item
        if explanation.kind == "class":
            head = f"Inference graph of class '{explanation.class_name}' ({explanation.images} images)"
        else:
            head = f"Inference graph of {Path(explanation.target).name} (predicted '{explanation.class_name}')"
        title = scene.addSimpleText(head)
        f = QFont(title.font())
        f.setBold(True)
        title.setFont(f)
        title.setPos(0, -28)
        scene.setSceneRect(scene.itemsBoundingRect().adjusted(-20, -20, 20, 20))
        self.canvas.fit_all()
        self.status.setText(f"{self._fit_text}\n{head}: {len(nodes)} nodes, {len(explanation.edges)} edges. "
                            "Hover for statistics, click a node for its patches.")
        keep = self.current_node if self.current_node in self.node_items else ""
        self._show_node(keep)
        self.graph_ready.emit(explanation)

    def node_scene_rect(self, node_id: str) -> QRectF:
        item = self.node_items[node_id]
        return item.mapRectToScene(item.rect())

    def click_node(self, node_id: str) -> None:
        """What clicking a node does: the class node explains its class; a word node shows its
        patches and is published as ``("graph_node", (layer, word))``."""
        ex = self.explanation
        node = next((nd for nd in ex.nodes if nd["id"] == node_id), None) if ex is not None else None
        if node is None:
            return
        if node["layer"] == "class":
            if self.mode != "class" or self.ctx.selection.class_index != node["word"]:
                self.mode = "class"
                self.mode_combo.setCurrentIndex(self.mode_combo.findData("class"))
                if self.ctx.selection.class_index != node["word"]:
                    self.ctx.selection.set_class_index(int(node["word"]))  # -> explain
                else:
                    self._update_controls()
                    self.explain_now()
            self._show_node(node_id)
            return
        self._show_node(node_id)
        self.ctx.selection.set_item(SELECTION_KIND, (str(node["layer"]), int(node["word"])))

    def _show_node(self, node_id: str) -> None:
        self.current_node = node_id
        for nid, item in self.node_items.items():
            item.set_selected_look(nid == node_id)
        ex = self.explanation
        node = next((nd for nd in ex.nodes if nd["id"] == node_id), None) if ex is not None and node_id else None
        if node is None:
            self.node_title.setText("")
            self.node_stats.setText("")
            self._show_where(None)
            self.patches.set_placeholder("Click a node to see its patches.", QSize(130, 60))
            return
        self.node_title.setText(node_name(node))
        self.node_stats.setText(node_tip(node, ex.edges, ex.images))
        self._show_where(node)
        crops = self.crops.get(node_id, [])
        if not crops:
            self.patches.set_placeholder("No patches.", QSize(130, 60))
        else:
            tiles = np.stack([_square(c, SIDE_PATCH) for c in crops])
            ids = [int(p["image"]) for p in node["patches"][: len(crops)]]
            tips = [f"{Path(p['path']).name}, box {p['box']} — click to explain this image"
                    for p in node["patches"][: len(crops)]]
            labels = [Path(p["path"]).stem[:10] for p in node["patches"][: len(crops)]]
            self.patches.set_tiles(tiles, ids, 2, labels=labels, tips=tips)
        self.node_shown.emit(node_id)

    def _show_where(self, node: dict[str, Any] | None) -> None:
        """The current image with the positions of ``node``'s word marked (orange cells)."""
        self._occurrences = -1
        cur = self._current_image
        fit = self.fit
        if node is None or node["layer"] == "class" or cur is None or fit is None:
            self.where_label.clear()
            self.where_caption.setText("")
            return
        index, rgb = cur
        lm = fit.layers[int(node["layer_index"])]
        hits = np.asarray(lm.words[index]) == int(node["word"])
        self._occurrences = int(hits.sum())
        scale = max(1, 96 // max(rgb.shape[:2]))
        big = resample(rgb, (rgb.shape[0] * scale, rgb.shape[1] * scale))
        image = to_qimage(big)
        painter = QPainter(image)
        colour = QColor(255, 140, 0, 110)
        stride, offset = lm.rf["stride"], lm.rf["offset"]
        for i, j in zip(*np.nonzero(hits), strict=True):
            cy, cx = offset[0] + i * stride[0], offset[1] + j * stride[1]
            painter.fillRect(QRectF((cx - stride[1] / 2) * scale, (cy - stride[0] / 2) * scale,
                                    max(1, stride[1]) * scale, max(1, stride[0]) * scale), colour)
        painter.end()
        self.where_label.setPixmap(QPixmap.fromImage(image))
        self.where_caption.setText(f"{node_name(node)} at {self._occurrences} of {hits.size} positions of "
                                   f"{Path(fit.image_paths[index]).name}")

    def occurrences(self) -> int:
        """Positions of the current image where the shown node's word occurs (-1: none shown)."""
        return self._occurrences

    def shown_patches(self) -> list[int]:
        """Image indices of the patches the side panel shows."""
        return self.patches.ids

    # ------------------------------------------------------------------ figure

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("graph", "Inference graph: nodes (patch montages), edges by LR, labels")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("edge_labels", "LR on every edge", True),
                FigureOption("legend", "Edge colour legend", True),
                FigureOption("node_patches", "Patches of the clicked node", True)]

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """The graph on the canvas as a vector figure, with the clicked node's patches."""
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        ex, fit = self.explanation, self.fit
        if ex is None or fit is None:
            raise ValueError("Inference graph: nothing to export yet: fit and explain first")
        montages = {nd["id"]: montage(self.crops.get(nd["id"], [])) for nd in ex.nodes}
        elements: list[Element] = [GraphPicture(list(ex.nodes), list(ex.edges), montages,
                                                edge_labels=include.get("edge_labels", True),
                                                max_node=56.0 if options.inches >= 5 else 40.0)]
        if include.get("legend", True):
            top = _top_lr(ex.edges)
            elements.append(Legend([(f"LR = +{top:.2f} (width grows with LR)", lr_colour(top, top)),
                                    ("LR = 0", lr_colour(0.0, top)),
                                    (f"LR = -{top:.2f}", lr_colour(-top, top))]))
        node = next((nd for nd in ex.nodes if nd["id"] == self.current_node), None)
        if include.get("node_patches", True) and node is not None and self.crops.get(node["id"]):
            from ..figures import Tile, TileGrid

            crops = self.crops[node["id"]]
            tiles = [Tile.of(_square(c, max(c.shape[:2])), Path(p["path"]).stem[:10])
                     for c, p in zip(crops, node["patches"], strict=False)]
            elements.append(Text(f"Patches of {node_name(node)} (receptive fields of its best columns)", bold=True))
            elements.append(TileGrid(tiles, columns=8 if options.inches >= 5 else 6, gap=3.0))
        layers = ", ".join(lm.name for lm in fit.layers)
        ks = ", ".join(f"K={lm.k}" for lm in fit.layers)
        model = self.ctx.session.model
        model_name = model.name if model is not None else Path(fit.model).name
        if ex.kind == "class":
            title = f"Inference graph of class '{ex.class_name}' ({model_name})"
            what = f"{ex.images} images predicted as '{ex.class_name}'"
        else:
            title = f"Inference graph of {Path(ex.target).name} ({model_name})"
            what = f"one image, predicted '{ex.class_name}'"
        subtitle = (f"layers {layers} ({ks}) + class layer · {len(fit.image_paths)} images fitted · local counts "
                    f"from {what} · top {ex.n} words per layer with positive score · edge width/colour: "
                    "LR = log2 P(t|s)/P(t)")
        return Figure(title, subtitle, elements, options.width_pt, options.dpi,
                      description=f"{len(ex.nodes)} nodes, {len(ex.edges)} edges")


def _square(crop: np.ndarray, side: int) -> np.ndarray:
    """``crop`` fitted into a ``side`` x ``side`` grey square (aspect kept)."""
    fitted = _fit(crop, side)
    out = np.full((side, side, 3), 235, dtype=np.uint8)
    h, w = fitted.shape[:2]
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = fitted
    return out
