"""Exports of hidden widgets and pyqtgraph plots to PNG, SVG and PDF, and to the clipboard."""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import pytest
from PIL import Image
from PySide6.QtCore import QRectF
from PySide6.QtGui import QBrush, QColor, QGuiApplication
from PySide6.QtWidgets import QGraphicsScene, QLabel, QVBoxLayout, QWidget

from gui.export import (
    FORMATS,
    copy_to_clipboard,
    export_dialog_filter,
    export_scene,
    export_widget,
    render_image,
)

SVG_NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture
def plot_widget(qtbot) -> pg.PlotWidget:
    plot = pg.PlotWidget(background="w")
    x = np.linspace(0, 4 * np.pi, 200)
    plot.plot(x, np.sin(x), pen=pg.mkPen("r", width=3))
    qtbot.addWidget(plot)
    return plot


@pytest.fixture
def figure(qtbot, plot_widget: pg.PlotWidget) -> QWidget:
    """A never-shown 400x300 widget: a label above a pyqtgraph plot."""
    widget = QWidget()
    layout = QVBoxLayout(widget)
    layout.addWidget(QLabel("Activation of unit 12"))
    layout.addWidget(plot_widget)
    widget.resize(400, 300)
    qtbot.addWidget(widget)
    return widget


def red_pixels(image: Image.Image) -> int:
    a = np.asarray(image.convert("RGB")).astype(int)
    return int(((a[..., 0] > 200) & (a[..., 1] < 80) & (a[..., 2] < 80)).sum())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_png_has_requested_dpi_and_size(figure: QWidget, tmp_path: Path) -> None:
    out = export_widget(figure, tmp_path / "fig.png", dpi=300)
    assert out == tmp_path / "fig.png"
    with Image.open(out) as image:
        width, height = image.size
        assert abs(width - 400 * 300 / 96) <= 1 and abs(height - 300 * 300 / 96) <= 1
        assert image.info["dpi"] == pytest.approx((300, 300), abs=0.5)
        assert red_pixels(image) > 500  # the curve, 3 px wide at 96 dpi
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert leftovers(tmp_path) == []


def test_svg_is_vector_with_viewbox(figure: QWidget, tmp_path: Path) -> None:
    out = export_widget(figure, tmp_path / "fig.SVG")
    root = ET.parse(out).getroot()
    assert root.tag == f"{SVG_NS}svg"
    assert root.get("viewBox") == "0 0 400 300"
    shapes = [e for e in root.iter() if e.tag in (f"{SVG_NS}path", f"{SVG_NS}polyline")]
    assert len(shapes) > 10  # axes, ticks and the curve are vectors
    assert any(e.get("stroke") == "#ff0000" for e in root.iter())  # the red curve
    texts = "".join(t.text or "" for t in root.iter(f"{SVG_NS}text"))
    assert "Activation of unit 12" in texts


def test_pdf_page_is_content_sized(figure: QWidget, tmp_path: Path) -> None:
    out = export_widget(figure, tmp_path / "fig.pdf")
    data = out.read_bytes()
    assert data.startswith(b"%PDF") and len(data) > 1024
    box = re.search(rb"/MediaBox \[0 0 ([\d.]+) ([\d.]+)\]", data)
    assert box is not None
    assert (float(box[1]), float(box[2])) == pytest.approx((300, 225))  # 400x300 px at 96 dpi


def test_export_plot_widget_scene(plot_widget: pg.PlotWidget, tmp_path: Path) -> None:
    plot_widget.resize(320, 240)  # hidden: Qt defers the resize until the export needs it
    out = export_scene(plot_widget, tmp_path / "plot.png", dpi=192)
    with Image.open(out) as image:
        assert image.size == (640, 480)
        assert image.getpixel((2, 2))[:3] == (255, 255, 255)  # the view's white background
        assert red_pixels(image) > 500
    root = ET.parse(export_scene(plot_widget, tmp_path / "plot.svg")).getroot()
    assert root.get("viewBox") == "0 0 320 240"
    assert any(e.get("stroke") == "#ff0000" for e in root.iter())


def test_export_bare_scene(qtbot, tmp_path: Path) -> None:
    scene = QGraphicsScene()
    scene.setSceneRect(QRectF(0, 0, 200, 100))
    scene.addRect(QRectF(50, 25, 100, 50), brush=QBrush(QColor("red")))
    image = render_image(scene, dpi=96)
    assert (image.width(), image.height()) == (200, 100)
    assert image.pixelColor(100, 50) == QColor("red")
    assert image.pixelColor(10, 10).alpha() == 0  # no background brush: transparent
    pdf = export_scene(scene, tmp_path / "scene.pdf", dpi=150)
    assert pdf.read_bytes().startswith(b"%PDF")


def test_render_image_records_dpi(figure: QWidget) -> None:
    image = render_image(figure, dpi=150)
    assert (image.width(), image.height()) == (625, 469)
    assert round(image.dotsPerMeterX() * 0.0254) == 150
    with pytest.raises(ValueError, match="dpi"):
        render_image(figure, dpi=0)


def test_unknown_suffix_is_refused_and_writes_nothing(figure: QWidget, tmp_path: Path) -> None:
    existing = tmp_path / "fig.jpg"
    existing.write_bytes(b"old")
    for name in ("fig.jpg", "fig", "new.tiff"):
        with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
            export_widget(figure, tmp_path / name)
    assert existing.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.jpg"]


def test_failed_render_leaves_existing_file_intact(figure: QWidget, tmp_path: Path) -> None:
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    with pytest.raises(MemoryError):  # a 4 million x 3 million pixel image cannot be allocated
        export_widget(figure, target, dpi=1_000_000)
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []

    export_widget(figure, target, dpi=96)  # a successful export replaces it
    with Image.open(target) as image:
        assert image.size == (400, 300)


def test_failed_write_removes_temporary_file(figure: QWidget, tmp_path: Path) -> None:
    # The SVG is fully written to a temporary file, then cannot replace a directory.
    blocker = tmp_path / "fig.svg"
    blocker.mkdir()
    (blocker / "keep.txt").write_text("keep")
    with pytest.raises(OSError):
        export_widget(figure, blocker)
    assert (blocker / "keep.txt").read_text() == "keep"
    assert leftovers(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        export_widget(figure, tmp_path / "missing" / "fig.pdf")


def test_copy_to_clipboard(figure: QWidget) -> None:
    clipboard = QGuiApplication.clipboard()
    clipboard.clear()
    copy_to_clipboard(figure)
    image = clipboard.image()
    assert not image.isNull()
    assert (image.width(), image.height()) == (800, 600)  # 192 dpi by default


def test_dialog_filter_lists_every_format() -> None:
    entries = export_dialog_filter().split(";;")
    assert len(entries) == len(FORMATS) == 3
    for fmt, entry in zip(FORMATS, entries, strict=False):
        assert entry.endswith(f"(*.{fmt})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_graphics_view_as_a_widget(plot_widget: pg.PlotWidget) -> None:
    plot_widget.resize(300, 200)
    image = render_image(plot_widget, dpi=96)  # a QGraphicsView given as a widget: whole widget
    assert (image.width(), image.height()) == (300, 200)
    assert image.pixelColor(150, 100).alpha() == 255
