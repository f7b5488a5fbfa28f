"""The Class evidence dock: why did the selected image get this class?

For the selected image (``ctx.selection.current_image``, set by the image browser) and a chosen
class (default: the predicted one) the view shows the evidence map of a method (Grad-CAM at the
heatmaps' layer, ``ctx.selection.layer``, when it is spatial; occlusion on any backend, ONNX
too; integrated gradients; saliency) over the image, the causal check's blobs outlined (green:
causal, masking it lowers the class probability by at least the threshold; red: non-causal) with
their number, and beside it the deletion and insertion curves (RISE) of the image with their AUC
(pyqtgraph). Below: each blob's size, share of the evidence and probability drop, and the
image's Average Drop / Increase terms.

Every computation is one engine job (:func:`engine.evidence.run.run` with ``indices=[image]``,
cached on disk by the engine and here in memory per setting), run on the inference worker with
key ``"evidence"``: a newer request supersedes it, Cancel stops it. Nothing runs while the view
is not on screen. Picking a layer here sets the shared layer; the heatmaps' layer choice moves
this one. The figure (File > Export figure) is composed from the result: the overlay at native
resolution with the blobs, the blob table and the two curves.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPen, QPixmap, QPolygonF, QShowEvent
from PySide6.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.types import Progress

from ..context import AppContext
from ..figures import Element, Figure, FigureKind, FigureOption, FigureOptions, Legend, Picture, Row, Stack, Text
from ..figures.model import CAPTION_PT, INK, MUTED, font, metrics
from ..jobs import JobHandle, show_progress
from ..widgets.eliding_combo import ElidingComboBox
from .base import View

__all__ = ["BlobPicture", "CurveChart", "EvidenceView", "blob_marks", "overlay_rgb"]

METHODS = [("gradcam", "Grad-CAM"), ("occlusion", "Occlusion"), ("ig", "Integrated gradients"),
           ("saliency", "Saliency (gradient)")]
CAUSAL = QColor(40, 170, 60)
NON_CAUSAL = QColor(220, 40, 40)
DELETION = QColor(200, 60, 40)
INSERTION = QColor(40, 90, 200)
MEMORY = 32  # results kept in memory (per image and setting)
SHOWN_PX = 240  # the overlay's size on screen, about


def overlay_rgb(result: Any, row: int, size: tuple[int, int], blobs: bool = True) -> np.ndarray:
    """uint8 (h, w, 3) at ``size``: the map over the image (nearest-neighbour enlargement) and,
    with ``blobs``, each blob's outline in its verdict's colour."""
    from engine.evidence.figure import overlay

    base = overlay(result.images[row], result.maps[row])
    h, w = base.shape[:2]
    th, tw = size
    ri = np.minimum((np.arange(th) * h) // th, h - 1)
    ci = np.minimum((np.arange(tw) * w) // tw, w - 1)
    out = base[ri][:, ci].copy()
    if not blobs:
        return out
    labels = result.blob_labels[row][ri][:, ci]
    for r in result.blobs_of(row):
        m = labels == result.blob_id[r]
        pad = np.pad(m, 1)
        edge = m & ~(pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:])
        thick = max(1, min(th, tw) // 160)
        for _ in range(thick - 1):
            p = np.pad(edge, 1)
            edge = m & (p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:] | edge)
        c = CAUSAL if result.blob_causal[r] else NON_CAUSAL
        out[edge] = (c.red(), c.green(), c.blue())
    return out


def _signed(x: float) -> str:
    """``x`` with its sign to 3 decimals, never "-0.000"."""
    x = float(x)
    return f"{0.0 if abs(x) < 5e-4 else x:+.3f}"


def _qpixmap(rgb: np.ndarray) -> QPixmap:
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = arr.shape[:2]
    img = QImage(arr.data, w, h, 3 * w, QImage.Format.Format_RGB888).copy()
    return QPixmap.fromImage(img)


def blob_marks(result: Any, row: int) -> list[tuple[float, float, str, QColor]]:
    """(row, column, number, colour) of each blob of image ``row``: its centroid, in map pixels."""
    return [(float(result.blob_centroid[b, 0]), float(result.blob_centroid[b, 1]), str(int(result.blob_id[b])),
             CAUSAL if result.blob_causal[b] else NON_CAUSAL) for b in result.blobs_of(row)]


def _paint_marks(painter: QPainter, target: QRectF, native: tuple[int, int],
                 marks: Sequence[tuple[float, float, str, QColor]], size_pt: float) -> None:
    """Each blob's number at its centroid: white text with a dark halo (text stays text in SVG/PDF)."""
    from PySide6.QtGui import QFont, QPainterPath

    f = QFont(font(size_pt, True))
    fm = metrics(f)
    h, w = native
    for r, c, text, colour in marks:
        x = target.left() + (c + 0.5) / w * target.width() - fm.horizontalAdvance(text) / 2
        y = target.top() + (r + 0.5) / h * target.height() + fm.ascent() / 2 - 0.5
        path = QPainterPath()
        path.addText(QPointF(x, y), f, text)
        painter.setPen(QPen(QColor(0, 0, 0), max(0.8, size_pt / 5)))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawPath(path)
        painter.setPen(QPen(colour.lighter(170)))
        painter.setFont(f)
        painter.drawText(QPointF(x, y), text)


