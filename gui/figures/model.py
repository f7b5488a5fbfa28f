"""A small page-layout model for figures, built from data and painted with one QPainter routine.

A :class:`Figure` is a title, a subtitle and a vertical stack of elements, laid out for a page
width in points (1/72 inch): text blocks, image panels (:class:`Picture`), grids of image
tiles with captions (:class:`TileGrid`), colour bars with their scale and threshold
(:class:`ColorBar`), bar charts with labelled axes and a legend (:class:`BarChart`,
:class:`HBarChart`), colour legends and rows of any of these (:class:`Row`, :class:`Stack`).
Fonts are sized in points. :meth:`Figure.paint` draws the whole page with one ``QPainter``
whose device has 72 logical dots per inch, so the same code makes the PNG (scaled to the
chosen DPI), the SVG and the PDF (see :mod:`gui.figures.render`). No widget is involved.

Images are shown at their native pixels: a panel enlarges its image by the largest whole
factor that fits at the figure's raster DPI, nearest-neighbour (so a 24 px crop stays 24
crisp blocks, never a blur), and only shrinks it (smoothly) when it does not fit at 1x.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF, QImage, QPainter, QPen

__all__ = [
    "SIZE_PRESETS",
    "BarChart",
    "ColorBar",
    "Element",
    "Figure",
    "FigureKind",
    "FigureOption",
    "FigureOptions",
    "HBarChart",
    "Legend",
    "Picture",
    "Row",
    "Stack",
    "Text",
    "Tile",
    "TileGrid",
    "pixel_size",
    "resample",
]

SIZE_PRESETS: dict[str, tuple[str, float]] = {
    "column": ("Single column (3.5 in)", 3.5),
    "full": ("Full width (7 in)", 7.0),
}
"""Page widths offered in the export dialog and the CLI: key -> (label, inches)."""

FONT_FAMILIES = ["Helvetica", "Arial", "Liberation Sans", "DejaVu Sans"]
TITLE_PT, SUBTITLE_PT, BODY_PT, CAPTION_PT = 9.0, 7.0, 7.0, 6.0
MARGIN_PT = 6.0
GAP_PT = 6.0
INK = QColor(20, 20, 20)
MUTED = QColor(90, 90, 90)
_MAX_RASTER_SIDE = 4096


# --------------------------------------------------------------------------------------------
# options a view's figure takes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FigureOption:
    """One view-specific include-toggle: ``key`` in :attr:`FigureOptions.include`."""

    key: str
    label: str
    default: bool = True
    kinds: tuple[str, ...] = ()  # the figure kinds it applies to (empty: all)


@dataclass(frozen=True)
class FigureKind:
    """One of the figures a view can compose (e.g. a unit, or a layer summary)."""

    key: str
    label: str


@dataclass
class FigureOptions:
    """What to compose: the figure kind, the page width, the raster DPI and what to include.

    ``size`` is a :data:`SIZE_PRESETS` key; ``width_in`` overrides it. ``include`` maps the
    keys of a view's :class:`FigureOption` toggles to on/off (missing keys: the default).
    """

    kind: str = ""
    size: str = "full"
    width_in: float | None = None
    dpi: int = 300
    include: dict[str, bool] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.width_in is None and self.size not in SIZE_PRESETS:
            raise ValueError(f"unknown figure size {self.size!r}; use one of {', '.join(SIZE_PRESETS)}")
        if self.width_in is not None and not 1.0 <= self.width_in <= 40.0:
            raise ValueError(f"figure width must be from 1 to 40 inches, got {self.width_in}")
        if isinstance(self.dpi, bool) or not isinstance(self.dpi, int) or not 1 <= self.dpi <= 2400:
            raise ValueError(f"dpi must be a whole number from 1 to 2400, got {self.dpi!r}")

    @property
    def inches(self) -> float:
        return self.width_in if self.width_in is not None else SIZE_PRESETS[self.size][1]

    @property
    def width_pt(self) -> float:
        return self.inches * 72.0

    def wants(self, key: str, default: bool = True) -> bool:
        return bool(self.include.get(key, default))


# --------------------------------------------------------------------------------------------
# fonts and pixels
# --------------------------------------------------------------------------------------------


def font(size_pt: float, bold: bool = False) -> QFont:
    f = QFont()
    f.setFamilies(FONT_FAMILIES)
    f.setStyleHint(QFont.StyleHint.SansSerif)
    f.setPointSizeF(size_pt)
    f.setBold(bold)
    f.setKerning(True)
    return f


@cache
def _reference() -> QImage:
    """A 72-dpi device for text metrics: every figure device paints at 72 logical dpi."""
    image = QImage(4, 4, QImage.Format.Format_ARGB32_Premultiplied)
    dpm = round(72 / 0.0254)
    image.setDotsPerMeterX(dpm)
    image.setDotsPerMeterY(dpm)
    return image


def metrics(f: QFont) -> QFontMetricsF:
    return QFontMetricsF(f, _reference())


def text_height(text: str, f: QFont, width: float) -> float:
    if not text:
        return 0.0
    r = metrics(f).boundingRect(QRectF(0, 0, width, 1e6), int(Qt.TextFlag.TextWordWrap), text)
    return math.ceil(r.height() * 10) / 10


def pixel_size(native: tuple[int, int], width_pt: float, dpi: int,
               max_height_pt: float | None = None) -> tuple[int, int]:
    """(h, w) in device pixels of an image of ``native`` (h, w) shown ``width_pt`` wide at most.

    The largest whole enlargement that fits (nearest-neighbour), else a smooth reduction to
    the width (or height) available.
    """
    h, w = max(1, native[0]), max(1, native[1])
    avail_w = width_pt * dpi / 72.0
    avail_h = max_height_pt * dpi / 72.0 if max_height_pt else math.inf
    n = min(avail_w / w, avail_h / h)
    if n >= 1.0:
        k = max(1, min(int(n + 1e-9), _MAX_RASTER_SIDE // max(h, w) or 1))
        return h * k, w * k
    return max(1, math.floor(h * n)), max(1, math.floor(w * n))


def resample(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``rgb`` (H, W, C) at ``size``: nearest-neighbour for a whole enlargement, else smooth."""
    h, w = rgb.shape[:2]
    th, tw = size
    if (th, tw) == (h, w):
        return np.ascontiguousarray(rgb)
    if th % h == 0 and tw % w == 0 and th // h == tw // w:
        k = th // h
        return np.ascontiguousarray(np.repeat(np.repeat(rgb, k, axis=0), k, axis=1))
    from PIL import Image

    mode = "RGBA" if rgb.shape[2] == 4 else "RGB"
    resampling = Image.Resampling.LANCZOS if th < h else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb), mode).resize((tw, th), resampling))


