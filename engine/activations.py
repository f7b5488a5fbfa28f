"""Activation extraction: one streaming pass over an image set, cached on disk.

One pass gives everything later views need:

- per captured layer, the activation maps as float16 ``(N, C, h, w)`` memory-mapped arrays
  (``store_maps``; float16 keeps about 3 significant digits, ample for heatmaps and ranking);
- per layer and unit, each image's max and mean activation (float32, ``(N, C)``);
- per unit, the top-k images by max activation;
- the model's classifier output for every image (so predictions come for free).

Memory stays bounded: a batch at a time, written straight into memory-mapped files inside a
temporary cache folder that is renamed into place only when the pass completes (a cancelled or
failed pass leaves nothing). The cache key covers the model hash, the architecture, the
preprocessing, the image set's fingerprint, the layers and the backend.

A cached entry is reused only after two checks: its files are whole and consistent (else it is
discarded with a warning and recomputed), and every image file still has the content digest it
had when extracted (:func:`engine.data.images.file_digest`, stored per image in the entry): a
file whose bytes changed while its size and modification time stayed (``cp -p``, ``rsync -t``,
a restore) makes the entry stale, so it is recomputed. A model whose output, or a captured
layer whose summaries, are not finite (NaN weights, a NaN mean) is an error, not numbers.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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

FORMAT_VERSION = 2
CACHE_KIND = "activations"
_META_KEYS = ("layers", "layer_order", "skipped", "seconds", "n_images", "store_maps", "top_k")


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
    """An opened extraction result (a cache entry). Arrays are read-only memory maps."""

    folder: Path
    image_set: ImageSet
    layers: dict[str, LayerInfo]
    outputs: np.ndarray  # (N, K) float32 classifier output as the model gives it
    valid: np.ndarray  # (N,) bool: False for images that could not be read
    skipped: list[tuple[str, str]]
    seconds: float
    from_cache: bool = False
    _stats: dict[str, LayerStats] = field(default_factory=dict, repr=False)

    @property
    def n_images(self) -> int:
        return len(self.valid)

    def has_maps(self, layer: str) -> bool:
        return (self.folder / f"maps_{_fname(layer)}.npy").is_file()

    def maps(self, layer: str) -> np.ndarray:
        """(N, C, h, w) float16 memory map (N, C for non-spatial layers)."""
        self._check(layer)
        if not self.has_maps(layer):
            raise ConvLensError(f"activation maps of '{layer}' were not stored (extract with store_maps)")
        return load_array(self.folder, f"maps_{_fname(layer)}")

    def stats(self, layer: str) -> LayerStats:
        self._check(layer)
        if layer not in self._stats:
            f = _fname(layer)
            self._stats[layer] = LayerStats(
                self.layers[layer],
                load_array(self.folder, f"max_{f}"),
                load_array(self.folder, f"mean_{f}"),
                load_array(self.folder, f"topidx_{f}", mmap=False),
                load_array(self.folder, f"topval_{f}", mmap=False),
            )
        return self._stats[layer]

    def _check(self, layer: str) -> None:
        if layer not in self.layers:
            raise ConvLensError(f"layer '{layer}' was not extracted (have: {', '.join(self.layers)})")


_fname = safe_name


def extraction_key(backend: Backend, model_sha: str, image_set: ImageSet, layers: Sequence[str],
                   store_maps: bool, top_k: int) -> str:
    spec = backend.spec
    return make_key("activations", FORMAT_VERSION, model_sha, spec.arch, spec.preprocess, spec.output_index,
                    image_set.fingerprint(), list(layers), store_maps, top_k, backend.name)


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
) -> Job[Activations]:
    """Extract ``layers`` over ``image_set`` (a job: yields Progress, returns Activations).

    A complete earlier pass with the same key is reused without running the model, once its
    files check out and every image file still has the content digest stored with it; else the
    entry is discarded (with a warning) and recomputed. Raises :class:`ConvLensError` naming the
    model, or the layer, when the model output or a captured layer is not finite.
    """
    cache = cache or Cache()
    layers = list(dict.fromkeys(layers))  # may be empty: outputs only, e.g. for predictions
    backend.check_capture(layers)
    key = extraction_key(backend, model_sha, image_set, layers, store_maps, top_k)
    found = cache.get(CACHE_KIND, key)
    if found is not None:
        yield Progress(0.0, f"checking {len(image_set)} images against the cache")
        reused = _reuse(cache, key, found, image_set, workers)
        if reused is not None:
            yield Progress(1.0, "activations found in cache")
            return reused

    info = {li.name: li for li in backend.layers()} if layers else {}
    n = len(image_set)
    t0 = time.perf_counter()
    yield Progress(0.0, f"extracting {', '.join(layers)} from {n} images" if layers else f"predicting {n} images")
    with cache.write(CACHE_KIND, key) as tmp, ImageLoader(image_set, backend.spec.preprocess,
                                                             batch_size=batch_size, workers=workers) as loader:
        writers = {name: _LayerWriter(tmp, info[name], n, store_maps, top_k) for name in layers}
        outputs: np.ndarray | None = None
        valid = np.zeros(n, dtype=bool)
        done = 0
        for batch in loader:
            out, summaries = backend.forward_summaries(batch.array, layers, maps=store_maps)
            _check_finite(backend, image_set, batch.indices, out, summaries, layers)
            if outputs is None:
                outputs = np.lib.format.open_memmap(tmp / "outputs.npy", "w+", np.float32, (n, out.shape[1]))
                outputs[:] = np.nan
            rows = _rows(batch.indices)
            outputs[rows] = out
            valid[rows] = True
            for name in layers:
                writers[name].add(batch.indices, rows, summaries[name])
            done += len(batch.indices)
            yield Progress(done / max(n, 1), f"{done}/{n} images")
        if outputs is None:
            raise ConvLensError(f"{image_set.source}: none of the {n} images could be read")
        for w in writers.values():
            w.finish()
        # no msync: the pages reach the file through the page cache; the rename below is what
        # makes the entry visible, so a crashed run never leaves a readable half entry
        np.save(tmp / "valid.npy", valid)
        np.save(tmp / "digests.npy", loader.digests)
        seconds = time.perf_counter() - t0
        write_meta(tmp, {
            "version": FORMAT_VERSION,
            "layers": {k: {"kind": v.kind, "shape": list(v.shape)} for k, v in info.items() if k in layers},
            "layer_order": layers,
            "skipped": loader.skipped,
            "seconds": seconds,
            "n_images": n,
            "store_maps": store_maps,
            "top_k": top_k,
            "model_sha256": model_sha,
            "backend": backend.name,
            "device": backend.device,
        })
        del outputs, writers
    found = cache.get(CACHE_KIND, key)
    assert found is not None
    result = open_activations(found, image_set)
    result.from_cache = False
    return result


def _reuse(cache: Cache, key: str, found: Path, image_set: ImageSet, workers: int | None) -> Activations | None:
    """The cached entry if whole and its images unchanged (content digests), else None after
    discarding it (with a warning saying why)."""
    try:
        acts = open_activations(found, image_set)
    except DamagedEntry as e:
        log.warning("damaged cache entry discarded, recomputing: %s", e)
        cache.discard(CACHE_KIND, key)
        return None
    stored = load_array(found, "digests", mmap=False)
    now = digest_files([r.path for r in image_set.records], workers=workers)
    changed = np.flatnonzero((stored != now).any(axis=1))
    if changed.size:
        log.warning("%s: %d image%s changed since the cached extraction although size and modification "
                    "time did not (first: %s); recomputing", image_set.source, changed.size,
                    "s" if changed.size != 1 else "", image_set.records[int(changed[0])].path)
        cache.discard(CACHE_KIND, key)
        return None
    return acts


def open_activations(folder: Path, image_set: ImageSet) -> Activations:
    """Open an extraction entry, checking first (from headers and sizes, no data read) that its
    meta.json is whole and of this format and that every array it lists is there with the
    expected shape and dtype; raises :class:`DamagedEntry` naming the entry otherwise."""
    meta = check_meta(folder, FORMAT_VERSION, _META_KEYS)
    try:
        n = int(meta["n_images"])
        layers = {k: LayerInfo(k, str(meta["layers"][k]["kind"]), tuple(int(d) for d in meta["layers"][k]["shape"]))
                  for k in meta["layer_order"]}
        skipped = [(str(p), str(c)) for p, c in meta["skipped"]]
        seconds = float(meta["seconds"])
        store_maps, top_k = bool(meta["store_maps"]), int(meta["top_k"])
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedEntry(f"{folder}: meta.json is inconsistent ({type(e).__name__}: {e})") from e
    if n != len(image_set):
        raise DamagedEntry(f"{folder}: {n} images, expected {len(image_set)}")
    check_array(folder, "outputs", np.float32, (n, None))
    check_array(folder, "valid", np.bool_, (n,))
    check_array(folder, "digests", np.uint8, (n, DIGEST_SIZE))
    for name, li in layers.items():
        f = _fname(name)
        units = li.shape[0] if li.shape else 1
        for arr in ("max", "mean"):
            check_array(folder, f"{arr}_{f}", np.float32, (n, units))
        check_array(folder, f"topidx_{f}", np.int64, (units, top_k))
        check_array(folder, f"topval_{f}", np.float32, (units, top_k))
        if store_maps:
            check_array(folder, f"maps_{f}", np.float16, (n, *li.shape))
    return Activations(
        folder=folder,
        image_set=image_set,
        layers=layers,
        outputs=load_array(folder, "outputs"),
        valid=load_array(folder, "valid", mmap=False),
        skipped=skipped,
        seconds=seconds,
        from_cache=True,
    )


def _check_finite(backend: Backend, image_set: ImageSet, idx: np.ndarray, out: np.ndarray,
                  summaries: dict[str, LayerSummaries], layers: Sequence[str]) -> None:
    """Raise a ConvLensError naming the model (or the layer) if a batch's output (or a captured
    layer's max / mean) holds NaN or infinite values."""
    def bad_rows(*arrays: np.ndarray) -> np.ndarray:
        rows = np.zeros(len(idx), dtype=bool)
        for a in arrays:
            a = np.asarray(a)
            rows |= ~np.isfinite(a.reshape(len(idx), -1)).all(axis=1)
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


