"""Activation extraction (and so predictions) on a Ray cluster, into the same cache entries.

:func:`extract_on_ray` takes :func:`engine.activations.extract`'s arguments plus the executor
and returns the same :class:`~engine.activations.Activations`, read from the same cache
entries (kind ``"activations"``, the same keys), so a later in-process ``extract`` (the app,
any command) finds them, and a cluster run finds what a local one left.

The image set is cut into blocks of consecutive images, a multiple of ``batch_size`` each, so
the forward batches are those of a local run. Each Ray actor (:class:`ExtractWorker`) opens the
model once (:class:`~engine.cluster.payload.ModelPayload`), decodes its blocks with
:class:`~engine.data.images.ImageLoader` (unreadable files are left out and named with their
cause, as locally) and returns per image: the classifier output, whether it loaded, the file's
content digest, the cause when it did not, and per layer the per-unit max and mean and, with
``store_maps``, the float16 maps (each batch checked with
:func:`~engine.activations.check_finite`, as locally). The driver hands the rows to an
:class:`~engine.activations.EntryWriter`, the writer the in-process pass uses, as blocks come
back (its memory stays at about one block; the top-k heaps are exact whatever the order blocks
arrive in), and opens the result with :func:`~engine.activations.open_entries`. A cancelled
job (the generator closed) stops the Ray execution and leaves no entry.

When every entry is already in the cache the in-process ``extract`` opens it (checking the
files and the images' digests), without starting any Ray work.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence

import numpy as np

from engine.activations import (
    CACHE_KIND,
    Activations,
    EntryWriter,
    cache_source,
    check_finite,
    extract,
    layer_key,
    open_entries,
    outputs_key,
)
from engine.backends.base import Backend, LayerSummaries
from engine.cache import Cache
from engine.cluster.executor import RayExecutor, worker_threads
from engine.cluster.payload import ModelPayload, Transfer
from engine.data.images import DIGEST_SIZE, ImageLoader, ImageSet
from engine.jobs import Job
from engine.types import ConvLensError, Progress


class ExtractWorker:
    """A Ray Data actor: the model opened once, then one block of image indices per call."""

    def __init__(self, payload: ModelPayload, image_set: ImageSet, layers: list[str], store_maps: bool,
                 batch_size: int, device: str, threads: int) -> None:
        from engine.predict import probe_batch

        worker_threads(threads)
        self.backend, self._opened = payload.open(device)
        self.image_set, self.layers, self.store_maps = image_set, layers, store_maps
        self.batch_size, self.threads = batch_size, threads
        info = {li.name: li for li in self.backend.layers()} if layers else {}
        self.shapes = {name: tuple(info[name].shape) for name in layers}
        out, _ = self.backend.forward_summaries(probe_batch(self.backend.spec), [], maps=False)
        self.n_out = int(out.shape[1])

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = np.asarray(batch["data"], np.int64)
        n = len(idx)
        at = {int(i): j for j, i in enumerate(idx)}
        out = np.full((n, self.n_out), np.nan, np.float32)
        valid = np.zeros(n, bool)
        cols: dict[str, np.ndarray] = {}
        for j, name in enumerate(self.layers):
            units = self.shapes[name][0] if self.shapes[name] else 1
            cols[f"max/{j}"] = np.full((n, units), np.nan, np.float32)
            cols[f"mean/{j}"] = np.full((n, units), np.nan, np.float32)
            if self.store_maps:
                cols[f"maps/{j}"] = np.zeros((n, *self.shapes[name]), np.float16)
        pre = self.backend.spec.preprocess
        with ImageLoader(self.image_set, pre, batch_size=self.batch_size, workers=self.threads,
                         indices=idx.tolist()) as loader:
            for b in loader:
                o, summaries = self.backend.forward_summaries(b.array, self.layers, maps=self.store_maps)
                check_finite(self.backend, self.image_set, b.indices, o, summaries, self.layers)
                rows = np.array([at[int(i)] for i in b.indices], np.int64)
                out[rows] = o
                valid[rows] = True
                for j, name in enumerate(self.layers):
                    s = summaries[name]
                    cols[f"max/{j}"][rows] = s.max
                    cols[f"mean/{j}"][rows] = s.mean
                    if self.store_maps and s.maps is not None:
                        cols[f"maps/{j}"][rows] = s.maps
            causes = dict(loader.skipped)
            digests = loader.digests[idx]
        records = self.image_set.records
        skip = np.array([causes.get(records[int(i)].path, "") if not ok else "" for i, ok in zip(idx, valid, strict=True)],
                        dtype=str)
        return {"index": idx, "valid": valid, "digest": digests, "skip": skip, "output": out, **cols,
                "pid": np.full(n, os.getpid(), np.int64)}


def extract_on_ray(
    backend: Backend,
    model_sha: str,
    image_set: ImageSet,
    layers: Sequence[str],
    *,
    executor: RayExecutor,
    batch_size: int = 64,
    store_maps: bool = True,
    top_k: int = 16,
    cache: Cache | None = None,
    workers: int | None = None,
    transfer: Transfer = "object_store",
) -> Job[Activations]:
    """:func:`engine.activations.extract` with the model passes on ``executor``'s Ray cluster
    (a job: yields Progress per block, returns Activations from the same cache entries).
    ``workers`` is the driver's hashing threads for a cache hit (as in ``extract``); the Ray
    actors are ``executor.workers``. ``transfer`` says how the model file reaches them."""
    cache = cache or Cache()
    layers = list(dict.fromkeys(layers))
    backend.check_capture(layers)
    if top_k < 1:
        raise ConvLensError(f"top_k must be >= 1, got {top_k}")
    source = cache_source(backend, model_sha, image_set)
    okey = outputs_key(source)
    lkeys = {name: layer_key(source, name, store_maps, top_k) for name in layers}

    def cached(name: str) -> bool:
        return cache.get(CACHE_KIND, lkeys[name]) is not None or (
            not store_maps and cache.get(CACHE_KIND, layer_key(source, name, True, top_k)) is not None)

    if cache.get(CACHE_KIND, okey) is not None and all(cached(name) for name in layers):
        return (yield from extract(backend, model_sha, image_set, layers, batch_size=batch_size,
                                   store_maps=store_maps, top_k=top_k, cache=cache, workers=workers))
    n = len(image_set)
    if n == 0:
        raise ConvLensError(f"{image_set.source}: none of the 0 images could be read")
    info = {li.name: li for li in backend.layers()} if layers else {}
    t0 = time.perf_counter()
    what = f"extracting {', '.join(layers)} from {n} images" if layers else f"predicting {n} images"
    yield Progress(0.0, f"{what} on {executor.describe()}")
    executor.connect()
    payload = ModelPayload.of(backend.spec, model_sha, executor, transfer)
    size = executor.block_size(n, batch_size)
    blocks = [np.arange(s, min(s + size, n), dtype=np.int64) for s in range(0, n, size)]
    kwargs = {"payload": payload, "image_set": image_set, "layers": layers, "store_maps": store_maps,
              "batch_size": batch_size, "device": executor.device(), "threads": executor.threads()}
    digests = np.zeros((n, DIGEST_SIZE), np.uint8)
    skipped: dict[int, tuple[str, str]] = {}
    done = 0
    with EntryWriter(cache, source, image_set, [info[name] for name in layers], store_maps=store_maps,
                     top_k=top_k) as writer, \
            contextlib.closing(executor.map_blocks(ExtractWorker, kwargs, blocks)) as blocks_out:
        for got in blocks_out:
            order = np.argsort(got["index"], kind="stable")
            idx = np.asarray(got["index"], np.int64)[order]
            ok = np.asarray(got["valid"], bool)[order]
            digests[idx] = np.asarray(got["digest"])[order]
            for i, cause in zip(idx[~ok].tolist(), np.asarray(got["skip"])[order][~ok].tolist(), strict=True):
                skipped[i] = (image_set.records[i].path, str(cause))
            if ok.any():
                writer.add(idx[ok], np.asarray(got["output"])[order][ok], {name: LayerSummaries(
                    np.asarray(got[f"maps/{j}"])[order][ok] if store_maps else None,
                    np.asarray(got[f"max/{j}"])[order][ok], np.asarray(got[f"mean/{j}"])[order][ok])
                    for j, name in enumerate(layers)})
            done += len(idx)
            workers_seen = len(executor.seen_pids)
            yield Progress(done / n, f"{done}/{n} images ({workers_seen} Ray worker{'s' if workers_seen != 1 else ''})")
        writer.finish(digests=digests, skipped=[skipped[i] for i in sorted(skipped)],
                      seconds=time.perf_counter() - t0, device=f"ray: {executor.describe()}")
    return open_entries(cache, source, image_set, layers, store_maps=store_maps, top_k=top_k)
