"""Honest defaults, on models nobody here wrote: MTCNN ONet (three outputs), PaddleOCR's text
detector (a map, not class scores) and direction classifier (dynamic input size), a torchvision
ResNet-18 with 1000 outputs. The output used, the values assumed and unmatched labels are said."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.cli import main

ONET_WEIGHTS = ("facenet-pytorch", "2.6.0", "facenet_pytorch/data/onet.pt")
OCR_DET_ONNX = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx")

# facenet-pytorch's ONet, written here to match the wheel's state dict: (box, landmarks, face prob)
ONET_PY = '''
import torch
from torch import nn


class ONet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous().flatten(1)
        x = self.prelu5(self.dense5(x))
        return self.dense6_2(x), self.dense6_3(x), self.softmax6_1(self.dense6_1(x))
'''
ONET_OUTPUTS = "has 3 outputs (0: (4,) 4 values; 1: (10,) 10 values; 2: (2,) probabilities over 2)"
MTCNN_NORM = ["--mean", "0.5,0.5,0.5", "--std", "0.50196,0.50196,0.50196", "--channels", "rgb"]


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def onet(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(weights, architecture) of MTCNN's ONet."""
    from engine.assets import wheel_member

    folder = tmp_path_factory.mktemp("onet")
    (folder / "onet_arch.py").write_text(ONET_PY)
    return str(wheel_member(*ONET_WEIGHTS)), f"{folder / 'onet_arch.py'}:ONet"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    cap = capsys.readouterr()
    assert "Traceback" not in cap.err
    return code, cap.out, cap.err


