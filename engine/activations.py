"""Activation extraction: one streaming pass over an image set, cached on disk per layer.

One pass gives everything later views need:

- per captured layer, the activation maps as float16 ``(N, C, h, w)`` memory-mapped arrays
  (``store_maps``; float16 keeps about 3 significant digits, ample for heatmaps and ranking);
- per layer and unit, each image's max and mean activation (float32, ``(N, C)``);
- per unit, the top-k images by max activation (:class:`TopK`);
- the model's classifier output for every image (so predictions come for free).

**Cache entries** (kind ``"activations"``): one per layer, keyed by the model (content hash,
architecture, backend), the image set's fingerprint, the preprocessing, the layer,
``store_maps`` and ``top_k``; and one for the outputs (model, image set, preprocessing, output
index). :func:`extract` opens the entries that exist, runs one pass computing only the missing
ones (none at all when everything is cached) and returns one :class:`Activations` over all the
requested layers. A layer entry with maps also serves a request without them.

Memory stays bounded: a batch at a time, written straight into memory-mapped files inside
temporary cache folders that are renamed into place only when the pass completes (a cancelled
or failed pass leaves nothing).

A cached entry is reused only after two checks: its files are whole and consistent (else it is
discarded with a warning and recomputed), and every image file still has the content digest it
had when extracted (:func:`engine.data.images.file_digest`; each entry stores the digests of
its pass, the files are hashed once per :func:`extract` call): a file whose bytes changed while
its size and modification time stayed (``cp -p``, ``rsync -t``, a restore) makes the entry
stale, so it is recomputed. A model whose output, or a captured layer whose summaries, are not
finite (NaN weights, a NaN mean) is an error, not numbers.

**Shards**: ``extract(..., indices=shard)`` extracts the images ``shard`` (increasing image-set
positions) only, giving a partial :class:`Activations` whose rows are those images
(``acts.indices``); :func:`merge_extractions` joins disjoint shards into the entries a single
pass over their union writes (per-image arrays concatenate, top-k heaps merge exactly), so a
later :func:`extract` of the union finds them in the cache.

**Writing entries elsewhere**: a pass that runs the model somewhere else (the Ray driver,
:mod:`engine.cluster.extract`) writes the same entries through the same public pieces as
:func:`extract`: :func:`cache_source` (what the keys depend on), :func:`check_finite` (on each
batch, where it ran), :class:`EntryWriter` (the entries' files, streamed batch by batch) and
:func:`open_entries` (the :class:`Activations` over what was written).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from .analysis import lookup
from .backends.base import Backend, LayerSummaries
from .cache import (
    Cache,
    DamagedEntry,
    atomic_write_text,
    check_array,
    check_meta,
    load_array,
    make_key,
    safe_name,
    write_meta,
)
from .data.images import DIGEST_SIZE, ImageLoader, ImageSet, digest_files
from .jobs import Job
from .types import ConvLensError, LayerInfo, Progress

log = logging.getLogger("convlens.activations")

FORMAT_VERSION = 3
CACHE_KIND = "activations"
_OUT_KEYS = ("role", "n_images", "skipped", "seconds", "source", "shard")
_LAYER_KEYS = ("role", "n_images", "layer", "kind", "shape", "store_maps", "top_k", "source", "shard")


# ----------------------------------------------------------------------------- statistics


class TopK:
    """Per unit, the ``k`` images with the largest value, best first; ties go to the lower
    image index, so the result is a function of the set of (image, value) pairs alone.

    Mergeable: :meth:`merge` of the heaps of disjoint image subsets equals the heap of their
    union, exactly, whatever the split and the order. :meth:`add` buffers batches and reduces
    every few of them (a selection over ``k`` + the buffered columns).
    """

    def __init__(self, units: int, k: int) -> None:
        if k < 1:
            raise ConvLensError(f"top_k must be >= 1, got {k}")
        self.units, self.k = units, k
        self._vals = np.empty((units, 0), np.float32)
        self._ids = np.empty((units, 0), np.int64)
        self._pend_v: list[np.ndarray] = []  # (B, C) blocks
        self._pend_i: list[np.ndarray] = []  # (B,) blocks
        self._pending = 0
        self._flush_at = max(4 * k, 256)

    def add(self, values: np.ndarray, images: np.ndarray) -> None:
        """Add one batch: ``values`` (B, C) of images ``images`` (B,)."""
        self._pend_v.append(np.asarray(values, np.float32))
        self._pend_i.append(np.asarray(images, np.int64))
        self._pending += len(images)
        if self._pending >= self._flush_at:
            self._reduce()

    def _reduce(self) -> None:
        if not self._pend_v:
            return
        vals = np.concatenate([self._vals, np.concatenate(self._pend_v).T], axis=1)
        ids = np.concatenate([self._ids, np.broadcast_to(np.concatenate(self._pend_i), (self.units, self._pending))],
                             axis=1)
        self._pend_v, self._pend_i, self._pending = [], [], 0
        self._vals, self._ids = _select(vals, ids, self.k)

    def merge(self, other: TopK) -> TopK:
        """The heap of both image subsets (which must be disjoint); neither is changed."""
        if (other.units, other.k) != (self.units, self.k):
            raise ConvLensError(f"cannot merge top-{other.k} of {other.units} units into top-{self.k} "
                                f"of {self.units} units")
        self._reduce()
        other._reduce()
        out = TopK(self.units, self.k)
        out._vals, out._ids = _select(np.concatenate([self._vals, other._vals], axis=1),
                                      np.concatenate([self._ids, other._ids], axis=1), self.k)
        return out

    @classmethod
    def from_arrays(cls, images: np.ndarray, values: np.ndarray) -> TopK:
        """The heap :meth:`arrays` gave (``-1`` pads dropped)."""
        units, k = images.shape
        out = cls(units, k)
        counts = (images >= 0).sum(axis=1)
        if units and (counts != counts[0]).any():
            raise ConvLensError("top-k rows hold different numbers of images")
        n = int(counts[0]) if units else 0
        out._ids = np.ascontiguousarray(images[:, :n], np.int64)
        out._vals = np.ascontiguousarray(values[:, :n], np.float32)
        return out

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images, values)``, each (C, k), best first; -1 / NaN pad when fewer images."""
        self._reduce()
        vals, ids = _select(self._vals, self._ids, self.k)
        pad = self.k - vals.shape[1]
        if pad > 0:
            vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=np.nan)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return ids, vals.astype(np.float32)


