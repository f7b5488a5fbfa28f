"""Image browser responsiveness on 20,000 images: model reset, predictions, sort, filter, scroll.

    .venv/bin/python bench/browser_scroll.py [--images 20000] [--step 600]

Writes ``--images`` small JPEG tiles (64-128 px crops of scikit-image's astronaut, coffee,
chelsea and rocket, one label folder each) once into a temporary folder (reused by later
runs), opens them as an ImageSet and shows the :class:`ImageBrowser` at 1200x800 (offscreen,
or under the X server named by ``DISPLAY``). The thumbnail disk cache starts empty.

Measured, with a 5 ms precise QTimer recording the gaps between its ticks (a gap is how long
the event loop could not run a timer: the stall a user would feel):

* set_images (model reset), set_predictions (random probabilities, about 70 % correct), sort
  by confidence, filter to incorrect: the time of the call, then the worst gap during the
  following second (the view lays the grid out in batches);
* a scroll through the whole grid by ``--step`` px every 16 ms, then 200 random page jumps
  every 16 ms: worst and 99th percentile gap, and the viewport's paint time per frame;
* thumbnail fill: after a jump with the view idle, the time until every visible cell has its
  thumbnail (median of 10 jumps, before the scroll: memory and disk caches cold);
* for reference: the same confidence sort done by a QSortFilterProxyModel with a Python
  ``lessThan`` (the design this view avoids).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if "DISPLAY" not in os.environ:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import (
    QAbstractListModel,
    QEvent,
    QEventLoop,
    QModelIndex,
    QObject,
    QPoint,
    QSortFilterProxyModel,
    Qt,
    QTimer,
)
from PySide6.QtWidgets import QApplication

from engine.data.images import ImageSet, open_image_set
from engine.predict import Predictions
from gui.context import AppContext
from gui.selection import Selection
from gui.thumbnails import ThumbnailCache
from gui.views.image_browser import ImageBrowser, SortKey

SOURCES = ("astronaut", "coffee", "chelsea", "rocket")


def make_images(n: int) -> Path:
    """``n`` JPEG tiles under a reusable temporary folder, one label folder per source."""
    from PIL import Image
    from skimage import data

    root = Path(tempfile.gettempdir()) / f"convlens-bench-browser-{n}"
    done = root / ".complete"
    if done.exists():
        return root
    rng = np.random.default_rng(0)
    pictures = [np.asarray(getattr(data, name)())[..., :3] for name in SOURCES]
    for i in range(n):
        k = i % len(SOURCES)
        pic = pictures[k]
        h, w = rng.integers(64, 129, size=2)
        y = rng.integers(0, pic.shape[0] - h)
        x = rng.integers(0, pic.shape[1] - w)
        folder = root / SOURCES[k]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pic[y : y + h, x : x + w]).save(folder / f"{i:06d}.jpg", quality=85)
    done.touch()
    return root


def synthetic_predictions(image_set: ImageSet, rng: np.random.Generator) -> Predictions:
    """Random class probabilities, peaked on the true label about 70 % of the time."""
    n, k = len(image_set), len(SOURCES)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    truth = np.array([SOURCES.index(r.label) for r in image_set.records])
    boost = rng.random(n) < 0.7
    logits[np.arange(n)[boost], truth[boost]] += 3.0
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return Predictions(
        paths=tuple(r.path for r in image_set.records),
        labels=tuple(r.label for r in image_set.records),
        classes=SOURCES,
        probs=e / e.sum(axis=1, keepdims=True),
        valid=np.ones(n, dtype=bool),
        score_kind="probs",
    )


class StallMonitor(QObject):
    """Records the gaps between the ticks of a 5 ms precise timer."""

    def __init__(self) -> None:
        super().__init__()
        self._timer = QTimer(self)
        self._timer.setTimerType(Qt.TimerType.PreciseTimer)
        self._timer.setInterval(5)
        self._timer.timeout.connect(self._tick)
        self._ticks: list[float] = []
        self._timer.start()

    def _tick(self) -> None:
        self._ticks.append(time.perf_counter())

    def reset(self) -> None:
        self._ticks = [time.perf_counter()]

    def gaps_ms(self) -> np.ndarray:
        return np.diff(np.asarray([*self._ticks, time.perf_counter()])) * 1000.0


class PaintTimer(QObject):
    """Times the paint events of one widget (the grid's viewport)."""

    def __init__(self, target: QObject) -> None:
        super().__init__()
        self.target = target
        self.durations: list[float] = []

    def timed_notify(self, receiver: QObject, event: QEvent, notify: Callable[[], bool]) -> bool:
        if receiver is self.target and event.type() == QEvent.Type.Paint:
            t0 = time.perf_counter()
            result = notify()
            self.durations.append((time.perf_counter() - t0) * 1000.0)
            return result
        return notify()


class BenchApp(QApplication):
    """A QApplication whose ``notify`` lets a :class:`PaintTimer` time paint events."""

    paint_timer: PaintTimer | None = None

    def notify(self, receiver: QObject, event: QEvent) -> bool:
        if self.paint_timer is None:
            return super().notify(receiver, event)
        return self.paint_timer.timed_notify(
            receiver, event, lambda: QApplication.notify(self, receiver, event)
        )


def run_loop(ms: int) -> None:
    """Run the event loop for ``ms`` milliseconds."""
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def timed(
    monitor: StallMonitor, action: Callable[[], object], settle_ms: int = 1000
) -> tuple[float, float]:
    """(ms the call took, worst event-loop gap in ms during the call and ``settle_ms`` after)."""
    monitor.reset()
    t0 = time.perf_counter()
    action()
    took = (time.perf_counter() - t0) * 1000.0
    run_loop(settle_ms)
    return took, float(monitor.gaps_ms().max())


def drive(steps: list[int], browser: ImageBrowser, interval_ms: int = 16) -> None:
    """Set the grid's scroll bar to each value of ``steps``, one every ``interval_ms``."""
    bar = browser.view.verticalScrollBar()
    loop = QEventLoop()
    it = iter(steps)
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(interval_ms)

    def step() -> None:
        value = next(it, None)
        if value is None:
            timer.stop()
            loop.quit()
        else:
            bar.setValue(value)

    timer.timeout.connect(step)
    timer.start()
    loop.exec()


def visible_rows(browser: ImageBrowser) -> list[int]:
    """Source rows of the cells that intersect the viewport."""
    view = browser.view
    rect = view.viewport().rect()
    cell = view.gridSize()
    rows = set()
    for y in range(rect.top() + 2, rect.bottom(), cell.height()):
        for x in range(rect.left() + 2, rect.right(), cell.width()):
            index = view.indexAt(QPoint(x, y))
            if index.isValid():
                rows.add(browser.proxy.source_row(index.row()))
    return sorted(rows)


def fill_latency(browser: ImageBrowser, rng: np.random.Generator, jumps: int = 10) -> float:
    """Median ms from a jump to a fresh place until every visible thumbnail is available."""
    bar = browser.view.verticalScrollBar()
    thumbs = browser.thumbnails
    times = []
    for _ in range(jumps):
        bar.setValue(int(rng.integers(0, bar.maximum())))
        run_loop(1)
        rows = visible_rows(browser)
        t0 = time.perf_counter()
        while any(thumbs.get(r) is None for r in rows):
            run_loop(2)
        times.append((time.perf_counter() - t0) * 1000.0)
    return float(np.median(times))


def qsfpm_sort_ms(conf: np.ndarray) -> float:
    """Time a QSortFilterProxyModel sort of len(conf) rows with a Python lessThan."""
    n = len(conf)
    keys = conf.tolist()

    class Rows(QAbstractListModel):
        def rowCount(self, parent: QModelIndex = QModelIndex()) -> int:  # noqa: B008, N802
            return 0 if parent.isValid() else n

        def data(self, index: QModelIndex, role: int = 0) -> object:
            return index.row() if role == Qt.ItemDataRole.DisplayRole else None

    class Proxy(QSortFilterProxyModel):
        def lessThan(self, a: QModelIndex, b: QModelIndex) -> bool:  # noqa: N802
            return keys[a.row()] < keys[b.row()]

    rows, proxy = Rows(), Proxy()
    proxy.setSourceModel(rows)
    t0 = time.perf_counter()
    proxy.sort(0)
    return (time.perf_counter() - t0) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--step", type=int, default=600, help="px per 16 ms scroll step")
    args = parser.parse_args()

    t0 = time.perf_counter()
    root = make_images(args.images)
    print(f"images: {root} ({time.perf_counter() - t0:.1f} s to prepare)")
    image_set = open_image_set(root)
    rng = np.random.default_rng(1)
    preds = synthetic_predictions(image_set, rng)

    app = BenchApp([])
    monitor = StallMonitor()
    selection = Selection()
    disk = Path(tempfile.mkdtemp(prefix="convlens-thumbs-"))
    browser = ImageBrowser(AppContext(selection, None, None), thumbnails=ThumbnailCache(disk_dir=disk))
    browser.resize(1200, 800)
    browser.show()
    run_loop(300)

    rows: list[tuple[str, str, str]] = []

    def add(op: str, value: str, notes: str) -> None:
        rows.append((op, value, notes))

    took, stall = timed(monitor, lambda: setattr(selection, "images", image_set))
    add("set_images (model reset)", f"{took:.0f} ms / {stall:.0f} ms", f"{len(image_set)} rows")
    took, stall = timed(monitor, lambda: browser.set_predictions(preds))
    add("set_predictions", f"{took:.0f} ms / {stall:.0f} ms", f"{len(SOURCES)} classes")
    conf_desc = browser.sort_combo.findData(SortKey.CONFIDENCE_DESC)
    took, stall = timed(monitor, lambda: browser.sort_combo.setCurrentIndex(conf_desc))
    add("sort by confidence", f"{took:.0f} ms / {stall:.0f} ms", "np.lexsort + proxy reset")
    incorrect = browser.correctness_filter.findData("incorrect")
    took, stall = timed(monitor, lambda: browser.correctness_filter.setCurrentIndex(incorrect))
    add("filter to incorrect", f"{took:.0f} ms / {stall:.0f} ms", browser.count_label.text())
    took, stall = timed(monitor, lambda: browser.text_filter.setText("0001"))
    add("text filter '0001'", f"{took:.0f} ms / {stall:.0f} ms", browser.count_label.text())
    browser.text_filter.clear()
    browser.correctness_filter.setCurrentIndex(0)
    browser.sort_combo.setCurrentIndex(0)
    run_loop(500)
    add(
        "reference: QSortFilterProxyModel",
        f"{qsfpm_sort_ms(preds.confidence):.0f} ms",
        "same sort, Python lessThan (not used)",
    )

    latency = fill_latency(browser, rng)
    cells = len(visible_rows(browser))
    add("thumbnail fill after a jump", f"{latency:.0f} ms", f"{cells} visible cells, cold caches")

    bar = browser.view.verticalScrollBar()
    paint = PaintTimer(browser.view.viewport())
    app.paint_timer = paint
    delivered = [0]
    browser.thumbnails.ready.connect(lambda _row: delivered.__setitem__(0, delivered[0] + 1))

    for label, steps in (
        ("scroll whole grid", list(range(0, bar.maximum() + args.step, args.step))),
        ("200 random page jumps", rng.integers(0, bar.maximum(), 200).tolist()),
    ):
        paint.durations.clear()
        delivered[0] = 0
        monitor.reset()
        t0 = time.perf_counter()
        drive(steps, browser)
        wall = time.perf_counter() - t0
        gaps = monitor.gaps_ms()
        frames = np.asarray(paint.durations)
        add(
            label,
            f"max {gaps.max():.0f} ms, p99 {np.percentile(gaps, 99):.0f} ms",
            f"{len(steps)} steps in {wall:.1f} s; {len(frames)} frames, paint median "
            f"{np.median(frames):.1f} ms, max {frames.max():.1f} ms; "
            f"{delivered[0]} thumbnails decoded",
        )
    app.paint_timer = None

    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"\n{'operation':<{width}} | {'time / max stall':<{value_width}} | notes")
    print(f"{'-' * width}-+-{'-' * value_width}-+------")
    for op, value, notes in rows:
        print(f"{op:<{width}} | {value:<{value_width}} | {notes}")
    browser.thumbnails.close()


if __name__ == "__main__":
    main()
