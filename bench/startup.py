"""Start-up time: from launching ``python main.py`` to the main window on screen.

    .venv/bin/python bench/startup.py [--runs 5]

Uses the real display when $DISPLAY is set (e.g. under xvfb-run), else Qt's offscreen platform.
Also reports whether torch / onnxruntime were imported before the window appeared (they must
not be: they load lazily in the worker).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import sys, runpy; sys.argv=['main.py','--quit-after','0.3']; "
    "from PySide6.QtCore import QTimer\n"
    "import gui.app as a\n"
    "orig = a.run\n"
    "def run(argv=None):\n"
    "    QTimer.singleShot(0, lambda: print('heavy', 'torch' in sys.modules, 'onnxruntime' in sys.modules, file=sys.stderr, flush=True))\n"
    "    return orig(argv)\n"
    "a.run = run\n"
    "runpy.run_path('main.py', run_name='__main__')\n"
)


def one(env: dict[str, str]) -> tuple[float, str]:
    t0 = time.time()
    proc = subprocess.run([sys.executable, "main.py", "--quit-after", "0.3"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    for line in proc.stderr.splitlines():
        if line.startswith("convlens-window-shown"):
            return float(line.split()[1]) - t0, ""
    return float("nan"), proc.stderr[-500:]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    env = dict(os.environ, CONVLENS_REPORT_STARTUP="1")
    platform = "xcb (" + env["DISPLAY"] + ")" if env.get("DISPLAY") else "offscreen"
    if not env.get("DISPLAY"):
        env["QT_QPA_PLATFORM"] = "offscreen"
    times = []
    for _ in range(a.runs):
        t, err = one(env)
        if err:
            print(err, file=sys.stderr)
        times.append(t)
    heavy = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    flags = next((ln.split()[1:] for ln in heavy.stderr.splitlines() if ln.startswith("heavy")), ["?", "?"])
    print(f"\nStart-up to window shown ({platform}, {a.runs} runs, includes interpreter start)\n")
    print("| measure | seconds |\n|---|---|")
    print(f"| median | {statistics.median(times):.2f} |\n| min | {min(times):.2f} |\n| max | {max(times):.2f} |")
    print(f"\ntorch imported before the window: {flags[0]}; onnxruntime: {flags[1]}  (target: False, False)")
    print("Target: window on screen within 3 s.")


if __name__ == "__main__":
    main()
