"""ConvLens: ``python main.py`` opens the desktop app; ``python main.py <command>`` runs headless.

The console script ``convlens`` is this same entry point.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cli_options = {"-h", "--help", "-q", "--quiet", "-v", "--verbose"}
    if not args or (args[0].startswith("--") and args[0] not in cli_options):
        from gui.app import run

        return run(args)
    if args[0] == "figure":  # renders views: lives in gui, not in the headless engine CLI
        from gui.figure import main as figure_main

        return figure_main(args[1:])
    from engine.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
