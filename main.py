"""ConvLens: ``python main.py`` opens the desktop app; ``python main.py <command>`` runs headless.

The console script ``convlens`` is this same entry point. Every command, ``figure`` included, goes
through :func:`engine.cli.main`; ``figure`` (it renders the app's views) is registered from
:mod:`gui.figure`, which imports Qt only when the command runs.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cli_options = {"-h", "--help", "-q", "--quiet", "-v", "--verbose"}
    if not args or (args[0].startswith("--") and args[0] not in cli_options):
        from gui.app import run

        return run(args)
    from engine.cli import main as cli_main
    from gui.figure import register as register_figure

    return cli_main(args, extra=[register_figure])


if __name__ == "__main__":
    sys.exit(main())
