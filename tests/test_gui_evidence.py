"""The Class evidence dock on the real demo session (pretrained RNet, 200 real faces): the map of
the selected image is the engine's, blobs and curves shown; it follows the image browser's image
and the heatmaps' layer; a class and a method can be chosen; a job can be cancelled; the figure
exports; the 1024x640 layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gui.figures import FigureOptions
from gui.views.evidence import CurveChart, EvidenceView, overlay_rgb

from .figure_checks import check_figure, parts
from .gui_layout import demo_window, widgets_off_view

JOB_MS = 180_000


@pytest.fixture(scope="module")
def view(ctx, qapp):
    v = EvidenceView(ctx)
    v.resize(900, 600)
    v.show()
    ctx.selection.current_image = 1
    yield v
    v.shutdown()
    v.close()


def _ready(qtbot, view: EvidenceView, image: int, **want: object) -> None:
    def ok() -> bool:
        r = view.result
        return (r is not None and view._handle is None and int(r.record_indices[0]) == image
                and all(getattr(r.params, k) == v for k, v in want.items()))
    qtbot.waitUntil(ok, timeout=JOB_MS)


def test_shows_the_engines_gradcam_of_the_selected_image(qtbot, ctx, demo, view: EvidenceView) -> None:
    from engine.backends.torch_backend import TorchBackend
    from engine.data.images import ImageLoader, open_image_set
    from engine.evidence import evidence_maps
    from engine.models import load_model

    _ready(qtbot, view, 1, method="gradcam")
    r = view.result
    assert view.layer() == "prelu3" and r.layer == "prelu3"  # the last spatial layer by default
    spec, images = demo
    loaded = load_model(spec)
    x = next(iter(ImageLoader(open_image_set(images), spec.preprocess, batch_size=1, indices=[1]))).array
    ref = evidence_maps(TorchBackend(loaded.module, spec, "cpu"), x, "gradcam", layer="prelu3")
    np.testing.assert_allclose(r.maps, ref.maps, rtol=1e-5, atol=1e-6)
    assert r.class_name(int(r.targets[0])) == "face"
    assert view.deletion_curve.getData()[1].tolist() == pytest.approx(r.deletion[0].tolist())
    assert "blob 1" in view.blob_label.text() and ("causal" in view.blob_label.text())
    assert "evidence for 'face' (predicted)" in view.status_label.text()
    pix = view.image_label.pixmap()
    assert not pix.isNull() and pix.width() % 24 == 0  # whole pixels
    # outlines drawn in the verdict's colour
    rgb = overlay_rgb(r, 0, (96, 96))
    green, red = (rgb == (40, 170, 60)).all(axis=2).sum(), (rgb == (220, 40, 40)).all(axis=2).sum()
    assert green + red > 0 and (green > 0) == bool(r.blob_causal.any())


def test_follows_the_image_the_layer_and_the_class(qtbot, ctx, view: EvidenceView) -> None:
    ctx.selection.current_image = 150  # a non-face
    _ready(qtbot, view, 150)
    assert view.result.class_name(int(view.result.targets[0])) == "non-face"
    ctx.selection.set_layer("conv2")  # the heatmaps' layer
    qtbot.waitUntil(lambda: view.layer() == "conv2", timeout=5000)
    _ready(qtbot, view, 150, layer="conv2")
    assert view.result.layer == "conv2"
    view.layer_combo.setCurrentIndex(view.layer_combo.findText("conv3"))
    view.layer_combo.activated.emit(view.layer_combo.currentIndex())
    assert ctx.selection.layer == "conv3"  # picking here sets the shared layer
    view.set_params(target=1)
    _ready(qtbot, view, 150, target=1, layer="conv3")
    assert view.result.class_name(int(view.result.targets[0])) == "face"
    view.set_params(method="occlusion", target=None)
    _ready(qtbot, view, 150, method="occlusion", target=None)
    assert view.result.layer is None and not view.layer_combo.isEnabled()


def test_a_running_job_can_be_cancelled(qtbot, ctx, view: EvidenceView) -> None:
    view.set_params(method="ig")
    ctx.selection.current_image = 7
    qtbot.waitUntil(lambda: view._handle is not None or (view.result is not None and
                                                         int(view.result.record_indices[0]) == 7), timeout=5000)
    if view._handle is None:
        pytest.skip("the job finished before it could be cancelled")
    handle = view._handle
    assert view.cancel_button.isVisible()
    with qtbot.waitSignal(handle.cancelled, timeout=JOB_MS):
        view.cancel_button.click()
    assert view._handle is None and not view.cancel_button.isVisible()
    view.set_params(method="gradcam")


def test_figure_exports_the_overlay_blobs_and_curves(qtbot, ctx, view: EvidenceView, tmp_path: Path) -> None:
    ctx.selection.current_image = 1
    view.set_params(method="gradcam", layer="prelu3", target=None)
    _ready(qtbot, view, 1, method="gradcam", layer="prelu3")
    fig, _svg = check_figure(view, FigureOptions(kind="evidence"), tmp_path, "evidence")
    assert "Class evidence for 'face'" in fig.title and "Grad-CAM at prelu3" in fig.title
    charts = [p for p in parts(fig) if isinstance(p, CurveChart)]
    assert len(charts) == 1 and "AUC" in charts[0].series[0][0]
    texts = " ".join(fig.texts())
    assert "blob 1" in texts and "drop" in texts
    fig2, _ = check_figure(view, FigureOptions(kind="curves"), tmp_path, "curves")
    assert [type(e).__name__ for e in fig2.elements] == ["CurveChart"]


def test_dock_in_the_window_at_1024x640(qtbot, demo, tmp_path: Path, monkeypatch) -> None:
    with demo_window(qtbot, demo, tmp_path, monkeypatch, "evidence") as (win, view):
        assert isinstance(view, EvidenceView)
        win.session.selection.current_image = 3
        _ready(qtbot, view, 3)
        qtbot.wait(50)
        win.grab().save(str(tmp_path / "evidence-1024x640.png"))
        assert widgets_off_view(view) == []


def test_an_onnx_model_gets_occlusion_only(qtbot, qapp, ocr_onnx: Path, demo_images: Path, tmp_path: Path,
                                           monkeypatch) -> None:
    from engine.models.config import build_spec
    from gui.context import AppContext
    from gui.jobs import JobRunner
    from gui.selection import Selection
    from gui.session import Session

    from .conftest import wait_job

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    selection, runner = Selection(), JobRunner()
    session = Session(selection, runner)
    session.show_notices = False
    try:
        wait_job(session.load_model(build_spec(str(ocr_onnx), input_size="48x192")))
        wait_job(session.open_images(str(demo_images)))
        v = EvidenceView(AppContext(selection, runner, session))
        v.resize(800, 500)
        v.show()
        assert v.method() == "occlusion"
        model = v.method_combo.model()
        enabled = {v.method_combo.itemData(i): model.item(i).isEnabled() for i in range(v.method_combo.count())}
        assert enabled == {"gradcam": False, "occlusion": True, "ig": False, "saliency": False}
        selection.current_image = 0
        _ready(qtbot, v, 0, method="occlusion")
        assert v.result.maps.shape == (1, 48, 192) and np.isfinite(v.result.maps).all()
        v.shutdown()
        v.close()
    finally:
        runner.shutdown()
