"""Content-addressed on-disk cache with atomic writes.

An entry is a folder ``<root>/<kind>/<key>/`` holding ``.npy`` arrays and a ``meta.json``.
It is built in a temporary sibling folder and renamed into place only when complete, so an
interrupted or cancelled job never leaves a half-written entry, and two writers of the same key
cannot corrupt each other (the second rename loses and its copy is discarded). No pickle:
arrays are read with ``allow_pickle=False``.

Robustness rules:

* **Only cache kinds are ever removed.** :meth:`Cache.clear` takes a kind name (see
  :data:`KNOWN_KINDS`) or ``"all"``; a path, ``..`` or an unknown name raises
  :class:`CacheError` and removes nothing. A symlinked kind folder is unlinked, never followed.
* **Temporaries of killed writers are cleaned up.** Each temporary entry folder holds an owner
  file locked (``flock``) by its writer for as long as it writes; a temporary whose lock is free
  (its writer died, even by SIGKILL) or, without an owner file, that is older than
  :data:`TEMP_MAX_AGE`, is removed by the next :meth:`Cache.write` of its kind or by
  :meth:`Cache.clean_temporaries`. :meth:`Cache.usage` counts temporaries separately.
* **Damaged entries are discarded.** Readers validate an entry (:func:`check_meta`,
  :func:`check_array`); a :class:`DamagedEntry` is moved aside atomically and deleted with
  :meth:`Cache.discard`, and the result is recomputed.

Keys are SHA-256 digests of a canonical JSON rendering of what determines the result (model
hash, image-set fingerprint, preprocessing, parameters), see :func:`make_key`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

try:  # POSIX: writers lock their temporaries; elsewhere only the age rule applies
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

from .types import ConvLensError

CACHE_ENV = "CONVLENS_CACHE"
_UMASK = os.umask(0)
os.umask(_UMASK)


def default_cache_root() -> Path:
    """``$CONVLENS_CACHE``, else ``$XDG_CACHE_HOME/convlens``, else ``~/.cache/convlens``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convlens"


def make_key(*parts: Any) -> str:
    """A stable digest of JSON-serialisable parts (dict keys sorted, tuples as lists)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _jsonable(o: Any) -> Any:
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"cannot key {type(o).__name__}")


def safe_name(name: str) -> str:
    """A file-system-safe file or folder name for a layer or module path."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    ``durable`` also syncs the data to disk before the rename (skip it for disposable files).
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return p


def encode_text(text: str) -> bytes:
    """UTF-8, keeping file names that are not UTF-8: the surrogate escapes ``os.fsdecode`` makes
    for undecodable bytes go back to those bytes; any other lone surrogate is written as a
    ``\\udxxx`` escape rather than failing."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="backslashreplace")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded by :func:`encode_text` (UTF-8; never
    fails on non-UTF-8 file names held in the text)."""
    return atomic_write_bytes(path, encode_text(text))


#: written into every folder :func:`atomic_dir` creates: only such folders are ever replaced
OUTPUT_MARKER = ".convlens-output"


class OutputFolderError(ConvLensError):
    """An output folder that holds files ConvLens did not write (they are never deleted)."""


def replaceable(folder: str | os.PathLike[str]) -> bool:
    """True if ``folder`` is missing, empty, or an earlier ConvLens output (has the marker)."""
    p = Path(folder)
    if not p.exists():
        return True
    return p.is_dir() and (not any(p.iterdir()) or (p / OUTPUT_MARKER).is_file())


def check_replaceable(folder: str | os.PathLike[str]) -> None:
    if not replaceable(folder):
        raise OutputFolderError(
            f"{folder}: already exists and holds files ConvLens did not write; choose a new or empty "
            "folder (nothing was changed)"
        )


