"""Jobs: generators that yield :class:`Progress` and return a result.

A job runner is any Python generator function ``run(...) -> Generator[Progress, None, R]``.
The caller iterates it; to cancel, it stops iterating and calls ``gen.close()``, which raises
``GeneratorExit`` at the yield where the job is paused, so ``finally`` blocks and context
managers clean up (hooks removed, temporary files deleted). Jobs therefore yield at least once
per batch. The GUI runs the same generator in a worker thread; tests and the CLI use
:func:`run_sync`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from .types import Progress

R = TypeVar("R")
Job = Generator[Progress, None, R]


@dataclass(frozen=True)
class DataProgress(Progress):
    """A :class:`Progress` that also carries plain, typed values about the step just done
    (``data``: names to numbers or strings, e.g. a training batch's ``{"epoch": 1, "batch": 3,
    "task_loss": 0.41}``), so that a caller reads them instead of parsing ``message``. Everything
    that takes a Progress takes one; :func:`subjob` passes ``data`` through."""

    data: Mapping[str, Any] = field(default_factory=dict)


class Cancelled(Exception):
    """Raised by :func:`run_sync` when ``should_cancel`` asked the job to stop."""


def run_sync(
    job: Job[R],
    on_progress: Callable[[Progress], None] | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> R:
    """Run a job generator to completion on this thread and return its result."""
    try:
        while True:
            try:
                p = next(job)
            except StopIteration as stop:
                return stop.value
            if on_progress is not None:
                on_progress(p)
            if should_cancel is not None and should_cancel():
                raise Cancelled()
    finally:
        job.close()


def subjob(job: Job[R], start: float, stop: float, prefix: str = "") -> Job[R]:
    """Re-yield a nested job's progress mapped into ``[start, stop]`` of the outer job."""
    while True:
        try:
            p = next(job)
        except StopIteration as s:
            return s.value
        f = None if p.fraction is None else start + (stop - start) * p.fraction
        yield replace(p, fraction=f, message=prefix + p.message)  # a DataProgress keeps its data
