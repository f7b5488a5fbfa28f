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
``store_maps``, the float16 maps. The driver writes the rows into the entries' memory maps as
blocks come back (its memory stays at about one block) and keeps the top-k heaps
(:class:`~engine.activations.TopK`, exact whatever the order blocks arrive in). A cancelled
job (the generator closed) stops the Ray execution and leaves no entry.

When every entry is already in the cache the in-process ``extract`` opens it (checking the
files and the images' digests), without starting any Ray work.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from engine.activations import (
    CACHE_KIND,
    FORMAT_VERSION,
    Activations,
    _check_finite,
    _LayerWriter,
    _open_layer,
    _open_outputs,
    _rows,
    _source,
    extract,
    layer_key,
    outputs_key,
)
from engine.backends.base import Backend, LayerSummaries
from engine.cache import Cache, load_array, write_meta
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
                _check_finite(self.backend, self.image_set, b.indices, o, summaries, self.layers)
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
    source = _source(backend, model_sha, image_set)
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
    with contextlib.ExitStack() as stack:
        out_tmp = stack.enter_context(cache.write(CACHE_KIND, okey))
        writers = {name: _LayerWriter(stack.enter_context(cache.write(CACHE_KIND, lkeys[name])), info[name], n,
                                      store_maps, top_k) for name in layers}
        outputs: np.ndarray | None = None
        valid = np.zeros(n, bool)
        digests = np.zeros((n, DIGEST_SIZE), np.uint8)
        skipped: dict[int, tuple[str, str]] = {}
        done = 0
        blocks_out = stack.enter_context(contextlib.closing(executor.map_blocks(ExtractWorker, kwargs, blocks)))
        for got in blocks_out:
            order = np.argsort(got["index"], kind="stable")
            idx = np.asarray(got["index"], np.int64)[order]
            ok = np.asarray(got["valid"], bool)[order]
            if outputs is None:
                outputs = np.lib.format.open_memmap(out_tmp / "outputs.npy", "w+", np.float32,
                                                    (n, got["output"].shape[1]))
                outputs[:] = np.nan
            outputs[_rows(idx)] = np.asarray(got["output"])[order]
            valid[idx] = ok
            digests[idx] = np.asarray(got["digest"])[order]
            for i, cause in zip(idx[~ok].tolist(), np.asarray(got["skip"])[order][~ok].tolist(), strict=True):
                skipped[i] = (image_set.records[i].path, str(cause))
            good = idx[ok]
            if good.size:
                for j, name in enumerate(layers):
                    maps = np.asarray(got[f"maps/{j}"])[order][ok] if store_maps else None
                    writers[name].add(good, _rows(good), LayerSummaries(
                        maps, np.asarray(got[f"max/{j}"])[order][ok], np.asarray(got[f"mean/{j}"])[order][ok]))
            done += len(idx)
            workers_seen = len(executor.seen_pids)
            yield Progress(done / n, f"{done}/{n} images ({workers_seen} Ray worker{'s' if workers_seen != 1 else ''})")
        if outputs is None or not valid.any():
            raise ConvLensError(f"{image_set.source}: none of the {n} images could be read")
        common = {"version": FORMAT_VERSION, "n_images": n, "source": source, "shard": None,
                  "seconds": time.perf_counter() - t0, "device": f"ray: {executor.describe()}"}
        for name, w in writers.items():
            w.finish()
            np.save(w.folder / "digests.npy", digests)
            li = info[name]
            write_meta(w.folder, {**common, "role": "layer", "layer": name, "kind": li.kind, "shape": list(li.shape),
                                  "store_maps": store_maps, "top_k": top_k})
        np.save(out_tmp / "valid.npy", valid)
        np.save(out_tmp / "digests.npy", digests)
        write_meta(out_tmp, {**common, "role": "outputs", "skipped": [list(skipped[i]) for i in sorted(skipped)]})
        del outputs, writers
    return _opened(cache, okey, lkeys, image_set, layers, n, store_maps, top_k, source)


def _opened(cache: Cache, okey: str, lkeys: dict[str, str], image_set: ImageSet, layers: list[str], n: int,
            store_maps: bool, top_k: int, source: dict[str, Any]) -> Activations:
    entry = cache.get(CACHE_KIND, okey)
    assert entry is not None
    out = _open_outputs(entry, n)
    folders: dict[str, Path] = {}
    infos = {}
    for name in layers:
        e = cache.get(CACHE_KIND, lkeys[name])
        assert e is not None
        folders[name], infos[name] = _open_layer(e, name, n, top_k)
    return Activations(folder=out["folder"], image_set=image_set, layers=infos,
                       outputs=load_array(out["folder"], "outputs"), valid=out["valid"], skipped=out["skipped"],
                       seconds=out["seconds"], from_cache=False, layer_folders=folders, indices=None,
                       store_maps=store_maps, top_k=top_k, source=source)