class _LayerWriter:
    """Streams one layer's maps and summaries into the cache folder."""

    def __init__(self, folder: Path, info: LayerInfo, n: int, store_maps: bool, top_k: int) -> None:
        self.info = info
        f = _fname(info.name)
        units = info.shape[0] if info.shape else 1
        self.folder, self.f = folder, f
        self.maps = (np.lib.format.open_memmap(folder / f"maps_{f}.npy", "w+", np.float16, (n, *info.shape))
                     if store_maps else None)
        self.max = np.lib.format.open_memmap(folder / f"max_{f}.npy", "w+", np.float32, (n, units))
        self.mean = np.lib.format.open_memmap(folder / f"mean_{f}.npy", "w+", np.float32, (n, units))
        self.max[:] = np.nan
        self.mean[:] = np.nan
        self.k = top_k
        self.top_val = np.full((units, 0), -np.inf, np.float32)
        self.top_idx = np.zeros((units, 0), np.int64)

    def add(self, idx: np.ndarray, rows: slice | np.ndarray, s: LayerSummaries) -> None:
        if self.maps is not None and s.maps is not None:
            self.maps[rows] = s.maps
        mx = s.max
        self.max[rows] = mx
        self.mean[rows] = s.mean
        # running top-k images per unit by max activation
        vals = np.concatenate([self.top_val, mx.T], axis=1)
        ids = np.concatenate([self.top_idx, np.broadcast_to(idx, mx.T.shape)], axis=1)
        if vals.shape[1] > self.k:
            part = np.argpartition(-vals, self.k - 1, axis=1)[:, : self.k]
            vals = np.take_along_axis(vals, part, axis=1)
            ids = np.take_along_axis(ids, part, axis=1)
        self.top_val, self.top_idx = vals, ids

    def finish(self) -> None:
        order = np.argsort(-self.top_val, axis=1, kind="stable")
        vals = np.take_along_axis(self.top_val, order, axis=1)
        ids = np.take_along_axis(self.top_idx, order, axis=1)
        pad = self.k - vals.shape[1]
        if pad > 0:
            vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=np.nan)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        np.save(self.folder / f"topval_{self.f}.npy", vals.astype(np.float32))
        np.save(self.folder / f"topidx_{self.f}.npy", ids)


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
        top = {str(u): [{"image": records[i].path, "max": float(v)} for i, v in zip(st.top_images[u], st.top_values[u])
                        if i >= 0] for u in range(st.top_images.shape[0])}
        written.append(atomic_write_text(out_dir / f"{_fname(name)}_top.json", json.dumps(top, indent=1)))
    return written
