"""Figures composed from data: the layout model, every view's figure in PNG, SVG and PDF on
the real demo session, the export dialog, and the clipboard copy."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PySide6.QtCore import QSettings
from PySide6.QtGui import QColor, QGuiApplication

from gui import colormaps
from gui.context import AppContext
from gui.export import copy_to_clipboard, export_figure, export_widget
from gui.figures import (
    BarChart,
    ColorBar,
    Figure,
    FigureOptions,
    Picture,
    Text,
    TileGrid,
    pixel_size,
    render_png,
    resample,
)
from gui.figures.dialog import FOLDER_KEY, ExportDialog
from gui.views.heatmaps import HeatmapsView
from gui.views.image_browser import ImageBrowser
from tests.figure_checks import check_figure, svg_images, svg_texts

LAYER = "conv3"
pytestmark = pytest.mark.usefixtures("qapp")  # fonts and images need a QApplication


@pytest.fixture(scope="module")
def heat(ctx: AppContext):
    from pytestqt.wait_signal import SignalBlocker

    w = HeatmapsView(ctx)
    w.resize(1000, 700)
    w.show()
    if w.activations(LAYER) is None:
        blocker = SignalBlocker(timeout=60000, raising=True)
        blocker.connect(w.activations_ready)
        ctx.selection.layer = LAYER
        blocker.wait()
    ctx.selection.layer = LAYER
    ctx.selection.current_image = 12
    yield w
    w.close()
    w.deleteLater()


@pytest.fixture(scope="module")
def browser(ctx: AppContext):
    w = ImageBrowser(ctx)
    w.resize(900, 600)
    w.show()
    yield w
    w.close()
    w.deleteLater()


# -- the layout model -------------------------------------------------------------------------


def test_small_images_enlarge_by_whole_factors_never_smoothed() -> None:
    assert pixel_size((24, 24), 72.0, 300) == (288, 288)  # 1 in at 300 dpi: 12x, not 12.5x
    assert pixel_size((24, 50), 72.0, 96) == (24, 50)  # 96 px available: 2x would not fit
    assert pixel_size((1000, 500), 72.0, 100) == (200, 100)  # too large: reduced to fit
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    big = resample(img, (96, 96))
    np.testing.assert_array_equal(big[::4, ::4], img)  # nearest-neighbour blocks
    np.testing.assert_array_equal(big[3::4, 3::4], img)


def test_png_pixels_follow_the_dpi_and_the_page_width() -> None:
    img = np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3)
    fig = Figure("A figure", "its subtitle", [Picture.of(img, "a crop"),
                                             ColorBar(colormaps.lut("inferno"), 2.5, "activation", threshold=0.5),
                                             BarChart(["a", "b"], [("s", [1, 3], QColor("red"))], "y", "x")],
                 width=252.0, dpi=150)
    sizes = {dpi: render_png(fig, dpi).size().toTuple() for dpi in (100, 200, 400)}
    w, h = fig.size()
    for dpi, (pw, ph) in sizes.items():
        assert (pw, ph) == (round(w * dpi / 72), round(h * dpi / 72))
    assert sizes[400][0] == 2 * sizes[200][0] == 4 * sizes[100][0]


def test_the_crop_is_painted_with_its_own_pixels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)
    fig = Figure("Crop", "", [Picture.of(img, frame=False)], width=144.0, dpi=72)
    out = export_figure(fig, tmp_path / "crop.png", FigureOptions(dpi=72))
    with Image.open(out) as im:
        a = np.asarray(im.convert("RGB"))
    k = pixel_size((24, 24), fig.width - 12, 72)[0] // 24
    assert k >= 4
    # find the panel: the block of k x k identical pixels equal to img[0, 0]
    ys, xs = np.nonzero((a == img[0, 0]).all(axis=2))
    found = False
    for y, x in zip(ys, xs, strict=False):
        block = a[y:y + 24 * k:k, x:x + 24 * k:k]
        if block.shape[:2] == (24, 24) and np.array_equal(block, img):
            found = np.array_equal(a[y + k - 1:y + 24 * k:k, x + k - 1:x + 24 * k:k], img)
            break
    assert found


# -- every view's figures, on the demo ------------------------------------------------------------


def test_unit_figure(heat: HeatmapsView, ctx: AppContext, tmp_path: Path) -> None:
    ctx.selection.unit = 7
    options = FigureOptions(kind="unit", size="full", dpi=150)
    fig, root = check_figure(heat, options, tmp_path, "unit")
    assert f"{LAYER} unit 7" in fig.title and "face/012.png" in fig.subtitle
    texts = " ".join(svg_texts(root))
    assert "threshold" in texts and "activation of unit 7" in texts  # the colour bar's scale and mark
    # the image and its overlay at the input's 24 x 24 pixels or a whole multiple of them
    sizes = svg_images(root)
    panels = [s for s in sizes if s[0] >= 48]
    assert len(panels) >= 2 and all(w % 24 == 0 and h % 24 == 0 for w, h in sizes)
    colorbars = [e for e in fig.elements[0].children[1].children if isinstance(e, ColorBar)]
    assert colorbars and colorbars[0].threshold == pytest.approx(heat.threshold * heat.unit_max(7))
    grids = [e for e in fig.elements if isinstance(e, TileGrid)]
    top = [int(i) for i in heat.activations().stats(LAYER).top_images[7] if i >= 0]
    assert len(grids) == 1 and len(grids[0].tiles) == len(top)
    # the same figure whether the view is shown or not: nothing is grabbed from the screen
    shown = render_png(heat.figure(options))
    heat.hide()
    try:
        hidden = render_png(heat.figure(options))
    finally:
        heat.show()
    assert shown == hidden
    # include-toggles: without the top images, no tile grid
    lean = heat.figure(FigureOptions(kind="unit", include={"top_images": False, "image": False}))
    assert not any(isinstance(e, TileGrid) for e in lean.elements)
    with pytest.raises(ValueError, match="no part named 'nope'"):
        export_figure(heat, tmp_path / "x.png", FigureOptions(include={"nope": True}))
    with pytest.raises(ValueError, match="no 'pie' figure"):
        export_figure(heat, tmp_path / "x.png", FigureOptions(kind="pie"))
    assert not (tmp_path / "x.png").exists()


def test_layer_summary_figure(heat: HeatmapsView, tmp_path: Path) -> None:
    fig, root = check_figure(heat, FigureOptions(kind="layer", size="column", dpi=100), tmp_path, "layer")
    assert f"{LAYER}, all 64 units" in fig.title
    grid = next(e for e in fig.elements if isinstance(e, TileGrid))
    assert len(grid.tiles) == 64
    assert all(w % 3 == 0 and h % 3 == 0 for w, h in svg_images(root))  # 3 x 3 maps, whole cells


def test_export_widget_of_a_view_is_its_figure(heat: HeatmapsView, ctx: AppContext, tmp_path: Path) -> None:
    """What gui/figure.py calls: export_widget(view.export_target(), path, dpi=...)."""
    ctx.selection.unit = 3
    assert heat.export_target() is heat
    out = export_widget(heat.export_target(), tmp_path / "cli.png", dpi=120)
    expected = render_png(heat.figure(FigureOptions(dpi=120)), 120)
    with Image.open(out) as im:
        assert im.size == expected.size().toTuple()
    svg = export_widget(heat.export_target(), tmp_path / "cli.svg")
    assert any("conv3 unit 3" in t for t in svg_texts(ET.parse(svg).getroot()))


def test_clipboard_holds_the_composed_png(heat: HeatmapsView, ctx: AppContext) -> None:
    ctx.selection.unit = 3
    copy_to_clipboard(heat, options=FigureOptions(dpi=100))
    image = QGuiApplication.clipboard().image()
    assert image.size() == render_png(heat.figure(FigureOptions(dpi=100)), 100).size()


def test_image_figure_and_contact_sheet(browser: ImageBrowser, ctx: AppContext, tmp_path: Path) -> None:
    ctx.selection.current_image = 150  # a non-face crop
    fig, root = check_figure(browser, FigureOptions(kind="image", size="column", dpi=200), tmp_path, "image")
    assert fig.title.startswith("150.png: predicted ")
    texts = " ".join(svg_texts(root))
    assert "Label: non-face" in texts and "probability" in texts
    native = Image.open(ctx.selection.images.records[150].path).size
    (w, h), = svg_images(root)
    assert w % native[0] == 0 and h % native[1] == 0 and w // native[0] == h // native[1] >= 2

    browser.text_filter.setText("01")
    shown = browser.proxy.rowCount()
    assert 0 < shown < 200
    fig, root = check_figure(browser, FigureOptions(kind="sheet", size="full", dpi=100), tmp_path, "sheet")
    grid = next(e for e in fig.elements if isinstance(e, TileGrid))
    assert len(grid.tiles) == shown and f"{shown} of 200 images (names containing '01')" in fig.subtitle
    browser.text_filter.setText("")


def test_nothing_to_show_is_a_clear_error(qtbot, tmp_path: Path) -> None:
    from gui.selection import Selection

    empty = ImageBrowser(AppContext(Selection(), None, None))
    qtbot.addWidget(empty)
    with pytest.raises(ValueError, match="open an image folder first"):
        export_figure(empty, tmp_path / "f.pdf")
    assert not (tmp_path / "f.pdf").exists()


# -- the export dialog --------------------------------------------------------------------------


def test_export_dialog_writes_and_remembers_its_folder(qtbot, heat: HeatmapsView, browser: ImageBrowser,
                                                       ctx: AppContext, tmp_path: Path) -> None:
    ctx.selection.unit = 5
    ini = str(tmp_path / "settings.ini")
    settings = QSettings(ini, QSettings.Format.IniFormat)
    dlg = ExportDialog({"images": browser, "heatmaps": heat}, heat, settings)
    qtbot.addWidget(dlg)
    assert dlg.view is heat and [dlg.kind_combo.itemData(i) for i in range(dlg.kind_combo.count())] == ["unit", "layer"]
    assert set(dlg.include_checks) == {"image", "colorbar", "top_images", "captions"}
    folder = tmp_path / "figures"
    folder.mkdir()
    dlg.format_combo.setCurrentIndex(dlg.format_combo.findData("svg"))
    dlg.size_combo.setCurrentIndex(dlg.size_combo.findData("column"))
    dlg.include_checks["top_images"].setChecked(False)
    dlg.path_edit.setText(str(folder / "unit5"))
    assert dlg.path() == folder / "unit5.svg"
    dlg.accept()
    assert dlg.result() == ExportDialog.DialogCode.Accepted and dlg.written == folder / "unit5.svg"
    assert "unit 5" in (folder / "unit5.svg").read_text()
    assert dlg.options().include["top_images"] is False and dlg.options().inches == 3.5
    # a new dialog, with the settings read back from the file, starts in that folder
    again = ExportDialog([browser, heat], browser, QSettings(ini, QSettings.Format.IniFormat))
    qtbot.addWidget(again)
    assert QSettings(ini, QSettings.Format.IniFormat).value(FOLDER_KEY) == str(folder.resolve())
    assert Path(again.path_edit.text()).parent == folder.resolve()
    assert again.fmt == "svg" and again.size_combo.currentData() == "column"
    # an error stays in the dialog
    again.path_edit.setText(str(tmp_path / "missing" / "f.png"))
    again.accept()
    assert again.written is None and again.error_label.isVisibleTo(again)


def test_text_block_wraps_within_the_page() -> None:
    fig = Figure("T", "", [Text("word " * 200)], width=252.0, dpi=72)
    w, h = fig.size()
    assert w == 252.0 and h > 100
