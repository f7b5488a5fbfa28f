"""JobRunner and JobsPanel with real threads and a real (offscreen) Qt event loop."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QMessageBox, QProgressBar, QPushButton

from engine.types import Progress
from gui.jobs import PROGRESS_RATE_HZ, JobHandle, JobRunner, JobsPanel

Job = Generator[Progress, None, object]


@pytest.fixture
def runner(qtbot) -> Iterator[JobRunner]:
    r = JobRunner()
    yield r
    assert r.shutdown(2000)


def slow_job(steps: int, record: list[str], *, delay: float = 0.02, result: object = "done") -> Job:
    """Sleeps ``delay`` per step and records when its finally block runs."""
    try:
        for i in range(steps):
            time.sleep(delay)
            yield Progress((i + 1) / steps, f"step {i + 1}")
        return result
    finally:
        record.append("finally")


def collect(signal) -> list:
    got: list = []
    signal.connect(got.append)
    return got


def test_progress_and_result(qtbot, runner: JobRunner) -> None:
    record: list[str] = []
    handle = runner.submit("five steps", lambda: slow_job(5, record, delay=0.05, result=42))
    progress = collect(handle.progress)
    with qtbot.waitSignal(handle.finished, timeout=5000) as blocker:
        pass
    assert blocker.args == [42]
    assert handle.state == "done" and record == ["finally"]
    assert progress[-1] == Progress(1.0, "step 5")
    assert len(progress) == 5  # 50 ms apart: slower than the throttle, all delivered
    assert handle.last_progress == progress[-1]
    assert 0.2 < handle.elapsed < 2.0


def test_progress_is_throttled_but_last_is_delivered(qtbot, runner: JobRunner) -> None:
    n = 50_000

    def fast() -> Job:
        for i in range(n):
            yield Progress((i + 1) / n, str(i + 1))
        return "ok"

    handle = runner.submit("fast", fast)
    progress = collect(handle.progress)
    with qtbot.waitSignal(handle.finished, timeout=10_000):
        pass
    assert progress[0].message == "1"
    assert progress[-1] == Progress(1.0, str(n))
    assert len(progress) <= handle.elapsed * PROGRESS_RATE_HZ + 2


def test_factory_runs_on_worker_thread(qtbot, runner: JobRunner) -> None:
    threads: list[threading.Thread] = []

    def factory() -> Job:
        threads.append(threading.current_thread())
        return slow_job(1, [], delay=0)

    handle = runner.submit("where", factory)
    with qtbot.waitSignal(handle.finished, timeout=5000):
        pass
    assert threads and threads[0] is not threading.main_thread()


def test_cancel_running_job(qtbot, runner: JobRunner) -> None:
    record: list[str] = []
    handle = runner.submit("long", lambda: slow_job(200, record))
    results = collect(handle.finished)
    with qtbot.waitSignal(handle.progress, timeout=5000):
        pass
    assert handle.state == "running"
    with qtbot.waitSignal(handle.cancelled, timeout=2000):
        handle.cancel()
    assert record == ["finally"]
    assert handle.state == "cancelled"
    qtbot.wait(100)
    assert results == []


def test_cancel_queued_job_is_immediate_and_never_starts(qtbot, runner: JobRunner) -> None:
    started: list[str] = []
    first = runner.submit("first", lambda: slow_job(5, []))

    def second_factory() -> Job:
        started.append("second")
        return slow_job(1, [])

    second = runner.submit("second", second_factory)
    cancelled: list[bool] = []
    second.cancelled.connect(lambda: cancelled.append(True))
    second.cancel()
    assert cancelled == [True]  # synchronously, no event loop needed
    assert second.state == "cancelled"
    with qtbot.waitSignal(first.finished, timeout=5000):
        pass
    qtbot.wait(50)
    assert started == []


def test_inference_jobs_run_in_order_one_at_a_time(qtbot, runner: JobRunner) -> None:
    spans: list[tuple[str, float, float]] = []

    def job(name: str) -> Job:
        start = time.monotonic()
        for _ in range(3):
            time.sleep(0.02)
            yield Progress(None, name)
        spans.append((name, start, time.monotonic()))
        return name

    handles = [runner.submit(n, lambda n=n: job(n)) for n in "abcd"]
    with qtbot.waitSignals([h.finished for h in handles], timeout=5000):
        pass
    assert [s[0] for s in spans] == list("abcd")
    for (_, _, end), (_, start, _) in zip(spans, spans[1:]):
        assert start >= end
    assert [h.id for h in handles] == sorted(h.id for h in handles)


def test_light_jobs_do_not_wait_for_inference(qtbot, runner: JobRunner) -> None:
    record: list[str] = []
    heavy = runner.submit("heavy", lambda: slow_job(100, record))
    light = runner.submit("thumb", lambda: slow_job(1, [], delay=0, result="thumb"), kind="light")
    with qtbot.waitSignal(light.finished, timeout=2000) as blocker:
        pass
    assert blocker.args == ["thumb"]
    assert heavy.state == "running"
    with pytest.raises(ValueError, match="inference, light"):
        runner.submit("bad", lambda: slow_job(1, []), kind="gpu")  # type: ignore[arg-type]


def test_superseding_by_key_drops_old_result(qtbot, runner: JobRunner) -> None:
    # A running job is superseded.
    old = runner.submit("map 1", lambda: slow_job(100, [], result="old"), key="heatmap")
    old_results = collect(old.finished)
    with qtbot.waitSignal(old.progress, timeout=5000):
        pass
    new = runner.submit("map 2", lambda: slow_job(2, [], result="new"), key="heatmap")
    new_results = collect(new.finished)
    with qtbot.waitSignals([old.cancelled, new.finished], timeout=5000):
        pass
    assert old.state == "cancelled" and old_results == []
    assert new_results == ["new"]


def test_superseded_result_already_computed_is_dropped(qtbot, runner: JobRunner) -> None:
    # The old job completes on the worker while the GUI thread is busy: its result is
    # already queued for delivery when the new request arrives, and must still be dropped.
    computed = threading.Event()

    def quick() -> Job:
        yield Progress(1.0, "")
        computed.set()
        return "old"

    old = runner.submit("map 1", quick, key="heatmap")
    old_results = collect(old.finished)
    assert computed.wait(5)  # the GUI thread does not process events meanwhile
    time.sleep(0.05)
    new = runner.submit("map 2", lambda: slow_job(1, [], delay=0, result="new"), key="heatmap")
    with qtbot.waitSignal(new.finished, timeout=5000) as blocker:
        pass
    qtbot.wait(50)
    assert blocker.args == ["new"]
    assert old_results == [] and old.state == "cancelled"


def test_exception_goes_to_failed_and_runner_keeps_working(qtbot, runner: JobRunner) -> None:
    def broken() -> Job:
        yield Progress(0.5, "half")
        raise ValueError("boom")

    handle = runner.submit("broken", broken)
    with qtbot.waitSignal(handle.failed, timeout=5000) as blocker:
        pass
    (error,) = blocker.args
    assert isinstance(error, ValueError) and str(error) == "boom"
    assert handle.state == "failed" and handle.error is error
    assert "ValueError: boom" in handle.traceback and "in broken" in handle.traceback

    def bad_factory() -> Job:
        raise RuntimeError("cannot build the job")

    handle2 = runner.submit("bad factory", bad_factory)
    with qtbot.waitSignal(handle2.failed, timeout=5000):
        pass
    handle3 = runner.submit("next", lambda: slow_job(1, [], delay=0, result=3))
    with qtbot.waitSignal(handle3.finished, timeout=5000) as blocker:
        pass
    assert blocker.args == [3]


def test_shutdown_with_running_job(qtbot) -> None:
    runner = JobRunner()
    record: list[str] = []
    running = runner.submit("long", lambda: slow_job(1000, record))
    queued_started: list[str] = []

    def queued_factory() -> Job:
        queued_started.append("queued")
        return slow_job(1, [])

    queued = runner.submit("queued", queued_factory)
    with qtbot.waitSignal(running.progress, timeout=5000):
        pass
    t0 = time.monotonic()
    assert runner.shutdown(5000)
    assert time.monotonic() - t0 < 1.0
    assert record == ["finally"]
    assert running.state == "cancelled" and queued.state == "cancelled"
    assert queued_started == []
    with pytest.raises(RuntimeError):
        runner.submit("late", lambda: slow_job(1, []))


def test_gui_thread_stays_responsive(qtbot, runner: JobRunner) -> None:
    def cpu_ish() -> Job:
        deadline = time.monotonic() + 1.0
        i = 0
        while time.monotonic() < deadline:
            chunk_end = time.monotonic() + 0.01
            total = 0
            while time.monotonic() < chunk_end:  # pure-Python work holding the GIL
                total += sum(range(200))
            time.sleep(0.005)
            i += 1
            yield Progress(None, f"chunk {i}")
        return i

    ticks: list[float] = []
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    handle = runner.submit("cpu", cpu_ish)
    timer.start()
    with qtbot.waitSignal(handle.finished, timeout=10_000):
        pass
    timer.stop()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 40
    max_gap = max(gaps)
    print(f"max timer gap while a 1 s job runs: {max_gap * 1000:.1f} ms over {len(ticks)} ticks")
    assert max_gap < 0.1


def test_panel_shows_progress_and_cancels(qtbot, runner: JobRunner) -> None:
    panel = JobsPanel(runner)
    qtbot.addWidget(panel)
    record: list[str] = []
    handle = runner.submit("Dissect layer4", lambda: slow_job(200, record))
    item = panel.item_for(handle)
    assert item is not None and item.text(panel.COL_TITLE) == "Dissect layer4"
    qtbot.waitUntil(lambda: handle.last_progress is not None and handle.last_progress.fraction > 0)
    bar = panel.tree.itemWidget(item, panel.COL_PROGRESS)
    assert isinstance(bar, QProgressBar) and bar.value() > 0
    assert item.text(panel.COL_MESSAGE).startswith("step ")
    assert item.text(panel.COL_ELAPSED) == "0:00"
    button = panel.tree.itemWidget(item, panel.COL_ACTION)
    assert isinstance(button, QPushButton) and button.text() == "Cancel"
    with qtbot.waitSignal(handle.cancelled, timeout=2000):
        button.click()
    assert record == ["finally"]
    assert item.text(panel.COL_MESSAGE) == "cancelled"
    assert panel.tree.itemWidget(item, panel.COL_ACTION) is None
    assert item.foreground(0).color() != panel.palette().text().color()  # greyed

    panel.clear_button.click()
    assert panel.item_for(handle) is None and panel.tree.topLevelItemCount() == 0
    assert runner.jobs() == []


def test_panel_failure_details(qtbot, runner: JobRunner) -> None:
    panel = JobsPanel(runner)
    qtbot.addWidget(panel)

    def broken() -> Job:
        yield Progress(0.1, "")
        raise KeyError("layer9")

    handle: JobHandle = runner.submit("broken", broken)
    with qtbot.waitSignal(handle.failed, timeout=5000):
        pass
    item = panel.item_for(handle)
    assert item is not None
    assert item.foreground(0).color() == Qt.GlobalColor.red
    assert "layer9" in item.text(panel.COL_MESSAGE)
    details = panel.tree.itemWidget(item, panel.COL_ACTION)
    assert isinstance(details, QPushButton) and details.text() == "Details…"
    details.click()
    box = panel.findChild(QMessageBox)
    assert box is not None and "KeyError" in box.detailedText()
    box.close()
