"""Headless command line: ``convlens <command> ...``. Every command writes machine-readable output.

Commands are found, not listed: every package ``engine/<name>/`` with a ``cli`` module that
defines ``register(subparsers)`` adds its command(s) (the built-in ones are
``engine/commands/cli.py``); see :mod:`engine.cli_common` for what a command shares. Building
the parser imports only those ``cli`` modules and their packages, so ``convlens --help`` and
``convlens cache`` load neither torch nor ONNX Runtime: a package with a command keeps its
``__init__`` light (PEP 562 ``__getattr__`` for what needs torch).

Exit codes: 0 success, 1 a problem with the input (the message names the file and the cause),
2 a usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import pkgutil
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

# the shared helpers, under their old home too (``from engine.cli import add_model_options``)
from .cli_common import (  # noqa: F401
    EXIT_INPUT,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ProgressBar,
    _emit_json,
    _listed,
    _made_dirs,
    _say,
    _SkipLogFilter,
    _user_path,
    _why,
    add_model_options,
    check_out_dir,
    check_out_file,
    check_out_parent,
    emit_json,
    error,
    float_range,
    int_range,
    listed_count,
    non_negative_int,
    open_model,
    parse_layers,
    positive_float,
    positive_int,
    report_skipped,
    run_job,
    say,
    shown,
    skipped_files,
    spec_from_args,
    user_path,
    warn,
    write_json_output,
    write_text_output,
    writing,
)
from .types import ConvLensError

Registrar = Callable[[Any], None]

#: command name -> its function, filled by :func:`build_parser`
COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def discover_commands() -> list[Registrar]:
    """``register`` of every ``engine.<package>.cli`` module, built-in commands first, then by
    the module's ``ORDER`` (default 100) and package name. A package is imported only when it
    has a ``cli`` module."""
    import engine

    found: list[tuple[int, str, Registrar]] = []
    for pkg in pkgutil.iter_modules(engine.__path__):
        if not pkg.ispkg:
            continue
        folder = [str(Path(p) / pkg.name) for p in engine.__path__]
        if not any(m.name == "cli" for m in pkgutil.iter_modules(folder)):
            continue
        mod = importlib.import_module(f"engine.{pkg.name}.cli")
        register = getattr(mod, "register", None)
        if callable(register):
            found.append((int(getattr(mod, "ORDER", 100)), pkg.name, register))
    return [r for _, _, r in sorted(found, key=lambda t: (t[0], t[1]))]


def build_parser(extra: Iterable[Registrar] = ()) -> argparse.ArgumentParser:
    """The ``convlens`` parser: every discovered command, then those of ``extra`` (``main.py``
    adds ``figure`` from :mod:`gui.figure`, which the headless engine cannot import)."""
    p = argparse.ArgumentParser(prog="convlens", description="See why your CNN decides what it decides. "
                                "Without a command, opens the desktop app.",
                                epilog="The app: convlens [--demo] [--open-model FILE] [--open-images DIR] "
                                "[--open-project FILE]. Each command has its own --help.")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="command")
    for register in [*discover_commands(), *extra]:
        register(sub)
    for name, sp in sub.choices.items():
        func = sp.get_default("func")
        if func is not None:
            COMMANDS[name] = func
    return p


def main(argv: Sequence[str] | None = None, extra: Iterable[Registrar] = ()) -> int:
    parser = build_parser(extra)
    try:
        a = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (argparse printed it; exit 2) or --help (exit 0)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.WARNING,
                        format="convlens: %(levelname)s: %(message)s")
    if not getattr(a, "func", None):
        parser.print_help()
        return EXIT_USAGE
    _made_dirs.clear()
    code = EXIT_INPUT
    data_log, skip_filter = logging.getLogger("convlens.data"), _SkipLogFilter()
    # for this command only (the logger outlives it when main is called in-process), and only for
    # a command that names its skipped files itself
    filtering = getattr(a, "names_skipped", False) and not a.verbose
    if filtering:
        data_log.addFilter(skip_filter)
    try:
        code = a.func(a)
        return code
    except ConvLensError as e:
        error(e)
        return EXIT_INPUT
    except BrokenPipeError:  # e.g. `convlens info ... | head`: the reader left, nothing to report
        with contextlib.suppress(OSError):
            sys.stderr.close()
        code = EXIT_OK
        return EXIT_OK
    except OSError as e:  # a write that failed outside ``writing``: name the user's file, not a temporary
        where = f"{user_path(e.filename)}: " if e.filename else ""
        error(f"{where}{_why(e)}")
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("convlens: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if filtering:
            data_log.removeFilter(skip_filter)
        if code != EXIT_OK:  # folders made for outputs that never came: leave no empty folder behind
            for d in reversed(_made_dirs):
                with contextlib.suppress(OSError):
                    d.rmdir()
        _made_dirs.clear()

