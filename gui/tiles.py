"""Imaging helpers and the tile mosaic shared by views: bilinear upsampling as the model's
own ``F.interpolate(align_corners=False)``, mask outlines, the image as the model sees it, and
``TileMosaic``, a grid of image tiles composed into one ``QImage`` and hit-tested."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache

import numpy as np
from PySide6.QtCore import QEvent, QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import QFont, QHelpEvent, QImage, QMouseEvent, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

from engine.types import Preprocess


@cache
def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 matrix of 1-D bilinear resampling, as torch's ``align_corners=False``.

    Output sample ``i`` reads the input at ``(i + 0.5) * n_in / n_out - 0.5`` (clamped at 0),
    between its two neighbours, so ``W @ x`` equals ``F.interpolate(..., mode="bilinear")``.
    """
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    w = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), 1.0 - frac)
    np.add.at(w, (rows, i1), frac)
    out = w.astype(np.float32)
    out.setflags(write=False)
    return out


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of the last two axes of ``maps`` to ``size = (H, W)`` (float32)."""
    h, w = maps.shape[-2:]
    return np.matmul(np.matmul(bilinear_weights(h, size[0]), maps.astype(np.float32, copy=False)),
                     _transposed_weights(w, size[1]))


@cache
def _transposed_weights(n_in: int, n_out: int) -> np.ndarray:
    # A C-contiguous transpose: multiplying by the ``.T`` view takes a slow BLAS path (~300x).
    out = np.ascontiguousarray(bilinear_weights(n_in, n_out).T)
    out.setflags(write=False)
    return out


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The pixels of a boolean mask that touch a pixel outside it (4-neighbourhood, border in)."""
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    inner[[0, -1]] = False
    inner[:, [0, -1]] = False
    return mask & ~inner


def model_view(img: np.ndarray, pre: Preprocess, size: tuple[int, int]) -> np.ndarray:
    """The part of ``img`` (H, W, 3 uint8) the model sees, resized to ``size = (h, w)``.

    Same geometry as :func:`engine.data.images.preprocess` (stretch, or cover-and-centre-crop),
    but in colour and at any display size, so activation maps line up with it.
    """
    from PIL import Image

    pil = Image.fromarray(img, "RGB")
    box: tuple[float, float, float, float] | None = None
    if pre.resize == "shorter_side_crop":
        th, tw = pre.input_size
        h, w = img.shape[:2]
        scale = max(th / pre.crop_fraction / h, tw / pre.crop_fraction / w)
        new_h, new_w = max(th, int(h * scale + 1e-6)), max(tw, int(w * scale + 1e-6))
        top, left = round((new_h - th) / 2.0), round((new_w - tw) / 2.0)
        sy, sx = new_h / h, new_w / w
        box = (left / sx, top / sy, (left + tw) / sx, (top + th) / sy)
    out = pil.resize((size[1], size[0]), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


def decode_view(path: str, pre: Preprocess, size: tuple[int, int]) -> np.ndarray:
    """:func:`model_view` of the image file ``path``; mid-grey when it cannot be read.

    JPEGs are decoded at a reduced scale (``draft``: DCT scaling, several times faster for
    photos much larger than ``size``), which only shows at sub-pixel level after resizing.
    """
    from PIL import Image, ImageOps

    from engine.data.images import load_image

    try:
        with Image.open(path) as img:
            if img.format == "JPEG":
                img.draft("RGB", (2 * size[1], 2 * size[0]))
                rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.uint8)
            else:
                rgb = load_image(path)
        return model_view(rgb, pre, size)
    except Exception:  # noqa: BLE001 - a file changed or removed since extraction: show grey
        return np.full((*size, 3), 128, dtype=np.uint8)


def display_size(pre: Preprocess, longer: int) -> tuple[int, int]:
    """(h, w) with the input's aspect ratio and ``longer`` pixels on the longer side."""
    ih, iw = pre.input_size
    s = longer / max(ih, iw)
    return max(1, round(ih * s)), max(1, round(iw * s))


def to_qimage(rgb: np.ndarray) -> QImage:
    """A deep-copied ``QImage`` of an (H, W, 3) or (H, W, 4) ``uint8`` array."""
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = arr.shape
    fmt = QImage.Format.Format_RGB888 if c == 3 else QImage.Format.Format_RGBA8888
    return QImage(arr.data, w, h, arr.strides[0], fmt).copy()


def compose_tiles(tiles: np.ndarray, cols: int, gap: int, label_height: int,
                  background: Sequence[int]) -> np.ndarray:
    """Lay ``tiles`` (n, th, tw, 3) out row by row, ``cols`` per row, in one RGB array.

    Every cell is ``th + label_height`` high (the label strip below the tile is left as
    background) and cells are ``gap`` pixels apart, with a ``gap`` margin all round. Tile ``i``
    has its top-left corner at :func:`tile_origin`.
    """
    n, th, tw, _ = tiles.shape
    rows = max(1, math.ceil(n / cols))
    cell_h, cell_w = th + label_height + gap, tw + gap
    width = cols * cell_w + gap
    canvas = np.empty((rows * cell_h + gap, width, 3), dtype=np.uint8)
    canvas[:] = np.tile(np.asarray(background, dtype=np.uint8), (width, 1))  # row-wise: ~50x faster
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = gap + r * cell_h, gap + c * cell_w
        canvas[y:y + th, x:x + tw] = tiles[i]
    return canvas


