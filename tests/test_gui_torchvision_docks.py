"""The Class evidence, Probes and Sanity check docks on a torchvision model in the real window:
a ResNet-18 (random weights, ImageNet class names) opened from its state dict with arch
"resnet18" at 64 px, on a folder of real photographs (skimage.data, cropped); each dock's job
gives the engine's own numbers on the same preprocessed images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from .conftest import wait_job

JOB_MS = 180_000
SIZE = 64
GRADCAM_LAYER = "layer3"
PROBE_LAYERS = ("layer2", "layer3")


def _photo_folder(root: Path) -> Path:
    """12 crops of real photographs in two class folders (6 each)."""
    from PIL import Image
    from skimage import data

    photos = {"animals": [data.chelsea(), data.astronaut()], "things": [data.coffee(), data.rocket()]}
    for cls, arrays in photos.items():
        (root / cls).mkdir(parents=True)
        k = 0
        for a in arrays:
            h, w = a.shape[:2]
            side = min(h, w) * 2 // 3
            for y0, x0 in ((0, 0), (h - side, w - side), ((h - side) // 2, (w - side) // 2)):
                Image.fromarray(np.ascontiguousarray(a[y0:y0 + side, x0:x0 + side])).save(root / cls / f"{cls}_{k:02d}.png")
                k += 1
    return root


@pytest.fixture(scope="module")
def resnet(qapp, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    """(window, session model spec, image folder): a MainWindow with the ResNet-18 and the photos open."""
    import torch
    from PySide6.QtCore import QSettings
    from torchvision.models import resnet18

    from engine.models import build_spec
    from gui.main_window import MainWindow

    tmp = tmp_path_factory.mktemp("tv_docks")
    torch.manual_seed(0)
    weights = tmp / "resnet18.pt"
    torch.save(resnet18(num_classes=1000).state_dict(), weights)
    folder = _photo_folder(tmp / "photos")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONVLENS_CACHE", str(tmp / "cache"))
        win = MainWindow(settings=QSettings(str(tmp / "settings.ini"), QSettings.Format.IniFormat))
        win.resize(1400, 900)
        win.show()
        try:
            spec = build_spec(str(weights), arch="resnet18", input_size=str(SIZE), resize="stretch")
            wait_job(win.session.load_model(spec, stated={"input_size": str(SIZE), "resize": "stretch"}))
            from pytestqt.wait_signal import SignalBlocker

            blocker = SignalBlocker(timeout=JOB_MS, raising=True, check_params_cb=lambda p: p is not None)
            blocker.connect(win.session.predictions_changed)
            win.session.open_images(str(folder))
            blocker.wait()
            yield win, win.session.model.spec, folder
        finally:
            win.close()


def _backend(spec: Any) -> tuple[Any, Any]:
    from engine.backends.torch_backend import TorchBackend
    from engine.models import load_model

    loaded = load_model(spec)
    return TorchBackend(loaded.module, spec, "cpu"), loaded


def _raise(qtbot, win: Any, name: str) -> Any:
    view = win.views[name]
    win.docks[name].show()
    win.docks[name].raise_()
    qtbot.waitUntil(lambda: view.isVisible() and not view.visibleRegion().isEmpty(), timeout=5000)
    return view


def test_the_model_opens_with_imagenet_names_and_its_input_size(resnet) -> None:
    win, spec, _folder = resnet
    assert spec.arch == "resnet18" and tuple(spec.preprocess.input_size) == (SIZE, SIZE)
    assert spec.preprocess.resize == "stretch"
    preds = win.session.predictions
    assert len(preds.classes) == 1000 and preds.classes[0] == "tench"
    assert len(win.session.selection.images.records) == 12


@pytest.mark.parametrize("method", ["gradcam", "occlusion"])
def test_class_evidence_dock_gives_the_engines_map(qtbot, resnet, method: str) -> None:
    from engine.data.images import ImageLoader, open_image_set
    from engine.evidence import evidence_maps

    win, spec, folder = resnet
    win.session.selection.current_image = 4
    view = _raise(qtbot, win, "evidence")
    layer = GRADCAM_LAYER if method == "gradcam" else None

    def ours(r: Any) -> bool:
        return r.params.method == method and r.params.layer == layer and int(r.record_indices[0]) == 4

    if not (view.result is not None and ours(view.result)):
        with qtbot.waitSignal(view.result_ready, timeout=JOB_MS, check_params_cb=ours):
            view.set_params(method=method, layer=GRADCAM_LAYER if method == "gradcam" else None, target=None)
    r = view.result
    assert ours(r) and r.maps.shape == (1, SIZE, SIZE) and np.isfinite(r.maps).all()
    assert r.layer == layer
    x = next(iter(ImageLoader(open_image_set(folder), spec.preprocess, batch_size=1, indices=[4]))).array
    backend, _loaded = _backend(spec)
    ref = evidence_maps(backend, x, method, layer=layer, **r.params.method_options() if method == "occlusion" else {})
    assert int(r.targets[0]) == int(ref.targets[0])
    np.testing.assert_allclose(r.maps, ref.maps, rtol=1e-4, atol=1e-6)
    assert r.maps.std() > 0  # a map, not a constant
    name = win.session.predictions.classes[int(r.targets[0])]
    assert f"evidence for '{name}' (predicted)" in view.status_label.text()


def test_probes_dock_gives_the_engines_invariance(qtbot, resnet, tmp_path: Path) -> None:
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.jobs import run_sync
    from engine.probes.run import ProbeParams, run
    from engine.probes.transforms import parse_range

    win, spec, folder = resnet
    view = win.views["probes"]
    view.set_params(transform="rotate", values="-20:20:10", fill="reflect", scope="set", layers=PROBE_LAYERS)
    _raise(qtbot, win, "probes")
    assert view.layers() == list(PROBE_LAYERS)
    with qtbot.waitSignal(view.result_ready, timeout=JOB_MS,
                          check_params_cb=lambda r: tuple(r.layers) == PROBE_LAYERS and len(r.values) == 5):
        view.run_probe()
    res = view.result
    assert res.n == 12 and res.layers == PROBE_LAYERS
    np.testing.assert_allclose(res.values, [-20, -10, 0, 10, 20])
    inv = res.invariance()
    assert inv.shape == (2, 5) and np.isfinite(inv).all()
    np.testing.assert_allclose(inv[:, 2], 0.0, atol=1e-6)  # angle 0 moves nothing
    assert (inv[:, [0, 1, 3, 4]] > 0).all()
    backend, loaded = _backend(spec)
    ref = run_sync(run(backend, loaded.cache_id, open_image_set(folder),
                       ProbeParams(transform="rotate", values=parse_range("-20:20:10"), fill="reflect", layers=PROBE_LAYERS),
                       cache=Cache(tmp_path / "ref")))
    np.testing.assert_allclose(inv, ref.invariance(), rtol=1e-5, atol=1e-7)
    # the dock's plot: one curve per layer, then the model input and the predictions kept
    items = view.inv_plot.getPlotItem().listDataItems()
    assert len(items) == 4
    for li in range(2):
        xs, ys = items[li].getData()
        np.testing.assert_allclose(xs, [-20, -10, 0, 10, 20])
        np.testing.assert_allclose(ys, ref.invariance()[li], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(items[3].getData()[1], ref.agreement())
    rows = view.numbers_rows()
    moved = [0, 1, 3, 4]
    assert [row["layer"] for row in rows] == list(PROBE_LAYERS)
    for li in range(2):
        assert rows[li]["linear"] == pytest.approx(float(ref.lin_test[li, moved].mean()), rel=1e-5)


def test_sanity_dock_gives_the_engines_cascade(qtbot, resnet, tmp_path: Path) -> None:
    from engine.cache import Cache
    from engine.data.images import open_image_set
    from engine.jobs import run_sync
    from engine.sanity.randomise import weight_layers
    from engine.sanity.run import run

    win, spec, folder = resnet
    win.session.selection.current_image = 1
    view = _raise(qtbot, win, "sanity")
    if view.explanation_combo.count() == 0:
        with qtbot.waitSignal(view.explanations_ready, timeout=JOB_MS):
            pass
    names = [view.explanation_combo.itemData(i) for i in range(view.explanation_combo.count())]
    assert {"gradcam", "occlusion", "guided_backprop"} <= set(names)  # ResNet's nn.ReLU: guided backprop too
    view.set_params(explanation="gradcam", mode="cascade", layer=GRADCAM_LAYER, images=3)
    assert view.layer() == GRADCAM_LAYER
    with qtbot.waitSignal(view.result_ready, timeout=JOB_MS):
        view.run_check()
    res = view.result
    assert res.explanation == "gradcam" and res.layer == GRADCAM_LAYER and res.mode == "cascade"
    assert len(res.indices) == 3 and int(res.indices[0]) == 1  # the selected image first
    backend, loaded = _backend(spec)
    named = weight_layers(backend)
    # one step per weight layer (20 convolutions and fc) the class output depends on, top down
    assert len(named) == 21 and named[-1] == "fc"
    assert res.n_steps + len(res.dropped) == len(named) and res.steps[0] == "fc"
    assert list(res.steps) == [n for n in reversed(named) if n not in res.dropped]
    assert [len(r) for r in res.randomised] == list(range(1, res.n_steps + 1))  # cascade: one more each step
    assert res.values.shape == (res.n_steps, len(res.metrics), 3)
    ref = run_sync(run(backend, loaded.cache_id, open_image_set(folder), view.params(), cache=Cache(tmp_path / "ref")))
    np.testing.assert_allclose(res.values, ref.values, rtol=1e-5, atol=1e-7)
    assert res.steps == ref.steps
    # a random fc gives another class gradient: the Grad-CAM at layer3 changes at once
    first = res.mean()[0]
    assert np.isfinite(first).all() and (first < 0.999).all()
    assert res.original_maps.shape == (3, SIZE, SIZE) and res.step_maps.shape == (res.n_steps, 3, SIZE, SIZE)
    # the dock shows these numbers: one curve per metric from 1 at "original" through each step's mean
    curves = list(view.plot.getPlotItem().listDataItems())
    assert len(curves) == len(res.metrics)
    for m, c in enumerate(curves):
        np.testing.assert_allclose(c.getData()[1], np.concatenate([[1.0], ref.mean()[:, m]]), rtol=1e-6, equal_nan=True)
    passes = all(ref.drop_step(m) is not None for m in ref.metrics)
    assert view.verdict().startswith("Passes" if passes else "Fails") and view.verdict() in view.numbers.text()


def test_probes_dock_names_the_imagenet_class(qtbot, resnet) -> None:
    win, _spec, _folder = resnet
    view = win.views["probes"]
    if view.result is None:
        view.set_params(transform="rotate", values="-20:20:10", fill="reflect", scope="set", layers=PROBE_LAYERS)
        _raise(qtbot, win, "probes")
        with qtbot.waitSignal(view.result_ready, timeout=JOB_MS):
            view.run_probe()
    names = win.session.predictions.classes
    j = view.result_row()
    assert j is not None
    assert view.result.class_name(int(view.result.ref_pred[j])) == names[int(view.result.ref_pred[j])]
    assert f"untransformed: {names[int(view.result.ref_pred[j])]};" in view.strip_title.text()
