"""The Heatmaps view on the real demo model (RNet) and its 200 face / non-face crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from PySide6.QtCore import Qt

from gui import colormaps
from gui.context import AppContext
from gui.export import export_widget
from gui.tiles import bilinear_weights, compose_tiles, mask_outline, upsample
from gui.views.heatmaps import HeatmapsView

LAYER = "conv2"  # RNet: 48 units of 9 x 9


@pytest.fixture
def view(qtbot, ctx: AppContext) -> HeatmapsView:
    """A shown view on ``LAYER`` and image 0, activations arrived."""
    w = HeatmapsView(ctx)
    qtbot.addWidget(w)
    w.resize(1100, 760)
    w.show()
    ctx.selection.current_image = 0
    if w.activations(LAYER) is None:
        with qtbot.waitSignal(w.activations_ready, timeout=60000):
            ctx.selection.layer = LAYER
    else:
        ctx.selection.layer = LAYER
    return w


def test_bilinear_matches_torch() -> None:
    x = np.random.default_rng(0).normal(size=(5, 9, 7)).astype(np.float32)
    ours = upsample(x, (40, 23))
    ref = F.interpolate(torch.from_numpy(x)[None], size=(40, 23), mode="bilinear", align_corners=False)[0]
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(bilinear_weights(9, 40).sum(axis=1), 1.0, atol=1e-6)


def test_compose_tiles_and_outline() -> None:
    tiles = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    canvas = compose_tiles(tiles, cols=2, gap=1, label_height=2, background=(9, 9, 9))
    assert canvas.shape == (3 * (2 + 2 + 1) + 1, 2 * (3 + 1) + 1, 3)
    np.testing.assert_array_equal(canvas[1 + 5:1 + 5 + 2, 1 + 4:1 + 4 + 3], tiles[3])  # row 1, col 1
    mask = np.zeros((5, 5), bool)
    mask[1:4, 1:4] = True
    ring = mask.copy()
    ring[2, 2] = False
    np.testing.assert_array_equal(mask_outline(mask), ring)


def test_computing_state_then_grid(qtbot, ctx: AppContext) -> None:
    ctx.selection.layer = ""
    w = HeatmapsView(ctx)
    qtbot.addWidget(w)
    w.resize(1100, 760)
    w.show()
    ctx.selection.current_image = 0
    with qtbot.waitSignal(w.activations_ready, timeout=60000):
        ctx.selection.layer = "conv3"
        assert w.message.text().startswith("Computing activations of conv3")
    acts = w.activations("conv3")
    assert acts is not None and w.message.text() == ""
    # no unit was chosen: the view picks the one most active on this image
    assert ctx.selection.unit == int(np.argmax(acts.stats("conv3").max[0]))
    assert len(w.grid.ids) == 64 and not w.grid.image.isNull()
    assert w.layer_combo.currentData() == "conv3" and w.layer_combo.currentText() == "conv3  64×3×3"
    assert [w.layer_combo.itemData(i) for i in range(w.layer_combo.count())] == [
        "conv1", "prelu1", "pool1", "conv2", "prelu2", "pool2", "conv3", "prelu3"]


def test_grid_sorted_and_clickable(qtbot, view: HeatmapsView, ctx: AppContext) -> None:
    acts = view.activations()
    maxima = np.asarray(acts.stats(LAYER).max[0])
    ids = view.grid.ids
    assert sorted(ids) == list(range(48))
    assert np.all(np.diff(maxima[ids]) <= 0)  # "max on this image", descending
    assert view.grid.image.width() <= view.grid_scroll.viewport().width()

    position = 7
    with qtbot.waitSignal(ctx.selection.unit_changed) as blocker:
        qtbot.mouseClick(view.grid, Qt.MouseButton.LeftButton, pos=view.grid.tile_rect(position).center())
    assert blocker.args == [ids[position]] and ctx.selection.unit == ids[position]
    assert view.grid.id_at(view.grid.tile_rect(position).topLeft()) == ids[position]

    view.sort_combo.setCurrentIndex(view.sort_combo.findData("unit"))
    assert view.grid.ids == list(range(48))


def test_overlay_is_the_upsampled_colour_mapped_map(view: HeatmapsView, ctx: AppContext) -> None:
    unit = 5
    ctx.selection.unit = unit
    view.threshold_slider.setValue(30)
    view.opacity_slider.setValue(70)
    view.cmap_combo.setCurrentText("viridis")
    rgba = view.heatmap_rgba()
    assert rgba is not None and rgba.shape == (256, 256, 4)

    acts = view.activations()
    maps = torch.from_numpy(np.asarray(acts.maps(LAYER)[0, unit], dtype=np.float32))
    up = F.interpolate(maps[None, None], size=(256, 256), mode="bilinear", align_corners=False)[0, 0].numpy()
    vmax = float(np.nanmax(np.asarray(acts.stats(LAYER).max)[acts.valid, unit]))
    assert view.unit_max(unit) == pytest.approx(vmax)
    scaled = np.clip(up / vmax, 0, 1)
    clear = np.abs(scaled - 0.3) > 1e-4  # pixels not on the threshold's edge
    np.testing.assert_array_equal(rgba[..., 3][clear], np.where(scaled >= 0.3, round(0.7 * 255), 0)[clear])
    assert (rgba[..., 3] == 0).any() and (rgba[..., 3] > 0).any()
    expected = colormaps.lut("viridis")[np.rint(scaled * 255).astype(int)]
    assert np.abs(rgba[..., :3].astype(int) - expected.astype(int)).max() <= 3  # rounding at LUT steps

    over = view.overlay_rgb()
    base = over.astype(float)  # where transparent, the overlay is the image itself
    transparent = rgba[..., 3] == 0
    assert np.abs(base[transparent] - base[transparent].mean()).max() > 0  # a real image
    shown = view.overlay_label.pixmap().toImage()
    assert (shown.width(), shown.height()) == (256, 256)


def test_top_images_strip(qtbot, view: HeatmapsView, ctx: AppContext) -> None:
    unit = 12
    ctx.selection.unit = unit
    top = np.asarray(view.activations().stats(LAYER).top_images[unit])
    expected = [int(i) for i in top if i >= 0]
    assert view.strip.ids == expected and len(expected) == top.shape[0]

    def tile(position: int) -> np.ndarray:
        image = view.strip.image.convertToFormat(view.strip.image.Format.Format_RGB888)
        rgb = np.asarray(image.constBits(), np.uint8).reshape(image.height(), image.bytesPerLine())
        r = view.strip.tile_rect(position)
        return rgb[r.top():r.bottom() + 1, 3 * r.left():3 * (r.right() + 1)].reshape(r.height(), r.width(), 3)

    # thumbnails are decoded on the light worker; grey until then
    qtbot.waitUntil(lambda: not (tile(0) == 128).all(), timeout=10000)
    cyan = (tile(0) == (0, 255, 255)).all(axis=2)
    assert cyan.any() and not cyan.all()  # the unit's mask on its best image is outlined
    with qtbot.waitSignal(ctx.selection.current_image_changed):
        qtbot.mouseClick(view.strip, Qt.MouseButton.LeftButton, pos=view.strip.tile_rect(3).center())
    assert ctx.selection.current_image == expected[3]
    assert ctx.selection.unit == unit  # the unit stays


def test_export_and_state(tmp_path: Path, view: HeatmapsView, ctx: AppContext) -> None:
    ctx.selection.unit = 3
    path = export_widget(view.export_target(), tmp_path / "heatmaps.png", dpi=96)
    with Image.open(path) as img:  # the composed unit figure, a 7-inch page: no widget grab
        assert img.size[0] == 7 * 96 and img.size != (view.main_splitter.width(), view.main_splitter.height())
        assert len(np.unique(np.asarray(img.convert("RGB")).reshape(-1, 3), axis=0)) > 50

    view.restore_state({"colormap": "magma", "opacity": 0.25, "threshold": 0.5, "sort": "unit",
                        "scale": "image", "unknown": 1})
    assert view.save_state() == {"colormap": "magma", "opacity": 0.25, "threshold": 0.5, "sort": "unit",
                                 "scale": "image"}
    assert view.grid.ids == list(range(48))


def test_layer_combo_elides_long_names_in_the_middle(qtbot) -> None:
    from gui.widgets.eliding_combo import ElidingComboBox

    combo = ElidingComboBox(12)
    qtbot.addWidget(combo)
    name = "/backbone/stage3/block2/conv/Conv_output_0  256×14×14"
    combo.addItem(name, "/backbone/stage3/block2/conv/Conv_output_0")
    combo.resize(combo.minimumSizeHint().width(), combo.height())
    combo.show()
    shown = combo.displayed_text()
    assert "…" in shown and shown.startswith("/ba") and shown.endswith("14")
    assert combo.currentText() == name  # the item keeps the whole name
    assert combo.minimumSizeHint().width() < combo.fontMetrics().horizontalAdvance(name)


def test_unit_masks_are_the_engines(view: HeatmapsView, ctx: AppContext) -> None:
    """The strip's masks: the map upsampled (F.interpolate) and >= threshold x the unit's set max,
    by the engine's mask code (engine.dissection.masks)."""
    unit = 7
    ctx.selection.unit = unit
    view.threshold_slider.setValue(40)
    acts = view.activations()
    for image in [int(i) for i in acts.stats(LAYER).top_images[unit] if i >= 0][:3]:
        got = view.unit_mask(image, unit, (88, 70))
        m = torch.from_numpy(np.asarray(acts.maps(LAYER)[image, unit], dtype=np.float32))[None, None]
        s = F.interpolate(m, size=(88, 70), mode="bilinear", align_corners=False)[0, 0].double().numpy()
        t = view.threshold * view.unit_max(unit)
        assert got is not None and got.dtype == bool and got.any()
        np.testing.assert_array_equal(got, s >= t)


def test_never_defaults_to_a_1x1_layer(qtbot, ocr_onnx, demo_images, tmp_path: Path, monkeypatch) -> None:
    """The ONNX text-direction classifier ends in layers with 1x1 maps: the view opens on the
    deepest layer with a spatial extent, never on one of those."""
    from engine.models.layers import has_extent
    from engine.types import ModelSpec
    from gui.context import AppContext as Context
    from gui.jobs import JobRunner
    from gui.selection import Selection
    from gui.session import Session
    from tests.conftest import wait_job

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    selection, runner = Selection(), JobRunner()
    session = Session(selection, runner)
    try:
        wait_job(session.load_model(ModelSpec(path=str(ocr_onnx))))
        layers = session.model.layers
        flat = [li.name for li in layers if li.is_spatial and not has_extent(li)]
        assert flat  # the model has 1x1 layers (e.g. after global pooling)
        w = HeatmapsView(Context(selection, runner, session))
        qtbot.addWidget(w)
        chosen = next(li for li in layers if li.name == selection.layer)
        assert has_extent(chosen) and selection.layer not in flat
        assert selection.layer == [li.name for li in layers if has_extent(li)][-1] or selection.layer in session.model.default_layers
    finally:
        runner.shutdown()
        session.shutdown()
