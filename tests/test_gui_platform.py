"""The Qt binding does not corrupt Python's reference counts (PySide6 6.12.0 on Python 3.11 did:
every signal emit dropped a reference to True, every call returning nothing one to None, and
the interpreter aborted after a few thousand)."""

from __future__ import annotations

import sys

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QApplication


class _Emitter(QObject):
    fired = Signal(int)


def test_signals_and_event_processing_keep_refcounts(qapp: QApplication) -> None:
    em = _Emitter()
    got: list[int] = []
    em.fired.connect(got.append)
    before_none, before_true = sys.getrefcount(None), sys.getrefcount(True)
    for i in range(2000):
        em.fired.emit(i)
        qapp.processEvents()
    drift_none = before_none - sys.getrefcount(None)
    drift_true = before_true - sys.getrefcount(True)
    assert len(got) == 2000
    if sys.version_info < (3, 12):  # immortal objects from 3.12 on: counts are not meaningful
        assert abs(drift_none) < 100 and abs(drift_true) < 100, (drift_none, drift_true)
