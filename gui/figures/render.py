"""Paint a :class:`~gui.figures.model.Figure` onto a PNG image, an SVG or a PDF page.

Every device paints at 72 logical dots per inch, so one point of the layout is one unit and
fonts sized in points come out in points: the ``QImage`` is given 72 dpi while painting (and
scaled by ``dpi / 72``), then its real DPI before it is saved; ``QSvgGenerator`` and
``QPdfWriter`` get a resolution of 72. SVG and PDF are vector: text is text (SVG ``<text>``,
PDF text operators with extractable characters), lines and bars are vector shapes; only the
image panels are rasters, embedded at the pixel size computed for the figure's DPI. The SVG
``<title>`` and the PDF title are the figure's title; the description is its subtitle.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from PySide6.QtCore import QMarginsF, QRectF, QSize, QSizeF, Qt
from PySide6.QtGui import (
    QImage,
    QPageLayout,
    QPageSize,
    QPaintDevice,
    QPainter,
    QPdfWriter,
)
from PySide6.QtSvg import QSvgGenerator

from .model import Figure

__all__ = ["paint", "render_png", "write_pdf", "write_svg"]


def paint(figure: Figure, painter: QPainter) -> None:
    """The one painting routine of every format."""
    figure.paint(painter)


def render_png(figure: Figure, dpi: int | None = None) -> QImage:
    """The figure as an image at ``dpi`` (default: the figure's), the DPI recorded in it."""
    dpi = dpi or figure.dpi
    w_pt, h_pt = figure.size()
    scale = dpi / 72.0
    width, height = max(1, round(w_pt * scale)), max(1, round(h_pt * scale))
    image = QImage(width, height, QImage.Format.Format_ARGB32_Premultiplied)
    if image.isNull():
        raise MemoryError(f"cannot allocate a {width}x{height} image ({dpi} dpi)")
    image.fill(Qt.GlobalColor.white)
    _set_dpi(image, 72)  # fonts in points = layout units while painting
    with _painting(image, "image") as painter:
        painter.scale(scale, scale)
        paint(figure, painter)
    _set_dpi(image, dpi)
    return image


def write_svg(figure: Figure, file: str | Path) -> None:
    w, h = figure.size()
    generator = QSvgGenerator()
    generator.setFileName(str(file))
    generator.setSize(QSize(round(w), round(h)))
    generator.setViewBox(QRectF(0, 0, w, h))
    generator.setResolution(72)
    generator.setTitle(figure.title)
    generator.setDescription(figure.description or figure.subtitle or "Made with ConvLens")
    with _painting(generator, str(file)) as painter:
        paint(figure, painter)


def write_pdf(figure: Figure, file: str | Path) -> None:
    w, h = figure.size()
    writer = QPdfWriter(str(file))
    writer.setResolution(72)
    writer.setCreator("ConvLens")
    writer.setTitle(figure.title)
    page = QPageSize(QSizeF(w, h), QPageSize.Unit.Point, "", QPageSize.SizeMatchPolicy.ExactMatch)
    if not writer.setPageLayout(QPageLayout(page, QPageLayout.Orientation.Portrait, QMarginsF())):
        raise ValueError(f"cannot make a {w:.0f}x{h:.0f} pt PDF page")
    with _painting(writer, str(file)) as painter:
        paint(figure, painter)


def _set_dpi(image: QImage, dpi: float) -> None:
    dpm = round(dpi / 0.0254)
    image.setDotsPerMeterX(dpm)
    image.setDotsPerMeterY(dpm)


@contextmanager
def _painting(device: QPaintDevice, what: str) -> Iterator[QPainter]:
    """A painter on ``device`` that is always ended (an active painter crashes on teardown)."""
    painter = QPainter()
    if not painter.begin(device):
        raise OSError(f"cannot paint on {what}")
    try:
        yield painter
    finally:
        ended = painter.end()
    if not ended:
        raise OSError(f"cannot finish writing {what}")
