"""The shape of an analysis method, and the one cached-job helper every method uses.

A method is a package ``engine/<method>/`` whose module exposes (see :class:`Method`; the
dissection package is the worked example, ``docs/methods.md`` the one-page guide):

* a frozen params dataclass with ``result_key()`` (the settings that change the result, as
  plain JSON data) and ``check()`` (raises :class:`~engine.types.ConvLensError` for settings
  out of range) — :class:`Params`;
* ``run(backend, model_sha, data, params, *, cache=None) -> Job[Result]``: a generator job
  (yields :class:`~engine.types.Progress`, returns the result) whose result is plain data
  (numpy arrays, strings, numbers, nested dataclasses) with a ``from_cache`` field;
* ``save_result(result, folder)`` / ``load_result(folder)``: ``.npy`` arrays plus a
  ``meta.json`` written last (no pickle); ``load_result`` raises
  :class:`~engine.cache.DamagedEntry` for anything unreadable, truncated or of another format;
* ``CACHE_KIND`` (the cache folder, e.g. ``"dissection"``) and ``FORMAT_VERSION`` (bumped
  whenever saved results change meaning, so old entries read as damaged and are recomputed).

``run`` does the caching with :func:`cached_job`: look the key up (a damaged entry is discarded
with a warning), else compute, write atomically, return. Keys come from :func:`method_key`.
Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

from .cache import Cache, DamagedEntry, make_key
from .jobs import Job
from .types import Progress

log = logging.getLogger("convlens.cache")

R = TypeVar("R")


@runtime_checkable
class Params(Protocol):
    """A method's settings: a frozen dataclass (hashable, comparable, usable as a key part)."""

    def result_key(self) -> dict[str, Any]:
        """The settings that change the result, as JSON data (not batch size or device)."""
        ...

    def check(self) -> None:
        """Raise :class:`~engine.types.ConvLensError` naming a setting that is out of range."""
        ...


class Method(Protocol):
    """What a method package's module provides (a module satisfies this protocol:
    ``m: Method = engine.dissection.run`` type-checks)."""

    @property
    def CACHE_KIND(self) -> str: ...  # noqa: N802 - a module constant

    @property
    def FORMAT_VERSION(self) -> int: ...  # noqa: N802 - a module constant

    def run(self, backend: Any, model_sha: str, data: Any, *args: Any, **kwargs: Any) -> Job[Any]:
        """The job: ``run(backend, model_sha, data, params, *, cache=None)``."""
        ...

    def save_result(self, result: Any, folder: Path, /) -> Any:
        """Write ``result`` into ``folder`` (``meta.json`` last)."""
        ...

    def load_result(self, folder: Path, /) -> Any:
        """Read a saved result; :class:`DamagedEntry` when it is not whole."""
        ...


def method_key(kind: str, version: int, backend: Any, model_sha: str, data: str,
               params: Params | None = None, *extra: Any) -> str:
    """A cache key of everything that determines a method's result: the method (``kind``,
    ``version``), the model (content hash, architecture, preprocessing, output index, whether
    that output is logits or probabilities, the class names results carry, backend), the data's
    fingerprint (e.g. :meth:`ImageSet.fingerprint`), ``params.result_key()`` and any ``extra``
    JSON-able parts (layers, categories, ...). The device is left out (the same result up to
    float rounding)."""
    spec = backend.spec
    model = {"arch": spec.arch, "output_index": spec.output_index, "scores": spec.scores,
             "classes": None if spec.classes is None else list(spec.classes), "num_classes": spec.num_classes}
    return make_key(kind, version, model_sha, spec.preprocess, model,
                    backend.name, data, None if params is None else params.result_key(), *extra)


def lookup(cache: Cache, kind: str, key: str, load: Callable[[Path], R],
           accept: Callable[[R], bool] | None = None) -> R | None:
    """The entry ``kind/key`` read by ``load``, or None when there is none.

    An entry that ``load`` finds damaged (:class:`DamagedEntry`) is discarded with a warning
    naming it; so is one that ``accept`` rejects (``accept`` logs its own reason, e.g. image
    files whose content changed). Either way the caller recomputes.
    """
    found = cache.get(kind, key)
    if found is None:
        return None
    try:
        result = load(found)
    except DamagedEntry as e:
        log.warning("damaged cache entry discarded, recomputing: %s", e)
        cache.discard(kind, key)
        return None
    if accept is not None and not accept(result):
        cache.discard(kind, key)
        return None
    return result


def mark_from_cache(result: R, from_cache: bool) -> R:
    """``result`` with its ``from_cache`` field set (a copy for dataclasses that have one)."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type) and any(
            f.name == "from_cache" for f in dataclasses.fields(result)):
        return dataclasses.replace(result, from_cache=from_cache)
    return result


def cached_job(
    cache: Cache | None,
    kind: str,
    key: str,
    load: Callable[[Path], R],
    *,
    compute: Callable[[], Job[R]] | None = None,
    save: Callable[[R, Path], object] | None = None,
    write: Callable[[Path], Job[object]] | None = None,
    accept: Callable[[R], bool] | None = None,
    found: str | None = None,
) -> Job[R]:
    """Look up ``kind/key`` in ``cache`` (default: the user cache), else compute, write the
    entry atomically and return the result (a job; use with ``yield from``).

    Two ways to compute, exactly one of them given:

    * ``compute()`` is a job returning the result, which ``save(result, folder)`` writes into
      the entry's temporary folder; the computed result itself is returned.
    * ``write(folder)`` is a job that streams its output into the temporary folder as it goes
      (e.g. memory-mapped ``.npy`` files) and writes ``meta.json`` last; the finished entry is
      then opened with ``load``.

    A hit is read with ``load`` (a :class:`DamagedEntry` is discarded with a warning and
    recomputed, as is a result ``accept`` rejects) and yields one ``Progress(1.0, found)``.
    Results with a ``from_cache`` field get it set (True for a hit, False otherwise). A job
    closed mid-way (cancelled) or failing leaves no entry.
    """
    if (compute is None) == (write is None) or (compute is not None and save is None):
        raise TypeError("cached_job needs either compute and save, or write")
    cache = cache if cache is not None else Cache()
    hit = lookup(cache, kind, key, load, accept)
    if hit is not None:
        yield Progress(1.0, found or f"{kind} found in cache")
        return mark_from_cache(hit, True)
    if compute is not None:
        assert save is not None
        result = yield from compute()
        with cache.write(kind, key) as tmp:
            save(result, tmp)
        return mark_from_cache(result, False)
    assert write is not None
    with cache.write(kind, key) as tmp:
        yield from write(tmp)
    entry = cache.get(kind, key)
    assert entry is not None
    return mark_from_cache(load(entry), False)