def tile_origin(i: int, cols: int, tile: QSize, gap: int, label_height: int) -> QPoint:
    """Top-left corner of tile ``i`` in an image made by :func:`compose_tiles`."""
    r, c = divmod(i, cols)
    return QPoint(gap + c * (tile.width() + gap), gap + r * (tile.height() + label_height + gap))


# --------------------------------------------------------------------------------------------
# widgets
# --------------------------------------------------------------------------------------------


class TileMosaic(QWidget):
    """One image made of equal tiles, each standing for an item id; click and hover aware.

    ``clicked(id)`` is emitted when a tile is clicked; hovering shows the tile's tooltip; the
    tile of :meth:`set_current` is framed. Labels (one short text per tile) are painted in the
    strip under each tile.
    """

    clicked = Signal(int)

    def __init__(self, parent: QWidget | None = None, *, gap: int = 4, label_height: int = 13) -> None:
        super().__init__(parent)
        self.gap, self.label_height = gap, label_height
        self._image = QImage()
        self._ids: list[int] = []
        self._tips: list[str] = []
        self._cols = 1
        self._tile = QSize(0, 0)
        self._current = -1
        self._placeholder = ""
        self.setMouseTracking(True)
        self.setSizePolicy(QSizePolicy.Policy.Fixed, QSizePolicy.Policy.Fixed)

    @property
    def ids(self) -> list[int]:
        """Item ids in display order."""
        return list(self._ids)

    @property
    def image(self) -> QImage:
        """The composed image (labels included)."""
        return self._image

    def set_tiles(self, tiles: np.ndarray, ids: Sequence[int], cols: int, *,
                  labels: Sequence[str] = (), tips: Sequence[str] = ()) -> None:
        """Show ``tiles`` (n, th, tw, 3 uint8) for ``ids``, ``cols`` per row."""
        self._ids, self._tips = list(ids), list(tips)
        self._cols = max(1, cols)
        self._tile = QSize(tiles.shape[2], tiles.shape[1])
        window = self.palette().color(self.backgroundRole())
        canvas = compose_tiles(tiles, self._cols, self.gap, self.label_height,
                               (window.red(), window.green(), window.blue()))
        self._image = to_qimage(canvas)
        if labels and self.label_height:
            self._draw_labels(labels)
        self._placeholder = ""
        self.setFixedSize(self._image.size())
        self.update()

    def set_placeholder(self, text: str, size: QSize | None = None) -> None:
        """Show ``text`` instead of tiles."""
        self._image, self._ids, self._tips, self._placeholder = QImage(), [], [], text
        self.setFixedSize(size or QSize(max(260, self.fontMetrics().horizontalAdvance(text) + 20), 60))
        self.update()

    def set_current(self, item_id: int) -> None:
        """Frame the tile of ``item_id`` (-1: none)."""
        if item_id != self._current:
            self._current = item_id
            self.update()

    def tile_rect(self, position: int) -> QRect:
        """The rectangle of the tile at display ``position``."""
        return QRect(tile_origin(position, self._cols, self._tile, self.gap, self.label_height), self._tile)

    def id_at(self, point: QPoint) -> int | None:
        """The item id of the tile under ``point``, or None."""
        if not self._ids or self._tile.isEmpty():
            return None
        cell_w = self._tile.width() + self.gap
        cell_h = self._tile.height() + self.label_height + self.gap
        x, y = point.x() - self.gap, point.y() - self.gap
        if x < 0 or y < 0:
            return None
        c, r = x // cell_w, y // cell_h
        if c >= self._cols or x % cell_w >= self._tile.width() or y % cell_h >= self._tile.height() + self.label_height:
            return None
        pos = r * self._cols + c
        return self._ids[pos] if pos < len(self._ids) else None

    def _draw_labels(self, labels: Sequence[str]) -> None:
        painter = QPainter(self._image)
        font = QFont(self.font())
        font.setPixelSize(max(8, self.label_height - 3))
        painter.setFont(font)
        painter.setPen(self.palette().color(self.foregroundRole()))
        align = Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignVCenter
        for pos, text in enumerate(labels):
            r = self.tile_rect(pos)
            painter.drawText(QRect(r.left() - self.gap // 2, r.bottom() + 1, r.width() + self.gap,
                                   self.label_height), align, text)
        painter.end()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        if self._placeholder:
            painter.setPen(self.palette().color(self.foregroundRole()))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self._placeholder)
            return
        painter.drawImage(0, 0, self._image)
        if self._current in self._ids:
            r = self.tile_rect(self._ids.index(self._current)).adjusted(-2, -2, 1, 1)
            painter.setPen(QPen(self.palette().color(self.palette().ColorRole.Highlight), 3))
            painter.drawRect(r)

    def mousePressEvent(self, event: QMouseEvent) -> None:
        item = self.id_at(event.position().toPoint())
        if item is not None and event.button() == Qt.MouseButton.LeftButton:
            self.clicked.emit(item)
        super().mousePressEvent(event)

    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            assert isinstance(event, QHelpEvent)
            item = self.id_at(event.pos())
            if item is not None and self._tips:
                QToolTip.showText(event.globalPos(), self._tips[self._ids.index(item)], self)
            else:
                QToolTip.hideText()
                event.ignore()
            return True
        return super().event(event)


