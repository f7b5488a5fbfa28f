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


GUI_CHECK = """
import importlib, pkgutil, sys
for name in ("torch", "torchvision", "onnxruntime", "onnx"):
    sys.modules[name] = None  # a module-level import of these in gui/ now raises ImportError
import gui
mods = [m.name for m in pkgutil.walk_packages(gui.__path__, "gui.")]
for m in mods:
    importlib.import_module(m)
print(len(mods))
"""


def test_every_gui_module_imports_without_torch() -> None:
    """The window appears before torch is imported: no gui module imports torch, torchvision or ONNX
    at module level (they load on the worker, inside functions)."""
    proc = subprocess.run([sys.executable, "-c", GUI_CHECK], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**__import__("os").environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.strip()) >= 10


def _imported_modules(path: Path) -> set[str]:
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join([*parts, base]) if base else ".".join(parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_views_do_not_import_each_other() -> None:
    """Views talk through the shared selection: no view module imports another view."""
    views = ROOT / "gui" / "views"
    names = {p.stem if p.is_file() else p.name for p in views.iterdir()
             if not p.name.startswith(("_", ".")) and p.name != "base.py" and (p.suffix == ".py" or p.is_dir())}
    names.discard("__pycache__")
    assert {"heatmaps", "dissection", "image_browser"} <= names
    for name in names:
        files = [views / f"{name}.py"] if (views / f"{name}.py").is_file() else sorted((views / name).rglob("*.py"))
        for f in files:
            others = {m for m in _imported_modules(f) for o in names - {name}
                      if m == f"gui.views.{o}" or m.startswith(f"gui.views.{o}.")}
            assert not others, f"{f.relative_to(ROOT)} imports {sorted(others)}"
