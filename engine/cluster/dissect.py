"""Network Dissection on a Ray cluster: the two passes sharded over Ray actors, reduced on the
driver with the statistics' own ``merge``, cached as the in-process result.

:func:`dissect_on_ray` takes :func:`engine.dissection.dissect`'s arguments plus the executor,
uses the same cache key, entry format and staleness check (kind ``"dissection"``), so the app,
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
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engine.activations import TopK
from engine.analysis import cached_job
from engine.backends.base import Backend
from engine.cache import Cache
from engine.cluster.executor import RayExecutor, worker_threads
from engine.cluster.payload import ModelPayload, Transfer
from engine.concepts import ConceptDataset
from engine.data.images import ImageLoader, ImageSet, digest_files
from engine.jobs import Job
from engine.types import ConvLensError, LayerInfo, Preprocess, Progress

_PASS1_SHARE = 0.3  # of the progress bar, as in a local run


def _run_module() -> Any:
    from engine.dissection import run

    return run


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
        import torch

        from engine.dissection import passes
        from engine.dissection.quantile import TopQuantile

        device = passes._compute_device(self.backend, self.params)
        assert self.total is not None
        quantiles = {name: TopQuantile(li.units, self.total * li.shape[1] * li.shape[2], self.params.quantile,
                                       device=device, **_sketch_options(self.total * li.shape[1] * li.shape[2],
                                                                        self.params))
                     for name, li in self.info.items()}
        tops = {name: TopK(li.units, self.params.top_k) for name, li in self.info.items()}
        layers = list(self.info)
        with ImageLoader(self.image_set, self.pre, batch_size=self.params.batch_size, workers=self.threads,
                         indices=block) as loader:
            for b in loader:
                acts = passes.forward_batch(self.backend, b.array, layers, device)
                for name in layers:
                    quantiles[name].update(acts[name])
                    tops[name].add(acts[name].amax(dim=(2, 3)).cpu().numpy(), b.indices)
            skipped = list(loader.skipped)
        cpu = torch.device("cpu")
        part = {name: (_moved(quantiles[name], cpu), tops[name]) for name in layers}
        return part, skipped

    def _pass2(self, block: list[int]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        import torch

        from engine.dissection.passes import _compute_device, _pass2
        from engine.dissection.timing import _Clock

        device = _compute_device(self.backend, self.params)
        assert self.thresholds is not None and self.ties is not None
        job = _pass2(self.backend, self.concepts, self.image_set, self.pre, block, self.info, self.thresholds,
                     self.ties, None, self.labels, self.params, device, _Clock(device))
        got = _drain(job)
        # ({layer: tally}, images that loaded in pass 1 but fail now), or the tallies alone
        tallies, failed = got if isinstance(got, tuple) else (got, [])
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


def _sketch_options(total: int, params: Any) -> dict[str, Any]:
    """What the dissection's own pass 1 gives its sketches beyond the count (the values kept
    for counting ties at the threshold, where the dissection does so)."""
    from engine.dissection import passes

    keep = getattr(passes, "tie_keep", None)
    return {} if keep is None else {"min_keep": keep(total, params)}


def _tie_plan(quantile: Any, thresholds: np.ndarray, params: Any) -> Any:
    """What pass 2 is told about ties, as the dissection's own run computes it."""
    from engine.dissection import passes

    plan = getattr(passes, "tie_plan", None)
    if plan is not None:
        return plan(quantile, thresholds, params)
    factor = params.tie_factor or 1.0
    return quantile.count_bound(thresholds) > factor * params.quantile * quantile.total


def _merge_device() -> Any:
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else None


