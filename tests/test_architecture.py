"""The engine is headless: it imports with Qt made unimportable, and no engine file names Qt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECK = """
import importlib, pkgutil, sys
for name in ("PySide6", "shiboken6", "pyqtgraph", "gui"):
    sys.modules[name] = None  # any import of these now raises ImportError
import engine
mods = [m.name for m in pkgutil.walk_packages(engine.__path__, "engine.")]
for m in mods:
    importlib.import_module(m)
print(len(mods))
"""


def test_every_engine_module_imports_without_qt() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 10


def test_import_linter_contract_holds() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 kept, 0 broken" in proc.stdout