def _qimage(rgb: np.ndarray) -> QImage:
    arr = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, c = arr.shape
    fmt = QImage.Format.Format_RGB888 if c == 3 else QImage.Format.Format_RGBA8888
    return QImage(arr.data, w, h, arr.strides[0], fmt).copy()


def _snap(painter: QPainter, point: QPointF) -> QPointF:
    """``point`` moved onto a whole device pixel (so images land pixel for pixel)."""
    t = painter.worldTransform()
    d = t.map(point)
    inverse, ok = t.inverted()
    return inverse.map(QPointF(round(d.x()), round(d.y()))) if ok else point


def _draw_text(painter: QPainter, rect: QRectF, text: str, f: QFont, *, color: QColor = INK,
               align: Qt.AlignmentFlag = Qt.AlignmentFlag.AlignLeft, wrap: bool = True) -> None:
    painter.setFont(f)
    painter.setPen(color)
    flags = int(align) | int(Qt.AlignmentFlag.AlignTop)
    if wrap:
        flags |= int(Qt.TextFlag.TextWordWrap)
    painter.drawText(rect, flags, text)


# --------------------------------------------------------------------------------------------
# elements
# --------------------------------------------------------------------------------------------


class Element:
    """Something laid out in a given width: :meth:`height` then :meth:`paint` into a rectangle."""

    def height(self, width: float, dpi: int) -> float:
        raise NotImplementedError

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        raise NotImplementedError


