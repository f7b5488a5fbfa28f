"""What the shell hands every view: the shared selection, the job runner, the session."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .jobs import JobRunner
    from .selection import Selection
    from .session import Session


@dataclass
class AppContext:
    selection: Selection
    runner: JobRunner
    session: Session
