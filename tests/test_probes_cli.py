"""``convlens probe`` on the demo RNet and on a torchvision ResNet-18 (random weights, small input):
the files it writes, what they hold, the printed table, and clear errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import engine.cli


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_probe_cli_on_the_demo(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    spec, images = demo
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    face = images / "face" / "003.png"
    rc = engine.cli.main(["-q", "probe", "--model", spec.path, "--images", str(images), "--transform", "rotate",
                          "--range", "-20:20:10", "--image", str(face), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "conv1" in printed and "conv3" in printed and "inv@-20" in printed and "(model input)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 200 and summary["values"] == [-20.0, -10.0, 0.0, 10.0, 20.0]
    assert [row["layer"] for row in summary["layers"]] == ["conv1", "conv2", "conv3"]
    assert summary["n_train"] == 140 and summary["n_test"] == 60
    inv = {(r["layer"], float(r["value"])): r for r in _read_csv(out / "invariance.csv")}
    assert float(inv[("conv2", 0.0)]["invariance_mean"]) == 0.0
    assert float(inv[("conv2", 20.0)]["invariance_mean"]) > float(inv[("conv2", 10.0)]["invariance_mean"]) > 0
    assert float(inv[("conv2", 20.0)]["linear_test_error"]) < float(inv[("conv2", 20.0)]["identity_map_error"])
    comp = _read_csv(out / "composition.csv")
    assert {(r["a"], r["b"], r["composed"]) for r in comp if r["layer"] == "conv1"} == {
        ("-20", "10", "-10"), ("-20", "20", "0"), ("-10", "-10", "-20"), ("-10", "10", "0"), ("-10", "20", "10"),
        ("10", "10", "20")}
    preds = _read_csv(out / "predictions.csv")
    assert len(preds) == 200 * 5 and {r["predicted"] for r in preds} <= {"face", "non-face"}
    resp = _read_csv(out / "responses.csv")
    assert len(resp) == 28 + 48 + 64 and set(resp[0]) >= {"layer", "unit", "untransformed", "-20", "20"}
    for name in ("invariance.png", "responses.png", "sweep.png"):
        with Image.open(out / name) as im:
            assert im.width > 300 and im.height > 100
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # drawn, not blank
    # a repeat comes from the cache and writes the same numbers
    rc = engine.cli.main(["-q", "probe", "--model", spec.path, "--images", str(images), "--range=-20:20:10", "--image",
                          str(face), "--out", str(tmp_path / "again")])
    assert rc == 0
    assert (tmp_path / "again" / "invariance.csv").read_text() == (out / "invariance.csv").read_text()


def test_probe_cli_on_resnet18_and_one_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=4).state_dict(), tmp_path / "r18.pt")
    rng = np.random.default_rng(0)
    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3)).astype(np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "out"
    rc = engine.cli.main(["-q", "probe", "--model", str(tmp_path / "r18.pt"), "--arch", "resnet18", "--num-classes",
                          "4", "--input-size", "32", "--images", str(folder), "--transform", "translate-x",
                          "--range", "-2:2:1", "--fill", "wrap", "--features", "flat", "--projection", "1024",
                          "--layers", "layer1,layer2,layer4", "--out", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [row["layer"] for row in summary["layers"]] == ["layer1", "layer2", "layer4"]
    assert "layer1: 4096 -> 1024 (random projection)" in summary["features"]
    assert [row["feature_dim"] for row in summary["layers"]] == [1024, 1024, 512]
    assert summary["layers"][2]["feature_dim"] == 512  # layer4 at 32 px: 512 x 1 x 1, kept whole
    # one image: invariance and predictions, no linear maps (nothing to fit and test on)
    rc = engine.cli.main(["-q", "probe", "--model", str(tmp_path / "r18.pt"), "--arch", "resnet18", "--num-classes",
                          "4", "--input-size", "32", "--images", str(folder / "03.png"), "--transform", "brightness",
                          "--range", "-0.2,0,0.2", "--layers", "layer1,layer4", "--out", str(tmp_path / "one")])
    assert rc == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert one["images"] == 1 and "linear_test_error" not in one["layers"][0]
    assert one["layers"][0]["invariance"][1] == 0.0 and one["layers"][0]["invariance"][0] > 0
    rows = _read_csv(tmp_path / "one" / "invariance.csv")
    assert rows[0]["linear_test_error"] == "" and "n/a" in capsys.readouterr().out


def test_probe_cli_errors(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    spec, images = demo
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    base = ["probe", "--model", spec.path, "--images", str(images), "--out", str(tmp_path / "o")]
    for extra, want in ((["--range", "5:1:1"], "range"), (["--layers", "nosuch"], "nosuch"),
                        (["--transform", "scale", "--range", "-1:1:1"], "positive"),
                        (["--image", str(tmp_path / "x.png"), "--max-images", "3"], "x.png")):
        rc = engine.cli.main([*base, *extra])
        err = capsys.readouterr().err
        assert rc == 1, extra
        assert "convlens: error:" in err and want in err and "Traceback" not in err


def test_probe_cli_on_an_onnx_model(ocr_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Any backend: the probe captures ONNX tensors in the same forward pass."""
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    folder = tmp_path / "img"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (48, 192, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    rc = engine.cli.main(["-q", "probe", "--model", str(ocr_onnx), "--input-size", "48x192", "--images", str(folder),
                          "--transform", "translate-x", "--range", "-4:4:4", "--out", str(tmp_path / "out")])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == 6 and len(summary["layers"]) >= 2
    for row in summary["layers"]:
        assert row["invariance"][1] == 0.0 and row["invariance"][0] > 0 and row["invariance"][2] > 0
    assert summary["layers"][0]["layer"] in capsys.readouterr().out
