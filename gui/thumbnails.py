"""Thumbnails decoded off the GUI thread, kept in a bounded LRU and optionally on disk.

:class:`ThumbnailCache` answers :meth:`~ThumbnailCache.get` immediately: the cached ``QImage``,
or ``None`` after queueing a request. Requests are served newest first (LIFO), so while the
user scrolls fast the rows painted last, the visible ones, are decoded first; the queue keeps
only the :data:`MAX_PENDING` newest requests, older ones (rows long scrolled away) are dropped
without any work and simply requested again if they are painted again.

Threading model
---------------
* Worker threads are plain daemon :class:`threading.Thread` objects started on demand, at most
  ``workers`` at a time; a worker exits after :data:`IDLE_EXIT_S` without work, so an idle cache
  holds no thread and nothing has to be shut down at exit. While scrolling, the workers stay
  alive and a request only wakes one (starting a thread costs the GUI thread a GIL hand-over,
  which measurably slowed painting).
* Workers decode with PIL (:func:`engine.data.images.load_image`), resize, and build the
  ``QImage`` themselves (``QImage`` is safe off the GUI thread, ``QPixmap`` is not). They never
  touch the cache object: they emit a signal of a private bridge ``QObject`` that lives on the
  GUI thread, delivered through a queued connection; the GUI thread then stores the image and
  emits :attr:`ThumbnailCache.ready`.
* :meth:`~ThumbnailCache.set_paths` bumps a generation counter: results of an earlier image set
  that are still in flight are discarded on arrival.
* A file that cannot be decoded gets a grey placeholder with a cross, once: the failure is
  remembered, the file is not decoded again for this image set.

The disk cache stores JPEG thumbnails under ``disk_dir`` keyed by (absolute path, size,
modification time, file size); files are written to a temporary name and moved into place with
:func:`os.replace`, so a reader never sees a partial file. No ``fsync``: a thumbnail lost in a
crash is simply decoded again (an unreadable cache file is treated as missing).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image
from PySide6.QtCore import QObject, QPointF, Signal, Slot
from PySide6.QtGui import QColor, QImage, QPainter, QPen

from engine.cache import atomic_write_bytes, default_cache_root
from engine.data.images import ImageError, load_image

__all__ = [
    "IDLE_EXIT_S",
    "MAX_PENDING",
    "POLITE_PAUSE_S",
    "SCROLL_WINDOW_S",
    "ThumbnailCache",
    "load_preview",
    "placeholder_image",
]

MAX_PENDING = 256
"""Queued (not yet started) requests kept; older ones are dropped when newer ones arrive."""

IDLE_EXIT_S = 2.0
"""A worker thread exits after this many seconds without a request."""

SCROLL_WINDOW_S = 0.025
POLITE_PAUSE_S = 0.001
"""While requests keep arriving (a request less than SCROLL_WINDOW_S ago: the user is
scrolling), a worker sleeps POLITE_PAUSE_S after each thumbnail, handing the GIL to the GUI
thread; on two cores this halves the worst event-loop stalls while scrolling. When the view
is still, workers decode at full speed."""

_JPEG_QUALITY = 90
_THUMB_FORMAT = QImage.Format.Format_RGB32  # the raster engine's fastest format to draw


def _to_qimage(pil: Image.Image) -> QImage:
    """An owned ``Format_RGB32`` copy of an RGB PIL image (safe on any thread)."""
    w, h = pil.size
    data = pil.tobytes()
    return QImage(data, w, h, 3 * w, QImage.Format.Format_RGB888).convertToFormat(_THUMB_FORMAT)


#: part of the disk-cache key: bump when :func:`_fit` changes what a thumbnail looks like
FIT_VERSION = 2


def _fit(pil: Image.Image, max_side: int, enlarge: bool = True) -> Image.Image:
    """``pil`` fitted in ``max_side`` x ``max_side``, aspect kept: shrunk smoothly, or enlarged
    by the largest whole factor with nearest-neighbour pixels (a 25 px crop stays legible and
    shows its true pixels instead of a blur)."""
    if max(pil.size) > max_side:
        pil = pil.copy()
        pil.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    elif enlarge and (factor := max_side // max(pil.size)) >= 2:
        pil = pil.resize((pil.width * factor, pil.height * factor), Image.Resampling.NEAREST)
    return pil


def load_preview(path: str, max_side: int) -> QImage | None:
    """Decode ``path`` for display, shrunk to at most ``max_side`` px; None if unreadable.

    Meant for worker threads: returns a ``QImage``, never a ``QPixmap``.
    """
    try:
        return _to_qimage(_fit(Image.fromarray(load_image(path)), max_side, enlarge=False))
    except ImageError:
        return None


def placeholder_image(size: int, cross: bool) -> QImage:
    """A ``size`` x ``size`` light grey square; with ``cross``, the "unreadable" marker."""
    image = QImage(size, size, _THUMB_FORMAT)
    image.fill(QColor(222, 222, 222))
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setPen(QPen(QColor(170, 170, 170), 1))
    painter.drawRect(0, 0, size - 1, size - 1)
    if cross:
        m = size * 0.3
        painter.setPen(QPen(QColor(140, 140, 140), max(2.0, size / 24)))
        painter.drawLine(QPointF(m, m), QPointF(size - m, size - m))
        painter.drawLine(QPointF(size - m, m), QPointF(m, size - m))
    painter.end()
    return image


class _Bridge(QObject):
    """Emitted from worker threads; lives on the GUI thread, so delivery is queued."""

    done = Signal(int, int, object)  # generation, row, QImage (a null image: unreadable)


class _Queue:
    """The state shared with the workers; every field is guarded by ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.pending: OrderedDict[int, str] = OrderedDict()  # row -> path; newest last
        self.generation = 0
        self.running = 0  # worker threads alive
        self.idle = 0  # of which waiting for a request
        self.closed = False
        self.last_request = 0.0  # time.monotonic() of the newest request


