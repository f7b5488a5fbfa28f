"""Run engine jobs off the GUI thread: progress, cancellation, superseding, a jobs panel.

An engine job is a generator that yields :class:`engine.types.Progress` at least once per batch
and returns its result (see :mod:`engine.jobs`). :class:`JobRunner` executes such generators on
worker threads and reports back through a :class:`JobHandle` per submitted job.

Threading model
---------------
* Two worker threads, one FIFO queue each: ``"inference"`` jobs run one at a time in submission
  order (a GPU does not like two models at once); ``"light"`` jobs (thumbnail decoding and
  other short I/O) have their own queue so they never wait behind a long inference job. Two
  plain queues keep the ordering guarantees obvious; a thread pool would add parallelism that
  the light jobs do not need. Each thread starts on the first job of its kind.
* The workers are daemon :class:`threading.Thread` objects rather than ``QThread``: a job stuck
  in native code that never yields again (a huge model load) cannot be interrupted, and a
  running ``QThread`` destroyed at exit aborts the process, whereas a daemon thread simply dies
  with it. :meth:`JobRunner.shutdown` joins the threads in the normal case.
* The job factory is called on the worker thread, so constructing the generator (which may
  already do work) never happens on the GUI thread.
* Worker threads never touch a :class:`JobHandle`. They emit signals of a private bridge object
  living on the GUI thread through queued connections; the runner's slots then update the
  handle and emit its signals, so every handle signal is emitted on the GUI thread, and a
  handle's state is only ever read and written there.
* Cancelling sets a :class:`threading.Event` that the worker checks after every ``yield``;
  it then calls ``gen.close()`` so the job's ``finally`` blocks run on the worker thread. A
  handle whose cancellation was requested never emits ``finished`` or ``failed``, even when
  the job had already completed when the request came: that is how superseding by ``key``
  guarantees that a view only ever receives the newest result.
* Progress is throttled on the worker thread to at most :data:`PROGRESS_RATE_HZ` signals per
  second per job; the last report before the job finishes is always delivered.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
import traceback as tb
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal

from PySide6.QtCore import QObject, Qt, QTimer, Signal, Slot
from PySide6.QtGui import QBrush, QPalette
from PySide6.QtWidgets import (
    QHBoxLayout,
    QHeaderView,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.types import Progress

__all__ = ["PROGRESS_RATE_HZ", "JobHandle", "JobKind", "JobRunner", "JobState", "JobsPanel"]

log = logging.getLogger(__name__)

JobKind = Literal["inference", "light"]
JobState = Literal["queued", "running", "done", "failed", "cancelled"]
JobFactory = Callable[[], Generator[Progress, None, Any]]

PROGRESS_RATE_HZ = 30.0
"""At most this many progress signals per second per job reach the GUI thread."""

_KINDS: tuple[JobKind, ...] = ("inference", "light")
_TERMINAL: frozenset[str] = frozenset({"done", "failed", "cancelled"})


class JobHandle(QObject):
    """One submitted job, as seen from the GUI thread.

    Signals are emitted on the GUI thread, exactly one of ``finished``, ``failed`` or
    ``cancelled`` per job. Attributes are read-only for callers:

    * ``id``: unique within the runner, increasing in submission order;
    * ``title``, ``kind``, ``key``: as given to :meth:`JobRunner.submit`;
    * ``state``: ``queued``, ``running``, ``done``, ``failed`` or ``cancelled``;
    * ``started_at`` / ``ended_at``: :func:`time.monotonic` timestamps or None;
    * ``last_progress``: the latest :class:`Progress` delivered, or None;
    * ``error`` / ``traceback``: the exception and its formatted traceback after a failure.
    """

    progress = Signal(object)
    finished = Signal(object)
    failed = Signal(object)
    cancelled = Signal()

    def __init__(self, job_id: int, title: str, kind: JobKind, key: str | None) -> None:
        super().__init__()
        self.id = job_id
        self.title = title
        self.kind: JobKind = kind
        self.key = key
        self.state: JobState = "queued"
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self.last_progress: Progress | None = None
        self.error: BaseException | None = None
        self.traceback = ""
        self._cancel_event = threading.Event()
        self._on_cancel: Callable[[JobHandle], None] | None = None

    @property
    def elapsed(self) -> float:
        """Seconds spent running: up to now while running, the final duration afterwards."""
        if self.started_at is None:
            return 0.0
        end = self.ended_at if self.ended_at is not None else time.monotonic()
        return max(0.0, end - self.started_at)

    @property
    def is_finished(self) -> bool:
        """True once the job is done, failed or cancelled."""
        return self.state in _TERMINAL

    @property
    def cancel_requested(self) -> bool:
        """True once :meth:`cancel` was called (the job may still be winding down)."""
        return self._cancel_event.is_set()

    def cancel(self) -> None:
        """Ask the job to stop.

        A queued job is cancelled at once; a running one stops at its next ``yield`` (its
        ``finally`` blocks run on the worker thread) and then emits ``cancelled``. Its result,
        if it completed meanwhile, is dropped. Does nothing for a finished job.
        """
        if self.is_finished or self._cancel_event.is_set():
            return
        self._cancel_event.set()
        if self._on_cancel is not None:
            self._on_cancel(self)


@dataclass
class _Ticket:
    """What a worker thread receives for one job: never the handle itself."""

    job_id: int
    factory: JobFactory
    cancel: threading.Event


class _Bridge(QObject):
    """Signals emitted by worker threads; lives on the GUI thread (queued delivery)."""

    started = Signal(int, float)
    progress = Signal(int, object)
    finished = Signal(int, object, float)
    failed = Signal(int, object, str, float)
    cancelled = Signal(int, float)


class _Worker:
    """One daemon thread executing the tickets of one queue in FIFO order."""

    def __init__(self, name: str, bridge: _Bridge) -> None:
        self._bridge = bridge
        self._queue: queue.SimpleQueue[_Ticket | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, ticket: _Ticket) -> None:
        """Append a job to this worker's queue."""
        self._queue.put(ticket)

    def stop(self) -> None:
        """Let the thread exit once the tickets already queued are drained."""
        self._queue.put(None)

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the thread to end; True when it did."""
        self._thread.join(max(0.0, timeout))
        return not self._thread.is_alive()

    def _loop(self) -> None:
        while (ticket := self._queue.get()) is not None:
            if not ticket.cancel.is_set():  # a cancelled queued job is already reported
                self._run(ticket)
            del ticket  # drop the factory (and whatever it captured) before blocking again

    def _run(self, ticket: _Ticket) -> None:
        bridge, job_id = self._bridge, ticket.job_id
        bridge.started.emit(job_id, time.monotonic())
        interval = 1.0 / PROGRESS_RATE_HZ
        last_emit = -interval
        pending: Progress | None = None
        try:
            gen = ticket.factory()
            while not ticket.cancel.is_set():
                try:
                    p = next(gen)
                except StopIteration as stop:
                    if pending is not None:
                        bridge.progress.emit(job_id, pending)
                    bridge.finished.emit(job_id, stop.value, time.monotonic())
                    return
                now = time.monotonic()
                if now - last_emit >= interval:
                    bridge.progress.emit(job_id, p)
                    last_emit, pending = now, None
                else:
                    pending = p
            gen.close()  # GeneratorExit at the paused yield: the job's finally blocks run
            bridge.cancelled.emit(job_id, time.monotonic())
        except BaseException as exc:  # noqa: BLE001 - reported, and the worker must survive
            text = "".join(tb.format_exception(exc))
            # Free the failed job's frames (and the tensors they may hold); the text stays.
            exc.with_traceback(None)
            bridge.failed.emit(job_id, exc, text, time.monotonic())


class JobRunner(QObject):
    """Executes engine jobs on worker threads; create and use it on the GUI thread.

    ``job_added`` and ``job_changed`` (state or progress) carry the :class:`JobHandle`;
    ``job_removed`` is emitted for each handle dropped by :meth:`clear_finished`.
    """

    job_added = Signal(object)
    job_changed = Signal(object)
    job_removed = Signal(object)

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._jobs: list[JobHandle] = []
        self._active: dict[int, JobHandle] = {}
        self._by_key: dict[str, JobHandle] = {}
        self._workers: dict[JobKind, _Worker] = {}
        self._closed = False
        self._bridge = _Bridge(self)
        queued = Qt.ConnectionType.QueuedConnection
        self._bridge.started.connect(self._on_started, queued)
        self._bridge.progress.connect(self._on_progress, queued)
        self._bridge.finished.connect(self._on_finished, queued)
        self._bridge.failed.connect(self._on_failed, queued)
        self._bridge.cancelled.connect(self._on_cancelled, queued)

    def submit(
        self,
        title: str,
        job_factory: JobFactory,
        *,
        kind: JobKind = "inference",
        key: str | None = None,
    ) -> JobHandle:
        """Queue a job and return its handle.

        ``job_factory`` is called on the worker thread and must return the job generator.
        With ``key``, a queued or running job submitted earlier with the same key is
        cancelled and its result dropped, so whoever asks again gets only the newest result.
        Connect to the handle's signals right after this call: nothing is emitted before
        control returns to the event loop.
        """
        if kind not in _KINDS:
            raise ValueError(f"unknown job kind {kind!r}; expected one of {', '.join(_KINDS)}")
        if self._closed:
            raise RuntimeError("JobRunner.submit() after shutdown()")
        if key is not None and (older := self._by_key.get(key)) is not None:
            older.cancel()
        handle = JobHandle(next(self._ids), title, kind, key)
        handle._on_cancel = self._cancel_requested
        self._jobs.append(handle)
        self._active[handle.id] = handle
        if key is not None:
            self._by_key[key] = handle
        worker = self._workers.get(kind)
        if worker is None:
            worker = self._workers[kind] = _Worker(f"convlens-{kind}", self._bridge)
        worker.put(_Ticket(handle.id, job_factory, handle._cancel_event))
        self.job_added.emit(handle)
        return handle

    def jobs(self) -> list[JobHandle]:
        """All handles not yet cleared, in submission order."""
        return list(self._jobs)

    def cancel_all(self) -> None:
        """Cancel every queued and running job."""
        for handle in list(self._active.values()):
            handle.cancel()

    def clear_finished(self) -> list[JobHandle]:
        """Forget finished jobs (emitting ``job_removed`` for each) and return them."""
        removed = [h for h in self._jobs if h.is_finished]
        self._jobs = [h for h in self._jobs if not h.is_finished]
        for handle in removed:
            self.job_removed.emit(handle)
        return removed

    def shutdown(self, timeout_ms: int = 5000) -> bool:
        """Cancel everything and join the worker threads; call it when the window closes.

        Returns True when every thread ended within ``timeout_ms`` (every job's ``finally``
        has then run); handles of jobs that stopped are reported ``cancelled`` right away.
        Returns False when a job did not reach its next ``yield`` in time; its daemon thread
        is abandoned and dies with the process. :meth:`submit` raises afterwards.
        """
        self._closed = True
        self.cancel_all()
        for worker in self._workers.values():
            worker.stop()
        deadline = time.monotonic() + timeout_ms / 1000.0
        joined = {kind: w.join(deadline - time.monotonic()) for kind, w in self._workers.items()}
        now = time.monotonic()
        for handle in list(self._active.values()):
            if joined.get(handle.kind, True):
                self._finish(handle, "cancelled", now)
                handle.cancelled.emit()
        return all(joined.values())

    # -- GUI-thread side of the bridge -------------------------------------------------------

    def _cancel_requested(self, handle: JobHandle) -> None:
        if handle.state == "queued":  # the worker will skip it: report it now
            self._finish(handle, "cancelled", None)
            handle.cancelled.emit()
        else:  # running: the worker reports once the job has stopped
            self.job_changed.emit(handle)

    def _finish(self, handle: JobHandle, state: JobState, at: float | None) -> None:
        handle.state = state
        if handle.started_at is not None:
            handle.ended_at = at if at is not None else time.monotonic()
        self._active.pop(handle.id, None)
        if handle.key is not None and self._by_key.get(handle.key) is handle:
            del self._by_key[handle.key]
        self.job_changed.emit(handle)

    @Slot(int, float)
    def _on_started(self, job_id: int, at: float) -> None:
        handle = self._active.get(job_id)
        if handle is None:
            return
        handle.state = "running"
        handle.started_at = at
        self.job_changed.emit(handle)

    @Slot(int, object)
    def _on_progress(self, job_id: int, progress: Progress) -> None:
        handle = self._active.get(job_id)
        if handle is None or handle.cancel_requested:
            return
        handle.last_progress = progress
        handle.progress.emit(progress)
        self.job_changed.emit(handle)

    @Slot(int, object, float)
    def _on_finished(self, job_id: int, result: object, at: float) -> None:
        handle = self._active.get(job_id)
        if handle is None:
            return
        if handle.cancel_requested:
            self._on_cancelled(job_id, at)
            return
        self._finish(handle, "done", at)
        handle.finished.emit(result)

    @Slot(int, object, str, float)
    def _on_failed(self, job_id: int, error: BaseException, text: str, at: float) -> None:
        handle = self._active.get(job_id)
        if handle is None:
            return
        if handle.cancel_requested:
            log.warning("job %r failed while being cancelled:\n%s", handle.title, text)
            self._on_cancelled(job_id, at)
            return
        handle.error = error
        handle.traceback = text
        self._finish(handle, "failed", at)
        handle.failed.emit(error)

    @Slot(int, float)
    def _on_cancelled(self, job_id: int, at: float) -> None:
        handle = self._active.get(job_id)
        if handle is None:
            return
        self._finish(handle, "cancelled", at)
        handle.cancelled.emit()


class JobsPanel(QWidget):
    """A list of the runner's jobs, meant to sit in a dock widget.

    One row per job: title, progress bar, message, elapsed time (refreshed at 4 Hz while a
    job runs) and a Cancel button while the job is queued or running. Finished jobs stay
    listed, greyed, until "Clear finished"; failed ones are red with a "Details…" button
    showing the traceback.
    """

    COL_TITLE, COL_PROGRESS, COL_MESSAGE, COL_ELAPSED, COL_ACTION = range(5)

    def __init__(self, runner: JobRunner, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._runner = runner
        self._items: dict[int, tuple[JobHandle, QTreeWidgetItem]] = {}

        self.tree = QTreeWidget(self)
        self.tree.setRootIsDecorated(False)
        self.tree.setUniformRowHeights(True)
        self.tree.setHeaderLabels(["Job", "Progress", "Message", "Elapsed", ""])
        header = self.tree.header()
        header.setStretchLastSection(False)
        header.setSectionResizeMode(self.COL_MESSAGE, QHeaderView.ResizeMode.Stretch)
        for col in (self.COL_TITLE, self.COL_ELAPSED, self.COL_ACTION):
            header.setSectionResizeMode(col, QHeaderView.ResizeMode.ResizeToContents)

        self.clear_button = QPushButton("Clear finished", self)
        self.clear_button.clicked.connect(runner.clear_finished)
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.clear_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tree)
        layout.addLayout(buttons)

        self._clock = QTimer(self)
        self._clock.setInterval(250)
        self._clock.timeout.connect(self._tick)

        runner.job_added.connect(self._add)
        runner.job_changed.connect(self._update)
        runner.job_removed.connect(self._remove)
        for handle in runner.jobs():
            self._add(handle)

    def item_for(self, handle: JobHandle) -> QTreeWidgetItem | None:
        """The row showing ``handle``, or None when it is not listed."""
        entry = self._items.get(handle.id)
        return entry[1] if entry is not None else None

    def _add(self, handle: JobHandle) -> None:
        item = QTreeWidgetItem([handle.title, "", "", ""])
        item.setToolTip(self.COL_TITLE, handle.title)
        self.tree.addTopLevelItem(item)
        bar = QProgressBar()
        bar.setRange(0, 1000)
        bar.setTextVisible(False)
        self.tree.setItemWidget(item, self.COL_PROGRESS, bar)
        cancel = QPushButton("Cancel")
        cancel.setObjectName("cancelButton")
        cancel.clicked.connect(handle.cancel)
        self.tree.setItemWidget(item, self.COL_ACTION, cancel)
        self._items[handle.id] = (handle, item)
        self._update(handle)

    def _remove(self, handle: JobHandle) -> None:
        entry = self._items.pop(handle.id, None)
        if entry is not None:
            self.tree.takeTopLevelItem(self.tree.indexOfTopLevelItem(entry[1]))

    def _update(self, handle: JobHandle) -> None:
        entry = self._items.get(handle.id)
        if entry is None:
            return
        item = entry[1]
        bar = self.tree.itemWidget(item, self.COL_PROGRESS)
        assert isinstance(bar, QProgressBar)
        p = handle.last_progress
        if handle.state == "done":
            bar.setRange(0, 1000)
            bar.setValue(1000)
        elif p is not None and p.fraction is None and handle.state == "running":
            bar.setRange(0, 0)  # busy indicator
        elif p is not None and p.fraction is not None:
            bar.setRange(0, 1000)
            bar.setValue(round(1000 * min(1.0, max(0.0, p.fraction))))
        message = {"queued": "queued", "cancelled": "cancelled"}.get(handle.state, "")
        if handle.state == "running" and handle.cancel_requested:
            message = "cancelling…"
            action = self.tree.itemWidget(item, self.COL_ACTION)
            if action is not None:
                action.setEnabled(False)
        elif handle.state == "failed":
            message = f"failed: {handle.error}"
        elif p is not None and handle.state == "running":
            message = p.message
        elif handle.state == "done":  # the last report only if it describes the end
            last = p.message if p is not None and p.fraction == 1.0 else ""
            message = "done" + (f": {last}" if last and last.lower() != "done" else "")  # never "done: done"
        item.setText(self.COL_MESSAGE, message)
        item.setToolTip(self.COL_MESSAGE, message)
        item.setText(self.COL_ELAPSED, _format_elapsed(handle))
        if handle.is_finished:
            self._show_finished(handle, item, bar)
        if handle.state == "running" and not self._clock.isActive():
            self._clock.start()

    def _show_finished(self, handle: JobHandle, item: QTreeWidgetItem, bar: QProgressBar) -> None:
        if bar.maximum() == 0:
            bar.setRange(0, 1000)
        bar.setEnabled(False)
        if handle.state == "failed":
            color = QBrush(Qt.GlobalColor.red)
            details = QPushButton("Details…")
            details.setObjectName("detailsButton")
            details.clicked.connect(lambda: self._show_details(handle))
            self.tree.setItemWidget(item, self.COL_ACTION, details)
        else:
            color = self.palette().brush(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Text)
            self.tree.removeItemWidget(item, self.COL_ACTION)
        for col in range(self.tree.columnCount()):
            item.setForeground(col, color)

    def _show_details(self, handle: JobHandle) -> None:
        box = QMessageBox(
            QMessageBox.Icon.Critical, "Job failed", f"{handle.title} failed.", parent=self
        )
        box.setInformativeText(f"{type(handle.error).__name__}: {handle.error}")
        box.setDetailedText(handle.traceback)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    def _tick(self) -> None:
        running = False
        for handle, item in self._items.values():
            if handle.state == "running":
                running = True
                item.setText(self.COL_ELAPSED, _format_elapsed(handle))
        if not running:
            self._clock.stop()


def _format_elapsed(handle: JobHandle) -> str:
    """``m:ss`` (or ``h:mm:ss``) of the job's running time; empty while queued."""
    if handle.started_at is None:
        return ""
    total = int(handle.elapsed)
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def show_progress(bar: Any, p: Progress) -> None:
    """Show ``p`` in the QProgressBar ``bar``: busy (no fraction) or its fraction, with the message."""
    if p.fraction is None:
        bar.setRange(0, 0)
    else:
        bar.setRange(0, 1000)
        bar.setValue(int(1000 * p.fraction))
    bar.setFormat(f"{p.message} %p%" if p.message else "%p%")
