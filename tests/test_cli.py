"""The headless command line, as a user runs it."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_info_on_a_third_party_onnx_lists_layers(ocr_onnx: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", str(ocr_onnx), "--input-size", "48x192"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "onnx" and info["backend"] == "onnxruntime" and info["gradients"] is False
    convs = [li for li in info["layers"] if li["kind"] == "Conv"]
    assert len(convs) > 20 and all(len(li["shape"]) == 3 for li in convs)
    assert info["input_shape"] == [None, 3, 48, 192]


def test_predict_writes_csv_and_accuracy(rnet_spec, demo_images: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["-q", "predict", "--model", rnet_spec.path, "--images", str(demo_images), "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 200 and all(r["correct"] == "true" and r["status"] == "ok" for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == 1.0 and summary["classes"] == ["non-face", "face"]


def test_activations_writes_unit_tables(rnet_spec, demo_images: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "acts"
    assert main(["-q", "activations", "--model", rnet_spec.path, "--images", str(demo_images),
                 "--layers", "conv2,conv3", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "conv3_units.csv").read_text().splitlines()))
    assert len(rows) == 64 and all(r["top_images"] for r in rows)
    top = json.loads((out / "conv2_top.json").read_text())
    assert len(top) == 48 and len(top["0"]) == 16
    assert json.loads((out / "summary.json").read_text())["valid"] == 200


@pytest.mark.parametrize(("argv", "needle"), [
    (["info", "--model", "/no/such/model.pt"], "/no/such/model.pt: no such file"),
    (["predict", "--model", "{rnet}", "--images", "/no/such/dir", "--out", "{tmp}"], "/no/such/dir"),
    (["activations", "--model", "{rnet}", "--images", "{imgs}", "--layers", "conv9", "--out", "{tmp}"],
     "no layer named 'conv9'"),
    (["info", "--model", "{rnet}", "--mean", "127.5,127.5,127.5"], "[0, 1] pixel units"),
])
def test_bad_input_gives_one_line_and_exit_1(argv, needle, rnet_spec, demo_images, tmp_path, capsys) -> None:
    argv = [a.format(rnet=rnet_spec.path, imgs=demo_images, tmp=tmp_path) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and err.startswith("convlens: error:")


def test_console_entry_point_runs_headless(ocr_onnx: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "info", "--model", str(ocr_onnx),
                           "--input-size", "48x192"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "onnx"
    bad = subprocess.run([sys.executable, str(ROOT / "main.py"), "predict"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "--model" in bad.stderr


def test_out_that_is_a_file_fails_before_any_work(rnet_spec, demo_images: Path, tmp_path: Path, capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for cmd in (["predict"], ["activations", "--layers", "conv1"]):
        argv = [*cmd, "--model", rnet_spec.path, "--images", str(demo_images), "--out", str(notes)]
        assert main(argv) == 1
        assert "exists and is not a folder" in capsys.readouterr().err
    assert notes.read_text() == "mine"


def test_no_strict_still_refuses_weights_that_fit_nothing(tmp_path: Path, capsys) -> None:
    import torch
    import torchvision

    path = tmp_path / "r18.pt"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), path)
    assert main(["info", "--model", str(path), "--arch", "vgg11", "--no-strict"]) == 1
    assert "none of its" in capsys.readouterr().err
    assert main(["info", "--model", str(path), "--arch", "resnet18", "--num-classes", "5", "--no-strict"]) == 0
    err = capsys.readouterr().err
    assert "convlens: warning: loaded non-strictly" in err and "fc.weight" in err


def test_cache_command_reports_and_clears(rnet_spec, demo_images: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    assert main(["-q", "activations", "--model", rnet_spec.path, "--images", str(demo_images), "--layers", "conv3",
                 "--out", str(tmp_path / "o")]) == 0
    capsys.readouterr()
    assert main(["cache"]) == 0
    usage = json.loads(capsys.readouterr().out)
    # per-layer cache: one entry for the model outputs, one for conv3
    assert usage["kinds"]["activations"]["entries"] == 2 and usage["total_bytes"] > 200 * 64 * 9 * 2
    assert main(["-q", "cache", "--clear", "activations"]) == 0
    assert "activations" not in json.loads(capsys.readouterr().out)["kinds"]


def test_cache_command_removes_what_killed_runs_left(tmp_path: Path, monkeypatch, capsys) -> None:
    from engine.cache import Cache

    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    cache = Cache()
    with cache.write("activations", "k1") as tmp:  # a complete entry, so the root is ConvLens's
        (tmp / "meta.json").write_text("{}")
    left = cache.root / "activations" / ".k2.tmp-deadbeef"  # a writer killed mid-write: no live owner
    left.mkdir()
    (left / ".owner").write_text('{"pid": 999999}')  # its writer's lock died with it
    (left / "maps_conv1.npy").write_bytes(b"\0" * 100_000)
    assert main(["cache"]) == 0
    out = capsys.readouterr()
    usage = json.loads(out.out)
    assert not left.exists() and "interrupted runs" in out.err
    assert usage["temporary_bytes"] == 0 and usage["kinds"]["activations"]["entries"] == 1