def dissect_on_ray(
    backend: Backend,
    model_sha: str,
    concepts: ConceptDataset,
    layers: Sequence[str],
    params: Any = None,
    *,
    cache: Cache | None = None,
    executor: RayExecutor,
    transfer: Transfer = "object_store",
) -> Job[Any]:
    """:func:`engine.dissection.dissect` with both passes on ``executor``'s Ray cluster (a job:
    yields Progress per block, returns the same :class:`DissectionResult`, cached under the same
    key). ``transfer`` says how the model file reaches the workers."""
    R = _run_module()  # noqa: N806 - the dissection module
    params = R.DissectionParams() if params is None else params
    params.check()
    layers = list(dict.fromkeys(layers))
    info = R.spatial_layers(backend, layers)
    if params.categories is not None and tuple(params.categories) != concepts.categories:
        concepts = R.restrict_categories(concepts, params.categories)
    key = R.dissection_key(backend, model_sha, concepts, layers, params)
    result = yield from cached_job(
        cache, R.CACHE_KIND, key, R.load_result, save=R.save_result, found="dissection found in cache",
        compute=lambda: _compute(backend, model_sha, concepts, layers, info, params, executor, transfer),
        accept=lambda r: R._inputs_unchanged(r, concepts))
    if result.from_cache:
        return dataclasses.replace(result, params=params)
    yield Progress(1.0, "; ".join(result.summary_line(n) for n in layers))
    return result


def _compute(backend: Backend, model_sha: str, concepts: ConceptDataset, layers: list[str],
             info: dict[str, LayerInfo], params: Any, executor: RayExecutor, transfer: Transfer) -> Job[Any]:
    """The two passes on Ray and the summary, as ``engine.dissection.run._compute`` does them."""
    from engine.dissection.labels import _Labels
    from engine.dissection.passes import one_position_warnings

    R = _run_module()  # noqa: N806
    if len(concepts) == 0:
        raise ConvLensError(f"{concepts.root}: the concept data set has no images.")
    yield Progress(0.0, f"hashing {len(concepts)} concept images and their masks")
    input_digests = digest_files(concepts.content_files())
    labels = _Labels.of(concepts)
    if not labels.scored.any():
        raise ConvLensError(f"{concepts.root}: no concept to score in categories "
                            f"{', '.join(concepts.categories) or '(none)'}.")
    image_set = R.concept_image_set(concepts)
    pre = R.dissection_preprocess(backend.spec.preprocess)
    t0 = time.perf_counter()
    yield Progress(0.0, f"dissecting on {executor.describe()}")
    executor.connect()
    payload = ModelPayload.of(backend.spec, model_sha, executor, transfer)
    worker_params = dataclasses.replace(params, device=None)  # the worker's own device
    common = {"payload": payload, "concepts": concepts, "image_set": image_set, "pre": pre, "info": info,
              "params": worker_params, "device": executor.device(), "threads": executor.threads()}
    order = list(range(len(concepts)))
    skipped: list[tuple[str, str]] = []
    t1 = t2 = t0
    for _attempt in range(3):
        yield Progress(0.0, f"pass 1/2: thresholds of {len(layers)} layers over {len(order)} images")
        quantiles, tops, newly = yield from _pass1(executor, common, order, info)
        if newly:
            skipped.extend(newly)
            bad = {p for p, _ in newly}
            order = [i for i in order if image_set.records[i].path not in bad]
            if not order:
                raise ConvLensError(f"{concepts.root}: none of the {len(concepts)} concept images could be read.")
            if not all(hasattr(q, "shrink_total") for q in quantiles.values()):
                continue  # sketches that cannot be told the smaller count: pass 1 again without them
            for name, li in info.items():  # the sketches count the loadable images only
                quantiles[name].shrink_total(len(order) * li.shape[1] * li.shape[2])
        thresholds = {name: quantiles[name].thresholds() for name in layers}
        t1 = time.perf_counter()
        ties = {name: _tie_plan(quantiles[name], thresholds[name], params) for name in layers}
        tallies, failed = yield from _pass2(executor, {**common, "phase": 2, "thresholds": thresholds,
                                                       "ties": ties, "labels": labels}, order, layers)
        t2 = time.perf_counter()
        if not failed:
            break
        # loaded in pass 1 but not in pass 2 (changed on disk): both passes again without them
        skipped.extend(failed)
        bad = {p for p, _ in failed}
        order = [i for i in order if image_set.records[i].path not in bad]
        if not order:
            raise ConvLensError(f"{concepts.root}: none of the {len(concepts)} concept images could be read.")
    else:
        raise ConvLensError(f"{concepts.root}: images keep failing to load; first: {skipped[0]}")
    out = {}
    for name in layers:
        iou = tallies[name].iou()
        top_images, top_values = tops[name].arrays()
        out[name] = R.LayerDissection(
            layer=name, units=info[name].units, shape=tuple(info[name].shape),
            thresholds=thresholds[name], iou=iou,
            summary=R.summarize_layer(iou, labels.names, labels.category_index, labels.categories,
                                      params.iou_threshold),
            top_images=top_images, top_values=top_values,
            tie_fallback=tallies[name].tie_fallback(),
            at_threshold=tallies[name].at_threshold_fraction(),
        )
    notes = [f"two forward passes on {executor.describe()} ({_workers(executor)} answered), "
             f"{len(order)} images in blocks of {executor.block_size(len(order), params.batch_size)}"]
    notes += [R.tie_note(name, out[name].tie_fallback, params) for name in layers if out[name].tie_fallback.any()]
    seconds = {"pass1": t1 - t0, "pass2": t2 - t1, "total": time.perf_counter() - t0}
    return R.DissectionResult(
        model=backend.spec.path, model_sha256=model_sha, concepts_root=concepts.root,
        params=params, layers=out, concept_names=labels.names,
        concept_categories=labels.categories_of, categories=labels.categories,
        n_images=len(order), seconds=seconds, skipped=tuple(skipped), input_digests=input_digests,
        notes=tuple(notes), warnings=tuple(one_position_warnings(info)),
        **({"passes": 2} if "passes" in {f.name for f in dataclasses.fields(R.DissectionResult)} else {}),
    )


