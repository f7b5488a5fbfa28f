"""The figure composer: views build a :class:`Figure` from their data; one painting routine
makes the PNG (at a chosen DPI), the SVG and the PDF. No widget is ever drawn into a figure.

* :mod:`.model`: the page-layout model (title, text, image panels, tile grids, colour bars,
  bar charts, legends, rows) and :class:`FigureOptions` (size preset, DPI, include-toggles).
* :mod:`.render`: painting a figure on ``QImage``, ``QSvgGenerator`` and ``QPdfWriter``.
* :mod:`.dialog`: the one export dialog (format, size, DPI, what to include, file), which
  remembers its folder.
"""

from __future__ import annotations

from .model import (
    SIZE_PRESETS,
    BarChart,
    ColorBar,
    Element,
    Figure,
    FigureKind,
    FigureOption,
    FigureOptions,
    HBarChart,
    Legend,
    Picture,
    Row,
    Stack,
    Text,
    Tile,
    TileGrid,
    pixel_size,
    resample,
)
from .render import render_png, write_pdf, write_svg

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
    "render_png",
    "resample",
    "write_pdf",
    "write_svg",
]