@dataclass
class BlobPicture(Picture):
    """A :class:`Picture` of the overlay with each blob's number drawn as text at its centroid."""

    marks: Sequence[tuple[float, float, str, QColor]] = ()

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        super().paint(painter, rect, dpi)
        if not self.marks:
            return
        _px, w, h = self._box(rect.width(), dpi)
        target = QRectF(rect.left() + (rect.width() - w) / 2, rect.top(), w, h)
        _paint_marks(painter, target, self.native, self.marks, max(5.0, min(9.0, w / 14)))


@dataclass
class CurveChart(Element):
    """Probability curves over the fraction of pixels changed, on [0, 1] x [0, 1]."""

    series: Sequence[tuple[str, Sequence[float], Sequence[float], QColor]]  # (name, xs, ys, colour)
    title: str = ""
    x_label: str = "fraction of pixels changed (in the map's order)"
    y_label: str = "class probability"
    plot_height: float = 90.0

    def _legend(self) -> Legend:
        return Legend([(n, c) for n, _x, _y, c in self.series])

    def height(self, width: float, dpi: int) -> float:
        fm = metrics(font(CAPTION_PT))
        title = fm.height() + 3 if self.title else 0
        return title + self.plot_height + 2 * fm.height() + 6 + self._legend().height(width, dpi) + 3

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
        left = fm.horizontalAdvance("0.00") + 6 + fm.height() + 2
        plot = QRectF(rect.left() + left, y, rect.width() - left - 6, self.plot_height)

        def to(px: float, py: float) -> QPointF:
            return QPointF(plot.left() + plot.width() * px, plot.bottom() - plot.height() * py)

        painter.setFont(f)
        painter.setPen(QPen(QColor(225, 225, 225), 0.5))
        ticks = [0.0, 0.25, 0.5, 0.75, 1.0]
        for t in ticks[1:-1]:
            painter.drawLine(to(0, t), to(1, t))
        painter.setPen(QPen(INK, 0.7))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.drawRect(plot)
        for t in ticks:
            p = to(0, t)
            painter.drawText(QRectF(rect.left(), p.y() - fm.height() / 2, left - 4, fm.height()),
                             int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter), f"{t:g}")
            q = to(t, 0)
            painter.drawLine(q, QPointF(q.x(), q.y() + 2))
            painter.drawText(QRectF(q.x() - 20, plot.bottom() + 2, 40, fm.height()), int(Qt.AlignmentFlag.AlignHCenter),
                             f"{t:g}")
        painter.setPen(MUTED)
        painter.drawText(QRectF(plot.left(), plot.bottom() + fm.height() + 3, plot.width(), fm.height() + 1),
                         int(Qt.AlignmentFlag.AlignHCenter), self.x_label)
        painter.save()
        painter.translate(rect.left(), plot.center().y())
        painter.rotate(-90)
        painter.drawText(QRectF(-plot.height() / 2, 0, plot.height(), fm.height() + 1), int(Qt.AlignmentFlag.AlignHCenter),
                         self.y_label)
        painter.restore()
        for _name, xs, ys, colour in self.series:
            pts = [to(float(a), min(1.0, max(0.0, float(b)))) for a, b in zip(xs, ys, strict=True) if math.isfinite(b)]
            painter.setPen(QPen(colour, 1.3))
            if len(pts) > 1:
                painter.drawPolyline(QPolygonF(pts))
        legend = self._legend()
        top = plot.bottom() + 2 * fm.height() + 6
        legend.paint(painter, QRectF(plot.left(), top, plot.width(), legend.height(plot.width(), dpi)), dpi)