def _blocks(executor: RayExecutor, order: list[int], batch_size: int) -> list[np.ndarray]:
    size = executor.block_size(len(order), batch_size)
    arr = np.asarray(order, np.int64)
    return [arr[s:s + size] for s in range(0, len(arr), size)]


def _pass1(executor: RayExecutor, common: dict[str, Any], order: list[int],
           info: dict[str, LayerInfo]) -> Job[tuple[dict[str, Any], dict[str, TopK], list[tuple[str, str]]]]:
    """Merged pass-1 sketches and top images over ``order``, and the files that failed."""
    n = len(order)
    params = common["params"]
    quantiles: dict[str, Any] = {}
    tops = {name: TopK(li.units, params.top_k) for name, li in info.items()}
    skipped: list[tuple[str, str]] = []
    done = 0
    kwargs = {**common, "phase": 1, "total": n}
    # merging exact sketches is a top-m selection per unit (seconds per block for a large layer
    # on one CPU core): on the driver's GPU when it has one
    on = _merge_device()
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
            yield Progress(_PASS1_SHARE * done / n, f"pass 1/2: {done}/{n} images ({_workers(executor)})")
    where = {r.path: i for i, r in enumerate(common["image_set"].records)}
    skipped.sort(key=lambda s: where.get(s[0], -1))
    return quantiles, tops, skipped


def _pass2(executor: RayExecutor, kwargs: dict[str, Any], order: list[int],
           layers: list[str]) -> Job[tuple[dict[str, Any], list[tuple[str, str]]]]:
    """Merged pass-2 tallies over ``order``, and the images that failed to load this time."""
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
            yield Progress(_PASS1_SHARE + (1 - _PASS1_SHARE) * done / n,
                           f"pass 2/2: {done}/{n} images ({_workers(executor)})")
    where = {r.path: i for i, r in enumerate(kwargs["image_set"].records)}
    failed.sort(key=lambda s: where.get(s[0], -1))
    return tallies, failed


def _workers(executor: RayExecutor) -> str:
    k = len(executor.seen_pids)
    return f"{k} Ray worker{'s' if k != 1 else ''}"
