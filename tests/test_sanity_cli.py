"""``convlens sanity`` on the demo: the CSV, JSON and figure it writes, and errors named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine.cli


def test_sanity_command_writes_csv_json_and_figure(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    spec, images = demo
    out = tmp_path / "out"
    rc = engine.cli.main(["-q", "sanity", "--model", spec.path, "--images", str(images), "--method", "heatmap",
                          "--layer", "conv2", "--unit", "5", "--n-images", "8", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "Unit heatmap, cascade randomisation, 8 image(s)" in printed and "dense5_2" in printed
    with open(out / "sanity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == ["dense5_1", "dense4", "conv3", "conv2", "conv1"]
    assert rows[2]["randomised"] == "dense5_1 dense4 conv3"
    assert [float(r["ssim_mean"]) for r in rows[:3]] == [1.0, 1.0, 1.0]
    assert float(rows[3]["spearman_abs_mean"]) < 0.6
    data = json.loads((out / "sanity.json").read_text())
    assert data["explanation"] == "heatmap" and data["mode"] == "cascade" and data["images"] == 8
    assert data["outcome"]["spearman_abs"]["drops_at"] == "conv2"
    assert data["dropped_layers"] == ["dense5_2"]
    fig = np.asarray(Image.open(out / "sanity.png").convert("RGB"))
    assert fig.shape[0] > 400 and fig.shape[1] >= 700
    # the plot has coloured lines (one per metric) and the strip has hot maps
    colours = {tuple(c) for c in fig.reshape(-1, 3)[::7].tolist()}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours
    # a second run is served from the cache and gives the same table
    rc = engine.cli.main(["-q", "sanity", "--model", spec.path, "--images", str(images), "--method", "heatmap",
                          "--layer", "conv2", "--unit", "5", "--n-images", "8", "--out", str(tmp_path / "again")])
    assert rc == 0
    assert (tmp_path / "again" / "sanity.csv").read_text() == (out / "sanity.csv").read_text()


def test_sanity_command_independent_gradcam(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    spec, images = demo
    rc = engine.cli.main(["-q", "sanity", "--model", spec.path, "--images", str(images), "--method", "gradcam",
                          "--mode", "independent", "--n-images", "6", "--randomise", "conv3,dense4",
                          "--out", str(tmp_path / "o")])
    assert rc == 0
    data = json.loads((tmp_path / "o" / "sanity.json").read_text())
    assert [s["randomised"] for s in data["steps"]] == ["dense4", "conv3"]
    assert data["params"]["layers"] == ["conv3", "dense4"]


def test_sanity_command_errors_are_named(demo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.setenv("CONVLENS_CACHE", str(tmp_path / "cache"))
    spec, images = demo
    base = ["sanity", "--model", spec.path, "--images", str(images), "--out", str(tmp_path / "o")]
    assert engine.cli.main([*base, "--method", "heatmap"]) == 1
    assert "convlens: error: the heatmap sanity check needs a layer" in capsys.readouterr().err
    assert engine.cli.main([*base, "--method", "heatmap", "--layer", "nosuch"]) == 1
    assert "no layer named 'nosuch'" in capsys.readouterr().err
    assert engine.cli.main([*base, "--method", "gradcam", "--randomise", "nosuch"]) == 1
    assert "layer 'nosuch' to randomise is no module of the model; the layers with weights are: conv1," in capsys.readouterr().err
    assert engine.cli.main([*base, "--method", "gradcam", "--randomise", "prelu1"]) == 1  # a PReLU: no 2-D weight
    err = capsys.readouterr().err
    assert "layer 'prelu1' to randomise owns no weight" in err and "Traceback" not in err
    assert engine.cli.main([*base, "--method", "nope"]) == 2
