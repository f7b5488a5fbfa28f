"""Unit heatmaps: every unit of a layer on the current image, one unit overlaid, its top images.

For the selected image and layer the view shows

* a grid of all the layer's unit maps (one tile per unit), composed with numpy into one
  ``QImage`` (never one widget per unit) and hit-tested for clicks and tooltips; tiles are
  sorted by the unit's max on this image or by unit index, and scaled per unit by its max over
  the image set or by its max on this image;
* the selected unit's map, upsampled bilinearly to the displayed image and overlaid with a
  chosen colormap, opacity and threshold (a fraction of the unit's max over the image set;
  lower values are transparent), with a colour bar;
* a strip of the unit's top images over the whole set, each with the unit's mask
  (map >= threshold) outlined and the rest dimmed; clicking one makes it the current image.

Activations come from ``ctx.session.extract`` (cached on disk by the engine) and are kept in
memory per layer, so once a layer is extracted, switching unit or image only recolours numpy
arrays: well under the 50 ms budget (see ``bench/heatmap_switch.py``).

The image is shown as the model sees it: cropped as the preprocessing crops it and resized to
the input's aspect ratio, so map and image are aligned exactly as in the model.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Generator
from typing import Any

import numpy as np
from PySide6.QtCore import QEvent, QRect, Qt, Signal
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPen, QPixmap
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QScrollArea,
    QSizePolicy,
    QSlider,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from engine.models.layers import has_extent
from engine.types import Preprocess, Progress

from .. import colormaps
from ..context import AppContext
from ..figures import (
    ColorBar as FigureColorBar,
)
from ..figures import (
    Figure,
    FigureKind,
    FigureOption,
    FigureOptions,
    Picture,
    Row,
    Stack,
    Text,
    Tile,
    TileGrid,
    resample,
)
from ..jobs import JobHandle
from ..tiles import (
    TileMosaic,
    decode_view,
    display_size,
    mask_outline,
    to_qimage,
    upsample,
)
from ..widgets.eliding_combo import ElidingComboBox
from .base import View

__all__ = ["ColorBar", "HeatmapsView"]

OVERLAY_SIZE = 256
"""Longer side, in pixels, of the overlaid image."""
TILE_SIZES = (32, 112)
"""Smallest and largest side of a unit tile: the grid uses the largest that fits without
scrolling (the smallest when none does)."""
THUMB_SIZE = 88
"""Longer side of a top-image thumbnail."""
IMAGE_CACHE = 512
"""Decoded display images kept in memory (least recently used first out)."""
SORT_MODES = {"activation": "Max on this image", "unit": "Unit index"}
SCALE_MODES = {"dataset": "Per unit (image-set max)", "image": "Per unit (this image)"}
_OUTLINE = np.array([0, 255, 255], dtype=np.uint8)


class ColorBar(QWidget):
    """A horizontal colour bar from 0 to ``vmax`` with a threshold mark."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._cmap, self._vmax, self._threshold = colormaps.DEFAULT, 1.0, 0.0
        self.setMinimumHeight(self.fontMetrics().height() * 2 + 14)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)

    def set_values(self, cmap: str, vmax: float, threshold: float) -> None:
        """Show ``cmap`` over [0, vmax]; ``threshold`` is a fraction in [0, 1]."""
        self._cmap, self._vmax, self._threshold = cmap, vmax, threshold
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        fm = self.fontMetrics()
        bar = QRect(6, 2, self.width() - 12, self.height() - fm.height() - 8)
        gradient = to_qimage(colormaps.lut(self._cmap)[None, :, :])
        painter.drawImage(bar, gradient)
        painter.setPen(self.palette().color(self.foregroundRole()))
        painter.drawRect(bar.adjusted(0, 0, -1, -1))
        x = bar.left() + round(self._threshold * (bar.width() - 1))
        painter.setPen(QPen(QColor(255, 255, 255), 3))
        painter.drawLine(x, bar.top(), x, bar.bottom())
        painter.setPen(QPen(QColor(0, 0, 0), 1))
        painter.drawLine(x, bar.top(), x, bar.bottom())
        painter.setPen(self.palette().color(self.foregroundRole()))
        y = bar.bottom() + 4
        text_rect = QRect(bar.left(), y, bar.width(), fm.height())
        if self._vmax <= 0:  # no unit shown: a scale of zeros would mean nothing
            painter.drawText(text_rect, Qt.AlignmentFlag.AlignHCenter, "activation scale of the selected unit")
            return
        painter.drawText(text_rect, Qt.AlignmentFlag.AlignLeft, "0")
        painter.drawText(text_rect, Qt.AlignmentFlag.AlignRight, f"{self._vmax:.3g}")
        mark = f"threshold {self._threshold * self._vmax:.3g}"
        w = fm.horizontalAdvance(mark)
        left = min(max(bar.left() + fm.horizontalAdvance("0") + 8, x - w // 2),
                   bar.right() - fm.horizontalAdvance(f"{self._vmax:.3g}") - 8 - w)
        painter.drawText(QRect(left, y, w, fm.height()), Qt.AlignmentFlag.AlignLeft, mark)


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(d) for d in shape) if shape else "?"


