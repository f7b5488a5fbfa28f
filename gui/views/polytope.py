"""The polytope neighbour gallery (Representative Interpretations, Lam, Chu et al., ICCV 2021).

For the selected image x the view shows the images the engine's polytope P(x) covers: the SCSC
greedy picks a few of the head's certified linear boundaries (hidden-unit hyperplanes and class
decision boundaries, sampled into a candidate set Q) so that the polytope on x's side of all of
them holds as many same-class images as possible and at most delta images predicted as another
class. The covered images are ranked by the semantic distance Dist(x, x') and shown as
thumbnails with their predicted class and distance; different-class intruders are framed red
and marked "✗". Beside the numbers (boundaries chosen, covered same/different class, coverage,
precision, the certificate max|A psi(x) + c - f(x)|) a strip shows the k nearest neighbours by
Euclidean distance on the same features psi at the gallery's size, and a line compares the
gallery with kNN over the whole image set (the engine's baselines, at equal size).

Controls: the split layer (the backend's split candidates, the engine's default marked), delta
("smallest feasible" by default) and |Q|. One engine job computes the galleries of every image
of the set at once (:func:`engine.polytope.run.run`, cached on disk by the engine and here in
memory per setting), on the inference worker through ``ctx.session.run`` with key
``"polytope"``: a new setting supersedes the job under way. Changing the image only reads the
result. Nothing runs while the view is not on screen (a hidden or tabbed-away dock computes
nothing, not even the list of split points): a model loaded meanwhile is looked at when the view
is first shown.

When the head after the split layer is affine (only pooling and linear layers) the view says so
and lists the earlier split layers the engine suggests. ONNX models cannot be split: the view
says a PyTorch model is needed.

Clicking a neighbour selects it everywhere: ``ctx.selection.current_image`` becomes its index
in the image set and the generic item ``("polytope_neighbour", index)`` is published; the
gallery keeps its query (the clicked tile is framed) until another image is selected elsewhere
or "Gallery of the selected image" is pressed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Generator
from typing import Any

import numpy as np
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QColor, QPixmap, QShowEvent
from PySide6.QtWidgets import (
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

from ..context import AppContext
from ..figures import (
    Figure,
    FigureKind,
    FigureOption,
    FigureOptions,
    Legend,
    Picture,
    Row,
    Stack,
    Text,
    Tile,
    TileGrid,
    resample,
)
from ..jobs import JobHandle, show_progress
from ..tiles import TileMosaic, decode_view, display_size, to_qimage
from ..widgets.eliding_combo import ElidingComboBox
from .base import View

__all__ = ["ITEM_KIND", "PolytopeView", "framed"]

ITEM_KIND = "polytope_neighbour"
"""The generic selection item a click on a neighbour publishes: its index in the image set."""
THUMB = 64
"""Longer side of a gallery thumbnail in the dock."""
QUERY_SIDE = 96
"""Longer side of the query image in the dock."""
MAX_SHOWN = 120
"""At most this many neighbours are shown in the dock (the rest are counted)."""
FIGURE_SHOWN = 16
"""Neighbours (and kNN images) in the figure."""
MEMORY = 6
"""Results kept in memory (one per setting: layer, delta, |Q|)."""
RED = np.array([210, 30, 30], dtype=np.uint8)
NEED_TORCH = ("Polytope galleries split the model at a layer, and splits need a PyTorch model: {model} runs on "
              "{backend}. Load the PyTorch checkpoint (a state dict with an architecture, a TorchScript file or a "
              "torch.export .pt2 archive) instead.")
NEED_MODEL = "Load a model and an image set to see the polytope neighbour gallery of an image."


def framed(rgb: np.ndarray, width: int | None = None) -> np.ndarray:
    """A copy of ``rgb`` with a red frame inside its border (the intruder mark)."""
    out = np.array(rgb[..., :3], dtype=np.uint8, copy=True)
    h, w = out.shape[:2]
    b = width if width is not None else max(2, round(min(h, w) / 12))
    b = max(1, min(b, h // 2, w // 2))
    out[:b], out[-b:], out[:, :b], out[:, -b:] = RED, RED, RED, RED
    return out


def _fmt(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


class PolytopeView(View):
    """The polytope neighbour gallery of the selected image; see the module docstring."""

    title = "Polytope gallery"
    object_name = "polytope"
    sanity_explanation = "polytope"
    order = 40

    #: a result arrived and is shown (its PolytopeResult)
    result_ready = Signal(object)
    #: the split candidates of the loaded model are known (or the reason there are none)
    layers_ready = Signal()

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self.result: Any = None  # engine PolytopeResult of the current setting
        self._results: OrderedDict[tuple[str, int | None, int], Any] = OrderedDict()
        self._handle: JobHandle | None = None
        self._handle_key: tuple[str, int | None, int] | None = None
        self._layers_handle: JobHandle | None = None
        self._default_layer = ""
        self._split_error = ""  # why this model cannot be split (ONNX), else ""
        self._error = ""
        self._query = ctx.selection.current_image  # image-set index of the gallery's image (-1: none)
        self._clicked = -1  # the neighbour a click just selected
        self._views: OrderedDict[tuple[str, tuple[int, int]], np.ndarray] = OrderedDict()
        self._decoding: set[tuple[str, tuple[int, int]]] = set()
        self._pending_state: dict[str, Any] = {}
        self._layers_wanted = False  # a model was loaded while the view was not shown: list its split points when it is
        self._build()
        sel, session = ctx.selection, ctx.session
        session.model_loaded.connect(self._model_loaded)
        sel.images_changed.connect(self._images_changed)
        sel.current_image_changed.connect(self._image_changed)
        if session.model is not None:
            self._model_loaded(session.model)
        else:
            self._render()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.layer_combo = ElidingComboBox(16)
        self.layer_combo.setToolTip("Split point: psi is the model up to this layer, the head G the rest")
        self.layer_combo.activated.connect(lambda _i: self._request())
        self.delta_spin = QSpinBox()
        self.delta_spin.setRange(-1, 1_000_000)
        self.delta_spin.setValue(-1)
        self.delta_spin.setSpecialValueText("smallest feasible")
        self.delta_spin.setKeyboardTracking(False)
        self.delta_spin.setToolTip("delta: how many images predicted as another class a gallery may hold")
        self.delta_spin.valueChanged.connect(lambda _v: self._request())
        self.q_spin = QSpinBox()
        self.q_spin.setRange(1, 100_000)
        self.q_spin.setValue(50)
        self.q_spin.setKeyboardTracking(False)
        self.q_spin.setToolTip("|Q|: candidate boundaries sampled from the image set (the paper's review: 50)")
        self.q_spin.valueChanged.connect(lambda _v: self._request())
        self.query_button = QPushButton("Show its gallery")
        self.query_button.setToolTip("Show the gallery of the image selected now (the neighbour clicked last)")
        self.query_button.clicked.connect(self.show_selected)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setMaximumWidth(160)
        self.progress.hide()

        controls = QHBoxLayout()
        for label, w in (("Layer", self.layer_combo), ("delta", self.delta_spin), ("|Q|", self.q_spin)):
            controls.addWidget(QLabel(label))
            controls.addWidget(w)
        controls.addStretch(1)

        self.status = QLabel()
        self.status.setWordWrap(True)
        self.note_label = QLabel()  # the affine-head note and suggestions
        self.note_label.setWordWrap(True)
        self.note_label.setStyleSheet("color: #a05a00")
        self.note_label.hide()
        self.suggest_button = QPushButton()
        self.suggest_button.setToolTip("Split at the suggested earlier layer, whose head has hidden units")
        self.suggest_button.clicked.connect(self._use_suggestion)
        self.suggest_button.hide()
        self.numbers = QLabel()
        self.numbers.setWordWrap(True)
        self.numbers.setTextFormat(Qt.TextFormat.RichText)
        self.numbers.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.numbers.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)

        self.query_label = QLabel()
        self.query_label.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignHCenter)
        column = max(QUERY_SIDE + 8, self.query_button.sizeHint().width())
        self.query_label.setFixedWidth(column)
        self.query_caption = QLabel()
        self.query_caption.setWordWrap(True)
        self.query_caption.setFixedWidth(column)
        self.query_caption.setAlignment(Qt.AlignmentFlag.AlignHCenter)
        query_box = QVBoxLayout()
        query_box.addWidget(self.query_label)
        query_box.addWidget(self.query_caption)
        query_box.addWidget(self.query_button)
        query_box.addStretch(1)

        self.gallery = TileMosaic(label_height=14)
        self.gallery.clicked.connect(self._tile_clicked)
        self.gallery_title = QLabel("Gallery: covered images, nearest (Dist) first")
        self.gallery_title.setWordWrap(True)
        self.gallery_title.setTextFormat(Qt.TextFormat.RichText)
        self.gallery_scroll = QScrollArea()
        self.gallery_scroll.setWidget(self.gallery)
        self.gallery_scroll.setWidgetResizable(False)
        self.gallery_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.gallery_scroll.setMinimumHeight(THUMB + 40)
        self.knn = TileMosaic(label_height=14)
        self.knn.clicked.connect(self._tile_clicked)
        self.knn_title = QLabel("kNN (Euclidean on psi) at the gallery's size")
        self.knn_scroll = QScrollArea()
        self.knn_scroll.setWidget(self.knn)
        self.knn_scroll.setWidgetResizable(False)
        self.knn_scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

        gallery_box = QWidget()
        gl = QVBoxLayout(gallery_box)
        gl.setContentsMargins(0, 0, 0, 0)
        gl.addWidget(self.gallery_title)
        gl.addWidget(self.gallery_scroll, 1)
        knn_box = QWidget()
        kl = QVBoxLayout(knn_box)
        kl.setContentsMargins(0, 0, 0, 0)
        kl.addWidget(self.knn_title)
        kl.addWidget(self.knn_scroll, 1)
        self.knn_title.setWordWrap(True)
        scrollbar = self.knn_scroll.horizontalScrollBar().sizeHint().height()
        self.knn_scroll.setFixedHeight(THUMB + self.knn.label_height + 2 * self.knn.gap + scrollbar + 4)
        self.strips = QWidget()
        sl = QVBoxLayout(self.strips)
        sl.setContentsMargins(0, 0, 0, 0)
        sl.addWidget(gallery_box, 1)
        sl.addWidget(knn_box)
        body = QHBoxLayout()
        body.addLayout(query_box)
        body.addWidget(self.strips, 1)
        layout = QVBoxLayout(self)
        layout.addLayout(controls)
        status_row = QHBoxLayout()
        status_row.addWidget(self.status, 1)
        status_row.addWidget(self.progress)
        layout.addLayout(status_row)
        note_row = QHBoxLayout()
        note_row.addWidget(self.note_label, 1)
        note_row.addWidget(self.suggest_button, 0, Qt.AlignmentFlag.AlignTop)
        layout.addLayout(note_row)
        layout.addWidget(self.numbers)
        layout.addLayout(body, 1)

    # ------------------------------------------------------------------ View API

    def save_state(self) -> dict[str, Any]:
        layer = self.layer() or str(self._pending_state.get("layer", ""))  # not listed yet: the one restored
        return {"layer": layer, "delta": self.delta(), "candidates": self.q_spin.value()}

    def restore_state(self, state: dict[str, Any]) -> None:
        if isinstance(state.get("candidates"), int) and not isinstance(state["candidates"], bool):
            self.q_spin.blockSignals(True)
            self.q_spin.setValue(state["candidates"])
            self.q_spin.blockSignals(False)
        d = state.get("delta")
        if d is None or (isinstance(d, int) and not isinstance(d, bool)):
            self.delta_spin.blockSignals(True)
            self.delta_spin.setValue(-1 if d is None else d)
            self.delta_spin.blockSignals(False)
        want = state.get("layer")
        if isinstance(want, str) and want and not self._select_layer(want):
            self._pending_state["layer"] = want  # the candidates are not known yet
        self._request()

    def shutdown(self) -> None:
        for h in (self._handle, self._layers_handle):
            if h is not None:
                h.cancel()

    def analysis_actions(self) -> list[tuple[str, Callable[[], None]]]:
        return [("Polytope gallery of the selected image", self._raise_and_run)]

    # ------------------------------------------------------------------ public helpers

    def layer(self) -> str:
        """The split layer chosen ("" while the candidates are unknown)."""
        return str(self.layer_combo.currentData() or "")

    def delta(self) -> int | None:
        """delta, None for the smallest feasible value."""
        v = self.delta_spin.value()
        return None if v < 0 else v

    def set_params(self, *, layer: str | None = None, delta: int | str | None = "keep",
                   candidates: int | None = None) -> None:
        """Change the settings (as the controls do) and recompute; ``delta=None``: smallest feasible."""
        for w in (self.layer_combo, self.delta_spin, self.q_spin):
            w.blockSignals(True)
        try:
            if layer is not None and not self._select_layer(layer):
                raise ValueError(f"'{layer}' is not a split point of this model "
                                 f"(split points: {', '.join(self.split_candidates())})")
            if delta != "keep":
                self.delta_spin.setValue(-1 if delta is None else int(delta))
            if candidates is not None:
                self.q_spin.setValue(candidates)
        finally:
            for w in (self.layer_combo, self.delta_spin, self.q_spin):
                w.blockSignals(False)
        self._request()

    def split_candidates(self) -> list[str]:
        return [str(self.layer_combo.itemData(i)) for i in range(self.layer_combo.count())]

    def result_index(self, image: int) -> int | None:
        """The row of the result for image-set index ``image`` (None: not in the result)."""
        if self.result is None or image < 0:
            return None
        hits = np.flatnonzero(self.result.record_indices == image)
        return int(hits[0]) if len(hits) else None

    def query(self) -> int:
        """The image-set index of the image whose gallery is shown (-1: none)."""
        return self._query

    def shown_neighbours(self) -> list[int]:
        """Image-set indices of the gallery tiles, in display order."""
        return self.gallery.ids

    def shown_knn(self) -> list[int]:
        return self.knn.ids

    def gallery_of(self, image: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(image-set indices, Dist) of the covered images of ``image``, ranked, or None."""
        j = self.result_index(image)
        if j is None:
            return None
        idx, dist = self.result.gallery(j)
        return self.result.record_indices[idx], dist

    def show_selected(self) -> None:
        """Make the selected image the gallery's query."""
        self._clicked = -1
        self._query = self.ctx.selection.current_image
        self._render()

    def _raise_and_run(self) -> None:
        dock = self.parentWidget()
        if dock is not None:
            dock.show()
            dock.raise_()
        if self._layers_wanted:
            self._list_layers()
        self.show_selected()
        self._request(force=True)

    # ------------------------------------------------------------------ state changes

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self.when_on_screen(self._shown)

    def _shown(self) -> None:
        if not self.on_screen():
            return
        if self._layers_wanted:
            self._list_layers()
        else:
            self._request()
        self._render()  # thumbnails not decoded while hidden

    def _forget(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._handle_key = None
        self.result = None
        self._results.clear()
        self._error = ""
        self.progress.hide()

    def _model_loaded(self, _info: Any = None) -> None:
        self._forget()
        if self._layers_handle is not None:
            self._layers_handle.cancel()
            self._layers_handle = None
        self.layer_combo.clear()
        self._default_layer = ""
        self._split_error = ""
        self._layers_wanted = True
        if self.on_screen():
            self._list_layers()
        self._render()

    def _list_layers(self) -> None:
        """List the model's split points on the worker (then the gallery of the default layer)."""
        info = self.ctx.session.model
        self._layers_wanted = False
        if info is None or self._layers_handle is not None:
            return

        def job(backend: Any, _loaded: Any) -> Generator[Progress, None, tuple[list[str], str, str]]:
            from engine.polytope.head import default_layer
            from engine.types import ConvLensError

            yield Progress(None, "split points")
            if not getattr(backend, "supports_split", False):
                return [], "", NEED_TORCH.format(model=info.name, backend=backend.name)
            try:
                return list(backend.split_candidates()), default_layer(backend), ""
            except ConvLensError as e:
                return [], "", str(e)

        self._layers_handle = self.ctx.session.run("Polytope: split points", job, key="polytope-layers",
                                                   on_done=self._layers_known)
        if self._layers_handle is not None:
            self._layers_handle.failed.connect(self._layers_failed)
        self._render()

    def _layers_known(self, value: tuple[list[str], str, str]) -> None:
        cands, default, error = value
        self._layers_handle = None
        self._split_error = error
        self._default_layer = default
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for name in cands:
            self.layer_combo.addItem(f"{name} (default)" if name == default else name, name)
        want = self._pending_state.pop("layer", "")
        if not (want and self._select_layer(want)):
            self._select_layer(default)
        self.layer_combo.blockSignals(False)
        self.layers_ready.emit()
        self._request()
        self._render()

    def _layers_failed(self, error: BaseException) -> None:
        self._layers_handle = None
        self._split_error = f"Could not list the split points: {error}"
        self.layers_ready.emit()
        self._render()

    def _select_layer(self, name: str) -> bool:
        i = self.layer_combo.findData(name)
        if i >= 0:
            self.layer_combo.setCurrentIndex(i)
        return i >= 0

    def _images_changed(self, *_args: object) -> None:
        self._forget()
        self._query = self.ctx.selection.current_image
        self._views.clear()
        self._request()
        self._render()

    def _image_changed(self, image: int) -> None:
        if image == self._clicked and image >= 0:
            self.gallery.set_current(image)  # a neighbour clicked here: keep the query
            self.knn.set_current(image)
            self._render_caption()
            return
        self._clicked = -1
        self._query = image
        if self.ctx.selection.item(ITEM_KIND) is not None:
            self.ctx.selection.clear_item(ITEM_KIND)  # it named a neighbour of the previous query
        if self.result is None:
            self._request()  # after a failure or a cancellation: try again
        self._render()

    def _tile_clicked(self, image: int) -> None:
        self._clicked = image
        sel = self.ctx.selection
        sel.current_image = image
        sel.set_item(ITEM_KIND, image)
        self.gallery.set_current(image)
        self.knn.set_current(image)

    # ------------------------------------------------------------------ the job

    def _key(self) -> tuple[str, int | None, int]:
        return self.layer(), self.delta(), self.q_spin.value()

    def _request(self, force: bool = False) -> None:
        """Show the result of the current setting, computing it on the worker when needed."""
        session, images = self.ctx.session, self.ctx.selection.images
        layer = self.layer()
        if session.model is None or images is None or self._split_error or not layer:
            self._render()
            return
        key = self._key()
        found = self._results.get(key)
        if found is not None:
            self._results.move_to_end(key)
            if self._handle is not None:
                self._handle.cancel()
                self._handle = self._handle_key = None
                self.progress.hide()
            self.result = found
            self._error = ""
            self._render()
            return
        if (key == self._handle_key and self._handle is not None) or not (force or self.on_screen()):
            return
        from engine.polytope.run import PolytopeParams

        params = PolytopeParams(layer=key[0], delta=key[1], candidates=key[2])

        def job(backend: Any, loaded: Any) -> Generator[Progress, None, Any]:
            from engine.polytope.run import run

            return (yield from run(backend, loaded.cache_id, images, params))

        handle = session.run(f"Polytope gallery at {layer}", job, key="polytope", on_done=self._done)
        if handle is None:
            return
        self._handle, self._handle_key = handle, key
        handle.failed.connect(lambda e, h=handle: self._failed(h, e))
        handle.cancelled.connect(lambda h=handle: self._cancelled(h))
        handle.progress.connect(self._progress)
        self.progress.setValue(0)
        self.progress.show()
        self._error = ""
        self._render_status()

    def _done(self, result: Any) -> None:
        key = self._handle_key
        self._handle = self._handle_key = None
        self.progress.hide()
        if key is not None:
            self._results[key] = result
            while len(self._results) > MEMORY:
                self._results.popitem(last=False)
        if key != self._key():  # the setting moved on while a job ran: the newest wins
            self._request()
            return
        self.result = result
        self._render()
        self.result_ready.emit(result)

    def _failed(self, handle: JobHandle, error: BaseException) -> None:
        if handle is not self._handle:
            return
        from engine.types import ConvLensError

        self._handle = self._handle_key = None
        self.progress.hide()
        self.result = None
        self._error = str(error) if isinstance(error, ConvLensError) else f"{type(error).__name__}: {error}"
        self._render()

    def _cancelled(self, handle: JobHandle) -> None:
        if handle is not self._handle:  # superseded: the newer job reports
            return
        self._handle = self._handle_key = None
        self.progress.hide()
        self._error = "cancelled (change a setting or select an image to compute it again)"
        self._render()

    def _progress(self, p: Progress) -> None:
        show_progress(self.progress, p)

    # ------------------------------------------------------------------ images

    def _path(self, image: int) -> str:
        images = self.ctx.selection.images
        return str(images.records[image].path) if images is not None else ""  # type: ignore[attr-defined]

    def _name(self, image: int) -> str:
        images = self.ctx.selection.images
        if images is None or not 0 <= image < len(images.records):  # type: ignore[attr-defined]
            return str(image)
        return str(images.relative_path(images.records[image]))  # type: ignore[attr-defined]

    def _view_of(self, image: int, size: tuple[int, int], wait: bool = False) -> np.ndarray | None:
        """The image as the model sees it at ``size`` (decoded on the light worker unless ``wait``)."""
        model = self.ctx.session.model
        if model is None:
            return None
        key = (self._path(image), size)
        found = self._views.get(key)
        if found is not None:
            return found
        if not wait:
            return None
        found = decode_view(key[0], model.spec.preprocess, size)
        self._views[key] = found
        while len(self._views) > 2000:
            self._views.popitem(last=False)
        return found

    def _decode_later(self, images: list[int], size: tuple[int, int]) -> None:
        model = self.ctx.session.model
        keys = [(self._path(i), size) for i in images]
        keys = [k for k in keys if k not in self._decoding]
        if model is None or not keys or not self.on_screen():  # decoded when shown (_shown renders again)
            return
        self._decoding.update(keys)
        pre = model.spec.preprocess

        def job() -> Generator[Progress, None, dict[tuple[str, tuple[int, int]], np.ndarray]]:
            yield Progress(None, f"decoding {len(keys)} images")
            return {k: decode_view(k[0], pre, k[1]) for k in keys}

        handle = self.ctx.runner.submit("Polytope: thumbnails", job, kind="light")
        handle.finished.connect(self._decoded)

    def _decoded(self, views: dict[tuple[str, tuple[int, int]], np.ndarray]) -> None:
        self._views.update(views)
        self._decoding.difference_update(views)
        self._render_tiles()

    def _thumbs(self, images: list[int], size: tuple[int, int], intruders: list[bool]) -> np.ndarray:
        out = np.full((len(images), *size, 3), 128, dtype=np.uint8)
        missing = []
        for r, i in enumerate(images):
            v = self._view_of(i, size)
            if v is None:
                missing.append(i)
            else:
                out[r] = v
            if intruders[r]:
                out[r] = framed(out[r], 3)
        if missing:
            self._decode_later(missing, size)
        return out

    # ------------------------------------------------------------------ rendering

    def _render(self) -> None:
        self._render_status()
        self._render_numbers()
        self._render_tiles()
        self._render_caption()

    def _render_status(self) -> None:
        model = self.ctx.session.model
        res = self.result
        self.query_button.setVisible(self._query >= 0 and self._query != self.ctx.selection.current_image)
        if model is None or self.ctx.selection.images is None:
            text = NEED_MODEL
        elif self._split_error:
            text = self._split_error
        elif self._error:
            text = f"Could not compute the gallery: {self._error}"
        elif self._handle is not None:
            text = f"Computing the galleries of every image at {self._handle_key[0] if self._handle_key else ''}…"
        elif not self.layer():
            text = "Listing the split points…" if self._layers_handle is not None else \
                "The split points and galleries are computed when this view is shown."
        elif res is None:
            text = "The gallery is computed when this view is shown."
        else:
            text = ""
        self.status.setText(text)
        self.status.setVisible(bool(text))
        note = self.affine_note()
        self.note_label.setText(note)
        self.note_label.setVisible(bool(note))
        sug = self.suggested_layers()
        self.suggest_button.setText(f"Split at {sug[0]}" if sug else "")
        self.suggest_button.setVisible(bool(note and sug))

    def suggested_layers(self) -> list[str]:
        """Earlier split layers whose head has hidden units, when the head is affine: the
        engine's suggestions (the nearest earlier spatial layers, also for a split after the
        flatten such as RNet's ``prelu4``), else the default layer when it comes before the
        chosen one (a result cached before the engine suggested those)."""
        res = self.result
        if res is None or not res.head.get("affine"):
            return []
        sug = [str(x) for x in res.head.get("suggested_layers") or []]
        cands = self.split_candidates()
        if not sug and self._default_layer in cands and res.layer in cands and \
                cands.index(self._default_layer) < cands.index(res.layer):
            sug = [self._default_layer]
        return sug

    def _use_suggestion(self) -> None:
        sug = self.suggested_layers()
        if sug:
            self.set_params(layer=sug[0])

    def affine_note(self) -> str:
        """The affine-head message with the suggested earlier split layers ("" when not affine)."""
        res = self.result
        if res is None or not res.head.get("affine"):
            return ""
        sug = self.suggested_layers()
        return (f"Affine head: {res.head.get('note', '')}." + (f" Suggested earlier split layers: {', '.join(sug)}."
                                                               if sug else ""))

    def summary(self) -> dict[str, Any] | None:
        """The engine's summary of the query image (no neighbour list), or None."""
        j = self.result_index(self._query)
        return None if j is None else self.result.image_summary(j, top=0)

    def knn_comparison(self) -> dict[str, Any] | None:
        """kNN (Euclidean on psi) of the query at the gallery's size: its images and scores.

        The result keeps as many nearest images as its largest gallery holds (within the engine's
        memory bound, :data:`engine.polytope.run.KNN_MAX_ENTRIES`): ``capped`` says when k is
        cut there."""
        j = self.result_index(self._query)
        if j is None:
            return None
        res = self.result
        size = len(res.gallery(j)[0])
        k = min(size, res.knn.shape[1])
        near = res.knn[j][:k]
        same = res.pred[near] == res.pred[j]
        n_same_all = int((res.pred == res.pred[j]).sum()) - 1
        return {"indices": res.record_indices[near], "rows": near, "k": k, "size": size, "capped": k < size,
                "precision": float(same.mean()) if k else None,
                "coverage": int(same.sum()) / n_same_all if n_same_all > 0 else None,
                "different": int((~same).sum())}

    def _numbers_text(self) -> str:
        s = self.summary()
        if s is None:
            return ""
        res = self.result
        return (f"<b>{s['image']}</b> predicted <b>{s['predicted']}</b> · "
                f"<b>{s['n_boundaries']}</b> boundaries chosen of |Q| = {len(res.q_kind)} at {res.layer} · covered "
                f"<b>{s['covered']}</b>: {s['covered_same_class']} same class, "
                f"<span style='color:#d21e1e'>{s['covered_different_class']} different class</span> "
                f"(delta {s['delta']}, smallest feasible {s['smallest_feasible_delta']}) · coverage "
                f"<b>{_fmt(s['coverage'])}</b> · precision <b>{_fmt(s['precision'])}</b> · certificate "
                f"max|A psi + c − f(x)| = <b>{s['certificate_error']:.1e}</b>"
                f"{' (from cache)' if res.from_cache else ''}")

    def _knn_text(self) -> str:
        k = self.knn_comparison()
        if k is None:
            return "kNN (Euclidean on psi) at the gallery's size"
        m = self.result.metrics()
        g, ke, kc = m["gallery"], m["knn_euclidean"], m["knn_cosine"]
        cap = f" (capped: the engine keeps the {k['k']} nearest)" if k["capped"] else ""
        return (f"kNN (Euclidean on psi), k = {k['k']}{cap}: precision {_fmt(k['precision'])}, coverage "
                f"{_fmt(k['coverage'])}, {k['different']} different class · means over the {self.result.n} images "
                f"(precision / coverage): gallery {_fmt(g['precision'])} / {_fmt(g['coverage'])}, "
                f"kNN {_fmt(ke['precision'])} / {_fmt(ke['coverage'])}, cosine kNN "
                f"{_fmt(kc['precision'])} / {_fmt(kc['coverage'])}")

    def _render_numbers(self) -> None:
        self.numbers.setText(self._numbers_text())

    def _render_caption(self) -> None:
        q = self._query
        self.query_button.setVisible(q >= 0 and q != self.ctx.selection.current_image)
        if q < 0 or self.ctx.selection.images is None or self.ctx.session.model is None:
            self.query_label.clear()
            self.query_caption.setText("")
            return
        pre = self.ctx.session.model.spec.preprocess
        size = display_size(pre, QUERY_SIDE)
        v = self._view_of(q, size)
        if v is None:
            self._decode_later([q], size)
            self.query_label.setText("…")
        else:
            self.query_label.setPixmap(QPixmap.fromImage(to_qimage(v)))
        j = self.result_index(q)
        pred = f"\npredicted {self.result.class_name(int(self.result.pred[j]))}" if j is not None else ""
        self.query_caption.setText(f"query: {self._name(q)}{pred}")

    def _render_tiles(self) -> None:
        j = self.result_index(self._query)
        model = self.ctx.session.model
        if j is None or model is None:
            msg = "" if self.result is None else f"Image {self._query} is not in the gallery's image set."
            self.gallery.set_placeholder(msg or "No gallery yet.", QSize(260, 40))
            self.knn.set_placeholder("", QSize(260, 20))
            self.gallery_title.setText("Gallery: covered images, nearest (Dist) first")
            self.knn_title.setText("kNN (Euclidean on psi) at the gallery's size")
            self._render_caption()
            return
        res = self.result
        size = display_size(model.spec.preprocess, THUMB)
        idx, dist = res.gallery(j)
        shown, dist = idx[:MAX_SHOWN], dist[:MAX_SHOWN]
        images = [int(i) for i in res.record_indices[shown]]
        intruders = [bool(res.pred[i] != res.pred[j]) for i in shown]
        more = f", the first {len(shown)} shown" if len(idx) > len(shown) else ""
        self.gallery_title.setText(f"Gallery of {self._name(self._query)}: {len(idx)} covered images{more}, "
                                   f"nearest (Dist) first; <span style='color:#d21e1e'>✗ red frame</span>: "
                                   "predicted as another class (intruder)")
        if images:
            cols = max(1, (self.gallery_scroll.viewport().width() - self.gallery.gap) // (size[1] + self.gallery.gap))
            labels = [f"{'✗ ' if bad else ''}{res.class_name(int(res.pred[i]))[:8]} {d:.2g}"
                      for i, d, bad in zip(shown, dist, intruders, strict=True)]
            tips = [f"#{r + 1}: {self._name(im)}\npredicted {res.class_name(int(res.pred[i]))}"
                    f"{' (different class: intruder)' if bad else ''}\nDist {d:.4g}"
                    for r, (im, i, d, bad) in enumerate(zip(images, shown, dist, intruders, strict=True))]
            self.gallery.set_tiles(self._thumbs(images, size, intruders), images, cols, labels=labels, tips=tips)
        else:
            self.gallery.set_placeholder("No other image is covered.", QSize(260, 40))
        k = self.knn_comparison()
        assert k is not None
        rows = k["rows"][:MAX_SHOWN]
        kimages = [int(i) for i in res.record_indices[rows]]
        kbad = [bool(res.pred[i] != res.pred[j]) for i in rows]
        self.knn_title.setText(self._knn_text())
        if kimages:
            self.knn.set_tiles(self._thumbs(kimages, size, kbad), kimages, len(kimages),
                               labels=[f"{'✗ ' if b else ''}{res.class_name(int(res.pred[i]))[:10]}"
                                       for i, b in zip(rows, kbad, strict=True)],
                               tips=[f"kNN #{r + 1}: {self._name(im)}" for r, im in enumerate(kimages)])
        else:
            self.knn.set_placeholder("", QSize(260, 20))
        cur = self.ctx.selection.current_image
        self.gallery.set_current(cur)
        self.knn.set_current(cur)

    def resizeEvent(self, event: Any) -> None:
        super().resizeEvent(event)
        if self.result is not None and self.gallery.ids:
            cols = max(1, (self.gallery_scroll.viewport().width() - self.gallery.gap) //
                       (self.gallery._tile.width() + self.gallery.gap))
            if cols != self.gallery._cols:
                self._render_tiles()

    # ------------------------------------------------------------------ figure

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("gallery", "Polytope gallery: the query, its ranked covered images, the kNN strip")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("knn", "kNN baseline strip at the gallery's size", True),
                FigureOption("numbers", "Boundaries, coverage, precision, certificate", True),
                FigureOption("boundaries", "The chosen boundaries P(x)", False)]

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """The query image, its first covered images ranked by Dist (predicted class and Dist
        under each; intruders framed red and marked ✗), the kNN strip at the same size and the
        numbers, composed from the engine's result."""
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        model = self.ctx.session.model
        if self._split_error:
            raise ValueError(f"Polytope gallery: {self._split_error}")
        j = self.result_index(self._query)
        if self.result is None or j is None or model is None:
            raise ValueError("Polytope gallery: nothing to export yet: select an image and wait for its gallery")
        res = self.result
        s = res.image_summary(j, top=0)
        native = tuple(model.spec.preprocess.input_size)
        idx, dist = res.gallery(j)

        def tile(row: int, caption: str, bad: bool) -> Tile:
            arr = self._view_of(int(res.record_indices[row]), native, wait=True)  # type: ignore[arg-type]
            assert arr is not None
            if not bad:
                return Tile.of(arr, caption)
            def render(size: tuple[int, int], a: np.ndarray = arr) -> np.ndarray:
                return framed(resample(a, size))

            return Tile((arr.shape[0], arr.shape[1]), render, f"✗ {caption}")

        gal = [tile(int(i), f"{res.class_name(int(res.pred[i]))} d={d:.3g}", bool(res.pred[i] != res.pred[j]))
               for i, d in zip(idx[:FIGURE_SHOWN], dist[:FIGURE_SHOWN], strict=True)]
        q_arr = self._view_of(self._query, native, wait=True)  # type: ignore[arg-type]
        assert q_arr is not None
        query = Picture.of(q_arr, f"query: {s['image']}\npredicted {s['predicted']}", max_width=110)
        more = f" (the first {len(gal)} shown)" if len(idx) > len(gal) else ""
        right: list[Any] = [Text(f"Covered images ranked by Dist(x, x'): {len(idx)}{more}", bold=True)]
        right.append(TileGrid(gal, columns=8, gap=3.0) if gal else Text("No other image is covered."))
        k = self.knn_comparison()
        assert k is not None
        if include.get("knn", True):
            rows = k["rows"][:FIGURE_SHOWN]
            ktiles = [tile(int(i), res.class_name(int(res.pred[i])), bool(res.pred[i] != res.pred[j])) for i in rows]
            cap = f", capped at the {k['k']} nearest the engine keeps" if k["capped"] else ""
            right.append(Text(f"kNN baseline (Euclidean on psi), k = {k['k']}{cap}: precision "
                              f"{_fmt(k['precision'])}, {k['different']} different class", bold=True))
            if ktiles:
                right.append(TileGrid(ktiles, columns=8, gap=3.0))
        elements: list[Any] = [Row([query, Stack(right, gap=3)], weights=[1, 4], gap=10)]
        elements.append(Legend([("different-class intruder (predicted as another class), marked ✗",
                                 QColor(210, 30, 30))], outline=True))
        if include.get("numbers", True):
            m = res.metrics()
            lines = [f"|P(x)| = {s['n_boundaries']} boundaries chosen of |Q| = {len(res.q_kind)}; "
                     f"covered {s['covered']}: "
                     f"{s['covered_same_class']} same class, {s['covered_different_class']} different class "
                     f"(delta {s['delta']}, smallest feasible {s['smallest_feasible_delta']})",
                     f"coverage {_fmt(s['coverage'])}, precision {_fmt(s['precision'])}; kNN at k = {k['k']}"
                     f"{' (capped)' if k['capped'] else ''}: "
                     f"coverage {_fmt(k['coverage'])}, precision {_fmt(k['precision'])}",
                     f"certificate max|A psi(x) + c - f(x)| = {s['certificate_error']:.2e} "
                     f"(over the set {_fmt(m.get('certificate_max'), '.2e')})",
                     f"over all {res.n} images at equal size: gallery precision {_fmt(m['gallery']['precision'])}, "
                     f"coverage {_fmt(m['gallery']['coverage'])}; kNN Euclidean "
                     f"{_fmt(m['knn_euclidean']['precision'])}, "
                     f"{_fmt(m['knn_euclidean']['coverage'])}; kNN cosine {_fmt(m['knn_cosine']['precision'])}, "
                     f"{_fmt(m['knn_cosine']['coverage'])}"]
            note = self.affine_note()
            if note:
                lines.append(note)
            elements.append(Text("\n".join(lines)))
        if include.get("boundaries", False):
            descr = []
            for b in s["boundaries"]:
                if b["kind"] == "decision":
                    descr.append(f"decision {b['classes'][0]} vs {b['classes'][1]}")
                else:
                    descr.append(f"{b['module']} unit {b['unit']} at {b['threshold']:g}")
            elements.append(Text("P(x): " + "; ".join(descr) if descr else "P(x) is empty"))
        params = "smallest feasible delta" if res.params.delta is None else f"delta = {res.params.delta}"
        subtitle = (f"{os.path.basename(res.model)} split at {res.layer}; {res.n} images of "
                    f"{os.path.basename(res.image_source.rstrip(os.sep)) or res.image_source}; |Q| = "
                    f"{len(res.q_kind)}, {params}; Representative Interpretations (Lam, Chu et al., ICCV 2021)")
        return Figure(f"Polytope neighbour gallery of {s['image']} ({model.name}, {res.layer})", subtitle,
                      elements, options.width_pt, options.dpi)
