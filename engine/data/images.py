"""Image sets: finding image files, decoding them predictably and feeding them to a model.

Three layers, each usable on its own:

* :func:`open_image_set` turns a folder (ImageFolder convention) or a CSV file into an
  :class:`ImageSet`, an immutable, deterministically ordered list of :class:`ImageRecord`.
* :func:`load_image` decodes one file into a ``uint8`` RGB array, with documented conversions for
  every PIL mode, and :func:`preprocess` turns that array into a normalised ``float32`` model
  input according to a :class:`Preprocess` spec. :func:`read_image_bytes` is its first half
  (a regular file, at most :data:`MAX_IMAGE_BYTES`, read once) and :func:`decode_image` the
  second; :func:`file_digest` hashes a file's bytes the way the loader does.
* :class:`ImageLoader` runs both in a thread pool with bounded prefetch and yields
  :class:`Batch` objects in record order, skipping (and reporting) files that fail to load.

Nothing here imports torch or Qt.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import stat
import threading
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..types import ConvLensError, ImageRecord, Preprocess

log = logging.getLogger("convlens.data")

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
"""File name suffixes (compared case-insensitively) that a folder scan treats as images."""

MAX_IMAGE_BYTES = 512 * 1024**2
"""Files larger than this (512 MiB) are refused as images before anything is read."""

LARGE_IMAGE_PIXELS = 100_000_000
"""Images with more pixels than this (100 MP) are decoded with a warning naming the file."""

MAX_IMAGE_PIXELS = 2 * 178_956_970
"""Images with more pixels than this (about 358 MP, PIL's own refusal limit: twice its default
``Image.MAX_IMAGE_PIXELS``) are refused without decoding, as possible decompression bombs.
PIL's raw ``DecompressionBombWarning`` never escapes :func:`decode_image`: the warning above
:data:`LARGE_IMAGE_PIXELS` names the file instead."""

DIGEST_SIZE = 16
"""Bytes of the BLAKE2b digest of an image file's content (see :func:`file_digest`)."""

MIN_SIDE = 4
"""Images whose smaller side is below this many pixels are refused by :func:`load_image`."""

PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "class", "target")


class ImageError(ConvLensError):
    """A file or image set that cannot be used. ``str(err)`` is ``"<path>: <cause>"``."""

    def __init__(self, path: str | os.PathLike[str], cause: str) -> None:
        super().__init__(os.fspath(path), cause)
        self.path = os.fspath(path)
        self.cause = cause

    def __str__(self) -> str:
        return f"{self.path}: {self.cause}"


# --------------------------------------------------------------------------------------------
# Image sets
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSet:
    """An ordered, immutable collection of image files with optional labels.

    ``source`` is the absolute folder or CSV path the set was opened from; record paths are
    absolute. ``ignored`` lists (relative to :attr:`root`) the files a folder scan saw but did
    not take because their extension is not in :data:`IMAGE_EXTENSIONS`; ``missing`` the CSV
    rows skipped because their file is missing.
    """

    source: str
    records: tuple[ImageRecord, ...]
    ignored: tuple[str, ...] = ()
    missing: tuple[tuple[str, str], ...] = ()
    """(path, reason) of the files a CSV lists that are not in the set: they do not exist or are
    not regular files (a folder, a FIFO, a device). Empty for folders."""

    @property
    def root(self) -> str:
        """The folder relative paths refer to: the source folder, or the CSV's folder."""
        if Path(self.source).suffix.lower() == ".csv" and not os.path.isdir(self.source):
            return os.path.dirname(self.source)
        return self.source

    @property
    def labels(self) -> tuple[str, ...]:
        """The sorted unique labels, ``None`` excluded."""
        return tuple(sorted({r.label for r in self.records if r.label is not None}))

    @property
    def has_labels(self) -> bool:
        return any(r.label is not None for r in self.records)

    def relative_path(self, record: ImageRecord) -> str:
        """``record.path`` relative to :attr:`root`, with ``/`` separators."""
        try:
            return Path(os.path.relpath(record.path, self.root)).as_posix()
        except ValueError:  # Windows: a different drive than the root
            return Path(record.path).as_posix()

    def fingerprint(self) -> str:
        """SHA-256 hex digest identifying the set's current content.

        Hashes, for every record in order, its path relative to :attr:`root`, the file's size and
        modification time (ns) as they are *now*, and its label. It is stable across runs and
        machines with the same files, and changes when a file is modified (or touched), added,
        removed, relabelled or reordered. A file that has vanished since the set was opened
        hashes with size and mtime -1.
        """
        h = hashlib.sha256()
        root = self.root
        prefix = os.path.abspath(root) + os.sep
        for r in self.records:
            try:
                st = os.stat(r.path)
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
            rel = _plain_relative(r.path, prefix)
            if rel is None:
                rel = self.relative_path(r)
            h.update(json.dumps([rel, size, mtime, r.label]).encode() + b"\n")
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.records)