@dataclass
class Text(Element):
    """A wrapped paragraph (lines split at ``\\n``)."""

    text: str
    size: float = BODY_PT
    bold: bool = False
    color: QColor = field(default_factory=lambda: QColor(INK))
    align: str = "left"

    def _font(self) -> QFont:
        return font(self.size, self.bold)

    def height(self, width: float, dpi: int) -> float:
        return text_height(self.text, self._font(), width)

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        align = {"left": Qt.AlignmentFlag.AlignLeft, "center": Qt.AlignmentFlag.AlignHCenter,
                 "right": Qt.AlignmentFlag.AlignRight}[self.align]
        _draw_text(painter, rect, self.text, self._font(), color=self.color, align=align)


@dataclass
class Picture(Element):
    """An image panel at native resolution with an optional caption below.

    ``render((h, w))`` gives the RGB pixels at a device size chosen by :func:`pixel_size`
    (so an overlay can be computed at the shown size while the image keeps whole pixels);
    :meth:`of` wraps a plain array. ``max_width`` / ``max_height`` bound the panel in points.
    """

    native: tuple[int, int]
    render: Callable[[tuple[int, int]], np.ndarray]
    caption: str = ""
    max_width: float | None = None
    max_height: float | None = None
    frame: bool = True

    @classmethod
    def of(cls, rgb: np.ndarray, caption: str = "", **kw: object) -> Picture:
        arr = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        return cls((arr.shape[0], arr.shape[1]), lambda size: resample(arr, size), caption, **kw)  # type: ignore[arg-type]

    def _box(self, width: float, dpi: int) -> tuple[tuple[int, int], float, float]:
        w = min(width, self.max_width) if self.max_width else width
        px = pixel_size(self.native, w, dpi, self.max_height)
        return px, px[1] * 72.0 / dpi, px[0] * 72.0 / dpi

    def height(self, width: float, dpi: int) -> float:
        _px, _w, h = self._box(width, dpi)
        cap = text_height(self.caption, font(CAPTION_PT), width) + 2 if self.caption else 0
        return h + cap

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        px, w, h = self._box(rect.width(), dpi)
        left = rect.left() + (rect.width() - w) / 2
        origin = _snap(painter, QPointF(left, rect.top()))
        target = QRectF(origin.x(), origin.y(), w, h)
        pixels = np.ascontiguousarray(self.render(px), dtype=np.uint8)
        image = _qimage(pixels)
        shrunk = px[0] < self.native[0]
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, shrunk)
        painter.drawImage(target, image, QRectF(0, 0, image.width(), image.height()))
        if self.frame:
            painter.setPen(QPen(QColor(160, 160, 160), 0.4))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(target)
        if self.caption:
            cap = QRectF(rect.left(), rect.top() + h + 2, rect.width(), 1e4)
            _draw_text(painter, cap, self.caption, font(CAPTION_PT), color=MUTED, align=Qt.AlignmentFlag.AlignHCenter)


@dataclass
class Tile:
    """One cell of a :class:`TileGrid`: an image (or ``render`` at a size) and a caption."""

    native: tuple[int, int]
    render: Callable[[tuple[int, int]], np.ndarray]
    caption: str = ""

    @classmethod
    def of(cls, rgb: np.ndarray, caption: str = "") -> Tile:
        arr = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
        return cls((arr.shape[0], arr.shape[1]), lambda size: resample(arr, size), caption)