def _select(vals: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row the ``k`` best columns, ordered by value descending then image ascending."""
    if vals.shape[1] > 2 * k:  # cut to the candidates first: values >= the row's k-th largest
        kth = -np.partition(-vals, k - 1, axis=1)[:, k - 1:k]
        cand = vals >= kth
        width = int(cand.sum(axis=1).max())
        pos = np.argsort(~cand, axis=1, kind="stable")[:, :width]
        vals = np.take_along_axis(vals, pos, axis=1)
        ids = np.take_along_axis(ids, pos, axis=1)
        ok = np.take_along_axis(cand, pos, axis=1)
        vals = np.where(ok, vals, -np.inf)
        ids = np.where(ok, ids, np.iinfo(np.int64).max)
    order = np.lexsort((ids, -vals), axis=1)[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(ids, order, axis=1)


def merge_rows(parts: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-image arrays of disjoint shards, ``[(indices, rows), ...]``, as one array over the
    union of their indices (sorted): ``(indices, rows)``. Raises ConvLensError on overlap."""
    idx = np.concatenate([np.asarray(i, np.int64) for i, _ in parts])
    order = np.argsort(idx, kind="stable")
    idx = idx[order]
    if idx.size and (np.diff(idx) == 0).any():
        raise ConvLensError(f"shards overlap (image {int(idx[np.flatnonzero(np.diff(idx) == 0)[0]])} twice)")
    return idx, np.concatenate([np.asarray(r) for _, r in parts])[order]


# ----------------------------------------------------------------------------- results


@dataclass
class LayerStats:
    """Per-image, per-unit summaries of one layer (rows of skipped images are NaN)."""

    info: LayerInfo
    max: np.ndarray  # (N, C) float32
    mean: np.ndarray  # (N, C) float32
    top_images: np.ndarray  # (C, k) int64, best first; -1 pads when fewer valid images
    top_values: np.ndarray  # (C, k) float32


@dataclass
class Activations:
    """An opened extraction result, assembled from cache entries (the outputs entry,
    ``folder``, and one entry per layer, ``layer_folders``). Arrays are read-only memory maps.

    ``indices`` is None for the whole image set; for a shard, the image-set positions of its
    rows (top-k image numbers are always image-set positions).
    """

    folder: Path
    image_set: ImageSet
    layers: dict[str, LayerInfo]
    outputs: np.ndarray  # (N, K) float32 classifier output as the model gives it
    valid: np.ndarray  # (N,) bool: False for images that could not be read
    skipped: list[tuple[str, str]]
    seconds: float
    from_cache: bool = False
    layer_folders: dict[str, Path] = field(default_factory=dict)
    indices: np.ndarray | None = None
    store_maps: bool = True
    top_k: int = 16
    source: dict[str, Any] = field(default_factory=dict, repr=False)
    _stats: dict[str, LayerStats] = field(default_factory=dict, repr=False)

    @property
    def n_images(self) -> int:
        return len(self.valid)

    def layer_folder(self, layer: str) -> Path:
        """The cache entry holding ``layer``."""
        self._check(layer)
        return self.layer_folders[layer]

    def has_maps(self, layer: str) -> bool:
        return (self.layer_folder(layer) / f"maps_{_fname(layer)}.npy").is_file()

    def maps(self, layer: str) -> np.ndarray:
        """(N, C, h, w) float16 memory map (N, C for non-spatial layers)."""
        if not self.has_maps(layer):
            raise ConvLensError(f"activation maps of '{layer}' were not stored (extract with store_maps)")
        return load_array(self.layer_folders[layer], f"maps_{_fname(layer)}")

    def stats(self, layer: str) -> LayerStats:
        self._check(layer)
        if layer not in self._stats:
            f, d = _fname(layer), self.layer_folders[layer]
            self._stats[layer] = LayerStats(
                self.layers[layer],
                load_array(d, f"max_{f}"),
                load_array(d, f"mean_{f}"),
                load_array(d, f"topidx_{f}", mmap=False),
                load_array(d, f"topval_{f}", mmap=False),
            )
        return self._stats[layer]

    def rows(self) -> np.ndarray:
        """The image-set positions of the rows (all of them for a whole-set result)."""
        return np.arange(len(self.image_set)) if self.indices is None else self.indices

    def _check(self, layer: str) -> None:
        if layer not in self.layers:
            raise ConvLensError(f"layer '{layer}' was not extracted (have: {', '.join(self.layers)})")


_fname = safe_name


# ----------------------------------------------------------------------------- keys


def cache_source(backend: Backend, model_sha: str, image_set: ImageSet) -> dict[str, Any]:
    """What every entry of one (model, image set, preprocessing) depends on, as JSON data: the
    ``source`` of :func:`outputs_key`, :func:`layer_key`, :class:`EntryWriter` and
    :func:`open_entries` (and of :attr:`Activations.source`)."""
    spec = backend.spec
    src = {"model_sha256": model_sha, "arch": spec.arch, "preprocess": spec.preprocess,
           "output_index": spec.output_index, "fingerprint": image_set.fingerprint(),
           "backend": backend.name}
    return json.loads(json.dumps(src, sort_keys=True, default=lambda o: o.to_dict()))


def _shard_id(indices: np.ndarray | None) -> str | None:
    return None if indices is None else hashlib.sha256(indices.astype("<i8").tobytes()).hexdigest()[:32]


def outputs_key(source: dict[str, Any], shard: str | None = None) -> str:
    """Key of the outputs entry (model, image set, preprocessing, output index)."""
    return make_key("activations/outputs", FORMAT_VERSION, source, shard)


def layer_key(source: dict[str, Any], layer: str, store_maps: bool, top_k: int, shard: str | None = None) -> str:
    """Key of one layer's entry (the output index does not matter to a layer)."""
    src = {k: v for k, v in source.items() if k != "output_index"}
    return make_key("activations/layer", FORMAT_VERSION, src, layer, bool(store_maps), int(top_k), shard)


def _normal_indices(indices: Sequence[int] | np.ndarray | None, n: int) -> np.ndarray | None:
    if indices is None:
        return None
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n or (np.diff(idx) <= 0).any():
        raise ConvLensError(f"indices must be increasing image positions in [0, {n}), got "
                            f"{idx[:5].tolist()}{'...' if idx.size > 5 else ''}")
    return None if idx.size == n else idx


# ----------------------------------------------------------------------------- extraction


def extract(
    backend: Backend,
    model_sha: str,
    image_set: ImageSet,
    layers: Sequence[str],
    *,
    batch_size: int = 64,
    store_maps: bool = True,
    top_k: int = 16,
    cache: Cache | None = None,
    workers: int | None = None,
    indices: Sequence[int] | np.ndarray | None = None,
) -> Job[Activations]:
    """Extract ``layers`` over ``image_set`` (a job: yields Progress, returns Activations).

    Layers (and the outputs) already in the cache under the same key are reused without running
    the model, once their files check out and every image file still has the content digest
    stored with them; else the entry is discarded (with a warning) and recomputed. One pass
    computes the missing layers only. ``indices`` (increasing image positions) extracts a shard
    (see :func:`merge_extractions`). Raises :class:`ConvLensError` naming the model, or the
    layer, when the model output or a captured layer is not finite.
    """
    cache = cache or Cache()
    layers = list(dict.fromkeys(layers))  # may be empty: outputs only, e.g. for predictions
    backend.check_capture(layers)
    shard = _normal_indices(indices, len(image_set))
    rows = np.arange(len(image_set)) if shard is None else shard
    source = cache_source(backend, model_sha, image_set)
    sid = _shard_id(shard)
    okey = outputs_key(source, sid)
    lkeys = {name: layer_key(source, name, store_maps, top_k, sid) for name in layers}

    check = _DigestCheck(image_set, rows, workers)
    if cache.get(CACHE_KIND, okey) is not None or any(cache.get(CACHE_KIND, k) for k in lkeys.values()):
        yield Progress(0.0, f"checking {len(rows)} images against the cache")
    have_out = lookup(cache, CACHE_KIND, okey, lambda d: _open_outputs(d, len(rows)), check.accept)
    have: dict[str, tuple[Path, LayerInfo]] = {}
    for name in layers:
        keys = [lkeys[name]] + ([] if store_maps else [layer_key(source, name, True, top_k, sid)])
        def open_layer(d: Path, name: str = name) -> tuple[Path, LayerInfo]:
            return _open_layer(d, name, len(rows), top_k)

        for key in keys:
            got = lookup(cache, CACHE_KIND, key, open_layer, check.accept)
            if got is not None:
                have[name] = got
                break
    missing = [name for name in layers if name not in have]
    from_cache = have_out is not None and not missing
    if have_out is None or missing:
        t0 = time.perf_counter()
        n = len(rows)
        what = f"extracting {', '.join(missing)} from {n} images" if missing else f"predicting {n} images"
        yield Progress(0.0, what)
        info = {li.name: li for li in backend.layers()} if missing else {}
        with EntryWriter(cache, source, image_set, [info[name] for name in missing], store_maps=store_maps,
                         top_k=top_k, indices=shard, outputs=have_out is None) as writer:
            yield from _pass(backend, image_set, shard, missing, writer, batch_size, workers, t0)
        if have_out is None:
            entry = cache.get(CACHE_KIND, okey)
            assert entry is not None
            have_out = _open_outputs(entry, n)
        for name in missing:
            entry = cache.get(CACHE_KIND, lkeys[name])
            assert entry is not None
            have[name] = _open_layer(entry, name, n, top_k)
    assert have_out is not None
    if from_cache:
        yield Progress(1.0, "activations found in cache")
    return Activations(
        folder=have_out["folder"], image_set=image_set,
        layers={name: have[name][1] for name in layers},
        outputs=load_array(have_out["folder"], "outputs"), valid=have_out["valid"],
        skipped=have_out["skipped"], seconds=have_out["seconds"], from_cache=from_cache,
        layer_folders={name: have[name][0] for name in layers}, indices=shard,
        store_maps=store_maps, top_k=top_k, source=source,
    )


class _DigestCheck:
    """Whether an entry's stored digests match the image files now; the files are hashed at most
    once (on the first entry checked) and a change is logged once."""

    def __init__(self, image_set: ImageSet, rows: np.ndarray, workers: int | None) -> None:
        self.image_set, self.rows, self.workers = image_set, rows, workers
        self._now: np.ndarray | None = None
        self._warned = False

    @property
    def checked(self) -> bool:
        return self._now is not None

    def accept(self, opened: Any) -> bool:
        folder = opened["folder"] if isinstance(opened, dict) else opened[0]
        if self._now is None:
            self._now = digest_files([self.image_set.records[int(i)].path for i in self.rows], workers=self.workers)
        stored = load_array(folder, "digests", mmap=False)
        changed = np.flatnonzero((stored != self._now).any(axis=1))
        if not changed.size:
            return True
        if not self._warned:
            self._warned = True
            log.warning("%s: %d image%s changed since the cached extraction although size and modification "
                        "time did not (first: %s); recomputing", self.image_set.source, changed.size,
                        "s" if changed.size != 1 else "", self.image_set.records[int(self.rows[changed[0]])].path)
        return False


def _pass(backend: Backend, image_set: ImageSet, shard: np.ndarray | None, layers: list[str], writer: EntryWriter,
          batch_size: int, workers: int | None, t0: float) -> Job[None]:
    """One forward pass over the images of ``writer`` (``shard``, or all) into its entries."""
    n = writer.n
    with ImageLoader(image_set, backend.spec.preprocess, batch_size=batch_size, workers=workers,
                     indices=None if shard is None else shard.tolist()) as loader:
        done = 0
        for batch in loader:
            out, summaries = backend.forward_summaries(batch.array, layers, maps=writer.store_maps)
            check_finite(backend, image_set, batch.indices, out, summaries, layers)
            writer.add(batch.indices, out, summaries)
            done += len(batch.indices)
            yield Progress(done / max(n, 1), f"{done}/{n} images")
        # no msync: the pages reach the file through the page cache; the renames that follow are
        # what makes the entries visible, so a crashed run never leaves a readable half entry
        writer.finish(digests=loader.digests[writer.rows], skipped=loader.skipped,
                      seconds=time.perf_counter() - t0, device=backend.device)


def _open_outputs(folder: Path, n: int) -> dict[str, Any]:
    """Check and open an outputs entry (headers and sizes only); DamagedEntry otherwise."""
    meta = check_meta(folder, FORMAT_VERSION, _OUT_KEYS)
    try:
        if meta["role"] != "outputs" or int(meta["n_images"]) != n:
            raise ValueError(f"an entry of {meta['n_images']} images ({meta['role']}), expected outputs of {n}")
        skipped = [(str(p), str(c)) for p, c in meta["skipped"]]
        seconds = float(meta["seconds"])
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedEntry(f"{folder}: meta.json is inconsistent ({type(e).__name__}: {e})") from e
    check_array(folder, "outputs", np.float32, (n, None))
    check_array(folder, "valid", np.bool_, (n,))
    check_array(folder, "digests", np.uint8, (n, DIGEST_SIZE))
    return {"folder": folder, "valid": load_array(folder, "valid", mmap=False), "skipped": skipped,
            "seconds": seconds, "meta": meta}


def _open_layer(folder: Path, name: str, n: int, top_k: int) -> tuple[Path, LayerInfo]:
    """Check a layer entry (headers and sizes only); DamagedEntry otherwise."""
    meta = check_meta(folder, FORMAT_VERSION, _LAYER_KEYS)
    try:
        if meta["role"] != "layer" or meta["layer"] != name or int(meta["n_images"]) != n:
            raise ValueError(f"holds {meta['layer']!r} over {meta['n_images']} images, expected {name!r} over {n}")
        li = LayerInfo(name, str(meta["kind"]), tuple(int(d) for d in meta["shape"]))
        store_maps, k = bool(meta["store_maps"]), int(meta["top_k"])
        if k != top_k:
            raise ValueError(f"top_k {k}, expected {top_k}")
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedEntry(f"{folder}: meta.json is inconsistent ({type(e).__name__}: {e})") from e
    f = _fname(name)
    units = li.shape[0] if li.shape else 1
    check_array(folder, "digests", np.uint8, (n, DIGEST_SIZE))
    for arr in ("max", "mean"):
        check_array(folder, f"{arr}_{f}", np.float32, (n, units))
    check_array(folder, f"topidx_{f}", np.int64, (units, top_k))
    check_array(folder, f"topval_{f}", np.float32, (units, top_k))
    if store_maps:
        check_array(folder, f"maps_{f}", np.float16, (n, *li.shape))
    return folder, li


def open_activations(folder: Path, image_set: ImageSet) -> Activations:
    """Open an outputs entry written by :func:`extract` (no layers), checking it first;
    :class:`DamagedEntry` naming the entry otherwise."""
    meta = check_meta(folder, FORMAT_VERSION, _OUT_KEYS)
    n = int(meta["n_images"])
    shard = load_array(folder, "indices", mmap=False) if meta.get("shard") else None
    if shard is None and n != len(image_set):
        raise DamagedEntry(f"{folder}: {n} images, expected {len(image_set)}")
    out = _open_outputs(folder, n)
    return Activations(folder=folder, image_set=image_set, layers={}, outputs=load_array(folder, "outputs"),
                       valid=out["valid"], skipped=out["skipped"], seconds=out["seconds"], from_cache=True,
                       indices=shard, source=dict(meta["source"]))


def open_entries(cache: Cache, source: dict[str, Any], image_set: ImageSet, layers: Sequence[str], *,
                 store_maps: bool, top_k: int, indices: np.ndarray | None = None) -> Activations:
    """The :class:`Activations` of the entries under the keys of ``source`` (:func:`cache_source`),
    ``layers``, ``store_maps``, ``top_k`` and the shard ``indices`` (None: the whole image set),
    as :class:`EntryWriter` has just written them (``from_cache`` False). The entries' headers
    and sizes are checked (:class:`DamagedEntry` otherwise), not the images' digests: to reuse
    entries found in the cache, call :func:`extract`. ConvLensError when an entry is missing."""
    sid = _shard_id(indices)
    n = len(image_set) if indices is None else len(indices)

    def entry(key: str, what: str) -> Path:
        found = cache.get(CACHE_KIND, key)
        if found is None:
            raise ConvLensError(f"{cache.path(CACHE_KIND, key)}: no activations entry for {what} of {image_set.source}")
        return found

    out = _open_outputs(entry(outputs_key(source, sid), "the outputs"), n)
    folders: dict[str, Path] = {}
    infos: dict[str, LayerInfo] = {}
    for name in layers:
        folders[name], infos[name] = _open_layer(entry(layer_key(source, name, store_maps, top_k, sid), f"layer '{name}'"),
                                                 name, n, top_k)
    return Activations(folder=out["folder"], image_set=image_set, layers=infos,
                       outputs=load_array(out["folder"], "outputs"), valid=out["valid"], skipped=out["skipped"],
                       seconds=out["seconds"], from_cache=False, layer_folders=folders, indices=indices,
                       store_maps=store_maps, top_k=top_k, source=source)


# ----------------------------------------------------------------------------- shards


def merge_extractions(parts: Sequence[Activations], *, cache: Cache | None = None) -> Activations:
    """Join extractions of disjoint shards of one image set (same model, preprocessing, layers,
    ``store_maps`` and ``top_k``) into the entries one pass over their union writes: per-image
    arrays are concatenated in image order, the top-k heaps merged (:meth:`TopK.merge`), the
    skipped files listed in image order. Returns the merged result (``indices`` None when the
    shards cover the whole set); ConvLensError when the parts do not fit together or overlap.
    """
    if not parts:
        raise ConvLensError("merge_extractions needs at least one shard")
    cache = cache or Cache()
    first = parts[0]
    for p in parts[1:]:
        if p.source != first.source or list(p.layers) != list(first.layers) or \
                (p.store_maps, p.top_k) != (first.store_maps, first.top_k):
            raise ConvLensError("shards to merge come from different models, image sets, preprocessing, "
                                "layers or settings")
    image_set, layers, n_all = first.image_set, list(first.layers), len(first.image_set)
    idx, valid = merge_rows([(p.rows(), p.valid) for p in parts])
    shard = None if len(idx) == n_all else idx
    sid = _shard_id(shard)
    n = len(idx)
    digests = merge_rows([(p.rows(), load_array(p.folder, "digests", mmap=False)) for p in parts])[1]
    where = {r.path: i for i, r in enumerate(image_set.records)}
    skipped = sorted((s for p in parts for s in p.skipped), key=lambda s: where.get(s[0], n_all))
    common = {"version": FORMAT_VERSION, "n_images": n, "source": first.source, "shard": sid,
              "seconds": float(sum(p.seconds for p in parts)), "device": "merged"}
    okey = outputs_key(first.source, sid)
    lkeys = {name: layer_key(first.source, name, first.store_maps, first.top_k, sid) for name in layers}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(cache.write(CACHE_KIND, okey))
        np.save(tmp / "outputs.npy", merge_rows([(p.rows(), p.outputs) for p in parts])[1])
        np.save(tmp / "valid.npy", valid)
        np.save(tmp / "digests.npy", digests)
        if shard is not None:
            np.save(tmp / "indices.npy", shard)
        write_meta(tmp, {**common, "role": "outputs", "skipped": skipped})
        for name in layers:
            tmp = stack.enter_context(cache.write(CACHE_KIND, lkeys[name]))
            f, li = _fname(name), first.layers[name]
            for arr in ("max", "mean"):
                np.save(tmp / f"{arr}_{f}.npy",
                        merge_rows([(p.rows(), getattr(p.stats(name), arr)) for p in parts])[1])
            if first.store_maps:
                out = np.lib.format.open_memmap(tmp / f"maps_{f}.npy", "w+", np.float16, (n, *li.shape))
                at = {int(i): j for j, i in enumerate(idx)}
                for p in parts:
                    dest = np.array([at[int(i)] for i in p.rows()], np.int64)
                    out[_rows(dest)] = p.maps(name)
                del out
            heap = TopK.from_arrays(parts[0].stats(name).top_images, parts[0].stats(name).top_values)
            for p in parts[1:]:
                heap = heap.merge(TopK.from_arrays(p.stats(name).top_images, p.stats(name).top_values))
            ids, vals = heap.arrays()
            np.save(tmp / f"topidx_{f}.npy", ids)
            np.save(tmp / f"topval_{f}.npy", vals)
            np.save(tmp / "digests.npy", digests)
            if shard is not None:
                np.save(tmp / "indices.npy", shard)
            write_meta(tmp, {**common, "role": "layer", "layer": name, "kind": li.kind, "shape": list(li.shape),
                             "store_maps": first.store_maps, "top_k": first.top_k})
    return open_entries(cache, first.source, image_set, layers, store_maps=first.store_maps, top_k=first.top_k,
                        indices=shard)


# ----------------------------------------------------------------------------- writing


def check_finite(backend: Backend, image_set: ImageSet, idx: np.ndarray, out: np.ndarray,
                 summaries: Mapping[str, LayerSummaries], layers: Sequence[str]) -> None:
    """Raise a ConvLensError naming the model (or the layer) if a batch's output ``out`` (or a
    captured layer's max / mean in ``summaries``) holds NaN or infinite values; ``idx`` are the
    batch's image-set positions (the error names the first bad image). Every pass that writes
    entries (:class:`EntryWriter`) calls it on each batch, wherever the batch ran."""
    def bad_rows(*arrays: np.ndarray) -> np.ndarray:
        rows = np.zeros(len(idx), dtype=bool)
        for a in arrays:
            rows |= ~np.isfinite(np.asarray(a).reshape(len(idx), -1)).all(axis=1)
        return rows

    def example(rows: np.ndarray) -> str:
        return image_set.records[int(idx[np.flatnonzero(rows)[0]])].path

    bad_layers = [(name, bad_rows(summaries[name].max, summaries[name].mean)) for name in layers]
    bad_layers = [(name, rows) for name, rows in bad_layers if rows.any()]
    rows = bad_rows(out)
    spec = backend.spec
    if rows.any():
        pre = spec.preprocess
        if not (np.isfinite(pre.mean).all() and np.isfinite(pre.std).all()) or not np.all(np.asarray(pre.std) != 0):
            hint = f"the preprocessing is not finite (mean {list(pre.mean)}, std {list(pre.std)})"
        else:
            hint = "check the weights for NaN or infinite values, and --mean/--std"
        also = f"; first non-finite captured layer: '{bad_layers[0][0]}'" if bad_layers else ""
        raise ConvLensError(f"{spec.path}: the model output is not finite (NaN or infinite) for "
                            f"{int(rows.sum())} of {len(idx)} images in a batch (first: {example(rows)}); "
                            f"{hint}{also}")
    if bad_layers:
        name, rows = bad_layers[0]
        raise ConvLensError(f"{spec.path}: layer '{name}' has non-finite activations (NaN or infinite) for "
                            f"{int(rows.sum())} of {len(idx)} images in a batch (first: {example(rows)}); "
                            "check the weights of that layer and those before it")


def _rows(idx: np.ndarray) -> slice | np.ndarray:
    """A slice when the batch's images are consecutive (the usual case: a plain block copy into
    the memory maps), else the index array."""
    if len(idx) and idx[-1] - idx[0] + 1 == len(idx) and np.all(np.diff(idx) == 1):
        return slice(int(idx[0]), int(idx[-1]) + 1)
    return idx


class EntryWriter:
    """Writes the cache entries of one extraction pass (kind ``"activations"``): the outputs entry
    (unless ``outputs`` is False) and one entry per layer of ``layers``, under the keys
    :func:`extract` looks up (from ``source``, :func:`cache_source`, ``store_maps``, ``top_k``
    and the shard ``indices``; None: the whole image set). This is the one place the entries'
    files are written: the in-process pass and the Ray driver (:mod:`engine.cluster.extract`)
    both use it, so their entries are the same.

    A context manager: entering opens the entries' temporary folders; :meth:`add` takes the
    images that were read, in batches, in any order (each image once); :meth:`finish` writes
    the remaining files and ``meta.json``; leaving the block without an exception renames the
    entries into place, with one (a cancelled job, an error, no :meth:`finish`) leaves none.
    Memory stays at about one batch: the arrays are written straight into the files.
    """

    def __init__(self, cache: Cache, source: dict[str, Any], image_set: ImageSet, layers: Sequence[LayerInfo], *,
                 store_maps: bool, top_k: int, indices: np.ndarray | None = None, outputs: bool = True) -> None:
        self.cache, self.source, self.image_set = cache, source, image_set
        self.layers = list(layers)
        self.store_maps, self.top_k, self.indices = bool(store_maps), int(top_k), indices
        self.rows = np.arange(len(image_set)) if indices is None else np.asarray(indices, np.int64)  # image positions
        self.n = len(self.rows)
        self.sid = _shard_id(indices)
        self._pos = None if indices is None else {int(i): j for j, i in enumerate(self.rows)}
        self._with_outputs = outputs
        self._stack: contextlib.ExitStack | None = None
        self._out_dir: Path | None = None
        self._outputs: np.ndarray | None = None
        self._writers: dict[str, _LayerWriter] = {}
        self._valid = np.zeros(self.n, dtype=bool)
        self._finished = False

    def __enter__(self) -> EntryWriter:
        with contextlib.ExitStack() as stack:
            if self._with_outputs:
                self._out_dir = stack.enter_context(self.cache.write(CACHE_KIND, outputs_key(self.source, self.sid)))
            for li in self.layers:
                key = layer_key(self.source, li.name, self.store_maps, self.top_k, self.sid)
                folder = stack.enter_context(self.cache.write(CACHE_KIND, key))
                self._writers[li.name] = _LayerWriter(folder, li, self.n, self.store_maps, self.top_k)
            stack.callback(self._close)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        stack, self._stack = self._stack, None
        assert stack is not None
        if exc is None and not self._finished:
            err = RuntimeError("EntryWriter left without finish(): its entries are discarded")
            stack.__exit__(RuntimeError, err, None)
            raise err
        return bool(stack.__exit__(exc_type, exc, tb))

    def add(self, images: np.ndarray, outputs: np.ndarray, summaries: Mapping[str, LayerSummaries]) -> None:
        """One batch of images that were read: ``images`` their image-set positions (B,), within
        the entries' rows, ``outputs`` the classifier output (B, K), ``summaries`` per layer of
        the writer (``maps`` may be None without ``store_maps``). Check them with
        :func:`check_finite` first."""
        assert self._stack is not None, "EntryWriter.add outside its with block"
        images = np.asarray(images, np.int64)
        local = images if self._pos is None else np.array([self._pos[int(i)] for i in images], np.int64)
        sl = _rows(local)
        if self._out_dir is not None:
            if self._outputs is None:
                self._outputs = np.lib.format.open_memmap(self._out_dir / "outputs.npy", "w+", np.float32,
                                                          (self.n, outputs.shape[1]))
                self._outputs[:] = np.nan
            self._outputs[sl] = outputs
        self._valid[sl] = True
        for name, w in self._writers.items():
            w.add(images, sl, summaries[name])

    def finish(self, *, digests: np.ndarray, skipped: Sequence[tuple[str, str]], seconds: float, device: str) -> None:
        """Write the rest: ``digests`` (n, DIGEST_SIZE) the content digests of every row's image
        file (:func:`engine.data.images.digest_files`), ``skipped`` the (path, cause) of the
        images that could not be read, in image order, ``seconds`` the pass's time and
        ``device`` where it ran. ConvLensError when no image was read."""
        if not self._valid.any():
            raise ConvLensError(f"{self.image_set.source}: none of the {self.n} images could be read")
        common = {"version": FORMAT_VERSION, "n_images": self.n, "source": self.source, "shard": self.sid,
                  "seconds": seconds, "device": device}
        for name, w in self._writers.items():
            w.finish()
            np.save(w.folder / "digests.npy", digests)
            if self.indices is not None:
                np.save(w.folder / "indices.npy", self.indices)
            li = w.info
            write_meta(w.folder, {**common, "role": "layer", "layer": name, "kind": li.kind, "shape": list(li.shape),
                                  "store_maps": self.store_maps, "top_k": self.top_k})
        if self._out_dir is not None:
            np.save(self._out_dir / "valid.npy", self._valid)
            np.save(self._out_dir / "digests.npy", digests)
            if self.indices is not None:
                np.save(self._out_dir / "indices.npy", self.indices)
            write_meta(self._out_dir, {**common, "role": "outputs", "skipped": [list(s) for s in skipped]})
        self._close()
        self._finished = True

    def _close(self) -> None:
        for w in self._writers.values():
            w.close()
        self._outputs = None


class _LayerWriter:
    """Streams one layer's maps and summaries into its cache entry's temporary folder."""

    def __init__(self, folder: Path, info: LayerInfo, n: int, store_maps: bool, top_k: int) -> None:
        self.info = info
        f = _fname(info.name)
        units = info.shape[0] if info.shape else 1
        self.folder, self.f = folder, f
        self.maps = _RowWriter(folder / f"maps_{f}.npy", np.float16, (n, *info.shape)) if store_maps else None
        self.max = np.lib.format.open_memmap(folder / f"max_{f}.npy", "w+", np.float32, (n, units))
        self.mean = np.lib.format.open_memmap(folder / f"mean_{f}.npy", "w+", np.float32, (n, units))
        self.max[:] = np.nan
        self.mean[:] = np.nan
        self.top = TopK(units, top_k)
        self._open = True

    def add(self, idx: np.ndarray, rows: slice | np.ndarray, s: LayerSummaries) -> None:
        if self.maps is not None and s.maps is not None:
            self.maps.write(rows, s.maps)
        self.max[rows] = s.max
        self.mean[rows] = s.mean
        self.top.add(s.max, idx)

    def finish(self) -> None:
        ids, vals = self.top.arrays()
        np.save(self.folder / f"topval_{self.f}.npy", vals)
        np.save(self.folder / f"topidx_{self.f}.npy", ids)
        self.close()

    def close(self) -> None:
        if self.maps is not None:
            self.maps.close()
        if self._open:  # drop the memory maps
            del self.max, self.mean
            self._open = False


class _RowWriter:
    """An ``.npy`` file of ``shape`` written by rows with ``pwrite``: a batch of consecutive
    rows is one block write through the page cache, several times cheaper than storing into a
    fresh memory map (one page fault per 4 KiB). Rows never written read as zeros."""

    def __init__(self, path: Path, dtype: Any, shape: tuple[int, ...]) -> None:
        mm = np.lib.format.open_memmap(path, "w+", dtype, shape)  # header + full (sparse) size
        self.offset, self.dtype = int(mm.offset), np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del mm
        self.fd: int | None = os.open(path, os.O_WRONLY)

    def write(self, rows: slice | np.ndarray, data: np.ndarray) -> None:
        assert self.fd is not None
        block = np.ascontiguousarray(data, dtype=self.dtype)
        if isinstance(rows, slice):
            _pwrite_all(self.fd, block.data.cast("B"), self.offset + rows.start * self.row_bytes)
            return
        for j, r in enumerate(np.asarray(rows).tolist()):
            _pwrite_all(self.fd, np.ascontiguousarray(block[j]).data.cast("B"), self.offset + r * self.row_bytes)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self) -> None:
        self.close()


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def write_unit_tables(acts: Activations, out_dir: Path) -> list[Path]:
    """Per layer: ``<layer>_units.csv`` (unit, mean of max, mean, top image paths) and JSON top-k."""
    import csv
    import io

    written = []
    records = acts.image_set.records
    for name in acts.layers:
        st = acts.stats(name)
        ok = acts.valid
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["unit", "max_of_max", "mean_of_max", "mean_of_mean", "top_images"])
        for u in range(st.max.shape[1]):
            tops = [records[i].path for i in st.top_images[u] if i >= 0][:5]
            w.writerow([u, f"{np.nanmax(st.max[ok, u]):.6g}", f"{np.nanmean(st.max[ok, u]):.6g}",
                        f"{np.nanmean(st.mean[ok, u]):.6g}", ";".join(tops)])
        written.append(atomic_write_text(out_dir / f"{_fname(name)}_units.csv", buf.getvalue()))
        top = {str(u): [{"image": records[i].path, "max": float(v)}
                        for i, v in zip(st.top_images[u], st.top_values[u], strict=True) if i >= 0]
               for u in range(st.top_images.shape[0])}
        written.append(atomic_write_text(out_dir / f"{_fname(name)}_top.json", json.dumps(top, indent=1)))
    return written
