"""Regenerate the example figures in this folder from the demo (RNet on its 200 face crops).

    QT_QPA_PLATFORM=offscreen .venv/bin/python docs/figures/make_figures.py [OUT_DIR]

Every view's figure is composed from its data and written as PNG (150 dpi) and PDF; the PDF
pages are then rendered with ``pdftoppm -png -r 80`` (poppler-utils) when it is installed, so
the vector output can be looked at too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main(out: Path) -> None:
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    tmp = Path(tempfile.mkdtemp(prefix="convlens-figures-"))
    os.environ["CONVLENS_CACHE"] = str(tmp / "cache")
    from engine.demo import prepare_demo
    from gui.context import AppContext
    from gui.export import export_figure
    from gui.figures import FigureOptions
    from gui.jobs import JobRunner
    from gui.selection import Selection
    from gui.session import Session
    from gui.views.dissection import DissectionView
    from gui.views.heatmaps import HeatmapsView
    from gui.views.image_browser import ImageBrowser

    def wait(cond: Callable[[], bool], what: str, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > end:
                raise TimeoutError(what)
            app.processEvents()
            time.sleep(0.01)

    spec, images = prepare_demo(tmp / "demo")
    selection, runner = Selection(), JobRunner()
    session = Session(selection, runner)
    session.load_model(spec)
    session.open_images(str(images))
    wait(lambda: session.model is not None and selection.images is not None and session.predictions is not None,
         "the demo")
    heat, browser, dissection = HeatmapsView(AppContext(selection, runner, session)), None, None
    heat.resize(1000, 700)
    heat.show()
    selection.layer = "conv3"
    wait(lambda: heat.activations("conv3") is not None, "conv3")
    selection.current_image = 12
    import numpy as np

    selection.unit = int(np.nanargmax(heat.activations("conv3").stats("conv3").max[12]))
    browser = ImageBrowser(AppContext(selection, runner, session))
    browser.resize(900, 600)
    browser.show()
    dissection = DissectionView(AppContext(selection, runner, session))
    dissection.resize(1000, 700)
    dissection.show()
    dissection.set_builtin(200, 64)
    dissection.set_checked_layers(["conv2", "conv3"])
    handle = dissection.run()
    wait(lambda: handle.is_finished, "the dissection")
    wait(dissection.figure_tiles_ready, "the dissection tiles")
    app.processEvents()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [
        ("heatmaps-unit", heat, FigureOptions(kind="unit", size="full", dpi=120)),
        ("heatmaps-unit-column", heat, FigureOptions(kind="unit", size="column", dpi=120)),
        ("heatmaps-layer", heat, FigureOptions(kind="layer", size="full", dpi=120)),
        ("image", browser, FigureOptions(kind="image", size="column", dpi=120)),
        ("contact-sheet", browser, FigureOptions(kind="sheet", size="full", dpi=120)),
        ("dissection", dissection, FigureOptions(kind="result", size="full", dpi=120)),
    ]
    pdftoppm = shutil.which("pdftoppm")
    for name, view, options in jobs:
        export_figure(view, out / f"{name}.png", options)
        pdf = export_figure(view, tmp / f"{name}.pdf", options)
        if pdftoppm:
            subprocess.run([pdftoppm, "-png", "-r", "80", "-singlefile", str(pdf), str(out / f"{name}.pdf-page")],
                           check=True)
        for png in (out / f"{name}.png", out / f"{name}.pdf-page.png"):
            _keep_small(png)
        print("wrote", out / f"{name}.png")
    runner.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)


def _keep_small(png: Path, limit: int = 280_000) -> None:
    """Examples are committed: a PNG over ``limit`` bytes is saved with a 256-colour palette."""
    from PIL import Image

    if png.is_file() and png.stat().st_size > limit:
        with Image.open(png) as im:
            dpi = im.info.get("dpi")
            small = im.convert("RGB").quantize(256, dither=Image.Dither.NONE)
        small.save(png, optimize=True, **({"dpi": dpi} if dpi else {}))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent)