def _slider(value: int, tip: str) -> QSlider:
    s = QSlider(Qt.Orientation.Horizontal)
    s.setRange(0, 100)
    s.setValue(value)
    s.setToolTip(tip)
    return s


# --------------------------------------------------------------------------------------------
# the view
# --------------------------------------------------------------------------------------------


class HeatmapsView(View):
    """Unit heatmaps of the selected layer on the selected image; see the module docstring."""

    title = "Heatmaps"
    object_name = "heatmaps"
    sanity_explanation = "heatmap"
    order = 20

    #: a layer's activations arrived (and were drawn if it is the selected layer)
    activations_ready = Signal(str)

    def __init__(self, ctx: AppContext, parent: QWidget | None = None) -> None:
        super().__init__(ctx, parent)
        self._acts: dict[str, Any] = {}  # layer -> engine Activations
        self._unit_max: dict[str, np.ndarray] = {}  # layer -> (C,) max over the image set
        self._maps: dict[str, np.ndarray] = {}  # layer -> (N, C, h, w) memory map, opened once
        self._handle: JobHandle | None = None  # extraction under way
        self._handle_layer = ""  # its layer
        self._images: OrderedDict[tuple[str, tuple[int, int]], np.ndarray] = OrderedDict()  # decoded views
        self._error = ""
        self._grid_layout = (0, 0)  # (tile side, columns) of the last render
        self._build()
        sel, session = ctx.selection, ctx.session
        session.model_loaded.connect(self._model_loaded)
        sel.model_changed.connect(self._reset)
        sel.images_changed.connect(self._reset)
        sel.layer_changed.connect(self._layer_changed)
        sel.current_image_changed.connect(self._image_changed)
        sel.unit_changed.connect(self._unit_changed)
        if session.model is not None:
            self._model_loaded(session.model)
        else:
            self._refresh()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        self.layer_combo = ElidingComboBox(18)
        self.layer_combo.setToolTip("Layer whose units are shown (spatial layers only), with its output shape")
        self.layer_combo.currentIndexChanged.connect(self._layer_index_chosen)
        self.sort_combo = QComboBox()
        for key, text in SORT_MODES.items():
            self.sort_combo.addItem(text, key)
        self.sort_combo.setToolTip("Order of the tiles")
        self.scale_combo = QComboBox()
        for key, text in SCALE_MODES.items():
            self.scale_combo.addItem(text, key)
        self.scale_combo.setToolTip("Each tile is divided by the unit's max over the image set, or on this image")
        for combo in (self.sort_combo, self.scale_combo):
            combo.currentIndexChanged.connect(lambda _i: self._render_grid())

        # two rows, so that the controls fit a narrow dock (1024x640 screens)
        controls = QVBoxLayout()
        top_row, bottom_row = QHBoxLayout(), QHBoxLayout()
        top_row.addWidget(QLabel("Layer"))
        top_row.addWidget(self.layer_combo, 1)
        for text, widget in (("Sort", self.sort_combo), ("Scale", self.scale_combo)):
            bottom_row.addWidget(QLabel(text))
            bottom_row.addWidget(widget)
            widget.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)  # never clip a choice
        bottom_row.addStretch(1)
        controls.addLayout(top_row)
        controls.addLayout(bottom_row)

        self.message = QLabel()
        self.message.setWordWrap(True)
        self.grid = TileMosaic()
        self.grid.clicked.connect(self._tile_clicked)
        self.grid_scroll = QScrollArea()
        self.grid_scroll.setWidget(self.grid)
        self.grid_scroll.setWidgetResizable(False)
        self.grid_scroll.setMinimumWidth(2 * TILE_SIZES[0] + 40)
        self.grid_scroll.viewport().installEventFilter(self)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addLayout(controls)
        left_layout.addWidget(self.message)
        left_layout.addWidget(self.grid_scroll, 1)

        self.unit_label = QLabel()
        self.unit_label.setWordWrap(True)
        font = self.unit_label.font()
        font.setBold(True)
        self.unit_label.setFont(font)
        self.overlay_label = QLabel()
        self.overlay_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.overlay_label.setMinimumSize(OVERLAY_SIZE, OVERLAY_SIZE)
        self.colorbar = ColorBar()
        self.cmap_combo = QComboBox()
        self.cmap_combo.addItems(list(colormaps.COLORMAPS))
        self.opacity_slider = _slider(60, "Opacity of the heatmap over the image")
        self.threshold_slider = _slider(
            20, "Values below this fraction of the unit's max over the image set are transparent")
        self.threshold_value = QLabel()
        self.threshold_value.setMinimumWidth(self.fontMetrics().horizontalAdvance("100%") + 4)
        self.cmap_combo.currentTextChanged.connect(lambda _t: self._style_changed(grid=True))
        self.opacity_slider.valueChanged.connect(lambda _v: self._style_changed())
        self.threshold_slider.valueChanged.connect(lambda _v: self._style_changed(masks=True))
        threshold_row = QHBoxLayout()
        threshold_row.addWidget(self.threshold_slider, 1)
        threshold_row.addWidget(self.threshold_value)
        form = QFormLayout()
        form.addRow("Colormap", self.cmap_combo)
        form.addRow("Opacity", self.opacity_slider)
        form.addRow("Threshold", threshold_row)
        right = QWidget()
        right_layout = QVBoxLayout(right)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.unit_label)
        right_layout.addWidget(self.overlay_label, 0, Qt.AlignmentFlag.AlignHCenter)
        right_layout.addWidget(self.colorbar)
        right_layout.addLayout(form)
        right_layout.addStretch(1)
        right.setMinimumWidth(OVERLAY_SIZE + 20)
        # the panel scrolls rather than running off a small window
        self.right_scroll = QScrollArea()
        self.right_scroll.setWidget(right)
        self.right_scroll.setWidgetResizable(True)
        self.right_scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        self.right_scroll.setMinimumWidth(120)

        self.main_splitter = QSplitter(Qt.Orientation.Horizontal)
        self.main_splitter.addWidget(left)
        self.main_splitter.addWidget(self.right_scroll)
        self.main_splitter.setStretchFactor(0, 1)
        self.main_splitter.setStretchFactor(1, 1)
        self.main_splitter.setChildrenCollapsible(False)

        self.strip_label = QLabel()
        self.strip = TileMosaic()
        self.strip.clicked.connect(self._top_clicked)
        self.strip_scroll = QScrollArea()
        self.strip_scroll.setWidget(self.strip)
        self.strip_scroll.setWidgetResizable(False)
        self.strip_scroll.setVerticalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.strip_scroll.setFixedHeight(THUMB_SIZE + self.strip.label_height + 2 * self.strip.gap
                                         + self.strip_scroll.horizontalScrollBar().sizeHint().height() + 6)

        layout = QVBoxLayout(self)
        layout.addWidget(self.main_splitter, 1)
        layout.addWidget(self.strip_label)
        layout.addWidget(self.strip_scroll)

    # ------------------------------------------------------------------ View API

    def save_state(self) -> dict[str, Any]:
        return {
            "colormap": self.colormap,
            "opacity": self.opacity_slider.value() / 100,
            "threshold": self.threshold,
            "sort": self.sort_combo.currentData(),
            "scale": self.scale_combo.currentData(),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        if state.get("colormap") in colormaps.COLORMAPS:
            self.cmap_combo.setCurrentText(state["colormap"])
        for key, slider in (("opacity", self.opacity_slider), ("threshold", self.threshold_slider)):
            if isinstance(state.get(key), (int, float)):
                slider.setValue(round(100 * min(1.0, max(0.0, float(state[key])))))
        for key, combo in (("sort", self.sort_combo), ("scale", self.scale_combo)):
            index = combo.findData(state.get(key))
            if index >= 0:
                combo.setCurrentIndex(index)

    # ------------------------------------------------------------------ figures

    def figure_kinds(self) -> list[FigureKind]:
        return [FigureKind("unit", "Unit: image, overlay, colour bar, top images"),
                FigureKind("layer", "Layer summary: every unit's map")]

    def figure_options(self) -> list[FigureOption]:
        return [FigureOption("image", "The image without overlay", True, ("unit",)),
                FigureOption("colorbar", "Colour bar with scale and threshold", True),
                FigureOption("top_images", "Top images of the unit with masks", True, ("unit",)),
                FigureOption("captions", "Tile captions", True)]

    def figure(self, options: FigureOptions | None = None) -> Figure:
        """The unit figure (default) or the layer summary of the current layer and image."""
        options = options or FigureOptions()
        kind = self.figure_kind(options)
        include = self.figure_includes(options, kind)
        sel = self.ctx.selection
        acts = self._ready(sel.current_image)
        if acts is None:
            raise ValueError(f"Heatmaps: nothing to export yet: {self._status() or 'select an image'}")
        if kind == "layer":
            return self._layer_figure(acts, options, include)
        if not 0 <= sel.unit < acts.layers[sel.layer].units:
            raise ValueError("Heatmaps: nothing to export yet: click a unit to choose one")
        return self._unit_figure(acts, options, include)

    def _native_size(self) -> tuple[int, int]:
        """(h, w) of the image as the model sees it: its input size."""
        model = self.ctx.session.model
        pre = model.spec.preprocess if model is not None else Preprocess()
        return display_size(pre, max(pre.input_size))

    def _about_image(self, acts: Any, image: int) -> str:
        """"label face · predicted face 97%" for ``image`` (what is known)."""
        record = acts.image_set.records[image]
        parts = [f"label {record.label}"] if record.label is not None else []
        preds = self.ctx.session.predictions
        if preds is not None:
            try:
                i = preds.paths.index(record.path)
            except ValueError:
                i = -1
            if i >= 0 and preds.valid[i]:
                parts.append(f"predicted {preds.classes[int(preds.predicted[i])]} {preds.confidence[i]:.0%}")
        return " · ".join(parts)

    def _model_name(self) -> str:
        model = self.ctx.session.model
        if model is None:
            return ""
        arch = getattr(model.spec, "arch", None)
        return f"{model.name} ({arch})" if arch and str(arch) not in model.name else model.name

    def _unit_figure(self, acts: Any, options: FigureOptions, include: dict[str, bool]) -> Figure:
        sel = self.ctx.selection
        layer, unit, image = sel.layer, sel.unit, sel.current_image
        native = self._native_size()
        base = self._view_of(image, native)
        assert base is not None
        vmax = self.unit_max(unit)
        threshold, opacity, cmap = self.threshold, self.opacity, self.colormap
        name = acts.image_set.relative_path(acts.image_set.records[image])
        here = float(acts.stats(layer).max[image, unit])

        def overlay(size: tuple[int, int]) -> np.ndarray:
            shown = resample(base, size).astype(np.float32)
            scaled = self._unit_map(image, unit, size)
            assert scaled is not None
            alpha = np.where(scaled >= threshold, opacity, 0.0).astype(np.float32)[..., None]
            heat = colormaps.apply(scaled, cmap).astype(np.float32)
            return np.rint(shown * (1 - alpha) + heat * alpha).astype(np.uint8)

        wide = options.inches >= 5
        panel_w = 170.0 if wide else None
        h, w = native
        caption_image = f"{name} as the model sees it ({w}×{h} px)" if include.get("captions", True) else ""
        caption_overlay = (f"{layer} unit {unit}: {cmap}, opacity {opacity:.0%}, values below "
                           f"{threshold:.0%} of the unit's max transparent") if include.get("captions", True) else ""
        overlay_panel: list[Any] = [Picture(native, overlay, caption_overlay, max_width=panel_w)]
        if include.get("colorbar", True):
            overlay_panel.append(FigureColorBar(
                colormaps.lut(cmap), vmax, f"activation of unit {unit} (0 to its max over the image set)",
                threshold=threshold * vmax, max_width=panel_w or 200.0))
        panels: list[Any] = []
        if include.get("image", True):
            panels.append(Picture.of(base, caption_image, max_width=panel_w))
        panels.append(Stack(overlay_panel, gap=4))
        elements: list[Any] = [Row(panels) if len(panels) > 1 else panels[0]]
        if include.get("top_images", True):
            st = acts.stats(layer)
            top = [int(i) for i in st.top_images[unit] if i >= 0]
            values = st.top_values[unit]
            records = acts.image_set.records
            tiles = []
            for i, v in zip(top, values, strict=False):
                tbase = self._view_of(i, native)
                assert tbase is not None

                def render(size: tuple[int, int], i: int = i, tbase: np.ndarray = tbase) -> np.ndarray:
                    return self._masked_thumb(resample(tbase, size), i, unit, size)

                cap = (f"{os.path.basename(records[i].path)}\nmax {v:.3g}"
                       if include.get("captions", True) else "")
                tiles.append(Tile(native, render, cap))
            elements.append(Text(f"Top {len(top)} images of {layer} unit {unit} over the {acts.n_images} images; "
                                 f"mask: map ≥ {threshold:.0%} of the unit's max {vmax:.3g} (outlined cyan, "
                                 "the rest dimmed)"))
            elements.append(TileGrid(tiles, columns=min(len(tiles), 10 if wide else 5) or None))
        about = self._about_image(acts, image)
        subtitle = " · ".join(x for x in (f"image {name}", about, f"max here {here:.3g}, over the set {vmax:.3g}",
                                           f"{acts.n_images} images") if x)
        return Figure(f"{self._model_name()}: {layer} unit {unit}", subtitle, elements, options.width_pt,
                      options.dpi)

    def _layer_figure(self, acts: Any, options: FigureOptions, include: dict[str, bool]) -> Figure:
        sel = self.ctx.selection
        layer, image = sel.layer, sel.current_image
        maps = np.asarray(self._maps[layer][image], dtype=np.float32)  # (C, h, w)
        maxima = np.asarray(acts.stats(layer).max[image], dtype=np.float32)
        n = maps.shape[0]
        by_activation = self.sort_combo.currentData() == "activation"
        order = (np.argsort(-np.nan_to_num(maxima, nan=-np.inf), kind="stable") if by_activation else np.arange(n))
        dataset = self.scale_combo.currentData() == "dataset"
        scale = self._unit_max[layer] if dataset else maxima
        with np.errstate(all="ignore"):
            inv = np.where(scale > 0, 1.0 / scale, 0.0).astype(np.float32)
        cmap = self.colormap
        cols = max(4, math.ceil(math.sqrt(n)))
        cell = (options.width_pt - 12) / cols
        captions = include.get("captions", True) and cell >= 12
        tiles = []
        for u in order.tolist():
            rgb = colormaps.apply(maps[u] * inv[u], cmap)
            tiles.append(Tile.of(rgb, str(u) if captions else ""))
        h, w = maps.shape[1:]
        name = acts.image_set.relative_path(acts.image_set.records[image])
        elements: list[Any] = [TileGrid(tiles, columns=cols, gap=max(1.0, min(4.0, cell * 0.08)),
                                        caption_size=6.0 if cell >= 24 else 5.0)]
        if include.get("colorbar", True):
            what = "its max over the image set" if dataset else "its max on this image"
            elements.append(FigureColorBar(colormaps.lut(cmap), 1.0, f"activation of each unit divided by {what}"))
        order_text = "sorted by their max on this image, highest first" if by_activation else "in unit order"
        subtitle = (f"image {name} · {n} units {order_text} · each map {w}×{h}, shown with its own cells "
                    f"(no smoothing)")
        about = self._about_image(acts, image)
        if about:
            subtitle += f" · {about}"
        return Figure(f"{self._model_name()}: {layer}, all {n} units", subtitle, elements, options.width_pt,
                      options.dpi)

    # ------------------------------------------------------------------ public state

    @property
    def colormap(self) -> str:
        return self.cmap_combo.currentText()

    @property
    def threshold(self) -> float:
        """Overlay / mask threshold as a fraction of the unit's max over the image set."""
        return self.threshold_slider.value() / 100

    @property
    def opacity(self) -> float:
        return self.opacity_slider.value() / 100

    def activations(self, layer: str | None = None) -> Any:
        """The engine ``Activations`` of ``layer`` (default: the selected one), or None."""
        return self._acts.get(layer if layer is not None else self.ctx.selection.layer)

    def unit_max(self, unit: int) -> float:
        """Max of ``unit`` of the selected layer over the image set (0 when unknown)."""
        values = self._unit_max.get(self.ctx.selection.layer)
        return float(values[unit]) if values is not None else 0.0

    def heatmap_rgba(self) -> np.ndarray | None:
        """The coloured heatmap layer of the selected unit on the current image, (H, W, 4) uint8.

        The unit's map is upsampled bilinearly to the overlay size, divided by the unit's max
        over the image set, clipped to [0, 1] and coloured; alpha is ``opacity * 255`` where
        that value is >= :attr:`threshold`, else 0. None when nothing is selected.
        """
        scaled = self._unit_map(self.ctx.selection.current_image, self.ctx.selection.unit, self._overlay_size())
        if scaled is None:
            return None
        rgba = np.empty((*scaled.shape, 4), dtype=np.uint8)
        rgba[..., :3] = colormaps.apply(scaled, self.colormap)
        rgba[..., 3] = np.where(scaled >= self.threshold, round(self.opacity * 255), 0)
        return rgba

    def overlay_rgb(self) -> np.ndarray | None:
        """The displayed overlay: the image with :meth:`heatmap_rgba` composited over it."""
        sel = self.ctx.selection
        base = self._view_of(sel.current_image, self._overlay_size())
        heat = self.heatmap_rgba()
        if base is None or heat is None:
            return base
        alpha = heat[..., 3:].astype(np.float32) / 255.0
        out = base.astype(np.float32) * (1.0 - alpha) + heat[..., :3].astype(np.float32) * alpha
        return np.rint(out).astype(np.uint8)

    # ------------------------------------------------------------------ state changes

    def _model_loaded(self, info: Any) -> None:
        self._reset()
        self.layer_combo.blockSignals(True)
        self.layer_combo.clear()
        for li in info.layers:
            if li.is_spatial:
                self.layer_combo.addItem(f"{li.name}  {_shape(li.shape)}", li.name)
                self.layer_combo.setItemData(self.layer_combo.count() - 1,
                                             f"{li.name}: {li.kind}, output {_shape(li.shape)}",
                                             Qt.ItemDataRole.ToolTipRole)
        self.layer_combo.blockSignals(False)
        sel = self.ctx.selection
        # the deepest of the model's layers of interest: the most semantic units come first; never
        # a 1x1 layer (no spatial extent: nothing to overlay), whatever the model's list says
        extent = [li.name for li in info.layers if has_extent(li)]
        default = next((name for name in reversed(info.default_layers) if name in extent),
                       extent[-1] if extent else "")
        if not sel.layer and default:
            sel.layer = default  # emits layer_changed -> _layer_changed
        else:
            self._layer_changed()

    def _reset(self, *_args: object) -> None:
        """Forget activations (a new model or image set); drop an extraction under way."""
        if self._handle is not None:
            self._handle.cancel()
        self._handle = None
        self._acts.clear()
        self._unit_max.clear()
        self._maps.clear()
        self._error = ""
        self._refresh()

    def _layer_index_chosen(self, index: int) -> None:
        name = self.layer_combo.itemData(index) if index >= 0 else None
        if name:
            self.ctx.selection.layer = name

    def _layer_changed(self, *_args: object) -> None:
        layer = self.ctx.selection.layer
        index = self.layer_combo.findData(layer)
        if index >= 0 and index != self.layer_combo.currentIndex():
            self.layer_combo.blockSignals(True)
            self.layer_combo.setCurrentIndex(index)
            self.layer_combo.blockSignals(False)
        self._error = ""
        self._request()
        self._refresh()

    @property
    def _pending(self) -> str | None:
        """The layer being extracted, if any."""
        return self._handle_layer if self._handle is not None else None

    def _request(self) -> None:
        """Ask the session for the selected layer's activations unless they are at hand.

        The handle's signals go to bound methods, so a deleted view is simply disconnected.
        """
        session, layer = self.ctx.session, self.ctx.selection.layer
        if (session.model is None or self.ctx.selection.images is None or not self._is_spatial(layer)
                or layer in self._acts or layer == self._pending):
            return
        handle = session.extract([layer], key="heatmaps", on_done=self._extracted,
                                 title=f"Heatmaps: extract {layer}")
        if handle is None:
            return
        self._handle, self._handle_layer = handle, layer
        handle.failed.connect(self._extract_failed)
        handle.cancelled.connect(self._extract_cancelled)
        handle.progress.connect(self._extract_progress)

    def _extracted(self, acts: Any) -> None:
        layer = next(iter(acts.layers))
        self._handle = None
        self._acts[layer] = acts
        self._maps[layer] = acts.maps(layer)
        # the extraction pass keeps each unit's top images, best first: column 0 is the unit's
        # max over the image set (no scan of the (N, C) table on the GUI thread)
        self._unit_max[layer] = np.nan_to_num(acts.stats(layer).top_values[:, 0].astype(np.float32), nan=0.0)
        if layer == self.ctx.selection.layer:
            self._refresh()
        else:
            self._request()  # the selection moved on meanwhile
        self.activations_ready.emit(layer)

    def _extract_failed(self, error: BaseException) -> None:
        if self._handle is not None and self._handle.state == "failed":
            self._error = f"Could not extract {self._handle_layer}: {error}"
            self._handle = None
            self._refresh()

    def _extract_cancelled(self) -> None:
        if self._handle is not None and self._handle.state == "cancelled":
            self._handle = None
            self._refresh()

    def _extract_progress(self, p: Any) -> None:
        if self._pending == self.ctx.selection.layer:
            pct = "" if p.fraction is None else f" {p.fraction:.0%}"
            self.message.setText(f"Computing activations of {self._pending}…{pct}")

    def _image_changed(self, *_args: object) -> None:
        self._show_status()
        self._render_grid()
        self._render_overlay()

    def _unit_changed(self, *_args: object) -> None:
        self.grid.set_current(self.ctx.selection.unit)
        self._render_overlay()
        self._render_strip()

    def _style_changed(self, *, grid: bool = False, masks: bool = False) -> None:
        """Redraw what a colormap (``grid``), opacity or threshold (``masks``) change affects."""
        self.threshold_value.setText(f"{self.threshold_slider.value()}%")
        if grid:
            self._render_grid()
        self._render_overlay()
        if masks:
            self._render_strip()

    def _tile_clicked(self, unit: int) -> None:
        self.ctx.selection.unit = unit

    def _top_clicked(self, image: int) -> None:
        self.ctx.selection.current_image = image

    def eventFilter(self, watched: Any, event: QEvent) -> bool:
        if watched is self.grid_scroll.viewport() and event.type() == QEvent.Type.Resize:
            acts = self._acts.get(self.ctx.selection.layer)
            if acts is not None and self._grid_fit(acts.layers[self.ctx.selection.layer].units) != self._grid_layout:
                self._render_grid()
        return super().eventFilter(watched, event)

    # ------------------------------------------------------------------ rendering

    def _refresh(self) -> None:
        """Re-render everything for the current state (message, grid, overlay, strip)."""
        self._pick_default_unit()
        self.threshold_value.setText(f"{self.threshold_slider.value()}%")
        self._show_status()
        self._render_grid()
        self._render_overlay()
        self._render_strip()

    def _pick_default_unit(self) -> bool:
        """With no unit chosen yet, choose the unit most active on the current image, so the
        overlay and the unit's top images show something at once. True if it set one."""
        sel = self.ctx.selection
        acts = self._acts.get(sel.layer)
        if sel.unit >= 0 or acts is None or not 0 <= sel.current_image < acts.n_images \
                or not acts.valid[sel.current_image]:
            return False
        sel.unit = int(np.nanargmax(np.asarray(acts.stats(sel.layer).max[sel.current_image])))
        return True

    def _show_status(self) -> None:
        text = self._status()
        self.message.setText(text)
        self.message.setVisible(bool(text))

    def _status(self) -> str:
        sel, session = self.ctx.selection, self.ctx.session
        layer = sel.layer
        if session.model is None:
            return "Load a model to see unit heatmaps."
        if sel.images is None:
            return "Open an image folder to see unit heatmaps."
        if not layer:
            return "Choose a layer."
        if not self._is_spatial(layer):
            return f"Layer {layer} has no spatial maps; choose a convolutional layer."
        if self._error:
            return self._error
        if layer not in self._acts:
            return f"Computing activations of {layer}…"
        if sel.current_image < 0:
            return "Select an image (or click one of the unit's top images below)."
        if not self._acts[layer].valid[sel.current_image]:
            return "The current image could not be read."
        return ""

    def _is_spatial(self, layer: str) -> bool:
        info = self.ctx.session.model.layer(layer) if self.ctx.session.model else None
        return info is not None and info.is_spatial

    def _ready(self, image: int) -> Any:
        """The layer's Activations when ``image`` is a valid index with maps, else None."""
        acts = self._acts.get(self.ctx.selection.layer)
        if acts is None or not 0 <= image < acts.n_images or not acts.valid[image]:
            return None
        return acts

    def _grid_fit(self, n: int) -> tuple[int, int]:
        """(tile side, columns) of the largest tiles that show ``n`` units without scrolling."""
        gap, label = self.grid.gap, self.grid.label_height
        viewport = self.grid_scroll.viewport()
        width, height = viewport.width() - gap, viewport.height() - gap
        side = TILE_SIZES[0]
        for candidate in range(TILE_SIZES[1], TILE_SIZES[0] - 1, -4):
            cols = max(1, width // (candidate + gap))
            if math.ceil(n / cols) * (candidate + label + gap) <= height:
                side = candidate
                break
        return side, max(1, width // (side + gap))

    def _render_grid(self) -> None:
        sel = self.ctx.selection
        layer, image = sel.layer, sel.current_image
        acts = self._ready(image)
        if acts is None:
            self.grid.set_placeholder("")
            return
        maps = np.asarray(self._maps[layer][image], dtype=np.float32)  # (C, h, w)
        maxima = np.asarray(acts.stats(layer).max[image], dtype=np.float32)  # (C,)
        n = maps.shape[0]
        order = (np.argsort(-np.nan_to_num(maxima, nan=-np.inf), kind="stable")
                 if self.sort_combo.currentData() == "activation" else np.arange(n))
        scale = self._unit_max[layer] if self.scale_combo.currentData() == "dataset" else maxima
        with np.errstate(all="ignore"):
            inv = np.where(scale > 0, 1.0 / scale, 0.0).astype(np.float32)
        side, cols = self._grid_fit(n)
        self._grid_layout = (side, cols)
        tiles = upsample(maps[order] * inv[order, None, None], (side, side))
        rgb = colormaps.apply(tiles, self.colormap)
        ids = order.tolist()
        self.grid.set_tiles(rgb, ids, cols, labels=[str(u) for u in ids],
                            tips=[f"unit {u}: max {maxima[u]:.4g}" for u in ids])
        self.grid.set_current(sel.unit)

    def _overlay_size(self) -> tuple[int, int]:
        model = self.ctx.session.model
        pre = model.spec.preprocess if model is not None else Preprocess()
        return display_size(pre, OVERLAY_SIZE)

    def _thumb_size(self) -> tuple[int, int]:
        model = self.ctx.session.model
        pre = model.spec.preprocess if model is not None else Preprocess()
        return display_size(pre, THUMB_SIZE)

    def _view_of(self, image: int, size: tuple[int, int], *, wait: bool = True) -> np.ndarray | None:
        """Image ``image`` as the model sees it, at ``size`` (decoded once, then cached).

        With ``wait=False`` an image not yet decoded gives None (see :meth:`_decode_later`).
        """
        acts = self._ready(image)
        model = self.ctx.session.model
        if acts is None or model is None:
            return None
        key = (acts.image_set.records[image].path, size)
        found = self._images.get(key)
        if found is not None:
            self._images.move_to_end(key)
            return found
        if not wait:
            return None
        found = decode_view(key[0], model.spec.preprocess, size)
        self._remember({key: found})
        return found

    def _remember(self, views: dict[tuple[str, tuple[int, int]], np.ndarray]) -> None:
        self._images.update(views)
        while len(self._images) > IMAGE_CACHE:
            self._images.popitem(last=False)

    def _decode_later(self, images: list[int], size: tuple[int, int]) -> None:
        """Decode ``images`` on the light worker; the strip is redrawn when they arrive."""
        acts, model = self._acts.get(self.ctx.selection.layer), self.ctx.session.model
        if acts is None or model is None:
            return
        paths = [acts.image_set.records[i].path for i in images]
        pre = model.spec.preprocess

        def job() -> Generator[Progress, None, dict[tuple[str, tuple[int, int]], np.ndarray]]:
            yield Progress(None, f"decoding {len(paths)} images")
            return {(p, size): decode_view(p, pre, size) for p in paths}

        handle = self.ctx.runner.submit("Heatmaps: top images", job, kind="light", key="heatmaps-thumbs")
        handle.finished.connect(self._decoded)

    def _decoded(self, views: dict[tuple[str, tuple[int, int]], np.ndarray]) -> None:
        self._remember(views)
        self._render_strip()

    def _unit_map(self, image: int, unit: int, size: tuple[int, int]) -> np.ndarray | None:
        """``unit``'s map on ``image``, upsampled to ``size``, over the unit's image-set max."""
        acts = self._ready(image)
        layer = self.ctx.selection.layer
        if acts is None or not 0 <= unit < acts.layers[layer].units:
            return None
        vmax = float(self._unit_max[layer][unit])
        m = np.asarray(self._maps[layer][image, unit], dtype=np.float32)
        up = upsample(m, size)
        return np.clip(up / vmax, 0.0, 1.0) if vmax > 0 else np.zeros_like(up)

    def _render_overlay(self) -> None:
        sel = self.ctx.selection
        layer, unit, image = sel.layer, sel.unit, sel.current_image
        vmax = self.unit_max(unit) if unit >= 0 else 0.0
        self.colorbar.set_values(self.colormap, vmax, self.threshold)
        acts = self._ready(image)
        if acts is None:
            self.overlay_label.setPixmap(QPixmap())
            self.overlay_label.setText("")
            self.unit_label.setText("")
            return
        rgb = self.overlay_rgb()
        assert rgb is not None
        self.overlay_label.setPixmap(QPixmap.fromImage(to_qimage(rgb)))
        name = acts.image_set.relative_path(acts.image_set.records[image])
        if unit < 0:
            self.unit_label.setText(f"{name}\nClick a tile to overlay that unit.")
        else:
            here = float(acts.stats(layer).max[image, unit])
            self.unit_label.setText(f"{layer} unit {unit} on {name}\nmax here {here:.3g}, over the set {vmax:.3g}")

    def _render_strip(self) -> None:
        sel = self.ctx.selection
        layer, unit = sel.layer, sel.unit
        acts = self._acts.get(layer)
        if acts is None or unit < 0 or unit >= acts.layers[layer].units:
            self.strip_label.setText("Top images of the selected unit")
            self.strip.set_placeholder("Click a unit to see the images that activate it most.")
            return
        st = acts.stats(layer)
        top = [int(i) for i in st.top_images[unit] if i >= 0]
        size = self._thumb_size()
        thumbs = np.empty((len(top), *size, 3), dtype=np.uint8)
        missing = []
        for j, i in enumerate(top):
            base = self._view_of(i, size, wait=False)
            if base is None:
                missing.append(i)
                thumbs[j] = 128
            else:
                thumbs[j] = self._masked_thumb(base, i, unit, size)
        if missing:
            self._decode_later(missing, size)
        values = st.top_values[unit]
        records = acts.image_set.records
        self.strip_label.setText(f"Top {len(top)} images of {layer} unit {unit} "
                                 f"(mask: map ≥ {self.threshold:.0%} of the unit's max {self.unit_max(unit):.3g})")
        self.strip.set_tiles(thumbs, top, len(top), labels=[f"{v:#.3g}" for v in values[:len(top)]],
                             tips=[f"image {i}: {acts.image_set.relative_path(records[i])}\nmax {v:.4g}"
                                   for i, v in zip(top, values, strict=False)])

    def unit_mask(self, image: int, unit: int, size: tuple[int, int]) -> np.ndarray | None:
        """``unit``'s mask on ``image`` at ``size``: its map upsampled to ``size`` and ``>=`` the
        threshold (a fraction of the unit's image-set max), by the engine's one mask code path
        (:func:`engine.dissection.masks.unit_masks`, as Network Dissection's masks); None when
        the layer is not extracted yet."""
        acts = self._ready(image)
        layer = self.ctx.selection.layer
        if acts is None or not 0 <= unit < acts.layers[layer].units:
            return None
        vmax = float(self._unit_max[layer][unit])
        if vmax <= 0:
            return np.zeros(size, dtype=bool)
        import torch

        from engine.dissection.masks import unit_masks

        m = torch.from_numpy(np.ascontiguousarray(self._maps[layer][image, unit], dtype=np.float32))[None]
        return unit_masks(m, np.array([self.threshold * vmax]), size, strict=False)[0].numpy()

    def _masked_thumb(self, base: np.ndarray, image: int, unit: int, size: tuple[int, int]) -> np.ndarray:
        """``base``, the thumbnail of ``image``, with ``unit``'s mask outlined and the rest dimmed."""
        mask = self.unit_mask(image, unit, size)
        if mask is None:
            return np.zeros((*size, 3), dtype=np.uint8)
        out = np.where(mask[..., None], base, (base * 0.35).astype(np.uint8))
        out[mask_outline(mask)] = _OUTLINE
        return out

