"""``convlens figure``: a view exported headless through the app's own export code."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

import main as convlens_main

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", CONVLENS_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "figure", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_heatmaps_figure_as_svg_and_png(rnet_spec, demo_images: Path, tmp_path: Path) -> None:
    common = ["--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images),
              "--layer", "conv2", "--unit", "3", "--image", "5"]
    svg = tmp_path / "heat.svg"
    proc = _run([*common, "--out", str(svg)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "propagateSizeHints" not in proc.stderr  # the offscreen platform's noise is not shown
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    assert "conv2 unit 3" in text  # the overlay's caption: the figure shows the asked-for unit
    assert "threshold " in text and root.get("viewBox") == "0 0 504 407"  # colour bar; full width (7 in)
    png = tmp_path / "heat.png"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", CONVLENS_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), "-q", "figure", *common, "--out", str(png),
                           "--dpi", "120"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0 and "wrote" not in proc.stderr, proc.stderr  # global -q before the command
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _svg_texts(path: Path) -> list[str]:
    return ["".join(e.itertext()).strip() for e in ET.parse(path).getroot().iter() if e.tag.endswith("text")]


def test_figure_parts_and_size_declared_by_the_view(rnet_spec, demo_images: Path, tmp_path: Path) -> None:
    """--exclude / --option / --size-preset reach the view's figure (gui.export.export_figure)."""
    svg = tmp_path / "bare.svg"
    proc = _run(["--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images), "--layer", "conv2",
                 "--unit", "3", "--exclude", "colorbar", "--option", "top_images=off", "--size-preset", "column",
                 "--out", str(svg)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    root = ET.parse(svg).getroot()
    assert root.get("viewBox", "").startswith("0 0 252 ")  # a single column: 3.5 in = 252 pt
    texts = _svg_texts(svg)
    assert "rnet.pt: conv2 unit 3" in texts
    assert not any(t.startswith("threshold ") for t in texts)  # no colour bar
    assert not any(t.startswith("max ") for t in texts)  # no top images
    layer = tmp_path / "layer.svg"
    proc = _run(["--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images), "--layer", "conv2",
                 "--kind", "layer", "--out", str(layer)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rnet.pt: conv2, all 48 units" in _svg_texts(layer)


def test_figure_parts_the_view_does_not_declare_are_errors(rnet_spec, demo_images: Path, tmp_path: Path) -> None:
    base = ["--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images)]
    out = tmp_path / "f.svg"
    for extra, needle in (
        (["--include", "legend"], "the Heatmaps figure has no part 'legend' (parts: image, colorbar, top_images, "
                                  "captions)"),
        (["--kind", "layer", "--include", "top_images"], "part 'top_images' belongs to the unit figure"),
        (["--kind", "grid"], "--kind grid: the Heatmaps view has no such figure (figures: unit, layer)"),
        (["--include", "captions", "--exclude", "captions"], "part 'captions' is both included and excluded"),
    ):
        proc = _run([*base, *extra, "--out", str(out)], tmp_path)
        assert proc.returncode == 1 and needle in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr and not out.exists()


def test_unknown_view_and_bad_suffix_fail_clearly(rnet_spec, demo_images: Path, tmp_path: Path) -> None:
    base = ["--model", rnet_spec.path, "--images", str(demo_images)]
    proc = _run(["--view", "nope", *base, "--out", str(tmp_path / "f.pdf")], tmp_path)
    assert proc.returncode == 1 and "no view named 'nope'" in proc.stderr and "heatmaps" in proc.stderr
    proc = _run(["--view", "heatmaps", *base, "--out", str(tmp_path / "f.gif")], tmp_path)
    assert proc.returncode == 1 and "must be .png, .svg or .pdf" in proc.stderr
    assert not (tmp_path / "f.gif").exists()


@pytest.mark.parametrize(("opt", "value", "needle"), [
    ("--size", "abc", "argument --size: expected WIDTHxHEIGHT in pixels such as 1400x900, got 'abc'"),
    ("--size", "10x900", "argument --size: width and height must be from 100 to 8000 pixels"),
    ("--dpi", "0", "argument --dpi: must be from 1 to 1200, got 0"),
    ("--dpi", "-300", "argument --dpi: must be from 1 to 1200"),
    ("--unit", "-1", "argument --unit: must be at least 0, got -1"),
    ("--image", "x", "argument --image: expected a whole number, got 'x'"),
    ("--timeout", "0", "argument --timeout: must be a positive number"),
    ("--option", "captions", "argument --option: expected PART=on or PART=off, got 'captions'"),
    ("--size-preset", "a4", "argument --size-preset: invalid choice: 'a4'"),
    ("--width-in", "0.5", "argument --width-in: must be in [1, 40], got 0.5"),
])
def test_figure_options_are_usage_errors(opt, value, needle, rnet_spec, demo_images: Path, tmp_path: Path,
                                         capsys) -> None:
    out = tmp_path / "f.png"
    argv = ["figure", "--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images),
            "--out", str(out), opt, value]
    assert convlens_main.main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_figure_out_checked_before_the_window_opens(rnet_spec, demo_images: Path, tmp_path: Path,
                                                    capsys) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    (tmp_path / "dir.png").mkdir()
    for out, needle in ((tmp_path / "dir.png", "is a folder; --out names the figure to write"),
                        (notes / "f.png", "notes.txt is a file, not a folder")):
        argv = ["figure", "--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images),
                "--out", str(out)]
        assert convlens_main.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"convlens: error: {out}: ") and needle in err, err
    assert notes.read_text() == "mine"


def test_unknown_layer_unit_or_image_fails_before_export(rnet_spec, demo_images: Path, tmp_path: Path) -> None:
    base = ["--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images)]
    out = tmp_path / "f.png"
    for extra, needle in (
        (["--layer", "conv9"], "no layer named 'conv9' (layers: conv1, prelu1, pool1, conv2"),
        (["--layer", "conv2", "--unit", "9999"], "--unit 9999: layer 'conv2' has 48 units (0 to 47)"),
        (["--unit", "64"], "--unit 64: layer 'conv3' has 64 units (0 to 63)"),  # the default layer
        (["--image", "200"], f"--image 200: {demo_images} has 200 images (0 to 199)"),
    ):
        proc = _run([*base, *extra, "--out", str(out)], tmp_path)
        assert proc.returncode == 1, (extra, proc.stderr)
        assert "convlens: error: " in proc.stderr and needle in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr and not out.exists()


def test_figure_names_the_values_it_assumed(ocr_onnx: Path, demo_images: Path, tmp_path: Path) -> None:
    """A dynamic-input ONNX model: the figure says which preprocessing was assumed, as every command does."""
    out = tmp_path / "f.png"
    proc = _run(["--view", "images", "--model", str(ocr_onnx), "--images", str(demo_images), "--out", str(out),
                 "--dpi", "50"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("assumed input size 224x224, mean 0.485,0.456,0.406") == 1, proc.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
