"""ConvLens: ``python main.py`` opens the desktop app; ``python main.py <command>`` runs headless.

The console script ``convlens`` is this same entry point.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0].startswith("--open") or args[0] in ("--demo", "--project"):
        from gui.app import run

        return run(args)
    from engine.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
