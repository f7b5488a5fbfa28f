"""Network Dissection on a Ray cluster: the two passes sharded over Ray actors, reduced on the
driver with the statistics' own ``merge``, cached as the in-process result.

:func:`dissect_on_ray` takes :func:`engine.dissection.dissect`'s arguments plus the executor,
is :func:`engine.dissection.dissect` itself with a :class:`RayPasses` strategy (so the same cache
key, entry format, staleness check, retries and result building; kind ``"dissection"``), so the app,
``convlens dissect`` and the report open a cluster run like a local one, and a local run finds
a cluster run's entry (and the other way round).

The concept images (the dissected order: every image, then the loadable ones) are cut into
blocks, each a multiple of ``batch_size`` images, so each forward batch holds the images of the
local run's batch and the activations are the same bits.

* **Pass 1**, per block on an actor: every activation into a
  :class:`~engine.dissection.quantile.TopQuantile` built for the *whole* data set's count (so
  partials merge), and each unit's max per image into a :class:`~engine.activations.TopK`
  (value, then lower image first: the in-process top images). The driver merges the partials
  (:meth:`TopQuantile.merge`: exact mode bit for bit; histogram mode within its stated bound)
  and takes the thresholds and the tie candidates as a local run does. Files that fail to load
  are named by the workers; as locally, pass 1 is then repeated over the loadable images.
* **Pass 2**, per block on an actor: the dissection's own pass 2 over the block (the sparse IoU
  tally with the thresholds and candidates of the whole set), returned as a partial tally; the
  driver merges them (int64 sums: exact) and builds the result exactly as ``dissect`` does.

Each pass is one Ray Data ``map_batches`` over a fixed pool of actors that load the model once
(the model file through the object store, opened by ConvLens's safe loaders on the worker).
Per block, what travels back is the partial state: a pass-1 sketch is at most
``units x min(block positions, m) x 4`` bytes per layer (``m = q x total + 2`` kept values,
exact mode) and a pass-2 tally ``2 x (units + candidates) x labels x 8`` bytes per layer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.activations import TopK
from engine.backends.base import Backend
from engine.cache import Cache
from engine.cluster.executor import RayExecutor, worker_threads
from engine.cluster.payload import ModelPayload, Transfer
from engine.concepts import ConceptDataset
from engine.data.images import ImageSet
from engine.jobs import Job
from engine.types import LayerInfo, Preprocess, Progress

if TYPE_CHECKING:  # engine.dissection (and torch) load when a dissection runs
    from engine.dissection.passes import Pass1
    from engine.dissection.run import DissectionInputs, DissectionParams, DissectionResult
    from engine.dissection.sparse import SparseTally


class DissectWorker:
    """A Ray Data actor for one pass: the model opened once; per call, one block of concept
    image indices, returned as one row holding the block's partial statistics."""

    def __init__(self, payload: ModelPayload, concepts: ConceptDataset, image_set: ImageSet, pre: Preprocess,
                 info: dict[str, LayerInfo], params: Any, device: str, threads: int, phase: int,
                 total: int | None = None, thresholds: dict[str, np.ndarray] | None = None,
                 ties: dict[str, Any] | None = None, labels: Any = None) -> None:
        worker_threads(threads)
        self.backend, self._opened = payload.open(device)
        self.concepts, self.image_set, self.pre, self.info = concepts, image_set, pre, info
        self.params, self.threads, self.phase = params, threads, phase
        self.total, self.thresholds, self.ties, self.labels = total, thresholds, ties, labels

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        block = [int(i) for i in np.asarray(batch["data"]).tolist()]
        part, skipped = self._pass1(block) if self.phase == 1 else self._pass2(block)
        return {"part": np.array([part], dtype=object), "n": np.array([len(block)], np.int64),
                "skipped": np.array([skipped], dtype=object), "pid": np.array([os.getpid()], np.int64)}

    def _pass1(self, block: list[int]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """The block's partial pass 1 (:func:`engine.dissection.passes.partial_pass1`), moved
        to the CPU for the object store."""
        import torch

        from engine.dissection.passes import compute_device, partial_pass1

        assert self.total is not None
        device = compute_device(self.backend, self.params)
        part, skipped = partial_pass1(self.backend, self.image_set, self.pre, block, self.info, self.params, device,
                                      self.total, workers=self.threads)
        cpu = torch.device("cpu")
        return {name: (_moved(q, cpu), top) for name, (q, top) in part.items()}, skipped

    def _pass2(self, block: list[int]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """The dissection's own pass 2 over the block (thresholds and tie plans of the whole
        set): partial tallies, and the images that loaded in pass 1 but fail now."""
        import torch

        from engine.dissection.passes import compute_device, pass2
        from engine.dissection.timing import Clock

        device = compute_device(self.backend, self.params)
        assert self.thresholds is not None and self.ties is not None
        job = pass2(self.backend, self.concepts, self.image_set, self.pre, block, self.info, self.thresholds,
                    self.ties, None, self.labels, self.params, device, Clock(device))
        tallies, failed = _drain(job)
        cpu = torch.device("cpu")
        return {name: _moved(t, cpu) for name, t in tallies.items()}, list(failed)


def _drain(job: Job[Any]) -> Any:
    while True:
        try:
            next(job)
        except StopIteration as stop:
            return stop.value


def _moved(stat: Any, device: Any) -> Any:
    """A copy of a partial statistic (a quantile sketch, a tally) whose tensors are on
    ``device``: the CPU before it goes into the object store, the driver's GPU for merging."""
    import torch

    if getattr(stat, "device", None) == device:
        return stat
    out = copy.copy(stat)
    for name, value in vars(stat).items():
        if isinstance(value, torch.Tensor):
            setattr(out, name, value.to(device))
    out.device = device
    return out


def _merge_device() -> Any:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else None


def dissect_on_ray(
    backend: Backend,
    model_sha: str,
    concepts: ConceptDataset,
    layers: Sequence[str],
    params: DissectionParams | None = None,
    *,
    cache: Cache | None = None,
    executor: RayExecutor,
    transfer: Transfer = "object_store",
) -> Job[DissectionResult]:
    """:func:`engine.dissection.dissect` with both passes on ``executor``'s Ray cluster (a job:
    yields Progress per block, returns the same :class:`DissectionResult`, cached under the same
    key). ``transfer`` says how the model file reaches the workers."""
    from engine.dissection.run import DissectionParams, dissect

    params = DissectionParams() if params is None else params
    return (yield from dissect(backend, model_sha, concepts, layers, params, cache=cache,
                               passes=lambda inputs: RayPasses(inputs, model_sha, executor, transfer)))


class RayPasses:
    """The :class:`engine.dissection.run.PassStrategy` of :func:`dissect_on_ray`: each pass one
    ``map_batches`` over the executor's actors in blocks of whole batches, the partials merged
    here (on this machine's GPU when it has one)."""

    passes = 2

    def __init__(self, inputs: DissectionInputs, model_sha: str, executor: RayExecutor, transfer: Transfer) -> None:
        import torch

        from engine.dissection.timing import Clock

        self.inputs, self.model_sha, self.executor, self.transfer = inputs, model_sha, executor, transfer
        self.on = _merge_device()
        self.clock = Clock(torch.device("cpu") if self.on is None else self.on)
        self.common: dict[str, Any] = {}

    def describe(self) -> str:
        return f"on {self.executor.describe()}"

    def begin(self) -> Job[None]:
        i, ex = self.inputs, self.executor
        yield Progress(0.0, f"dissecting on {ex.describe()}")
        ex.connect()
        payload = ModelPayload.of(i.backend.spec, self.model_sha, ex, self.transfer)
        worker_params = dataclasses.replace(i.params, device=None)  # the worker's own device
        self.common = {"payload": payload, "concepts": i.concepts, "image_set": i.image_set, "pre": i.pre,
                       "info": i.info, "params": worker_params, "device": ex.device(), "threads": ex.threads()}

    def pass1(self, order: list[int]) -> Job[Pass1]:
        from engine.dissection.passes import Pass1

        quantiles, tops, skipped = yield from _pass1(self.executor, self.common, order, self.inputs.info, self.on)
        bad = {p for p, _ in skipped}
        loaded = [i for i in order if self.inputs.image_set.records[i].path not in bad]
        if loaded and len(loaded) < len(order):
            for name, li in self.inputs.info.items():  # the sketches count the loadable images only
                quantiles[name].shrink_total(len(loaded) * li.shape[1] * li.shape[2])
        return Pass1(quantiles, tops, None, skipped, loaded)

    def pass2(self, p1: Pass1, thresholds: dict[str, np.ndarray],
              ties: dict[str, tuple[np.ndarray, np.ndarray]]) -> Job[tuple[dict[str, SparseTally], list[tuple[str, str]]]]:
        kwargs = {**self.common, "phase": 2, "thresholds": thresholds, "ties": ties, "labels": self.inputs.labels}
        return (yield from _pass2(self.executor, kwargs, p1.loaded, list(self.inputs.info)))

    def notes(self, n_images: int) -> list[str]:
        ex = self.executor
        return [f"two forward passes on {ex.describe()} ({_workers(ex)} answered), "
                f"{n_images} images in blocks of {ex.block_size(n_images, self.inputs.params.batch_size)}"]

    def seconds(self, layers: Sequence[str]) -> dict[str, float]:
        return {k: v for k, v in self.clock.seconds.items() if k in ("pass1", "pass2")}


def _blocks(executor: RayExecutor, order: list[int], batch_size: int) -> list[np.ndarray]:
    size = executor.block_size(len(order), batch_size)
    arr = np.asarray(order, np.int64)
    return [arr[s:s + size] for s in range(0, len(arr), size)]


def _pass1(executor: RayExecutor, common: dict[str, Any], order: list[int], info: dict[str, LayerInfo],
           on: Any) -> Job[tuple[dict[str, Any], dict[str, TopK], list[tuple[str, str]]]]:
    """Merged pass-1 sketches (on ``on``, else as they come) and top images over ``order``,
    and the files that failed."""
    from engine.dissection.passes import PASS1_SHARE

    n = len(order)
    params = common["params"]
    quantiles: dict[str, Any] = {}
    tops = {name: TopK(li.units, params.top_k) for name, li in info.items()}
    skipped: list[tuple[str, str]] = []
    done = 0
    kwargs = {**common, "phase": 1, "total": n}
    # merging exact sketches is a top-m selection per unit (seconds per block for a large layer
    # on one CPU core): on the driver's GPU when it has one
    with contextlib.closing(executor.map_blocks(DissectWorker, kwargs, _blocks(executor, order, params.batch_size))) \
            as results:
        for got in results:
            for part, count, bad in zip(got["part"], got["n"], got["skipped"], strict=True):
                for name, (q, top) in part.items():
                    if name not in quantiles:
                        quantiles[name] = q if on is None else _moved(q, on)
                    else:
                        quantiles[name] = quantiles[name].merge(q)
                    tops[name] = tops[name].merge(top)
                skipped.extend((str(p), str(c)) for p, c in bad)
                done += int(count)
            yield Progress(PASS1_SHARE * done / n, f"pass 1/2: {done}/{n} images ({_workers(executor)})")
    where = {r.path: i for i, r in enumerate(common["image_set"].records)}
    skipped.sort(key=lambda s: where.get(s[0], -1))
    return quantiles, tops, skipped


def _pass2(executor: RayExecutor, kwargs: dict[str, Any], order: list[int],
           layers: list[str]) -> Job[tuple[dict[str, Any], list[tuple[str, str]]]]:
    """Merged pass-2 tallies over ``order``, and the images that failed to load this time."""
    from engine.dissection.passes import PASS1_SHARE

    n = len(order)
    tallies: dict[str, Any] = {}
    failed: list[tuple[str, str]] = []
    done = 0
    blocks = _blocks(executor, order, kwargs["params"].batch_size)
    with contextlib.closing(executor.map_blocks(DissectWorker, kwargs, blocks)) as results:
        for got in results:
            for part, count, bad in zip(got["part"], got["n"], got["skipped"], strict=True):
                for name in layers:
                    tallies[name] = part[name] if name not in tallies else tallies[name].merge(part[name])
                failed.extend((str(p), str(c)) for p, c in bad)
                done += int(count)
            yield Progress(PASS1_SHARE + (1 - PASS1_SHARE) * done / n,
                           f"pass 2/2: {done}/{n} images ({_workers(executor)})")
    where = {r.path: i for i, r in enumerate(kwargs["image_set"].records)}
    failed.sort(key=lambda s: where.get(s[0], -1))
    return tallies, failed


def _workers(executor: RayExecutor) -> str:
    k = len(executor.seen_pids)
    return f"{k} Ray worker{'s' if k != 1 else ''}"
