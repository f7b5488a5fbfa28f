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
    # the command after any of the CLI's global options (``convlens -q figure ...``)
    lead = 0
    while lead < len(args) and args[lead] in cli_options - {"-h", "--help"}:
        lead += 1
    if lead < len(args) and args[lead] == "figure":  # renders views: lives in gui, not in the engine CLI
        from gui.figure import main as figure_main

        return figure_main(args[lead + 1:], quiet=bool({"-q", "--quiet"} & set(args[:lead])))
    from engine.cli import main as cli_main

    return cli_main(args)


if __name__ == "__main__":
    sys.exit(main())
