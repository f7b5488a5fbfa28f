"""How long the Heatmaps view takes to show another unit or image once activations are cached.

Loads the demo model (RNet) and its 200 images in a real session, shows the view (offscreen
unless ``QT_QPA_PLATFORM`` says otherwise), extracts each layer once, then times 100 unit
switches and 100 image switches per layer: from the selection setter to the end of the
``processEvents()`` that repaints the window. Target: under 50 ms per switch.

    .venv/bin/python bench/heatmap_switch.py [--layers conv2 conv3] [--switches 100]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", nargs="+", default=["conv2", "conv3"])
    parser.add_argument("--switches", type=int, default=100)
    args = parser.parse_args()

    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from engine.demo import prepare_demo
    from gui.context import AppContext
    from gui.jobs import JobHandle, JobRunner
    from gui.selection import Selection
    from gui.session import Session
    from gui.views.heatmaps import HeatmapsView

    app = QApplication.instance() or QApplication([])
    cache_dir = tempfile.TemporaryDirectory(prefix="convlens-bench-")
    os.environ["CONVLENS_CACHE"] = cache_dir.name

    def wait(signal: object, what: str) -> None:
        loop = QEventLoop()
        signal.connect(loop.quit)  # type: ignore[attr-defined]
        QTimer.singleShot(120_000, loop.quit)
        t0 = time.perf_counter()
        loop.exec()
        if time.perf_counter() - t0 >= 119:
            raise SystemExit(f"timed out waiting for {what}")

    def run_job(handle: JobHandle) -> None:
        wait(handle.finished, handle.title)

    spec, images = prepare_demo()
    selection, runner = Selection(), JobRunner()
    session = Session(selection, runner)
    run_job(session.load_model(spec))
    run_job(session.open_images(str(images)))
    view = HeatmapsView(AppContext(selection, runner, session))
    view.resize(1200, 800)
    view.show()
    selection.current_image = 0
    rng = np.random.default_rng(0)
    rows = []
    for layer in args.layers:
        selection.layer = layer
        if view.activations(layer) is None:
            wait(view.activations_ready, f"activations of {layer}")
        units = view.activations(layer).layers[layer].units
        n_images = view.activations(layer).n_images
        selection.unit = 0
        app.processEvents()
        for what, setter, n in (("unit", selection.set_unit, units), ("image", selection.set_current_image, n_images)):
            times = []
            previous = -1
            for _ in range(args.switches):
                value = int(rng.integers(n))
                while value == previous:
                    value = int(rng.integers(n))
                previous = value
                t0 = time.perf_counter()
                setter(value)
                app.processEvents()
                times.append((time.perf_counter() - t0) * 1000)
            t = np.asarray(times)
            rows.append((layer, what, len(t), t.mean(), np.percentile(t, 95), t.max()))

    print(f"Heatmaps view switch latency, {args.switches} switches each (ms, setter to repaint done)")
    print(f"{'layer':<8} {'switch':<6} {'n':>4} {'mean':>7} {'p95':>7} {'max':>7}")
    for layer, what, n, mean, p95, mx in rows:
        print(f"{layer:<8} {what:<6} {n:>4} {mean:>7.2f} {p95:>7.2f} {mx:>7.2f}")
    runner.shutdown()
    view.close()
    cache_dir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
