"""ConvLens as installed: the console script and the packaged resources, from a built wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project built as a wheel and installed (without dependencies) into a folder of its own."""
    out = tmp_path_factory.mktemp("wheel")
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out / "dist"), str(ROOT)]
    try:
        import setuptools

        if int(setuptools.__version__.split(".")[0]) >= 77:
            build.insert(4, "--no-build-isolation")  # the venv's own setuptools: no download
    except ImportError:
        pass
    proc = subprocess.run(build, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    wheel = next((out / "dist").glob("convlens-*.whl"))
    target = out / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert {"resources/imagenet_classes.txt", "resources/icon.svg", "resources/style.qss"} <= names
    return target


def _env(site: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(site), "QT_QPA_PLATFORM": "offscreen"}


def test_installed_resources_come_from_the_wheel(installed: Path, tmp_path: Path) -> None:
    code = ("import json, resources, gui.app; from PySide6.QtWidgets import QApplication; a = QApplication([]); "
            "gui.app.apply_resources(a); print(json.dumps([resources.__file__, len(resources.imagenet_classes()), "
            "a.windowIcon().isNull(), 'error' in a.styleSheet()]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(installed), timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    where, n, icon_null, styled = json.loads(proc.stdout)
    assert Path(where).is_relative_to(installed) and n == 1000 and not icon_null and styled


def test_installed_console_script_runs_commands(installed: Path, ocr_onnx: Path, tmp_path: Path) -> None:
    script = installed / "bin" / "convlens"
    assert script.is_file()
    env = _env(installed)
    help_ = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=tmp_path,
                           env=env, timeout=120, check=False)
    assert help_.returncode == 0 and "info" in help_.stdout, help_.stderr
    info = subprocess.run([sys.executable, str(script), "info", "--model", str(ocr_onnx), "--input-size", "48x192"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120, check=False)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["format"] == "onnx"


def test_the_venvs_console_script_runs(ocr_onnx: Path, tmp_path: Path) -> None:
    """The ``convlens`` command that scripts/test's set-up installs into the venv."""
    script = Path(sys.executable).with_name("convlens")
    assert script.is_file()
    proc = subprocess.run([str(script), "info", "--model", str(ocr_onnx), "--input-size", "48x192"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["format"] == "onnx"
