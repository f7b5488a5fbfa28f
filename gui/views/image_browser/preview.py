"""Decoding the single-image pane's picture off the GUI thread: :class:`PreviewLoader`."""

from __future__ import annotations

import threading

from PySide6.QtCore import QObject, Signal, Slot
from PySide6.QtGui import QImage

from gui.thumbnails import load_preview


def unreadable_cause(path: str) -> str:
    """Why ``path`` cannot be shown, as the engine says it (the CLI's words)."""
    from engine.data.images import load_image
    from engine.types import ConvLensError

    try:
        load_image(path)
    except ConvLensError as e:
        return str(getattr(e, "cause", "") or e)
    except Exception as e:  # noqa: BLE001 - anything else the decoder raises: say what it was
        return f"{type(e).__name__}: {e}"
    return "it could not be decoded for display"

__all__ = ["PREVIEW_MAX_SIDE", "PreviewLoader"]

PREVIEW_MAX_SIDE = 1024
"""The pane's image is decoded at most this large; it is scaled down further to fit."""


class _PreviewBridge(QObject):
    """Emitted from the preview worker; lives on the GUI thread, so delivery is queued."""

    loaded = Signal(int, object, str)  # request token, QImage (a null image: unreadable), why


class PreviewLoader(QObject):
    """Decodes the most recently requested image on a worker thread.

    One request at a time; requests made while one is decoding replace each other, so holding
    an arrow key down decodes only the images the user stops on. ``loaded`` fires on the GUI
    thread for the newest request only, with the engine's cause when the file is unreadable.
    """

    loaded = Signal(object, str)  # QImage | None (unreadable), the cause ("" when read)

    def __init__(self, max_side: int, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._max_side = max_side
        self._lock = threading.Lock()
        self._token = 0
        self._wanted: tuple[int, str] | None = None
        self._busy = False
        self._bridge = _PreviewBridge(self)  # dies with the loader; see _work
        self._bridge.loaded.connect(self._deliver)

    def request(self, path: str) -> None:
        with self._lock:
            self._token += 1
            self._wanted = (self._token, path)
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._work, name="convlens-preview", daemon=True).start()

    def cancel(self) -> None:
        """Forget the pending request; a result in flight is dropped."""
        with self._lock:
            self._token += 1
            self._wanted = None

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._wanted is None:
                    self._busy = False
                    return
                token, path = self._wanted
                self._wanted = None
            image = load_preview(path, self._max_side)
            why = "" if image is not None else unreadable_cause(path)
            try:
                self._bridge.loaded.emit(token, image if image is not None else QImage(), why)
            except RuntimeError:  # the loader was deleted (its view closed)
                return

    @Slot(int, object, str)
    def _deliver(self, token: int, image: QImage, why: str) -> None:
        if token == self._token:
            self.loaded.emit(None if image.isNull() else image, why)
