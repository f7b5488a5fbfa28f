"""``convlens evidence`` on the demo RNet, a torchvision ResNet-18 state dict and a third-party ONNX model."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main


@pytest.fixture
def few_faces(demo_images: Path, tmp_path: Path) -> Path:
    """Two faces and two non-faces of the demo set, in its class folders."""
    root = tmp_path / "few"
    for cls, names in (("face", ["000.png", "001.png"]), ("non-face", ["100.png", "101.png"])):
        (root / cls).mkdir(parents=True)
        for n in names:
            shutil.copy(demo_images / cls / n, root / cls / n)
    return root


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evidence_on_the_demo_writes_maps_tables_overlays_and_curves(rnet_spec, few_faces: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["-q", "evidence", "--model", rnet_spec.path, "--images", str(few_faces), "--method", "gradcam",
                 "--layer", "conv3", "--steps", "10", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "4 images, gradcam at conv3" in printed and "face" in printed
    maps = np.load(out / "maps.npy")
    assert maps.shape == (4, 24, 24) and maps.dtype == np.float32 and (maps >= 0).all()
    rows = _rows(out / "images.csv")
    assert [r["class"] for r in rows] == ["face", "face", "non-face", "non-face"]  # predicted, per image
    assert all(0 <= float(r["deletion_auc"]) <= 1 and 0 <= float(r["insertion_auc"]) <= 1 for r in rows)
    assert json.loads((out / "images.json").read_text())[0]["overlay"] == "overlays/0000_000.png"
    blobs = _rows(out / "causal.csv")
    assert blobs and {b["causal"] for b in blobs} <= {"true", "false"}
    assert all(abs(float(b["probability"]) - float(b["probability_masked"]) - float(b["drop"])) < 1e-5 for b in blobs)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 4 and summary["layer"] == "conv3" and set(summary["per_class"]) == {"face", "non-face"}
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["0000_000.png", "0001_001.png", "0002_100.png",
                                                                   "0003_101.png"]
    from PIL import Image

    assert Image.open(out / "curves.png").size == (720, 300)
    # the class asked for, by name: every map explains "face"
    out2 = tmp_path / "out2"
    assert main(["-q", "evidence", "--model", rnet_spec.path, "--images", str(few_faces), "--method", "saliency",
                 "--class", "face", "--steps", "5", "--overlays", "0", "--out", str(out2)]) == 0
    assert {r["class"] for r in _rows(out2 / "images.csv")} == {"face"}
    assert not (out2 / "overlays").exists()


def test_evidence_demo_flag_uses_the_demo_model(few_faces: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo-out"
    assert main(["-q", "evidence", "--demo", "--images", str(few_faces), "--method", "ig", "--ig-steps", "8",
                 "--steps", "5", "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["model"] == "rnet.pt"


def test_evidence_on_a_torchvision_resnet18(tmp_path: Path, few_faces: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    weights = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    out = tmp_path / "r18"
    code = main(["-q", "evidence", "--model", str(weights), "--arch", "resnet18", "--num-classes", "3",
                 "--input-size", "64", "--images", str(few_faces), "--method", "gradcam", "--layer", "layer4",
                 "--class", "2", "--steps", "8", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    maps = np.load(out / "maps.npy")
    assert maps.shape == (4, 64, 64)
    assert {r["class_index"] for r in json.loads((out / "images.json").read_text())} == {2}
    out_occ = tmp_path / "r18-occ"
    assert main(["-q", "evidence", "--model", str(weights), "--arch", "resnet18", "--num-classes", "3",
                 "--input-size", "64", "--images", str(few_faces), "--method", "occlusion", "--window", "16",
                 "--stride", "16", "--steps", "4", "--out", str(out_occ)]) == 0
    assert np.load(out_occ / "maps.npy").shape == (4, 64, 64)


def test_occlusion_on_an_onnx_model_and_gradients_refused(ocr_onnx: Path, few_faces: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ocr"
    code = main(["-q", "evidence", "--model", str(ocr_onnx), "--input-size", "48x192", "--images", str(few_faces),
                 "--method", "occlusion", "--window", "16", "--stride", "16", "--steps", "4", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert np.load(out / "maps.npy").shape == (4, 48, 192)
    capsys.readouterr()
    code = main(["-q", "evidence", "--model", str(ocr_onnx), "--input-size", "48x192", "--images", str(few_faces),
                 "--method", "gradcam", "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err
    assert code == 1 and "convlens: error:" in err and "needs gradients" in err and "Traceback" not in err


def test_evidence_bad_input_is_a_clear_error(rnet_spec, few_faces: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    base = ["-q", "evidence", "--model", rnet_spec.path, "--images", str(few_faces), "--out", str(tmp_path / "o")]
    assert main([*base, "--class", "cat"]) == 1
    assert "--class 'cat': not a class index or name (classes: non-face, face)" in capsys.readouterr().err
    assert main([*base, "--class", "7"]) == 1
    assert "the classifier has 2 classes" in capsys.readouterr().err
    assert main([*base, "--layer", "dense4"]) == 1
    assert "Grad-CAM needs a spatial layer" in capsys.readouterr().err
    assert main(["-q", "evidence", "--images", str(few_faces), "--out", str(tmp_path / "o")]) == 1
    assert "give --model and --images (or --demo" in capsys.readouterr().err
    assert main([*base, "--top", "0"]) == 2  # a usage error, found while parsing


def test_an_occlusion_stride_larger_than_the_window_is_a_clear_error(rnet_spec, few_faces: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    base = ["-q", "evidence", "--model", rnet_spec.path, "--images", str(few_faces), "--method", "occlusion",
            "--out", str(tmp_path / "o")]
    assert main([*base, "--window", "2", "--stride", "4"]) == 1
    err = capsys.readouterr().err
    assert "convlens: error:" in err and "stride 4 is larger than the window 2" in err and "Traceback" not in err
    assert main([*base, "--stride", "4"]) == 1  # against the default window (3 px at 24 px)
    err = capsys.readouterr().err
    assert "stride 4 is larger than the window 3" in err and "Traceback" not in err