def _plain_relative(path: str, prefix: str) -> str | None:
    """``path`` relative to the folder ``prefix`` (normalised, ending in the separator) when it
    lies inside it with no ``.``, ``..`` or empty parts: what :meth:`ImageSet.relative_path`
    gives, without its ``os.path.relpath`` cost; else None (POSIX only)."""
    if os.sep != "/" or not path.startswith(prefix):
        return None
    rest = path[len(prefix):]
    if not rest or any(part in ("", ".", "..") for part in rest.split("/")):
        return None
    return rest


def open_image_set(source: str | os.PathLike[str]) -> ImageSet:
    """Open a folder or a CSV file as an :class:`ImageSet`.

    **Folder** (ImageFolder convention): the folder is scanned recursively; names starting with
    ``.`` (files and folders) are skipped and symlinked folders are not followed. Files whose
    suffix is in :data:`IMAGE_EXTENSIONS` become records, other files go to ``ignored``. An
    image inside a subfolder is labelled with the name of the *top-level* subfolder it is under;
    an image directly in the folder gets label ``None`` (so a flat folder is unlabelled).
    Records are sorted by (label, relative path), unlabelled first. Whether the files decode is
    not checked here (see :func:`load_image`).

    **CSV file** (``.csv`` suffix, UTF-8, comma separated): see :func:`_read_csv`.

    Raises :class:`ImageError` naming the path when the source does not exist, is neither a
    folder nor a ``.csv`` file, cannot be read, or yields no images.
    """
    path = os.path.abspath(os.fspath(source))
    if os.path.isdir(path):
        records, ignored = _scan_folder(path)
        if not records:
            what = (
                "folder is empty" if not ignored else f"no image files among {len(ignored)} files"
            )
            raise ImageError(path, f"{what} (image extensions: {_extension_list()})")
        return ImageSet(path, records, ignored)
    if os.path.isfile(path):
        if Path(path).suffix.lower() != ".csv":
            raise ImageError(path, "not a folder or a .csv file")
        records, missing = _read_csv(path)
        if not records:
            raise ImageError(path, "the CSV lists no existing image files")
        return ImageSet(path, records, missing=missing)
    raise ImageError(path, "no such folder or file")


def _extension_list() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def _scan_folder(root: str) -> tuple[tuple[ImageRecord, ...], tuple[str, ...]]:
    """Walk ``root``; return the sorted image records and the sorted ignored relative paths."""
    found: list[tuple[str | None, str, str]] = []  # (label, relative posix path, absolute path)
    ignored: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            rel = Path(os.path.relpath(full, root)).as_posix()
            if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(rel)
                continue
            parts = rel.split("/")
            found.append((parts[0] if len(parts) > 1 else None, rel, full))
    found.sort(key=lambda t: (t[0] is not None, t[0] or "", t[1]))
    return tuple(ImageRecord(full, label) for label, _, full in found), tuple(sorted(ignored))