def free_output_dir(folder: str | os.PathLike[str], name: str) -> Path:
    """``folder`` if it may be replaced, else the first replaceable ``folder/name[-N]``."""
    folder = Path(folder)
    if replaceable(folder):
        return folder
    candidate, n = folder / name, 2
    while not replaceable(candidate):
        candidate, n = folder / f"{name}-{n}", n + 1
    return candidate


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` only if the block completes.

    ``final`` may be missing, empty, or an earlier output of this function (which marks its
    folders with :data:`OUTPUT_MARKER`); anything else raises :class:`OutputFolderError` before
    any work, so a user's own files are never deleted. An earlier output is replaced only once
    the new one is whole.
    """
    final = Path(final)
    check_replaceable(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text("written by ConvLens; this folder is replaced when regenerated\n")
        check_replaceable(final)  # the user may have put files there meanwhile
        old = None
        if final.exists():
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            remove_path(old)
    finally:
        if tmp.exists():
            remove_path(tmp)


def remove_path(p: str | os.PathLike[str]) -> None:
    """Remove a file, a symlink (the link only, never what it points to) or a folder tree
    (``shutil.rmtree``, which does not follow symlinks inside it). Errors are ignored."""
    p = Path(p)
    try:
        st = p.lstat()
    except OSError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            p.unlink()


#: The kinds of entries ConvLens keeps under the cache root (one folder each): extraction results,
#: dissection results, ONNX exports, GUI thumbnails, the built-in concept sets, assets read out
#: of PyPI wheels, and the prepared demo. :meth:`Cache.clear` accepts these, the other plain-named
#: folders of a root that ConvLens marked as its cache (:data:`ROOT_MARKER`), and ``"all"``.
KNOWN_KINDS: tuple[str, ...] = ("activations", "assets", "concepts", "demo", "dissection", "onnx", "thumbs")

#: Written at the cache root by :meth:`Cache.write` (the Cache Directory Tagging standard, so
#: backup tools skip the cache). Only in a root that has it are folders other than
#: :data:`KNOWN_KINDS` taken for cache kinds: a ``$CONVLENS_CACHE`` set to a user's folder by
#: mistake never gets that folder's sub-folders cleared.
ROOT_MARKER = "CACHEDIR.TAG"
_ROOT_MARKER_TEXT = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                     "# This file is a cache directory tag created by ConvLens.\n"
                     "# For information about cache directory tags see https://bford.info/cachedir/\n")

#: A temporary (a ``.<name>.tmp...`` file or folder) without a lockable owner file is taken for
#: abandoned once nothing in it changed for this many seconds.
TEMP_MAX_AGE = 24 * 3600.0

_OWNER = ".owner"  # inside a temporary entry folder: JSON (pid, host, time), flock-ed by its writer


class CacheError(ConvLensError):
    """A cache request that cannot be honoured (e.g. clearing something that is not a kind)."""


class DamagedEntry(CacheError):
    """A cache entry whose files are unreadable, truncated or inconsistent with its meta.json."""


def _plain(name: object) -> bool:
    """A single plain path component: no separator, not ``.``/``..``, not absolute, no NUL."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name
            and "\\" not in name and "\0" not in name and not os.path.isabs(name)
            and not (os.altsep and os.altsep in name) and Path(name).name == name
            and not os.path.splitdrive(name)[0])


def _is_temporary(name: str) -> bool:
    """Names of in-progress or abandoned writes: ``.<name>.tmp-<hex>`` folders (entries, atomic
    folders), ``.<name>.<random>.tmp`` files (atomic files, ONNX exports), and folders being
    removed (``.<name>.removing-<hex>``)."""
    return name.startswith(".") and (".tmp-" in name or name.endswith(".tmp") or ".removing-" in name)


class Cache:
    """Entries by ``kind`` (e.g. ``activations``) and key, under one root folder."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    def path(self, kind: str, key: str) -> Path:
        if not (_plain(kind) and _plain(key)) or key.startswith("."):
            raise CacheError(f"cache: invalid kind or key {kind!r}/{key!r}")
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        """The entry's folder if complete, else None (validating its content is the reader's
        job: on :class:`DamagedEntry`, :meth:`discard` it)."""
        p = self.path(kind, key)
        return p if (p / "meta.json").is_file() else None

    @contextlib.contextmanager
    def write(self, kind: str, key: str) -> Iterator[Path]:
        """Build an entry in a temporary folder; it appears under its key only when complete.

        The block must write ``meta.json`` last (use :func:`write_meta`). Abandoned temporaries
        of this kind (their writer died) are removed first. While the block runs, the
        temporary folder holds an owner file locked by this process, so that no other process's
        clean-up removes it.
        """
        final = self.path(kind, key)
        self._mark_root()
        final.parent.mkdir(parents=True, exist_ok=True)
        self._clean_folder(final.parent)
        tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        lock = None
        try:
            lock = _take_ownership(tmp)
            yield tmp
            if not (tmp / "meta.json").is_file():
                raise RuntimeError("cache entry written without meta.json")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp / _OWNER)  # still locked through the open file until renamed
            try:
                os.rename(tmp, final)
            except OSError:
                if (final / "meta.json").is_file():  # another writer finished first: keep theirs
                    pass
                elif os.path.lexists(final):  # a leftover without meta.json (damaged): replace it
                    self._remove_aside(final)
                    try:
                        os.rename(tmp, final)
                    except OSError:
                        if not (final / "meta.json").is_file():
                            raise
                else:
                    raise
        finally:
            if lock is not None:
                lock.close()
            if tmp.exists():
                remove_path(tmp)

    def discard(self, kind: str, key: str) -> None:
        """Remove an entry (e.g. a :class:`DamagedEntry`): renamed aside in one step, so readers
        see it whole or not at all, then deleted."""
        self._remove_aside(self.path(kind, key))

    def _remove_aside(self, p: Path) -> None:
        aside = p.parent / f".{p.name}.removing-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(p, aside)
        except FileNotFoundError:
            return
        except OSError:
            aside = p
        remove_path(aside)

    def _mark_root(self) -> None:
        marker = self.root / ROOT_MARKER
        if not marker.is_file():
            with contextlib.suppress(OSError):
                self.root.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(marker, _ROOT_MARKER_TEXT.encode(), durable=False)

    # -------------------------------------------------------------- kinds, clearing

    def _is_own_root(self) -> bool:
        return (self.root / ROOT_MARKER).is_file()

    def _present_kinds(self) -> list[str]:
        """Plain-named folders (or links to folders) under the root that count as kinds."""
        try:
            names = sorted(os.listdir(self.root))
        except OSError:
            return []
        own = self._is_own_root()
        return [n for n in names if _plain(n) and not n.startswith(".")
                and (n in KNOWN_KINDS or own) and os.path.isdir(self.root / n)]

    def kinds(self) -> list[str]:
        """Every name :meth:`clear` accepts besides ``"all"``: :data:`KNOWN_KINDS` and the kind
        folders present under the root (other plain-named folders only in a root marked with
        :data:`ROOT_MARKER`)."""
        return sorted(set(KNOWN_KINDS) | set(self._present_kinds()))

    def clear(self, what: str) -> list[str]:
        """Remove one kind of entries, or every kind with ``"all"``; return the kinds removed
        (those that were present), in order.

        ``what`` must be one of :meth:`kinds` or ``"all"``: anything else (a path, ``..``, an
        unknown name) raises :class:`CacheError` listing the valid kinds, and removes nothing.
        A kind folder that is a symlink is unlinked (what it points to is left alone); files and
        folders at the root that are not kinds (e.g. :data:`ROOT_MARKER`) stay.
        """
        valid = self.kinds()
        if what == "all":
            chosen = self._present_kinds()
        elif isinstance(what, str) and _plain(what) and what in valid:
            chosen = [what] if os.path.lexists(self.root / what) else []
        else:
            raise CacheError(f"cache: {what!r} is not a cache kind; choose one of "
                             f"{', '.join(valid)} or 'all' (nothing was removed)")
        for kind in chosen:
            p = self.root / kind
            if p.is_symlink() or not p.is_dir():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            else:
                self._remove_aside(p)
        if what == "all":  # leftovers of interrupted removals
            with contextlib.suppress(OSError):
                for name in os.listdir(self.root):
                    if name.startswith(".") and ".removing-" in name:
                        remove_path(self.root / name)
        return chosen

    # -------------------------------------------------------------- temporaries

    def clean_temporaries(self, kind: str | None = None) -> int:
        """Remove abandoned temporaries (see :func:`temporary_is_abandoned`) in ``kind`` (or all
        kinds), at any depth; temporaries of live writers stay. Returns the bytes freed."""
        freed = 0
        kinds = [kind] if kind is not None else self._present_kinds()
        for k in kinds:
            top = self.root / k
            if not _plain(k) or top.is_symlink() or not top.is_dir():
                continue
            freed += self._clean_folder(top)
            for dirpath, dirnames, _files in os.walk(top):
                dirnames[:] = [d for d in dirnames if not _is_temporary(d)]
                if Path(dirpath) != top:
                    freed += self._clean_folder(Path(dirpath))
        return freed

    def _clean_folder(self, folder: Path) -> int:
        freed = 0
        try:
            names = [n for n in os.listdir(folder) if _is_temporary(n)]
        except OSError:
            return 0
        for name in names:
            p = folder / name
            if ".removing-" in name:
                freed += _tree_bytes(p)
                remove_path(p)
                continue
            with _claim_abandoned(p) as claimed:
                if claimed:
                    freed += _tree_bytes(p)
                    remove_path(p)
        return freed

    def usage(self) -> dict[str, dict[str, int]]:
        """Per kind: complete entries (non-hidden folders or files at the kind's top level),
        their ``bytes`` on disk, and ``temporary_bytes``: what writes in progress or abandoned
        by killed runs hold (see :meth:`clean_temporaries`)."""
        out: dict[str, dict[str, int]] = {}
        for kind in self._present_kinds():
            top = self.root / kind
            try:
                entries = sum(1 for n in os.listdir(top) if not n.startswith("."))
            except OSError:
                entries = 0
            size = temp = 0
            for dirpath, dirnames, files in os.walk(top):
                for d in [d for d in dirnames if _is_temporary(d)]:
                    temp += _tree_bytes(Path(dirpath) / d)
                dirnames[:] = [d for d in dirnames if not _is_temporary(d)]
                for f in files:
                    try:
                        n = os.lstat(os.path.join(dirpath, f)).st_size
                    except OSError:
                        continue
                    if _is_temporary(f):
                        temp += n
                    else:
                        size += n
            out[kind] = {"entries": entries, "bytes": size, "temporary_bytes": temp}
        return out


def _tree_bytes(p: Path) -> int:
    try:
        st = p.lstat()
    except OSError:
        return 0
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(p):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def _take_ownership(tmp: Path) -> Any:
    """Create ``tmp/.owner`` already locked (written and locked under another name, then
    renamed), so a cleaner never sees an owner file that is not yet locked."""
    partial = tmp / f".owner-{uuid.uuid4().hex[:8]}"
    f = open(partial, "w+", encoding="utf-8")  # noqa: SIM115 - held open for the lock
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # a file system without locks: the age rule protects it
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()}))
        f.flush()
        os.rename(partial, tmp / _OWNER)
    except BaseException:
        f.close()
        raise
    return f


def _newest_mtime(p: Path) -> float:
    try:
        newest = p.lstat().st_mtime
    except OSError:
        return 0.0
    if p.is_dir() and not p.is_symlink():
        for dirpath, dirs, files in os.walk(p):
            for name in (*dirs, *files):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
    return newest


@contextlib.contextmanager
def _claim_abandoned(p: Path) -> Iterator[bool]:
    """Yield True (holding the owner's lock, if any, until the block ends) if temporary ``p``
    is abandoned: its owner file exists and its lock is free (the writer is gone, however it
    ended), or it has no lockable owner file and nothing in it changed for
    :data:`TEMP_MAX_AGE` seconds. A temporary whose writer holds the lock is never claimed."""
    owner = p / _OWNER
    f = None
    try:
        if fcntl is not None and p.is_dir() and not p.is_symlink():
            try:
                f = open(owner, "rb")  # noqa: SIM115
            except OSError:
                f = None
            if f is not None:
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:  # held: a live writer
                    yield False
                    return
                except OSError:  # no locks on this file system: fall back to the age rule
                    f.close()
                    f = None
                else:
                    yield True
                    return
        yield time.time() - _newest_mtime(p) > TEMP_MAX_AGE
    finally:
        if f is not None:
            f.close()


def temporary_is_abandoned(p: str | os.PathLike[str]) -> bool:
    """Whether the temporary file or folder ``p`` would be removed by a clean-up now."""
    with _claim_abandoned(Path(p)) as claimed:
        return claimed


def check_meta(folder: Path, version: int, keys: tuple[str, ...]) -> dict[str, Any]:
    """``folder/meta.json`` as a dict, if it parses, has ``version`` and every key of ``keys``;
    else :class:`DamagedEntry`."""
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DamagedEntry(f"{folder}: meta.json unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise DamagedEntry(f"{folder}: meta.json is not an object")
    if meta.get("version") != version:
        raise DamagedEntry(f"{folder}: format version {meta.get('version')!r}, expected {version}")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise DamagedEntry(f"{folder}: meta.json lacks {', '.join(missing)}")
    return meta


def check_array(folder: Path, name: str, dtype: Any, shape: tuple[int | None, ...]) -> tuple[int, ...]:
    """Check ``folder/<name>.npy`` from its header and size alone (no data read): a readable
    ``.npy`` of ``dtype`` and ``shape`` (``None`` matches any length), holding all its bytes.
    Returns the shape; raises :class:`DamagedEntry` naming the file otherwise."""
    path = folder / f"{name}.npy"
    try:
        with open(path, "rb") as f:
            major, _minor = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if major == 1
                    else np.lib.format.read_array_header_2_0)
            got_shape, _fortran, got_dtype = read(f)
            offset = f.tell()
            size = os.fstat(f.fileno()).st_size
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"{path}: unreadable array ({e})") from e
    want = np.dtype(dtype)
    if got_dtype != want:
        raise DamagedEntry(f"{path}: dtype {got_dtype}, expected {want}")
    if len(got_shape) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got_shape, strict=False)):
        raise DamagedEntry(f"{path}: shape {tuple(got_shape)}, expected {shape}")
    need = offset + int(np.prod(got_shape, dtype=np.int64)) * want.itemsize
    if size != need:
        raise DamagedEntry(f"{path}: {size} bytes, expected {need} (truncated?)")
    return tuple(got_shape)


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """``meta.json``, ASCII JSON: non-ASCII text and the surrogate escapes of non-UTF-8 file
    names are ``\\u`` escapes, read back by :func:`read_meta` as the same strings."""
    text = json.dumps(meta, indent=1, sort_keys=True, default=_jsonable, ensure_ascii=True)
    (folder / "meta.json").write_bytes(text.encode("ascii"))


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_bytes().decode("utf-8"))


def load_array(folder: Path, name: str, mmap: bool = True) -> np.ndarray:
    return np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
