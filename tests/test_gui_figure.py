"""``convlens figure``: a view exported headless through the app's own export code."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", CONVLENS_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, str(ROOT / "main.py"), "figure", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def test_heatmaps_figure_as_svg_and_png(rnet_spec, demo_images: Path, tmp_path: Path) -> None:  # noqa: ANN001
    common = ["--view", "heatmaps", "--model", rnet_spec.path, "--images", str(demo_images),
              "--layer", "conv2", "--unit", "3", "--image", "5"]
    svg = tmp_path / "heat.svg"
    proc = _run([*common, "--out", str(svg)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg")
    text = svg.read_text()
    assert "conv2 unit 3" in text  # the overlay's caption: the figure shows the asked-for unit
    png = tmp_path / "heat.png"
    assert _run([*common, "--out", str(png), "--dpi", "120"], tmp_path).returncode == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_view_and_bad_suffix_fail_clearly(rnet_spec, demo_images: Path, tmp_path: Path) -> None:  # noqa: ANN001
    base = ["--model", rnet_spec.path, "--images", str(demo_images)]
    proc = _run(["--view", "nope", *base, "--out", str(tmp_path / "f.pdf")], tmp_path)
    assert proc.returncode == 1 and "no view named 'nope'" in proc.stderr and "heatmaps" in proc.stderr
    proc = _run(["--view", "heatmaps", *base, "--out", str(tmp_path / "f.gif")], tmp_path)
    assert proc.returncode == 1 and "must be .png, .svg or .pdf" in proc.stderr
    assert not (tmp_path / "f.gif").exists()