def _read_csv(csv_path: str) -> tuple[tuple[ImageRecord, ...], tuple[tuple[str, str], ...]]:
    """Read image records from a CSV file, in row order; also return the (path, reason) of the
    listed files that are missing or not regular files.

    The first row is a header when one of its cells (case-insensitive, stripped) is a known
    column name: ``path``/``image``/``file``/``filename`` for the image path and
    ``label``/``class``/``target`` for the label. A header must name a path column. Without a
    header, column 0 is the path and column 1, when present, the label. Relative paths are
    relative to the CSV's folder. An empty label cell means ``None``; blank rows are ignored.
    Any listed file is taken whatever its extension (it was named explicitly).

    Rows are skipped, each with a warning on the ``convlens.data`` logger naming the CSV, the row
    number (1-based, header included) and the cause, when the path cell is empty, the file does
    not exist (or is not a regular file) or the path repeats an earlier row (the first wins).
    A missing, unreadable or malformed CSV raises :class:`ImageError`.
    """
    base = os.path.dirname(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ImageError(csv_path, f"cannot read the CSV ({exc})") from exc

    path_col, label_col, first = 0, 1, 0
    if rows:
        header = [c.strip().lower() for c in rows[0]]
        if any(c in PATH_COLUMNS or c in LABEL_COLUMNS for c in header):
            path_col = next((i for i, c in enumerate(header) if c in PATH_COLUMNS), -1)
            if path_col < 0:
                names = "/".join(PATH_COLUMNS)
                raise ImageError(csv_path, f"the header row has no path column ({names})")
            label_col = next((i for i, c in enumerate(header) if c in LABEL_COLUMNS), -1)
            first = 1

    records: list[ImageRecord] = []
    missing: list[tuple[str, str]] = []
    seen: set[str] = set()
    for number, row in enumerate(rows[first:], start=first + 1):
        if not any(cell.strip() for cell in row):
            continue
        cell = row[path_col].strip() if path_col < len(row) else ""
        if not cell:
            log.warning("%s: row %d has no path; skipped", csv_path, number)
            continue
        full = os.path.normpath(os.path.join(base, os.path.expanduser(cell)))
        if not os.path.isfile(full):
            if os.path.exists(full):
                log.warning("%s: row %d: %s is not a regular file; skipped", csv_path, number, full)
                missing.append((full, "not a regular file"))
            else:
                log.warning("%s: row %d: %s does not exist; skipped", csv_path, number, full)
                missing.append((full, "does not exist"))
            continue
        if full in seen:
            log.warning("%s: row %d repeats %s; skipped", csv_path, number, full)
            continue
        seen.add(full)
        label = row[label_col].strip() if 0 <= label_col < len(row) else ""
        records.append(ImageRecord(full, label or None))
    return tuple(records), tuple(missing)


# --------------------------------------------------------------------------------------------
# Decoding and preprocessing
# --------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file into a ``uint8`` array of shape (H, W, 3), RGB.

    The file is read once by :func:`read_image_bytes` (a regular file of at most
    :data:`MAX_IMAGE_BYTES`) and decoded from those bytes by :func:`decode_image`.

    Conversions, by PIL mode (after the EXIF orientation is applied with
    ``ImageOps.exif_transpose``; multi-frame files such as animated GIFs, multi-page TIFFs or
    animated WebPs give their first frame, with a warning on ``convlens.data`` naming the file
    and its frame count):

    * ``RGB``: as is. 16-bit-per-channel RGB(A) PNGs are already reduced to 8 bits by PIL,
      which keeps the high byte (``value >> 8``, at most 1 below ``round(value / 257)``).
    * ``L``: replicated to 3 channels. ``1`` (bilevel): 0 / 255, replicated.
    * ``LA``, ``RGBA``, ``PA`` and other modes with alpha: the alpha channel is **dropped**, the
      stored colours are kept as they are (no compositing over a background). Palette
      transparency is ignored likewise.
    * ``P`` (palette): colours looked up in the palette. ``CMYK``, ``YCbCr`` and any other mode
      PIL can convert: ``Image.convert("RGB")``.
    * ``I;16``, ``I;16B``, ``I;16L`` (16-bit gray): ``round(value / 257)``; ``I`` (32-bit int):
      clipped to 0..65535 first. Replicated to 3 channels.
    * ``F`` (float gray): NaN counts as 0; the values are taken to be in [0, 1] when the
      largest is <= 1 (then multiplied by 255), else in [0, 255]; clipped and rounded.

    Raises :class:`ImageError` naming the file: ``"<path>: not a readable image (<cause>)"`` for
    anything PIL cannot decode (unknown format, truncated or corrupt data, I/O error; truncated
    files are never padded), ``"<path>: image is WxH px, too small to analyse (minimum 4 px per
    side)"`` when the smaller side is below :data:`MIN_SIDE`, a refusal of images over
    :data:`MAX_IMAGE_PIXELS` (decompression bombs), and those of :func:`read_image_bytes`
    (not a regular file, too large, unreadable). Images over :data:`LARGE_IMAGE_PIXELS` are
    decoded with a warning naming the file.
    """
    p = os.fspath(path)
    return decode_image(read_image_bytes(p), p)


def _open_regular(p: str) -> tuple[int, os.stat_result]:
    """Open ``p`` for reading without blocking on a FIFO; return (fd, fstat) of a regular file
    of at most :data:`MAX_IMAGE_BYTES`, else raise :class:`ImageError`."""
    try:
        st = os.stat(p)
        if stat.S_ISREG(st.st_mode):
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                         | getattr(os, "O_BINARY", 0))
            st = os.fstat(fd)  # the file opened, not the one stat-ed a moment earlier
        else:
            fd = -1
    except FileNotFoundError as exc:
        raise ImageError(p, "not a readable image (no such file)") from exc
    except OSError as exc:
        raise ImageError(p, f"not a readable image ({exc.strerror or exc})") from exc
    if not stat.S_ISREG(st.st_mode):
        if fd >= 0:
            os.close(fd)
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise ImageError(p, f"not a regular file ({kind})")
    if st.st_size > MAX_IMAGE_BYTES:
        os.close(fd)
        raise ImageError(p, f"file is {st.st_size:,} bytes, over the {_byte_limit()} limit for an image; "
                            "not read")
    return fd, st


def _byte_limit() -> str:
    mib = MAX_IMAGE_BYTES / 1024**2
    return f"{mib:g} MiB" if mib >= 1 else f"{MAX_IMAGE_BYTES:,} bytes"


def read_image_bytes(path: str | os.PathLike[str]) -> bytes:
    """The content of an image file, read once.

    Refuses, with :class:`ImageError` naming the file and before reading anything, what is
    not a regular file (a folder, FIFO, device such as ``/dev/zero``, socket; symlinks are
    followed) and files over :data:`MAX_IMAGE_BYTES`; a FIFO is never waited on.
    """
    p = os.fspath(path)
    fd, _st = _open_regular(p)
    try:
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_IMAGE_BYTES + 1)
    except OSError as exc:
        raise ImageError(p, f"not a readable image ({exc.strerror or exc})") from exc
    if len(data) > MAX_IMAGE_BYTES:  # it grew while being read
        raise ImageError(p, f"file is over the {_byte_limit()} limit for an image")
    return data


def bytes_digest(data: bytes) -> bytes:
    """The :data:`DIGEST_SIZE`-byte BLAKE2b digest of ``data`` (an image file's content)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE).digest()


_CHUNK = 1 << 20
_buffers = threading.local()


def file_digest(path: str | os.PathLike[str]) -> bytes:
    """:func:`bytes_digest` of the file's content (files over 1 MiB streamed, 1 MiB at a
    time); the same checks as :func:`read_image_bytes` (raises :class:`ImageError`)."""
    p = os.fspath(path)
    fd, st = _open_regular(p)
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    total = 0
    try:
        if st.st_size < _CHUNK:  # the usual small image: one read
            data = os.read(fd, _CHUNK)
            h.update(data)
            total = len(data)
        if total == _CHUNK or st.st_size >= _CHUNK:
            buf = getattr(_buffers, "buf", None)
            if buf is None:
                buf = _buffers.buf = bytearray(_CHUNK)
            view = memoryview(buf)
            with open(fd, "rb", buffering=0, closefd=False) as f:
                while n := f.readinto(buf):
                    h.update(view[:n])
                    total += n
                    if total > MAX_IMAGE_BYTES:
                        raise ImageError(p, f"file is over the {_byte_limit()} limit for an image")
    except OSError as exc:
        raise ImageError(p, f"not a readable image ({exc.strerror or exc})") from exc
    finally:
        os.close(fd)
    return h.digest()


def digest_files(paths: Sequence[str], workers: int | None = None) -> np.ndarray:
    """(len(paths), :data:`DIGEST_SIZE`) ``uint8``: each file's :func:`file_digest`, all zeros
    for a file that cannot be read. Files are read (never decoded) by ``workers`` threads
    (default ``min(8, os.cpu_count())``; hashing releases the GIL)."""
    out = np.zeros((len(paths), DIGEST_SIZE), dtype=np.uint8)

    def one(i: int) -> None:
        with contextlib.suppress(ImageError):
            out[i] = np.frombuffer(file_digest(paths[i]), dtype=np.uint8)

    def some(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            one(i)

    n_workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
    if n_workers == 1 or len(paths) < 64:
        some(0, len(paths))
    else:
        step = 256
        with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="convlens-digest") as pool:
            for f in [pool.submit(some, lo, min(lo + step, len(paths))) for lo in range(0, len(paths), step)]:
                f.result()
    return out


_BOMB_FILTER = ("ignore", None, Image.DecompressionBombWarning, None, 0)


def _quiet_pil_bomb_warning() -> None:
    """Keep PIL's raw DecompressionBombWarning (which names no file) from escaping; the size
    checks in :func:`decode_image` warn or refuse by file name instead. Re-installed when
    another filter was put in front of it (``warnings.catch_warnings`` blocks restore the list)."""
    if warnings.filters[:1] != [_BOMB_FILTER]:
        warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def decode_image(data: bytes, path: str | os.PathLike[str]) -> np.ndarray:
    """Decode the bytes of image file ``path`` as :func:`load_image` describes (``path`` only
    names the file in errors and warnings)."""
    p = os.fspath(path)
    try:
        _quiet_pil_bomb_warning()
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            pixels = w * h
            if pixels > MAX_IMAGE_PIXELS:
                raise ImageError(p, f"image is {w}x{h} = {pixels:,} pixels, over the limit of "
                                    f"{MAX_IMAGE_PIXELS:,}; not decoded (a possible decompression bomb)")
            if pixels > LARGE_IMAGE_PIXELS:
                log.warning("%s: large image, %dx%d = %s pixels (warning above %s); decoding it takes "
                            "about %.1f GB", p, w, h, f"{pixels:,}", f"{LARGE_IMAGE_PIXELS:,}", pixels * 3 / 1e9)
            frames = getattr(img, "n_frames", 1)
            if isinstance(frames, int) and frames > 1:
                log.warning("%s: %d frames (animated or multi-page image); using the first", p, frames)
                img.seek(0)
            img.load()
            oriented = ImageOps.exif_transpose(img)
            w, h = oriented.size
            if min(w, h) < MIN_SIDE:
                raise ImageError(
                    p, f"image is {w}x{h} px, too small to analyse (minimum {MIN_SIDE} px per side)"
                )
            return _to_rgb(oriented)
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:  # PIL refuses in Image.open, before our check
        m = re.search(r"\((\d+) pixels\)", str(exc))
        if m and int(m.group(1)) > MAX_IMAGE_PIXELS:
            raise ImageError(p, f"image is {int(m.group(1)):,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}; "
                                "not decoded (a possible decompression bomb)") from exc
        raise ImageError(p, f"not decoded, a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(p, "not a readable image (unknown or invalid image format)") from exc
    # PIL's format plugins raise many exception types on malformed data (OSError, SyntaxError,
    # ValueError, struct.error, ...): all mean "this file is unusable".
    except Exception as exc:
        raise ImageError(p, f"not a readable image ({_describe(exc)})") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image to a (H, W, 3) uint8 array as documented in :func:`load_image`."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode in ("1", "L"):
        gray = np.asarray(img.convert("L"), dtype=np.uint8)
    elif mode.startswith("I;16") or mode == "I":
        values = np.asarray(img).astype(np.float64)
        gray = np.rint(np.clip(values, 0, 65535) / 257).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        gray = np.rint(np.clip(values, 0, 255)).astype(np.uint8)
    else:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def preprocess(img: np.ndarray, spec: Preprocess) -> np.ndarray:
    """Turn a (H, W, 3) ``uint8`` RGB image into a ``float32`` model input of shape (C, H, W).

    Steps, in order:

    1. ``spec.grayscale``: luminance by PIL ``convert("L")`` (ITU-R 601-2:
       ``L = R*299/1000 + G*587/1000 + B*114/1000``), one channel.
    2. Resize with PIL bilinear interpolation (PIL antialiases when downscaling):

       * ``"stretch"``: to exactly ``spec.input_size`` (aspect ratio not kept);
       * ``"shorter_side_crop"``: scale keeping the aspect ratio so that the image covers
         ``input_size / crop_fraction`` (sizes floored, never below ``input_size``), then crop
         the centre ``input_size``. For 224 px and 0.875 this is torchvision's
         ``Resize(256)`` + ``CenterCrop(224)``.
    3. ``spec.channels == "bgr"``: reverse the channel order.
    4. ``x = (pixel / 255 - mean) / std`` per channel, with mean/std in the model's channel
       order (only the first entry with ``grayscale``).
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    pil = Image.fromarray(img, "RGB")
    if spec.grayscale:
        pil = pil.convert("L")
    target_h, target_w = spec.input_size
    if spec.resize == "stretch":
        pil = pil.resize((target_w, target_h), Image.Resampling.BILINEAR)
    elif spec.resize == "shorter_side_crop":
        pil = _resize_cover_and_crop(pil, target_h, target_w, spec.crop_fraction)
    else:
        raise ValueError(f"unknown resize policy {spec.resize!r}")

    x = np.asarray(pil, dtype=np.float32) / np.float32(255.0)
    if spec.grayscale:
        x = x[None, :, :]
        mean = np.asarray(spec.mean[:1], dtype=np.float32)
        std = np.asarray(spec.std[:1], dtype=np.float32)
    else:
        x = x.transpose(2, 0, 1)
        if spec.channels == "bgr":
            x = x[::-1]
        mean = np.asarray(spec.mean, dtype=np.float32)
        std = np.asarray(spec.std, dtype=np.float32)
    out = (x - mean[:, None, None]) / std[:, None, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def _resize_cover_and_crop(
    pil: Image.Image, target_h: int, target_w: int, fraction: float
) -> Image.Image:
    """Scale ``pil`` to cover ``(target_h, target_w) / fraction`` (aspect kept); centre-crop."""
    if not 0 < fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], got {fraction}")
    w, h = pil.size
    scale = max(target_h / fraction / h, target_w / fraction / w)
    # Floor like torchvision's Resize(int) (long side) and timm (size / crop_pct); the epsilon
    # keeps an exact product such as 255.99999 on the side that sets the scale.
    new_h = max(target_h, int(h * scale + 1e-6))
    new_w = max(target_w, int(w * scale + 1e-6))
    pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
    # Same rounding as torchvision's CenterCrop.
    top = round((new_h - target_h) / 2.0)
    left = round((new_w - target_w) / 2.0)
    return pil.crop((left, top, left + target_w, top + target_h))


# --------------------------------------------------------------------------------------------
# Batched loading
# --------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """Preprocessed images: ``array[k]`` is the image ``image_set.records[indices[k]]``."""

    indices: np.ndarray  # int64, (B,)
    array: np.ndarray  # float32, (B, C, H, W)

    def __len__(self) -> int:
        return len(self.indices)


class ImageLoader:
    """Decode and preprocess an image set in a thread pool; iterate :class:`Batch` es in order.

    Each file is read once: its bytes are hashed (:attr:`digests`) and decoded from memory.
    Images are taken in record order (or in the order of ``indices``, a subset). Every batch
    holds ``batch_size`` images except the last; a file that fails to load is left out (the
    batch's ``indices`` say which images it holds), appended to :attr:`skipped` as
    ``(path, cause)`` and logged as a warning on ``convlens.data``. Batches with no good image
    are never yielded.

    At most ``batch_size * (prefetch + 1)`` images are queued or held at any time: the batch
    being assembled plus ``prefetch`` batches ahead, so memory is bounded whatever the set
    size. ``workers`` defaults to ``min(8, os.cpu_count())``.

    Each iteration starts a fresh pool, which is shut down when the iteration ends, is
    abandoned (the generator is closed or garbage collected) or :meth:`close` is called;
    queued work is cancelled and at most one image per worker is finished. :meth:`close` may
    be called from any thread; iterating after it yields nothing. Also a context manager.
    """

    def __init__(
        self,
        image_set: ImageSet,
        spec: Preprocess,
        batch_size: int = 64,
        workers: int | None = None,
        prefetch: int = 2,
        indices: Sequence[int] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        n = len(image_set.records)
        order = (
            np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        if order.ndim != 1 or (order.size and (order.min() < 0 or order.max() >= n)):
            raise ValueError(f"indices must be a sequence of integers in [0, {n})")
        self.image_set = image_set
        self.spec = spec
        self.batch_size = batch_size
        self.workers = max(1, workers if workers is not None else min(8, os.cpu_count() or 1))
        self.prefetch = prefetch
        self.indices = order
        self.skipped: list[tuple[str, str]] = []
        self.digests = np.zeros((n, DIGEST_SIZE), dtype=np.uint8)
        """Row ``i``: :func:`bytes_digest` of record ``i``'s file as it was read (zeros until
        read, or when it could not be read), the same as :func:`file_digest` gives."""
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._pools: set[ThreadPoolExecutor] = set()

    def __len__(self) -> int:
        """Number of batches if every image loads (an upper bound)."""
        return math.ceil(len(self.indices) / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        if self._closed.is_set():
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="convlens-data")
        with self._lock:
            self._pools.add(pool)
        try:
            yield from self._batches(pool)
        finally:
            with self._lock:
                self._pools.discard(pool)
            pool.shutdown(wait=True, cancel_futures=True)

    def _batches(self, pool: ThreadPoolExecutor) -> Iterator[Batch]:
        window = self.batch_size * (self.prefetch + 1)
        todo = iter(self.indices.tolist())
        pending: deque[tuple[int, Future[np.ndarray]]] = deque()
        got_idx: list[int] = []
        got_arr: list[np.ndarray] = []
        while True:
            while len(pending) + len(got_idx) < window and (i := next(todo, None)) is not None:
                if self._closed.is_set():
                    return
                try:
                    pending.append((i, pool.submit(self._load, i)))
                except RuntimeError:  # the pool was shut down by close() on another thread
                    return
            if not pending:
                break
            i, future = pending.popleft()
            try:
                got_arr.append(future.result())
                got_idx.append(i)
            except CancelledError:
                return
            except ImageError as exc:
                self.skipped.append((exc.path, exc.cause))
                log.warning("skipped %s", exc)
            if len(got_idx) == self.batch_size:
                yield self._batch(got_idx, got_arr)
                got_idx, got_arr = [], []
        if got_idx:
            yield self._batch(got_idx, got_arr)

    def _load(self, i: int) -> np.ndarray:
        path = self.image_set.records[i].path
        data = read_image_bytes(path)
        self.digests[i] = np.frombuffer(bytes_digest(data), dtype=np.uint8)
        return preprocess(decode_image(data, path), self.spec)

    @staticmethod
    def _batch(indices: list[int], arrays: list[np.ndarray]) -> Batch:
        return Batch(
            np.asarray(indices, dtype=np.int64), np.stack(arrays).astype(np.float32, copy=False)
        )

    def close(self) -> None:
        """Stop: cancel queued work and shut the pools down without waiting for them."""
        self._closed.set()
        with self._lock:
            pools = list(self._pools)
        for pool in pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> ImageLoader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