@dataclass
class TileGrid(Element):
    """Equal tiles in rows, ``columns`` per row (or as many ``tile_width`` tiles as fit)."""

    tiles: Sequence[Tile]
    columns: int | None = None
    tile_width: float = 54.0
    gap: float = 4.0
    caption_size: float = CAPTION_PT

    def _cols(self, width: float) -> int:
        if self.columns:
            return max(1, min(self.columns, len(self.tiles) or 1))
        return max(1, int((width + self.gap) // (self.tile_width + self.gap)))

    def _cell(self, width: float) -> tuple[int, float, float]:
        cols = self._cols(width)
        cell_w = (width - (cols - 1) * self.gap) / cols
        native = self.tiles[0].native if self.tiles else (1, 1)
        cell_h = cell_w * native[0] / max(1, native[1])
        return cols, cell_w, cell_h

    def _caption_h(self, cell_w: float) -> float:
        f = font(self.caption_size)
        return max((text_height(t.caption, f, cell_w) for t in self.tiles), default=0.0)

    def height(self, width: float, dpi: int) -> float:
        if not self.tiles:
            return 0.0
        cols, cell_w, cell_h = self._cell(width)
        rows = math.ceil(len(self.tiles) / cols)
        cap = self._caption_h(cell_w)
        return rows * (cell_h + cap + (1 if cap else 0)) + (rows - 1) * self.gap

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        if not self.tiles:
            return
        cols, cell_w, cell_h = self._cell(rect.width())
        cap_h = self._caption_h(cell_w)
        f = font(self.caption_size)
        for i, tile in enumerate(self.tiles):
            r, c = divmod(i, cols)
            x = rect.left() + c * (cell_w + self.gap)
            y = rect.top() + r * (cell_h + cap_h + (1 if cap_h else 0) + self.gap)
            px = pixel_size(tile.native, cell_w, dpi, cell_h)
            w, h = px[1] * 72.0 / dpi, px[0] * 72.0 / dpi
            origin = _snap(painter, QPointF(x + (cell_w - w) / 2, y + (cell_h - h) / 2))
            target = QRectF(origin.x(), origin.y(), w, h)
            image = _qimage(tile.render(px))
            painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, px[0] < tile.native[0])
            painter.drawImage(target, image, QRectF(0, 0, image.width(), image.height()))
            painter.setPen(QPen(QColor(170, 170, 170), 0.3))
            painter.setBrush(Qt.BrushStyle.NoBrush)
            painter.drawRect(target)
            if tile.caption:
                _draw_text(painter, QRectF(x - self.gap / 2, y + cell_h + 1, cell_w + self.gap, cap_h + 2),
                           tile.caption, f, color=INK, align=Qt.AlignmentFlag.AlignHCenter)


def nice_ticks(vmax: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at most ``vmax`` (``count`` or so of them)."""
    if not math.isfinite(vmax) or vmax <= 0:
        return [0.0]
    raw = vmax / max(1, count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    n = int(vmax / step + 1e-9)
    return [round(i * step, 10) for i in range(n + 1)]


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v != int(v) or abs(v) >= 1e4 else str(int(v))


@dataclass
class ColorBar(Element):
    """A horizontal colour bar from ``vmin`` to ``vmax`` with ticks, a label and the threshold."""

    lut: np.ndarray  # (256, 3) uint8
    vmax: float
    label: str = ""
    vmin: float = 0.0
    threshold: float | None = None  # in data units
    max_width: float = 200.0
    bar_height: float = 7.0

    def height(self, width: float, dpi: int) -> float:
        tick = metrics(font(CAPTION_PT)).height()
        lab = text_height(self.label, font(CAPTION_PT), min(width, self.max_width)) if self.label else 0
        return self.bar_height + 3 + tick + (2 + lab if lab else 0) + (tick + 3 if self.threshold is not None else 0)

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        f = font(CAPTION_PT)
        fm = metrics(f)
        w = min(rect.width(), self.max_width)
        half_label = fm.horizontalAdvance(_fmt(self.vmax)) / 2
        x0 = rect.left() + (rect.width() - w) / 2 + half_label
        w -= 2 * half_label
        top = rect.top()
        if self.threshold is not None:
            top += fm.height() + 3
        bar = QRectF(x0, top, w, self.bar_height)
        # vector bar: one rectangle per colour step, no raster in SVG/PDF
        steps = 64
        painter.setPen(Qt.PenStyle.NoPen)
        for i in range(steps):
            c = self.lut[round(i * 255 / (steps - 1))]
            painter.setBrush(QColor(int(c[0]), int(c[1]), int(c[2])))
            painter.drawRect(QRectF(x0 + i * w / steps, top, w / steps + 0.3 if i < steps - 1 else w / steps,
                                    self.bar_height))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.setPen(QPen(INK, 0.5))
        painter.drawRect(bar)
        span = self.vmax - self.vmin
        def xof(v: float) -> float:
            return x0 + (v - self.vmin) / span * w if span > 0 else x0
        ticks = [self.vmin + t for t in nice_ticks(span)]
        step = ticks[1] - ticks[0] if len(ticks) > 1 else span
        if span > 0 and self.vmax - ticks[-1] > 0.4 * step:
            ticks.append(self.vmax)  # the scale's end is labelled
        elif span > 0:
            ticks[-1] = self.vmax
        y = bar.bottom()
        labels: list[tuple[float, str]] = []
        for t in ticks:
            x = xof(t)
            painter.drawLine(QPointF(x, y), QPointF(x, y + 2.5))
            labels.append((x, _fmt(t)))
        # drop labels that would overlap the next one (keep the ends)
        kept: list[tuple[float, str]] = []
        for i, (x, s) in enumerate(labels):
            half = fm.horizontalAdvance(s) / 2
            if kept and x - half < kept[-1][0] + fm.horizontalAdvance(kept[-1][1]) / 2 + 3:
                if i == len(labels) - 1:
                    kept[-1] = (x, s)
                continue
            kept.append((x, s))
        for x, s in kept:
            tw = fm.horizontalAdvance(s)
            _draw_text(painter, QRectF(x - tw / 2 - 2, y + 3, tw + 4, fm.height() + 1), s, f,
                       align=Qt.AlignmentFlag.AlignHCenter, wrap=False)
        if self.threshold is not None and span > 0:
            x = xof(min(max(self.threshold, self.vmin), self.vmax))
            painter.setPen(QPen(QColor(255, 255, 255), 1.6))
            painter.drawLine(QPointF(x, top - 1), QPointF(x, bar.bottom() + 1))
            painter.setPen(QPen(INK, 0.7))
            painter.drawLine(QPointF(x, top - 1.5), QPointF(x, bar.bottom() + 1))
            painter.drawLine(QPointF(x - 1.5, top - 2.5), QPointF(x + 1.5, top - 2.5))
            mark = f"threshold {_fmt(self.threshold)}"
            tw = fm.horizontalAdvance(mark)
            left = min(max(rect.left(), x - tw / 2), rect.right() - tw)
            _draw_text(painter, QRectF(left - 1, rect.top(), tw + 2, fm.height() + 1), mark, f,
                       align=Qt.AlignmentFlag.AlignHCenter, wrap=False)
        if self.label:
            lab_top = y + 3 + fm.height() + 2
            _draw_text(painter, QRectF(rect.left(), lab_top, rect.width(), 1e4), self.label, f, color=MUTED,
                       align=Qt.AlignmentFlag.AlignHCenter)


@dataclass
class Legend(Element):
    """Colour swatches with labels, in one wrapped line."""

    items: Sequence[tuple[str, QColor]]
    size: float = CAPTION_PT
    outline: bool = False  # swatches drawn as outlines (for mask colours)

    def _layout(self, width: float) -> list[tuple[float, float, str, QColor]]:
        fm = metrics(font(self.size))
        sw, pad = fm.height() * 0.8, 8.0
        x = y = 0.0
        out = []
        for text, color in self.items:
            w = sw + 3 + fm.horizontalAdvance(text)
            if x > 0 and x + w > width:
                x, y = 0.0, y + fm.height() + 1
            out.append((x, y, text, color))
            x += w + pad
        return out

    def height(self, width: float, dpi: int) -> float:
        if not self.items:
            return 0.0
        fm = metrics(font(self.size))
        return self._layout(width)[-1][1] + fm.height()

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        f = font(self.size)
        fm = metrics(f)
        sw = fm.height() * 0.8
        for x, y, text, color in self._layout(rect.width()):
            sx, sy = rect.left() + x, rect.top() + y + (fm.height() - sw) / 2
            if self.outline:
                painter.setPen(QPen(color, 1.4))
                painter.setBrush(QColor(80, 80, 80))
            else:
                painter.setPen(Qt.PenStyle.NoPen)
                painter.setBrush(color)
            painter.drawRect(QRectF(sx, sy, sw, sw))
            _draw_text(painter, QRectF(sx + sw + 3, rect.top() + y, 1e4, fm.height() + 1), text, f, wrap=False)


@dataclass
class BarChart(Element):
    """Vertical grouped bars: one group per category, one bar per series, axes and legend."""

    categories: Sequence[str]
    series: Sequence[tuple[str, Sequence[float], QColor]]
    y_label: str = ""
    x_label: str = ""
    title: str = ""
    plot_height: float = 90.0
    integer: bool = True

    def _geometry(self, width: float) -> tuple[float, float, float, bool]:
        """(left axis width, bottom label height, legend height, rotated labels)."""
        f = font(CAPTION_PT)
        fm = metrics(f)
        top = max((max(v, default=0) for _n, v, _c in self.series), default=0)
        ticks = nice_ticks(max(1.0, top * 1.05), 5)
        left = max(fm.horizontalAdvance(_fmt(t)) for t in ticks) + 5 + (fm.height() + 3 if self.y_label else 0)
        slot = (width - left) / max(1, len(self.categories))
        widest = max((fm.horizontalAdvance(c) for c in self.categories), default=0)
        rotated = widest > slot - 2
        bottom = (widest * 0.72 + fm.height() * 0.7 if rotated else fm.height()) + 4
        if self.x_label:
            bottom += fm.height() + 2
        legend = self._legend().height(width - left, 300) + 3 if len(self.series) > 1 else 0
        return left, bottom, legend, rotated

    def _legend(self) -> Legend:
        return Legend([(name, color) for name, _v, color in self.series])

    def height(self, width: float, dpi: int) -> float:
        _l, bottom, legend, _r = self._geometry(width)
        title = text_height(self.title, font(BODY_PT, True), width) + 3 if self.title else 0
        return title + legend + self.plot_height + bottom

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        f = font(CAPTION_PT)
        fm = metrics(f)
        left, _bottom, legend_h, rotated = self._geometry(rect.width())
        y = rect.top()
        if self.title:
            th = text_height(self.title, font(BODY_PT, True), rect.width())
            _draw_text(painter, QRectF(rect.left(), y, rect.width(), th + 1), self.title, font(BODY_PT, True))
            y += th + 3
        if legend_h:
            self._legend().paint(painter, QRectF(rect.left() + left, y, rect.width() - left, legend_h), dpi)
            y += legend_h
        plot = QRectF(rect.left() + left, y, rect.width() - left, self.plot_height)
        top = max((max(v, default=0) for _n, v, _c in self.series), default=0)
        ticks = nice_ticks(max(1.0, top * 1.05), 5)
        if self.integer:
            ticks = [t for t in ticks if t == int(t)] or [0.0]
        ymax = max(ticks[-1], top, 1.0) * 1.05

        def yof(v: float) -> float:
            return plot.bottom() - v / ymax * plot.height()

        painter.setPen(QPen(QColor(225, 225, 225), 0.4))
        for t in ticks[1:]:
            painter.drawLine(QPointF(plot.left(), yof(t)), QPointF(plot.right(), yof(t)))
        n_cat, n_ser = max(1, len(self.categories)), max(1, len(self.series))
        slot = plot.width() / n_cat
        bar_w = slot * 0.8 / n_ser
        for j, (_name, values, color) in enumerate(self.series):
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(color)
            for i, v in enumerate(values):
                if v <= 0:
                    continue
                x = plot.left() + i * slot + slot * 0.1 + j * bar_w
                painter.drawRect(QRectF(x, yof(v), bar_w * 0.92, plot.bottom() - yof(v)))
        painter.setBrush(Qt.BrushStyle.NoBrush)
        painter.setPen(QPen(INK, 0.6))
        painter.drawLine(plot.bottomLeft(), plot.bottomRight())
        painter.drawLine(plot.bottomLeft(), plot.topLeft())
        for t in ticks:
            ty = yof(t)
            painter.drawLine(QPointF(plot.left() - 2.5, ty), QPointF(plot.left(), ty))
            s = _fmt(t)
            tw = fm.horizontalAdvance(s)
            _draw_text(painter, QRectF(plot.left() - 4 - tw - 1, ty - fm.height() / 2, tw + 2, fm.height() + 1), s, f,
                       align=Qt.AlignmentFlag.AlignRight, wrap=False)
        painter.setPen(QPen(INK, 0.6))
        for i, cat in enumerate(self.categories):
            cx = plot.left() + (i + 0.5) * slot
            painter.drawLine(QPointF(cx, plot.bottom()), QPointF(cx, plot.bottom() + 2))
            tw = fm.horizontalAdvance(cat)
            if rotated:
                painter.save()
                painter.translate(cx + fm.height() * 0.3, plot.bottom() + 4)
                painter.rotate(-45)
                _draw_text(painter, QRectF(-tw - 1, 0, tw + 2, fm.height() + 1), cat, f,
                           align=Qt.AlignmentFlag.AlignRight, wrap=False)
                painter.restore()
            else:
                _draw_text(painter, QRectF(cx - tw / 2 - 1, plot.bottom() + 3, tw + 2, fm.height() + 1), cat, f,
                           align=Qt.AlignmentFlag.AlignHCenter, wrap=False)
        if self.x_label:
            _draw_text(painter, QRectF(plot.left(), rect.top() + self.height(rect.width(), dpi) - fm.height() - 1,
                                       plot.width(), fm.height() + 1), self.x_label, f, color=MUTED,
                       align=Qt.AlignmentFlag.AlignHCenter, wrap=False)
        if self.y_label:
            painter.save()
            painter.translate(rect.left(), plot.center().y())
            painter.rotate(-90)
            tw = fm.horizontalAdvance(self.y_label)
            _draw_text(painter, QRectF(-tw / 2 - 1, 0, tw + 2, fm.height() + 1), self.y_label, f, color=MUTED,
                       align=Qt.AlignmentFlag.AlignHCenter, wrap=False)
            painter.restore()


@dataclass
class HBarChart(Element):
    """Horizontal bars from 0 to ``vmax`` (e.g. class probabilities), a value after each."""

    items: Sequence[tuple[str, float, bool]]  # (label, value, highlighted)
    vmax: float = 1.0
    value_format: Callable[[float], str] = lambda v: f"{100 * v:.1f}%"
    x_label: str = ""
    color: QColor = field(default_factory=lambda: QColor(70, 120, 180))
    highlight: QColor = field(default_factory=lambda: QColor(214, 120, 40))

    def height(self, width: float, dpi: int) -> float:
        fm = metrics(font(CAPTION_PT))
        return len(self.items) * (fm.height() + 2) + (fm.height() + 3 if self.x_label else 0)

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        f, fb = font(CAPTION_PT), font(CAPTION_PT, True)
        fm = metrics(f)
        names = max((metrics(fb).horizontalAdvance(n) for n, _v, _h in self.items), default=0) + 4
        names = min(names, rect.width() * 0.45)
        value_w = fm.horizontalAdvance("100.0%") + 4
        bar_w = rect.width() - names - value_w
        for i, (name, v, hi) in enumerate(self.items):
            y = rect.top() + i * (fm.height() + 2)
            _draw_text(painter, QRectF(rect.left(), y, names - 3, fm.height() + 1),
                       metrics(fb if hi else f).elidedText(name, Qt.TextElideMode.ElideMiddle, names - 3),
                       fb if hi else f, wrap=False)
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(QColor(232, 232, 232))
            painter.drawRect(QRectF(rect.left() + names, y + 1.5, bar_w, fm.height() - 3))
            painter.setBrush(self.highlight if hi else self.color)
            frac = 0.0 if self.vmax <= 0 else min(1.0, max(0.0, v / self.vmax))
            painter.drawRect(QRectF(rect.left() + names, y + 1.5, bar_w * frac, fm.height() - 3))
            _draw_text(painter, QRectF(rect.right() - value_w, y, value_w, fm.height() + 1), self.value_format(v),
                       f, align=Qt.AlignmentFlag.AlignRight, wrap=False)
        if self.x_label:
            y = rect.top() + len(self.items) * (fm.height() + 2) + 1
            _draw_text(painter, QRectF(rect.left() + names, y, bar_w, fm.height() + 1), self.x_label, f,
                       color=MUTED, align=Qt.AlignmentFlag.AlignHCenter, wrap=False)


@dataclass
class Row(Element):
    """Elements side by side; ``weights`` share the width (equal by default), tops aligned."""

    children: Sequence[Element]
    weights: Sequence[float] | None = None
    gap: float = GAP_PT

    def _widths(self, width: float) -> list[float]:
        weights = list(self.weights) if self.weights else [1.0] * len(self.children)
        avail = width - self.gap * (len(self.children) - 1)
        total = sum(weights) or 1.0
        return [avail * w / total for w in weights]

    def height(self, width: float, dpi: int) -> float:
        return max((c.height(w, dpi) for c, w in zip(self.children, self._widths(width), strict=False)), default=0.0)

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        x = rect.left()
        for child, w in zip(self.children, self._widths(rect.width()), strict=False):
            child.paint(painter, QRectF(x, rect.top(), w, child.height(w, dpi)), dpi)
            x += w + self.gap


@dataclass
class Stack(Element):
    """Elements one below the other."""

    children: Sequence[Element]
    gap: float = 3.0

    def height(self, width: float, dpi: int) -> float:
        hs = [c.height(width, dpi) for c in self.children]
        return sum(hs) + self.gap * max(0, len([h for h in hs if h > 0]) - 1)

    def paint(self, painter: QPainter, rect: QRectF, dpi: int) -> None:
        y = rect.top()
        for child in self.children:
            h = child.height(rect.width(), dpi)
            if h <= 0:
                continue
            child.paint(painter, QRectF(rect.left(), y, rect.width(), h), dpi)
            y += h + self.gap


# --------------------------------------------------------------------------------------------
# the page
# --------------------------------------------------------------------------------------------


@dataclass
class Figure:
    """A page: title, subtitle, elements top to bottom; ``width`` in points, ``dpi`` for rasters."""

    title: str
    subtitle: str = ""
    elements: list[Element] = field(default_factory=list)
    width: float = 504.0
    dpi: int = 300
    description: str = ""

    def _blocks(self) -> list[Element]:
        head: list[Element] = [Text(self.title, TITLE_PT, bold=True)]
        if self.subtitle:
            head.append(Text(self.subtitle, SUBTITLE_PT, color=QColor(MUTED)))
        return [Stack(head, gap=1.5), *self.elements]

    def size(self) -> tuple[float, float]:
        """(width, height) of the page in points."""
        inner = self.width - 2 * MARGIN_PT
        hs = [b.height(inner, self.dpi) for b in self._blocks()]
        body = sum(hs) + GAP_PT * max(0, len([h for h in hs if h > 0]) - 1)
        return self.width, math.ceil(body + 2 * MARGIN_PT)

    def paint(self, painter: QPainter) -> None:
        """Paint the page at (0, 0), in points, on white."""
        w, h = self.size()
        painter.fillRect(QRectF(0, 0, w, h), QColor(255, 255, 255))
        painter.setRenderHint(QPainter.RenderHint.Antialiasing, True)
        painter.setRenderHint(QPainter.RenderHint.TextAntialiasing, True)
        inner = w - 2 * MARGIN_PT
        y = MARGIN_PT
        for block in self._blocks():
            bh = block.height(inner, self.dpi)
            if bh <= 0:
                continue
            painter.save()
            block.paint(painter, QRectF(MARGIN_PT, y, inner, bh), self.dpi)
            painter.restore()
            y += bh + GAP_PT

    def texts(self) -> list[str]:
        """Every text string of the figure (title, subtitle, captions, labels): for tests."""
        out: list[str] = [self.title, self.subtitle]

        def walk(e: object) -> None:
            if isinstance(e, Text):
                out.append(e.text)
            elif isinstance(e, Picture):
                out.append(e.caption)
            elif isinstance(e, TileGrid):
                out.extend(t.caption for t in e.tiles)
            elif isinstance(e, (Row, Stack)):
                for c in e.children:
                    walk(c)
            elif isinstance(e, BarChart):
                out.extend([e.title, e.x_label, e.y_label, *e.categories, *(n for n, _v, _c in e.series)])
            elif isinstance(e, ColorBar):
                out.append(e.label)
            elif isinstance(e, Legend):
                out.extend(t for t, _c in e.items)
            elif isinstance(e, HBarChart):
                out.extend(n for n, _v, _h in e.items)

        for e in self.elements:
            walk(e)
        return [t for t in out if t]
