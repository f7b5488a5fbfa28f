"""Content-addressed on-disk cache with atomic writes.

An entry is a folder ``<root>/<kind>/<key>/`` holding ``.npy`` arrays and a ``meta.json``.
It is built in a temporary sibling folder and renamed into place only when complete, so an
interrupted or cancelled job never leaves a half-written entry, and two writers of the same key
cannot corrupt each other (the second rename loses and its copy is discarded). No pickle:
arrays are read with ``allow_pickle=False``.

Keys are SHA-256 digests of a canonical JSON rendering of what determines the result (model
hash, image-set fingerprint, preprocessing, parameters), see :func:`make_key`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

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


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


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
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class Cache:
    """Entries by ``kind`` (e.g. ``activations``) and key, under one root folder."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_root()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def get(self, kind: str, key: str) -> Path | None:
        """The entry's folder if complete, else None."""
        p = self.path(kind, key)
        return p if (p / "meta.json").is_file() else None

    @contextlib.contextmanager
    def write(self, kind: str, key: str) -> Iterator[Path]:
        """Build an entry in a temporary folder; it appears under its key only when complete.

        The block must write ``meta.json`` last (use :func:`write_meta`).
        """
        final = self.path(kind, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            if not (tmp / "meta.json").is_file():
                raise RuntimeError("cache entry written without meta.json")
            try:
                os.rename(tmp, final)
            except OSError:  # another writer finished the same key first: keep theirs
                if not (final / "meta.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def clear(self, kind: str | None = None) -> None:
        shutil.rmtree(self.root / kind if kind else self.root, ignore_errors=True)

    def usage(self) -> dict[str, dict[str, int]]:
        """Per kind: complete entries (folders with meta.json, or files) and bytes on disk."""
        out: dict[str, dict[str, int]] = {}
        if not self.root.is_dir():
            return out
        for kind in sorted(p for p in self.root.iterdir() if p.is_dir()):
            entries = sum(1 for e in kind.iterdir() if not e.name.startswith("."))
            size = sum(f.stat().st_size for f in kind.rglob("*") if f.is_file())
            out[kind.name] = {"entries": entries, "bytes": size}
        return out


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    (folder / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True, default=_jsonable))


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def load_array(folder: Path, name: str, mmap: bool = True) -> np.ndarray:
    return np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