def test_onet_with_only_arch_fails_on_the_assumed_size_and_says_which_option(onet, demo_images: Path, tmp_path,
                                                                              capsys) -> None:
    weights, arch = onet
    code, _, err = _run(["-q", "predict", "--model", weights, "--arch", arch, "--images", str(demo_images),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 1
    assert "convlens: warning: onet.pt: assumed input size 224x224, mean 0.485,0.456,0.406" in err
    assert "the model failed on a batch of shape (1, 3, 224, 224)" in err
    assert "the input size 224x224 was assumed: give the size the model was trained at with --input-size HxW" in err


def test_onet_outputs_named_and_the_probabilities_chosen(onet, capsys) -> None:
    weights, arch = onet
    code, out, err = _run(["info", "--model", weights, "--arch", arch, "--input-size", "48"], capsys)
    assert code == 0, err
    assert f"convlens: warning: onet.pt {ONET_OUTPUTS}; using output 2 as the class scores (its values are " \
           "probabilities); --output-index N chooses another" in err
    info = json.loads(out)
    assert info["output_index"] == 2 and info["score_kind"] == "probs"
    assert [o["shape"] for o in info["outputs"]] == [[4], [10], [2]]
    assert info["assumed"] == {"mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225", "channels": "rgb"}


def test_onet_with_two_class_names_predicts_faces_from_output_2(onet, demo_images: Path, tmp_path: Path,
                                                               capsys) -> None:
    weights, arch = onet
    classes = tmp_path / "classes.txt"
    classes.write_text("non-face\nface\n")
    out = tmp_path / "o"
    code, _, err = _run(["-q", "predict", "--model", weights, "--arch", arch, "--classes", str(classes),
                         "--input-size", "48", *MTCNN_NORM, "--images", str(demo_images), "--out", str(out)], capsys)
    assert code == 0, err
    assert f"{ONET_OUTPUTS}; using output 2 as the class scores (its size matches the 2 class names; its values " \
           "are probabilities)" in err
    assert "assumed" not in err  # size, mean, std and channels all given
    summary = json.loads((out / "summary.json").read_text())
    assert summary["output_index"] == 2 and summary["classes"] == ["non-face", "face"]
    assert summary["scored"] == 200 and summary["accuracy"] > 0.9 and summary["score_kind"] == "probs"
    # output 2 named explicitly: used as given, nothing to warn about
    code, _, err = _run(["-q", "predict", "--model", weights, "--arch", arch, "--classes", str(classes),
                         "--input-size", "48", *MTCNN_NORM, "--output-index", "2", "--images", str(demo_images),
                         "--out", str(out)], capsys)
    assert code == 0 and err == "", err


def _few_images(demo_images: Path, root: Path, labels: tuple[str, ...] = ("180", "0")) -> Path:
    for label, src in zip(labels, ("face", "non-face"), strict=True):
        (root / label).mkdir(parents=True)
        for p in sorted((demo_images / src).iterdir())[:3]:
            shutil.copy(p, root / label / p.name)
    return root


def test_text_detector_map_is_not_class_scores(demo_images: Path, tmp_path: Path, capsys) -> None:
    from engine.assets import wheel_member

    det = str(wheel_member(*OCR_DET_ONNX))
    imgs = _few_images(demo_images, tmp_path / "imgs")  # a folder named "180" is not class 180
    out = tmp_path / "o"
    code, _, err = _run(["predict", "--model", det, "--images", str(imgs), "--out", str(out)], capsys)
    assert code == 0, err
    assert "ch_PP-OCRv4_det_infer.onnx: its output (1, 224, 224) is a map, not class scores: no predictions or " \
           "accuracy" in err
    assert "accuracy " not in err.replace("or accuracy", "") and "the model's output is not class scores" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] is None and summary["classes"] is None and summary["class_scores"] is False
    assert summary["outputs"] == [{"index": 0, "shape": [1, 224, 224], "kind": "map", "score_kind": None}]
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and set(rows[0]) == {"path", "label", "status"}
    # activations (what heatmaps and dissection read) still work
    code, _, err = _run(["-q", "activations", "--model", det, "--images", str(imgs), "--out", str(tmp_path / "a")],
                        capsys)
    assert code == 0, err
    acts = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert acts["valid"] == 6 and acts["layers"]


def test_info_lists_assumed_values_of_a_dynamic_input_onnx(ocr_onnx: Path, capsys) -> None:
    code, out, err = _run(["info", "--model", str(ocr_onnx)], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["assumed"] == {"input_size": "224x224", "mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225",
                               "channels": "rgb"}
    assert err.count("assumed") == 1 and "assumed input size 224x224" in err and "--input-size HxW" in err
    code, out, err = _run(["info", "--model", str(ocr_onnx), "--input-size", "48x192", "--mean", "0.5,0.5,0.5",
                           "--std", "0.5,0.5,0.5", "--channels", "bgr"], capsys)
    assert code == 0 and err == "", err
    info = json.loads(out)
    assert info["assumed"] == {} and info["output_index"] == 0 and info["outputs"][0]["shape"] == [2]


def test_labels_that_match_no_class_are_named(rnet_spec, demo_images: Path, tmp_path: Path, capsys) -> None:
    imgs = _few_images(demo_images, tmp_path / "imgs", ("gesicht", "kein-gesicht"))
    code, _, err = _run(["predict", "--model", rnet_spec.path, "--images", str(imgs), "--out", str(tmp_path / "o")],
                        capsys)
    assert code == 0, err
    assert "6 images: no accuracy: no label matches a class name (labels: gesicht, kein-gesicht; classes: " \
           "non-face, face; give the names with --classes)" in err


def test_torchvision_1000_outputs_get_imagenet_names(demo_images: Path, tmp_path: Path, capsys) -> None:
    import torch
    from safetensors.torch import save_file
    from torchvision.models import resnet18

    from resources import imagenet_classes

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.safetensors"
    save_file(resnet18().state_dict(), str(weights))
    code, out, err = _run(["info", "--model", str(weights), "--arch", "resnet18"], capsys)
    assert code == 0, err
    info = json.loads(out)
    assert info["classes"] == list(imagenet_classes()) and info["classes"][0] == "tench"
    assert info["assumed"] == {}  # torchvision's own size and normalisation
    imgs = _few_images(demo_images, tmp_path / "imgs")
    code, _, err = _run(["-q", "predict", "--model", str(weights), "--arch", "resnet18", "--images", str(imgs),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    with open(tmp_path / "o" / "predictions.csv", newline="") as f:
        predicted = {r["predicted"] for r in csv.DictReader(f)}
    assert predicted and predicted <= set(imagenet_classes())


def test_output_rule_on_shapes() -> None:
    from engine.predict import choose_output, describe_output

    rng = np.random.default_rng(0)
    assert describe_output(0, rng.normal(size=(2, 5, 1, 1))).kind == "scores"  # (N, K, 1, 1): K classes
    assert describe_output(0, rng.normal(size=(2, 1))).kind == "single"
    assert describe_output(0, rng.normal(size=(2, 3, 4, 4))).kind == "map"
    logits, probs = rng.normal(size=(2, 4)), np.full((2, 4), 0.25)
    assert choose_output([logits, probs]).index == 1  # probabilities preferred
    assert choose_output([logits, probs], n_classes=4).index == 1
    assert choose_output([rng.normal(size=(2, 3)), logits], n_classes=4).index == 1  # size matches the names
    assert choose_output([logits, probs], given=0).index == 0
    assert choose_output([rng.normal(size=(2, 1, 8, 8))]).index is None


def test_one_default_for_the_builtin_concept_set() -> None:
    import argparse

    from engine.concepts import BUILTIN_DEFAULT_IMAGES
    from engine.dissection.cli import register

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    assert sub.choices["dissect"].get_default("builtin_images") == BUILTIN_DEFAULT_IMAGES
