"""Checks every composed figure must pass, in PNG, SVG and PDF (shared by the view tests)."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from PIL import Image
from PySide6.QtWidgets import QWidget

from gui.export import export_figure
from gui.figures import Figure, FigureOptions

SVG = "{http://www.w3.org/2000/svg}"


def parts(obj: object) -> list[object]:
    """Every object a figure is built of (its elements, their fields, recursively)."""
    out: list[object] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        out.append(o)
        if dataclasses.is_dataclass(o) and not isinstance(o, type):
            stack.extend(getattr(o, f.name) for f in dataclasses.fields(o))
        elif isinstance(o, (list, tuple)):
            stack.extend(o)
    return out


def svg_texts(root: ET.Element) -> list[str]:
    return [" ".join("".join(t.itertext()).split()) for t in root.iter(f"{SVG}text")]


def svg_images(root: ET.Element) -> list[tuple[int, int]]:
    """(width, height) in pixels of every raster embedded in the SVG."""
    sizes = []
    for im in root.iter(f"{SVG}image"):
        href = im.get("{http://www.w3.org/1999/xlink}href") or im.get("href") or ""
        data = base64.b64decode(href.split(",", 1)[1])
        with Image.open(io.BytesIO(data)) as img:
            sizes.append(img.size)
    return sizes


def check_figure(view: object, options: FigureOptions, tmp_path: Path, name: str) -> tuple[Figure, ET.Element]:
    """Compose ``view``'s figure and write it in every format; assert what all figures share.

    * the figure is a :class:`Figure` built of data: no QWidget anywhere in it;
    * the PNG is the page width times the DPI, DPI recorded;
    * the SVG's <title> is the figure's title, the title is a <text> element (text stays text);
    * the PDF's text is extractable and holds the title (when pdftotext is installed).
    Returns the figure and the SVG's root.
    """
    figure = view.figure(options)  # type: ignore[attr-defined]
    assert isinstance(figure, Figure)
    assert not any(isinstance(p, QWidget) for p in parts(figure))
    png = export_figure(view, tmp_path / f"{name}.png", options)
    width_pt, height_pt = figure.size()
    with Image.open(png) as img:
        assert img.size == (round(width_pt * options.dpi / 72), round(height_pt * options.dpi / 72))
        assert abs(img.info["dpi"][0] - options.dpi) < 0.5
    svg = export_figure(view, tmp_path / f"{name}.svg", options)
    root = ET.parse(svg).getroot()
    assert root.findtext(f"{SVG}title") == figure.title
    texts = svg_texts(root)
    assert figure.title in texts
    assert len(texts) >= 3
    pdf = export_figure(view, tmp_path / f"{name}.pdf", options)
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    pdftotext = shutil.which("pdftotext")
    if pdftotext:
        text = subprocess.run([pdftotext, str(pdf), "-"], capture_output=True, text=True, check=True).stdout
        assert " ".join(figure.title.split()) in " ".join(text.split())
    else:  # at least the title is in the document's metadata as text
        assert re.search(rb"/Title", data)
    return figure, root
