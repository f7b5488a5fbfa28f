"""One registry for the command line: commands are found, not listed; ``--help`` and ``cache``
load neither torch, ONNX Runtime nor Qt; the shared helpers live in a module that imports no
method."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = """
import runpy, sys
for name in ("torch", "torchvision", "onnxruntime", "onnx", "PySide6", "shiboken6", "pyqtgraph"):
    sys.modules[name] = None  # any import of these now raises ImportError
sys.argv = ["main.py", *sys.argv[1:]]
runpy.run_path("main.py", run_name="__main__")
"""


def _blocked(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, CONVLENS_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-c", BLOCKED, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=300)


def _registered() -> set[str]:
    """Every command a discovered ``register`` adds, and figure (added by main.py)."""
    import argparse

    from engine.cli import discover_commands

    sub = argparse.ArgumentParser().add_subparsers()
    for register in discover_commands():
        register(sub)
    return {*sub.choices, "figure"}


def test_help_lists_every_command_without_torch_onnx_or_qt(tmp_path: Path) -> None:
    proc = _blocked(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    listed = {line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()}
    names = _registered()
    assert {"info", "predict", "activations", "demo", "cache", "dissect", "figure"} <= names
    assert names <= listed, proc.stdout


@pytest.mark.parametrize("command", ["dissect", "figure", "predict"])
def test_each_commands_help_without_torch_onnx_or_qt(command: str, tmp_path: Path) -> None:
    proc = _blocked([command, "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"usage: convlens {command}" in proc.stdout and "--model" in proc.stdout


def test_cache_runs_without_torch_onnx_or_qt(tmp_path: Path) -> None:
    proc = _blocked(["cache"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["root"] == str(tmp_path / "cache") and info["total_bytes"] == 0


def test_a_new_method_package_is_found_without_editing_any_shared_file(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:
    """A package ``engine/<method>/`` with a ``cli.py`` defining ``register`` adds its command."""
    import engine
    from engine.cli import main

    pkg = tmp_path / "engine_more" / "hello"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A method."""\n')
    (pkg / "cli.py").write_text(
        "from engine.cli_common import EXIT_OK, add_model_options, say\n"
        "def register(subparsers):\n"
        "    sp = subparsers.add_parser('hello', help='say hello', description='say hello')\n"
        "    sp.add_argument('--name', required=True)\n"
        "    sp.set_defaults(func=lambda a: say(a, f'hello {a.name}') or EXIT_OK)\n")
    (tmp_path / "engine_more" / "nocli").mkdir()  # a package without cli.py is not imported
    (tmp_path / "engine_more" / "nocli" / "__init__.py").write_text("raise ImportError('imported')\n")
    monkeypatch.setattr(engine, "__path__", [*engine.__path__, str(tmp_path / "engine_more")])
    try:
        assert main(["--help"]) == 0
        assert "say hello" in capsys.readouterr().out
        assert main(["hello", "--name", "you"]) == 0
        assert capsys.readouterr().err == "hello you\n"
        assert main(["-q", "hello", "--name", "you"]) == 0
        assert capsys.readouterr().err == ""
    finally:
        for name in [m for m in sys.modules if m.startswith("engine.hello")]:
            del sys.modules[name]


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ("." * node.level) + (node.module or "")
            found.add(base)
    return found


def test_shared_helpers_import_no_method_and_methods_do_not_import_engine_cli() -> None:
    methods = {p.name for p in (ROOT / "engine").iterdir() if (p / "cli.py").is_file()}
    assert {"commands", "dissection"} <= methods
    common = _imports(ROOT / "engine" / "cli_common.py")
    assert not {m for m in common for meth in methods if meth in m.split(".")}, common
    assert not {m for m in common if m.split(".")[0] in ("torch", "onnxruntime")}
    for meth in methods:  # the cycle engine.cli <-> engine.<method>.cli is gone
        used = _imports(ROOT / "engine" / meth / "cli.py")
        assert "engine.cli" not in used and "..cli" not in used, (meth, used)


def test_helpers_keep_their_old_home() -> None:
    """Code written against ``from engine.cli import ...`` keeps working: the same objects."""
    import engine.cli
    import engine.cli_common

    for name in ("add_model_options", "spec_from_args", "open_model", "run_job", "check_out_dir", "check_out_file",
                 "check_out_parent", "parse_layers", "ProgressBar", "EXIT_OK", "EXIT_INPUT", "writing",
                 "write_json_output", "report_skipped", "shown", "error", "warn", "int_range", "float_range"):
        assert getattr(engine.cli, name) is getattr(engine.cli_common, name), name
