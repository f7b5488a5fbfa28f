"""JobRunner and JobsPanel with real threads and a real (offscreen) Qt event loop.

No assertion depends on how fast the machine is: instead of bounds on elapsed time, the tests
wait for signals, order events, gate jobs on :class:`threading.Event`, and compare the job's own
timestamps with the runner's.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections.abc import Generator, Iterator

import pytest
from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import QMessageBox, QProgressBar, QPushButton

from engine.types import Progress
from gui.jobs import PROGRESS_RATE_HZ, JobHandle, JobKind, JobRunner, JobsPanel

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


def drain(qtbot, runner: JobRunner, kind: JobKind = "inference") -> None:
    """Run an empty job of ``kind`` to its end: every signal of the jobs that worker ran before
    has then been delivered (one worker runs its jobs in order; queued signals arrive in order)."""
    handle = runner.submit("sentinel", lambda: slow_job(1, [], delay=0), kind=kind)
    with qtbot.waitSignal(handle.finished, timeout=5000):
        pass


def test_progress_and_result(qtbot, runner: JobRunner) -> None:
    record: list[str] = []
    clock: list[float] = []

    def job() -> Job:
        clock.append(time.monotonic())
        result = yield from slow_job(5, record, delay=0.05, result=42)
        clock.append(time.monotonic())
        return result

    handle = runner.submit("five steps", job)
    progress = collect(handle.progress)
    with qtbot.waitSignal(handle.finished, timeout=5000) as blocker:
        pass
    assert blocker.args == [42]
    assert handle.state == "done" and record == ["finally"]
    assert progress == [Progress((i + 1) / 5, f"step {i + 1}") for i in range(5)]  # sleeps of 50 ms
    assert handle.last_progress == progress[-1]  # are slower than the throttle: all delivered
    # elapsed spans the job's own run, measured by the runner, and is frozen once it is done
    assert handle.started_at is not None and handle.ended_at is not None
    assert handle.started_at <= clock[0] <= clock[-1] <= handle.ended_at
    assert handle.elapsed == handle.ended_at - handle.started_at == handle.elapsed


def test_progress_is_throttled_but_last_is_delivered(qtbot, runner: JobRunner) -> None:
    n = 50_000
    stamps: list[float] = []  # stamps[k]: when step k + 1 was yielded; stamps[n]: the end

    def fast() -> Job:
        for i in range(n):
            stamps.append(time.monotonic())
            yield Progress((i + 1) / n, str(i + 1))
        stamps.append(time.monotonic())
        return "ok"

    handle = runner.submit("fast", fast)
    progress = collect(handle.progress)
    with qtbot.waitSignal(handle.finished, timeout=60_000):
        pass
    steps = [int(p.message) for p in progress]
    assert steps[0] == 1 and progress[-1] == Progress(1.0, str(n))  # the first and the last
    assert steps == sorted(set(steps)) and len(steps) < n // 10  # in order, most dropped
    # Step k is sent between its yield (stamps[k - 1]) and the next one (stamps[k]), so two
    # throttled sends k < j at least 1 / RATE apart mean stamps[j] - stamps[k - 1] >= 1 / RATE.
    # (The last report is sent at the end, unthrottled.)
    interval = 1.0 / PROGRESS_RATE_HZ
    throttled = steps[:-1] if steps[-1] == n else steps  # the final pending report skips the throttle
    for k, j in itertools.pairwise(throttled):
        assert stamps[j] - stamps[k - 1] >= interval, (k, j)


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
    drain(qtbot, runner)
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
    drain(qtbot, runner)  # the worker went past the cancelled job
    assert started == []


def test_inference_jobs_run_in_order_one_at_a_time(qtbot, runner: JobRunner) -> None:
    events: list[str] = []
    lock = threading.Lock()

    def job(name: str) -> Job:
        with lock:
            events.append(f"start {name}")
        for _ in range(3):
            time.sleep(0.02)  # time for another job to start, were two allowed at once
            yield Progress(None, name)
        with lock:
            events.append(f"end {name}")
        return name

    handles = [runner.submit(n, lambda n=n: job(n)) for n in "abcd"]
    with qtbot.waitSignals([h.finished for h in handles], order="strict", timeout=5000):
        pass
    assert events == [f"{what} {n}" for n in "abcd" for what in ("start", "end")]
    assert [h.id for h in handles] == sorted(h.id for h in handles)


def test_light_jobs_do_not_wait_for_inference(qtbot, runner: JobRunner) -> None:
    release = threading.Event()

    def heavy_job() -> Job:
        yield Progress(None, "holding the inference worker")
        while not release.wait(0.01):  # only the test ends it, after the light job finished
            yield Progress(None, "waiting")
        return "heavy"

    heavy = runner.submit("heavy", heavy_job)
    with qtbot.waitSignal(heavy.progress, timeout=5000):
        pass
    light = runner.submit("thumb", lambda: slow_job(1, [], delay=0, result="thumb"), kind="light")
    with qtbot.waitSignal(light.finished, timeout=5000) as blocker:
        pass
    assert blocker.args == ["thumb"]
    assert heavy.state == "running"
    release.set()
    with qtbot.waitSignal(heavy.finished, timeout=5000):
        pass
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

    sent = threading.Event()  # set on the worker thread once the old result is on its way
    runner._bridge.finished.connect(lambda *_a: sent.set(), Qt.ConnectionType.DirectConnection)
    old = runner.submit("map 1", quick, key="heatmap")
    old_results = collect(old.finished)
    assert computed.wait(5) and sent.wait(5)  # the GUI thread does not process events meanwhile
    assert old.state in ("queued", "running")  # its signals are queued, not delivered
    new = runner.submit("map 2", lambda: slow_job(1, [], delay=0, result="new"), key="heatmap")
    with qtbot.waitSignal(new.finished, timeout=5000) as blocker:
        pass
    assert blocker.args == ["new"]  # the old result was delivered first (queued before): dropped
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
    steps: list[int] = []

    def long_job() -> Job:  # 1000 steps of 20 ms: shutdown must not wait for them
        try:
            for i in range(1000):
                time.sleep(0.02)
                steps.append(i)
                yield Progress((i + 1) / 1000, f"step {i + 1}")
        finally:
            record.append("finally")
        return "never"

    running = runner.submit("long", long_job)
    queued_started: list[str] = []

    def queued_factory() -> Job:
        queued_started.append("queued")
        return slow_job(1, [])

    queued = runner.submit("queued", queued_factory)
    with qtbot.waitSignal(running.progress, timeout=5000):
        pass
    before = len(steps)
    assert runner.shutdown(5000)
    assert record == ["finally"]
    assert before <= len(steps) <= before + 1  # stopped at its next yield
    assert running.state == "cancelled" and queued.state == "cancelled"
    assert queued_started == []
    with pytest.raises(RuntimeError):
        runner.submit("late", lambda: slow_job(1, []))


def test_gui_thread_keeps_running_while_a_job_holds_the_gil(qtbot, runner: JobRunner) -> None:
    """A job doing pure-Python work never sleeps, and it only ends once the GUI thread has run
    a timer ten times and handled three of its progress reports meanwhile: it finishes only if
    the GUI thread keeps running beside it (a real worker thread, sharing the GIL)."""
    ticks: list[int] = []  # both appended on the GUI thread, read by the job
    seen: list[str] = []

    def busy() -> Job:
        i = 0
        while len(ticks) < 10 or len(seen) < 3:
            total = 0
            for _ in range(2000):  # pure-Python work holding the GIL
                total += sum(range(200))
            i += 1
            yield Progress(None, f"chunk {i}")
        return len(ticks), len(seen)

    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(1))
    handle = runner.submit("cpu", busy)
    handle.progress.connect(lambda p: seen.append(p.message))
    timer.start()
    with qtbot.waitSignal(handle.finished, timeout=60_000) as blocker:
        pass
    timer.stop()
    n_ticks, n_seen = blocker.args[0]
    assert n_ticks >= 10 and n_seen >= 3


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
    assert re.fullmatch(r"\d+:\d\d", item.text(panel.COL_ELAPSED))  # m:ss
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