class EvidenceView(View):
    """Class evidence of the selected image: map, causal blobs, deletion / insertion curves."""

    title = "Class evidence"
    object_name = "evidence"
    sanity_explanation = "gradcam"  # the method chosen in the dock, see sanity_request
    area = Qt.DockWidgetArea.RightDockWidgetArea
    order = 45

    #: a result arrived and is shown (its EvidenceResult)
    result_ready = Signal(object)

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.result: Any = None  # engine EvidenceResult of the shown setting (one image)
        self._results: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._handle: JobHandle | None = None
        self._handle_key: tuple[Any, ...] | None = None
        self._error = ""
        self._build()
        sel, session = ctx.selection, ctx.session
        session.model_loaded.connect(self._model_loaded)
        sel.images_changed.connect(lambda _s: self._reset())
        sel.current_image_changed.connect(lambda _i: self._request())
        sel.layer_changed.connect(self._layer_changed)
        if session.model is not None:
            self._model_loaded(session.model)
        else:
            self._render()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.method_combo = QComboBox()
        for key, label in METHODS:
            self.method_combo.addItem(label, key)
        self.method_combo.setToolTip("Grad-CAM needs a spatial layer and gradients (PyTorch); occlusion runs on "
                                     "any backend, ONNX included")
        self.method_combo.activated.connect(lambda _i: self._setting_changed())
        self.layer_combo = ElidingComboBox(12)
        self.layer_combo.setToolTip("Grad-CAM's layer (spatial layers only); follows the heatmaps' layer")
        self.layer_combo.activated.connect(self._layer_picked)
        self.class_combo = ElidingComboBox(10)
        self.class_combo.setToolTip("The class whose evidence is shown (default: the predicted one)")
        self.class_combo.activated.connect(lambda _i: self._setting_changed())
        self.threshold_spin = QDoubleSpinBox()
        self.threshold_spin.setRange(0.0, 1.0)
        self.threshold_spin.setSingleStep(0.01)
        self.threshold_spin.setDecimals(2)
        self.threshold_spin.setValue(0.05)
        self.threshold_spin.setToolTip("A blob is causal when masking it (mean colour) lowers the class probability "
                                       "by at least this much")
        self.threshold_spin.editingFinished.connect(self._setting_changed)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the computation under way")
        self.cancel_button.clicked.connect(self.cancel)
        self.cancel_button.hide()
        self.progress = QProgressBar()
        self.progress.setMaximumHeight(14)
        self.progress.hide()

        # two rows of two settings: the dock fits beside the image browser in a 1024 px window
        controls = QGridLayout()
        controls.setContentsMargins(0, 0, 0, 0)
        for i, (label, w) in enumerate((("Method", self.method_combo), ("Layer", self.layer_combo),
                                        ("Class", self.class_combo), ("Causal drop ≥", self.threshold_spin))):
            controls.addWidget(QLabel(label), i // 2, 2 * (i % 2))
            controls.addWidget(w, i // 2, 2 * (i % 2) + 1)
        controls.setColumnStretch(1, 1)
        controls.setColumnStretch(3, 1)
        controls.addWidget(self.cancel_button, 0, 4)

        self.image_label = QLabel()
        self.image_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.image_label.setMinimumSize(120, 120)
        self.image_label.setToolTip("The map's positive evidence over the image (brighter: more evidence); the "
                                    "numbered outlines are the blobs of its top pixels, green causal, red not")
        self.image_label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.plot = pg.PlotWidget(background="w")
        self.plot.setMinimumSize(160, 120)
        self.plot.setLabel("bottom", "fraction of pixels changed")
        self.plot.setLabel("left", "class probability")
        self.plot.setYRange(-0.03, 1.06, padding=0)  # room for the labels of 0 and 1
        self.plot.setXRange(0, 1, padding=0.02)
        self.plot.showGrid(x=True, y=True, alpha=0.2)
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        ticks = [(v, f"{v:g}") for v in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)]  # 0 and 1 labelled too
        for side in ("left", "bottom"):
            self.plot.getAxis(side).setPen("k")
            self.plot.getAxis(side).setTextPen("k")
            self.plot.getAxis(side).setTicks([ticks])
        self.plot.setToolTip("Deletion: the class probability as the map's top pixels are removed first (a low AUC: "
                             "the map found the evidence). Insertion: as they are put back into a blurred image first "
                             "(a high AUC is good). RISE, Petsiuk et al. 2018")
        self.deletion_curve = self.plot.plot([], [], pen=pg.mkPen(DELETION, width=2), name="deletion")
        self.insertion_curve = self.plot.plot([], [], pen=pg.mkPen(INSERTION, width=2), name="insertion")
        # the legend under the plot, not inside it: the curves fill the whole [0, 1] square
        self.legend_label = QLabel()
        self.legend_label.setTextFormat(Qt.TextFormat.RichText)
        self.legend_label.setWordWrap(True)
        self.legend_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        plot_box = QWidget()
        pl = QVBoxLayout(plot_box)
        pl.setContentsMargins(0, 0, 0, 0)
        pl.setSpacing(2)
        pl.addWidget(self.plot, 1)
        pl.addWidget(self.legend_label)
        split = QSplitter(Qt.Orientation.Horizontal)
        split.addWidget(self.image_label)
        split.addWidget(plot_box)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 1)
        split.setChildrenCollapsible(False)
        split.setSizes([1000, 1000])  # half and half once laid out
        self.blob_label = QLabel()
        self.blob_label.setWordWrap(True)
        self.blob_label.setTextFormat(Qt.TextFormat.RichText)
        self.blob_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label = QLabel()
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(controls)
        lay.addWidget(self.progress)
        lay.addWidget(split, 1)
        lay.addWidget(self.blob_label)
        lay.addWidget(self.status_label)

    # ------------------------------------------------------------------ settings

    def method(self) -> str:
        return str(self.method_combo.currentData() or "gradcam")

    def layer(self) -> str | None:
        return self.layer_combo.currentText() or None if self.method() == "gradcam" else None

    def target(self) -> int | None:
        data = self.class_combo.currentData()
        return None if data is None or int(data) < 0 else int(data)

    def set_params(self, *, method: str | None = None, layer: str | None = None, target: int | str | None = "keep",
                   threshold: float | None = None) -> None:
        """Set the controls (as a user would) and compute what they ask for."""
        if method is not None:
            i = self.method_combo.findData(method)
            if i < 0:
                raise ValueError(f"unknown method {method!r}")
            self.method_combo.setCurrentIndex(i)
        if layer is not None:
            i = self.layer_combo.findText(layer)
            if i < 0:
                raise ValueError(f"'{layer}' is not a spatial layer of this model")
            self.layer_combo.setCurrentIndex(i)
        if target != "keep":
            i = self.class_combo.findData(-1 if target is None else int(target))
            if i >= 0:
                self.class_combo.setCurrentIndex(i)
        if threshold is not None:
            self.threshold_spin.setValue(float(threshold))
        self._setting_changed()

    def save_state(self) -> dict[str, Any]:
        return {"method": self.method(), "layer": self.layer_combo.currentText(), "target": self.target(),
                "threshold": self.threshold_spin.value()}

    def restore_state(self, state: dict[str, Any]) -> None:
        i = self.method_combo.findData(state.get("method"))
        if i >= 0:
            self.method_combo.setCurrentIndex(i)
        j = self.layer_combo.findText(str(state.get("layer") or ""))
        if j >= 0:
            self.layer_combo.setCurrentIndex(j)
        t = state.get("target")
        k = self.class_combo.findData(-1 if t is None else t)
        if k >= 0:
            self.class_combo.setCurrentIndex(k)
        if isinstance(state.get("threshold"), (int, float)):
            self.threshold_spin.setValue(float(state["threshold"]))
        self._request()

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        return [("Class evidence of the selected image", self._raise_and_run)]

    def sanity_request(self) -> dict[str, Any] | None:
        """The sanity check of the method (and Grad-CAM layer) chosen in this dock."""
        return {"explanation": self.method(), "layer": self.layer() or self.ctx.selection.layer}

    def shutdown(self) -> None:
        self.cancel()

    def _raise_and_run(self) -> None:
        dock = self.parentWidget()
        if dock is not None:
            dock.show()
            dock.raise_()
        self._request(force=True)

    # ------------------------------------------------------------------ state changes

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self.when_on_screen(self._request)

    def _reset(self) -> None:
        self.cancel()
        self._results.clear()
        self.result = None
        self._error = ""
        self._request()

    def _model_loaded(self, info: Any = None) -> None:
        from engine.predict import class_names

        info = info or self.ctx.session.model
        self.cancel()
        self._results.clear()
        self.result = None
        self._error = ""
        self.layer_combo.clear()
        self.class_combo.clear()
        if info is None:
            self._render()
            return
        spatial = [li.name for li in info.layers if len(li.shape) == 3 and li.shape[1] * li.shape[2] > 1]
        for name in spatial:
            self.layer_combo.addItem(name)
        if spatial:
            want = self.ctx.selection.layer
            self.layer_combo.setCurrentIndex(spatial.index(want) if want in spatial else len(spatial) - 1)
        chosen = info.choice.chosen if info.choice is not None else None
        n = chosen.n_classes if chosen is not None else (len(info.spec.classes) if info.spec.classes else 0)
        self.class_combo.addItem("predicted class", -1)
        if n:
            for k, name in enumerate(class_names(info.spec, n)):
                self.class_combo.addItem(f"{k}: {name}", k)
        grads = bool(info.gradients)
        model = self.method_combo.model()
        for i, (key, _label) in enumerate(METHODS):
            item = model.item(i)  # type: ignore[attr-defined]
            item.setEnabled(grads or key == "occlusion")
        if not grads:
            self.method_combo.setCurrentIndex(self.method_combo.findData("occlusion"))
        self._request()

    def _layer_changed(self, layer: str) -> None:
        i = self.layer_combo.findText(layer)
        if i >= 0 and i != self.layer_combo.currentIndex():
            self.layer_combo.setCurrentIndex(i)
            if self.method() == "gradcam":
                self._request()

    def _layer_picked(self, _i: int) -> None:
        name = self.layer_combo.currentText()
        if name and name != self.ctx.selection.layer:
            self.ctx.selection.set_layer(name)
        self._setting_changed()

    def _setting_changed(self) -> None:
        self.layer_combo.setEnabled(self.method() == "gradcam")
        self._request(force=True)

    # ------------------------------------------------------------------ the job

    def _key(self) -> tuple[Any, ...]:
        return (self.ctx.selection.current_image, self.method(), self.layer(), self.target(),
                round(self.threshold_spin.value(), 4))

    def _params(self) -> Any:
        from engine.evidence.run import EvidenceParams

        return EvidenceParams(method=self.method(), layer=self.layer(), target=self.target(),
                              threshold=round(self.threshold_spin.value(), 4), batch_size=1)

    def _request(self, force: bool = False) -> None:
        """Show the result of the current setting, computing it on the worker when needed."""
        session, images = self.ctx.session, self.ctx.selection.images
        image = self.ctx.selection.current_image
        if session.model is None or images is None or image < 0 or image >= len(images.records):  # type: ignore[attr-defined]
            self.result = None
            self._render()
            return
        info = session.model
        if info.choice is not None and info.choice.index is None:
            self.result = None
            self._error = f"{info.name}: its output is not class scores, so there is no class to find evidence for"
            self._render()
            return
        if self.method() == "gradcam" and not self.layer():
            self.result = None
            self._error = "this model has no spatial layer for Grad-CAM: choose occlusion"
            self._render()
            return
        key = self._key()
        found = self._results.get(key)
        if found is not None:
            self._results.move_to_end(key)
            if self._handle is not None and self._handle_key != key:
                self.cancel()
            self.result, self._error = found, ""
            self._render()
            return
        if (key == self._handle_key and self._handle is not None) or not (force or self.on_screen()):
            return
        params = self._params()

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, Any]:
            from engine.evidence.run import run

            return (yield from run(backend, loaded.cache_id, images, params, indices=[image]))

        title = f"Class evidence ({params.method}{' at ' + params.layer if params.layer else ''}) of image {image}"
        handle = session.run(title, job, key="evidence", on_done=self._done)
        if handle is None:
            return
        self._handle, self._handle_key = handle, key
        handle.failed.connect(lambda e, h=handle: self._failed(h, e))
        handle.cancelled.connect(lambda h=handle: self._cancelled(h))
        handle.progress.connect(self._progress)
        self.progress.setRange(0, 0)
        self.progress.show()
        self.cancel_button.show()
        self._error = ""
        self._render_status()

    def cancel(self) -> None:
        """Stop the job under way (its result, should it arrive, is dropped)."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._handle_key = None
        self.progress.hide()
        self.cancel_button.hide()

    def _done(self, result: Any) -> None:
        key = self._handle_key
        self._handle = self._handle_key = None
        self.progress.hide()
        self.cancel_button.hide()
        if key is not None:
            self._results[key] = result
            while len(self._results) > MEMORY:
                self._results.popitem(last=False)
        if key != self._key():
            self._request()
            return
        self.result, self._error = result, ""
        self._render()
        self.result_ready.emit(result)

    def _failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is not self._handle:
            return
        from engine.types import ConvLensError

        self._handle = self._handle_key = None
        self.progress.hide()
        self.cancel_button.hide()
        self.result = None
        self._error = str(error) if isinstance(error, ConvLensError) else f"{type(error).__name__}: {error}"
        self._render()

    def _cancelled(self, handle: JobHandle) -> None:
        if handle is not self._handle and self._handle is not None:
            return
        self._handle = self._handle_key = None
        self.progress.hide()
        self.cancel_button.hide()
        self._error = "cancelled (change a setting or select an image to compute it again)"
        self._render_status()

    def _progress(self, p: Progress) -> None:
        show_progress(self.progress, p)

    # ------------------------------------------------------------------ showing it

    def _image_name(self) -> str:
        images = self.ctx.selection.images
        i = self.ctx.selection.current_image
        if images is None or not 0 <= i < len(images.records):  # type: ignore[attr-defined]
            return ""
        return str(images.relative_path(images.records[i]))  # type: ignore[attr-defined]

    def _render(self) -> None:
        r = self.result
        if r is None or not r.n:
            self.image_label.setPixmap(QPixmap())
            self.image_label.setText("Select an image in the image browser" if self.ctx.session.model else
                                     "Open a model and images")
            self.deletion_curve.setData([], [])
            self.insertion_curve.setData([], [])
            self.blob_label.setText("")
            self.legend_label.setText("")
        else:
            h, w = r.maps.shape[1:]
            avail = max(60, min(self.image_label.width(), self.image_label.height(), 2 * SHOWN_PX))
            k = max(1, avail // max(h, w))
            size = (h * k, w * k) if k * max(h, w) <= avail or max(h, w) <= avail else (
                int(h * avail / max(h, w)), int(w * avail / max(h, w)))
            pix = _qpixmap(overlay_rgb(r, 0, size))
            painter = QPainter(pix)
            painter.setRenderHint(QPainter.RenderHint.Antialiasing)
            _paint_marks(painter, QRectF(0, 0, size[1], size[0]), (h, w), blob_marks(r, 0), max(7.0, size[0] / 16))
            painter.end()
            self.image_label.setPixmap(pix)
            self.deletion_curve.setData(r.fractions, r.deletion[0])
            self.insertion_curve.setData(r.fractions, r.insertion[0])
            self.legend_label.setText(
                f"<span style='color:{DELETION.name()}'>━━</span>&nbsp;deletion, AUC {r.deletion_auc[0]:.3f} "
                f"(lower is better) &nbsp; <span style='color:{INSERTION.name()}'>━━</span>&nbsp;insertion, AUC "
                f"{r.insertion_auc[0]:.3f} (higher is better)")
            self.blob_label.setText(self._blob_html(r))
        self.layer_combo.setEnabled(self.method() == "gradcam")
        self._render_status()

    def _blob_html(self, r: Any) -> str:
        rows = r.blobs_of(0)
        parts = []
        for b in rows:
            c = CAUSAL if r.blob_causal[b] else NON_CAUSAL
            verdict = "causal" if r.blob_causal[b] else "non-causal"
            parts.append(f"<span style='color:{c.name()}'>blob {int(r.blob_id[b])}: {int(r.blob_area[b])} px, "
                         f"{100 * r.blob_mass[b]:.0f}% of the evidence, p {r.probs[0]:.3f} → "
                         f"{r.blob_prob_after[b]:.3f} (drop {_signed(r.blob_drop[b])}): <b>{verdict}</b></span>")
        if not parts:
            parts.append("no positive evidence in the map: no blobs")
        tail = (f"top {100 * r.params.top_fraction:.0f}% of the map masked at once: p → {r.region_prob[0]:.3f}; "
                f"map × image (Average Drop): p → {r.explanation_prob[0]:.3f}, drop {r.avg_drop[0]:.1f}%"
                f"{', an increase' if r.increase[0] else ''}")
        return "<br>".join([*parts, f"<span style='color:#555'>{tail}</span>"])

    def _render_status(self) -> None:
        r = self.result
        if self._error:
            self.status_label.setText(self._error)
        elif self._handle is not None:
            self.status_label.setText(f"computing {self.method_combo.currentText()} for {self._image_name()} …")
        elif r is not None and r.n:
            cls = r.class_name(int(r.targets[0]))
            how = "predicted" if r.params.target is None else "chosen"
            where = f" at {r.layer}" if r.layer else ""
            self.status_label.setText(f"{self._image_name()}: evidence for '{cls}' ({how}), p = {r.probs[0]:.3f}; "
                                      f"{self.method_combo.currentText()}{where}"
                                      f"{' (cached)' if r.from_cache else ''}")
        else:
            self.status_label.setText("")

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        if self.result is not None:
            QTimer.singleShot(0, self._render)

    # ------------------------------------------------------------------ figure

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("evidence", "Class evidence: the map over the image with its causal blobs, the "
                                       "deletion / insertion curves"),
                FigureKind("curves", "Deletion and insertion curves only")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("blobs", "Blob outlines (green causal, red non-causal)", True, kinds=("evidence",)),
                FigureOption("table", "Each blob's size, evidence share and probability drop", True,
                             kinds=("evidence",)),
                FigureOption("plain", "The image without the map beside it", True, kinds=("evidence",))]

    def figure(self, options: FigureOptions | None = None) -> Figure:
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        r = self.result
        model = self.ctx.session.model
        if r is None or not r.n or model is None:
            raise ValueError("Class evidence: nothing to export yet: select an image and wait for its evidence map")
        name = self._image_name() or r.paths[0]
        cls = r.class_name(int(r.targets[0]))
        method = dict(METHODS).get(r.params.method, r.params.method)
        where = f" at {r.layer}" if r.layer else ""
        chart = CurveChart(
            [(f"deletion (AUC {r.deletion_auc[0]:.3f}, lower is better)", r.fractions, r.deletion[0], DELETION),
             (f"insertion (AUC {r.insertion_auc[0]:.3f}, higher is better)", r.fractions, r.insertion[0], INSERTION)],
            title=f"Deletion / insertion of '{cls}' (RISE)")
        subtitle = (f"{model.name}; {method}{where}; class '{cls}' "
                    f"({'predicted' if r.params.target is None else 'chosen'}), p = {r.probs[0]:.3f}; deletion to the "
                    f"{r.params.deletion_baseline} input, insertion from a blur; blobs: top {100 * r.params.top_fraction:.0f}% "
                    f"of the map, masked with the {r.params.mask_baseline} colour, causal when p drops by "
                    f"≥ {r.params.threshold:g}")
        title = f"Class evidence for '{cls}' in {name} ({method}{where})"
        if kind == "curves":
            return Figure(title, subtitle, [chart], options.width_pt, options.dpi)
        h, w = r.maps.shape[1:]
        show_blobs = include.get("blobs", True)
        pics: list[Element] = []
        if include.get("plain", True):
            img = r.images[0]
            pics.append(Picture.of(img, "image as the model sees it", max_width=150))
        pics.append(BlobPicture((h, w), lambda size: overlay_rgb(r, 0, size, show_blobs),
                                f"{method}{where}" + (": blobs numbered" if show_blobs else ""), max_width=150,
                                marks=blob_marks(r, 0) if show_blobs else ()))
        elements: list[Element] = [Row([Row(pics, gap=6), chart], weights=[len(pics), 2], gap=10)]
        if show_blobs:
            elements.append(Legend([("causal blob (masking it lowers p by at least the threshold)", CAUSAL),
                                    ("non-causal blob", NON_CAUSAL)], outline=True))
        if include.get("table", True):
            lines = []
            for b in r.blobs_of(0):
                verdict = "causal" if r.blob_causal[b] else "non-causal"
                lines.append(f"blob {int(r.blob_id[b])}: {int(r.blob_area[b])} px, {100 * r.blob_mass[b]:.0f}% of the "
                             f"evidence; p {r.probs[0]:.3f} → {r.blob_prob_after[b]:.3f} (drop {_signed(r.blob_drop[b])}): "
                             f"{verdict}")
            if not lines:
                lines.append("no positive evidence in the map: no blobs")
            lines.append(f"top region masked at once: p → {r.region_prob[0]:.3f}; map × image: p → "
                         f"{r.explanation_prob[0]:.3f} (Average Drop term {r.avg_drop[0]:.1f}%)")
            elements.append(Stack([Text(line) for line in lines], gap=1))
        return Figure(title, subtitle, elements, options.width_pt, options.dpi)