class ThumbnailCache(QObject):
    """Thumbnails of an image set's rows, decoded in the background.

    ``size`` bounds both sides (aspect kept, never enlarged). ``memory_items`` bounds the
    in-memory LRU. ``disk_dir`` is the on-disk cache (default:
    ``default_cache_root() / "thumbs"``); ``use_disk=False`` disables it. ``workers`` is the
    number of decoding threads (default: ``cpu_count - 1``, between 1 and 3: decoding
    competes with the GUI thread for the CPU and the GIL, and on two cores a second worker
    doubles the paint time while scrolling).

    Lives on the GUI thread; every public method must be called there.
    """

    ready = Signal(int)
    """A row's thumbnail (or its placeholder) just became available through :meth:`get`."""

    def __init__(
        self,
        size: int = 96,
        memory_items: int = 4000,
        disk_dir: Path | None = None,
        *,
        use_disk: bool = True,
        workers: int | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        if size < 8:
            raise ValueError(f"thumbnail size must be >= 8, got {size}")
        self.size = size
        self.memory_items = max(1, memory_items)
        self.disk_dir: Path | None = (
            (disk_dir if disk_dir is not None else default_cache_root() / "thumbs")
            if use_disk
            else None
        )
        default_workers = min(3, (os.cpu_count() or 2) - 1)
        self.workers = max(1, workers if workers is not None else default_workers)
        self._paths: tuple[str, ...] = ()
        self._memory: OrderedDict[int, QImage] = OrderedDict()
        self._failed: set[int] = set()
        self._requested: set[int] = set()  # queued or being decoded; GUI thread only
        self._queue = _Queue()
        self._broken = placeholder_image(size, cross=True)
        # A child, so it dies with the cache in C++; the workers then see RuntimeError on emit.
        self._bridge = _Bridge(self)
        self._bridge.done.connect(self._deliver)

    @property
    def placeholder(self) -> QImage:
        """The image shown for files that cannot be decoded."""
        return self._broken

    def set_paths(self, paths: Sequence[str]) -> None:
        """Switch to a new image set: forget cached rows, drop every pending request."""
        self._paths = tuple(paths)
        self._memory.clear()
        self._failed.clear()
        self._requested.clear()
        with self._queue.lock:
            self._queue.pending.clear()
            self._queue.generation += 1

    def get(self, row: int) -> QImage | None:
        """The thumbnail of ``row`` if available, else None after queueing (or re-prioritising)
        its request; :attr:`ready` fires with ``row`` once it is available."""
        image = self._memory.get(row)
        if image is not None:
            self._memory.move_to_end(row)
            return image
        if row in self._failed:
            return self._broken
        if not 0 <= row < len(self._paths):
            return None
        q = self._queue
        with q.lock:
            if q.closed:
                return None
            if row in self._requested:
                if row in q.pending:  # not started yet: serve it before older requests
                    q.pending.move_to_end(row)
                return None
            self._requested.add(row)
            q.pending[row] = self._paths[row]
            q.last_request = time.monotonic()
            while len(q.pending) > MAX_PENDING:
                dropped, _ = q.pending.popitem(last=False)
                self._requested.discard(dropped)
            if q.idle:
                q.wake.notify()
            elif q.running < self.workers:
                q.running += 1
                threading.Thread(
                    target=_work,
                    args=(q, self._bridge, self.size, self.disk_dir),
                    name="convlens-thumbs",
                    daemon=True,
                ).start()
        return None

    def close(self) -> None:
        """Drop pending requests and stop the workers after their current image; from then on
        :meth:`get` only returns what is already cached."""
        with self._queue.lock:
            self._queue.closed = True
            self._queue.pending.clear()
            self._queue.wake.notify_all()

    @Slot(int, int, object)
    def _deliver(self, generation: int, row: int, image: QImage) -> None:
        if generation != self._queue.generation:
            return
        self._requested.discard(row)
        if image.isNull():
            self._failed.add(row)
        else:
            self._memory[row] = image
            while len(self._memory) > self.memory_items:
                self._memory.popitem(last=False)
        self.ready.emit(row)


def _work(q: _Queue, bridge: _Bridge, size: int, disk_dir: Path | None) -> None:
    """Worker thread: serve the newest pending request; exit when idle for IDLE_EXIT_S."""
    while True:
        with q.lock:
            if not q.pending and not q.closed:
                q.idle += 1
                q.wake.wait_for(lambda: q.pending or q.closed, timeout=IDLE_EXIT_S)
                q.idle -= 1
            if q.closed or not q.pending:
                q.running -= 1
                return
            row, path = q.pending.popitem(last=True)
            generation = q.generation
        image = _thumbnail(path, size, disk_dir)
        try:
            bridge.done.emit(generation, row, image if image is not None else QImage())
        except RuntimeError:  # the bridge was deleted: the application is shutting down
            with q.lock:
                q.running -= 1
            return
        if time.monotonic() - q.last_request < SCROLL_WINDOW_S:
            time.sleep(POLITE_PAUSE_S)


def _thumbnail(path: str, size: int, disk_dir: Path | None) -> QImage | None:
    """The thumbnail of ``path`` from the disk cache or decoded (and then stored); None if the
    file cannot be decoded."""
    cached: Path | None = None
    if disk_dir is not None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        key = f"{FIT_VERSION}\0{os.path.abspath(path)}\0{size}\0{st.st_mtime_ns}\0{st.st_size}"
        digest = hashlib.sha1(key.encode("utf-8", "surrogatepass"), usedforsecurity=False).hexdigest()
        cached = disk_dir / digest[:2] / f"{digest}.jpg"
        image = QImage(str(cached))
        if not image.isNull():
            return image.convertToFormat(_THUMB_FORMAT)
    try:
        pil = _fit(Image.fromarray(load_image(path)), size)
    except ImageError:
        return None
    if cached is not None:
        with contextlib.suppress(OSError):
            _write_atomic(cached, pil)
    return _to_qimage(pil)


def _write_atomic(target: Path, pil: Image.Image) -> None:
    """Store ``pil`` as a JPEG at ``target`` atomically (no fsync: a thumbnail is disposable)."""
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=_JPEG_QUALITY)
    atomic_write_bytes(target, buf.getvalue(), durable=False)

