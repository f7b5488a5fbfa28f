"""The passes of a dissection over the concept images: the model's activations per batch, the
thresholds and top images (pass 1), and the IoU tallies (pass 2, over kept maps or the model
run again)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np
import torch

from engine.activations import TopK
from engine.backends.base import Backend, forward_error
from engine.backends.torch_backend import TorchBackend
from engine.concepts import ConceptDataset
from engine.data.images import ImageLoader, ImageSet
from engine.dissection.labels import Labels, _ImageLabels, _LabelPrefetcher
from engine.dissection.quantile import TopQuantile
from engine.dissection.result import DissectionParams
from engine.dissection.sparse import SparseTally
from engine.dissection.timing import Clock
from engine.jobs import Job
from engine.types import ConvLensError, ImageRecord, LayerInfo, Preprocess, Progress

PASS1_SHARE = 0.3
"""Fraction of the progress bar given to pass 1 (pass 2, which tallies, is the longer)."""


def dissection_preprocess(pre: Preprocess) -> Preprocess:
    """The model's preprocessing with ``resize="stretch"``: the whole image reaches the model,
    so an activation map lines up with the whole label mask (a centre crop would not)."""
    return replace(pre, resize="stretch")


def concept_image_set(concepts: ConceptDataset) -> ImageSet:
    """The concept images as an :class:`ImageSet` (record ``i`` is concept image ``i``)."""
    records = tuple(ImageRecord(concepts.image_path(i)) for i in range(len(concepts)))
    return ImageSet(source=concepts.root, records=records)


def spatial_layers(backend: Backend, layers: Sequence[str]) -> dict[str, LayerInfo]:
    """``LayerInfo`` of each requested layer; ConvLensError naming any unknown or non-spatial one."""
    if not layers:
        raise ConvLensError("no layers to dissect: name at least one convolutional layer.")
    backend.check_capture(layers)
    info = {li.name: li for li in backend.layers()}
    flat = [n for n in layers if not info[n].is_spatial]
    if flat:
        raise ConvLensError(
            f"{backend.spec.path}: layer(s) {', '.join(map(repr, flat))} have no spatial map "
            f"(shape {list(info[flat[0]].shape)}); dissection needs (units, h, w) outputs."
        )
    return {n: info[n] for n in layers}


def one_position_warnings(info: dict[str, LayerInfo]) -> list[str]:
    """A warning per layer whose maps are 1x1 (no spatial extent): each unit's mask is then the
    whole image or nothing, so its IoU is image-level (such layers are never default layers)."""
    return [f"layer {name!r} has 1x1 maps (shape {list(li.shape)}): each unit's mask is the whole image or "
            "nothing, so its IoU is image-level" for name, li in info.items() if li.shape[1] * li.shape[2] == 1]


def forward_batch(backend: Backend, batch: np.ndarray, layers: Sequence[str],
                  device: torch.device) -> dict[str, torch.Tensor]:
    """The activations of ``layers`` on ``device``: torch models stay on their device
    (``forward_tensors``, no host copy), ONNX outputs are moved there from numpy."""
    if isinstance(backend, TorchBackend):
        try:
            _, acts = backend.forward_tensors(backend.to_tensor(batch), layers)
        except RuntimeError as e:
            raise forward_error(backend.spec.path, batch.shape, e) from None
        return {n: acts[n].to(device, torch.float32) for n in layers}
    res = backend.forward(batch, capture=layers)
    return {n: torch.from_numpy(res.activations[n]).to(device, torch.float32) for n in layers}


def compute_device(backend: Backend, params: DissectionParams) -> torch.device:
    """Where the activations are reduced: ``params.device`` if set, else a torch model's own
    device, else CUDA when available (ONNX models), else the CPU."""
    if params.device:
        return torch.device(params.device)
    if isinstance(backend, TorchBackend):
        return backend.torch_device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _TopImages:
    """Per unit, the ``k`` images with the largest max activation (earlier image on ties)."""

    def __init__(self, units: int, k: int, device: torch.device) -> None:
        self.k = k
        self.values = torch.empty((units, 0), dtype=torch.float32, device=device)
        self.images = torch.empty((units, 0), dtype=torch.int64, device=device)

    def update(self, acts: torch.Tensor, indices: torch.Tensor) -> None:
        mx = acts.amax(dim=(2, 3)).T  # (K, B)
        vals = torch.cat((self.values, mx), dim=1)
        ids = torch.cat((self.images, indices[None].expand(mx.shape[0], -1)), dim=1)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, : self.k]
        self.values = torch.gather(vals, 1, order)
        self.images = torch.gather(ids, 1, order)

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        vals = self.values.cpu().numpy().astype(np.float32)
        ids = self.images.cpu().numpy().astype(np.int64)
        pad = self.k - vals.shape[1]
        if pad > 0:
            vals = np.pad(vals, ((0, 0), (0, pad)), constant_values=np.nan)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return ids, vals


def _phase_totals(seconds: dict[str, float], layers: Sequence[str]) -> dict[str, float]:
    """Per-layer laps plus their sums per phase (``quantile``, ``masks``, ``tally``)."""
    out = dict(seconds)
    for phase in ("quantile", "masks", "tally"):
        out[phase] = out.get(phase, 0.0) + sum(seconds.get(f"{phase}[{n}]", 0.0) for n in layers)
    for n in layers:
        out[f"tally[{n}]"] = seconds.get(f"masks[{n}]", 0.0) + seconds.get(f"tally[{n}]", 0.0)
        out.pop(f"masks[{n}]", None)
    return out


def map_bytes(info: dict[str, LayerInfo], n_images: int) -> int:
    """Bytes of the layers' float32 maps of ``n_images`` images (what one-pass mode keeps)."""
    return sum(4 * n_images * int(np.prod(li.shape)) for li in info.values())


def keeps_maps(info: dict[str, LayerInfo], n_images: int, params: DissectionParams) -> bool:
    """Whether the maps fit ``params.map_budget_mb`` (one forward pass) or not (two)."""
    return map_bytes(info, n_images) <= params.map_budget_mb * 2**20


@dataclass
class Kept:
    """Pass 1's activation maps for pass 2 (float32, CPU memory): row ``j`` of ``maps[layer]``
    is image ``rows[j]`` (the images that loaded, in order)."""

    maps: dict[str, torch.Tensor]
    rows: list[int] = field(default_factory=list)


class TopImages(Protocol):
    """Per unit, the top images of pass 1 (this module's own, or a merged
    :class:`engine.activations.TopK`)."""

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(images, values)``, each (units, k), best first; -1 / NaN pad."""
        ...


@dataclass
class Pass1:
    """What pass 1 gives pass 2 and the result: per layer the threshold sketches (told the
    count of the images that loaded) and the top images, the kept maps (one-pass mode), the
    images that failed to load and those that loaded (of the pass's ``order``, in order)."""

    quantiles: dict[str, TopQuantile]
    tops: Mapping[str, TopImages]
    kept: Kept | None
    skipped: list[tuple[str, str]]
    loaded: list[int]  # the images of ``order`` that loaded, in order


def pass1(
    backend: Backend, image_set: ImageSet, pre: Preprocess, order: list[int],
    info: dict[str, LayerInfo], params: DissectionParams, device: torch.device, clock: Clock,
    *, keep: bool,
) -> Job[Pass1]:
    """Thresholds and top images (a sub-generator); with ``keep`` every map is kept for pass 2.

    The quantile sketches are made for every image of ``order``; when some fail to load they
    are told the smaller count at the end (:meth:`TopQuantile.shrink_total`), so a failure
    never restarts the pass and the thresholds count exactly the images that loaded.
    """
    n = len(order)
    quantiles = {name: TopQuantile(li.units, n * li.shape[1] * li.shape[2], params.quantile, device=device,
                                   min_keep=tie_keep(n * li.shape[1] * li.shape[2], params))
                 for name, li in info.items()}
    tops = {name: _TopImages(li.units, params.top_k, device) for name, li in info.items()}
    pin = device.type == "cuda"
    kept = Kept({name: torch.empty((n, *li.shape), dtype=torch.float32, pin_memory=pin)
                  for name, li in info.items()}) if keep else None
    layers = list(info)
    loaded: list[int] = []
    with ImageLoader(image_set, pre, batch_size=params.batch_size, indices=order) as loader:
        clock.lap("setup")
        for batch in loader:
            clock.lap("load")
            acts = forward_batch(backend, batch.array, layers, device)
            clock.lap("forward")
            idx = torch.as_tensor(batch.indices, device=device)
            done = len(loaded)
            for name in layers:
                quantiles[name].update(acts[name])
                clock.lap(f"quantile[{name}]")
                tops[name].update(acts[name], idx)
                clock.lap("top_images")
                if kept is not None:
                    kept.maps[name][done:done + len(batch)].copy_(acts[name])
                    clock.lap("keep")
            loaded.extend(batch.indices.tolist())
            yield Progress(PASS1_SHARE * len(loaded) / n, f"pass 1/2: {len(loaded)}/{n} images")
            clock.lap("progress")
        skipped = list(loader.skipped)
    if kept is not None:
        kept.rows = loaded
    if loaded and len(loaded) < n:
        for name, li in info.items():
            quantiles[name].shrink_total(len(loaded) * li.shape[1] * li.shape[2])
    return Pass1(quantiles, tops, kept, skipped, loaded)


def partial_pass1(
    backend: Backend, image_set: ImageSet, pre: Preprocess, block: Sequence[int], info: dict[str, LayerInfo],
    params: DissectionParams, device: torch.device, total_images: int, *, workers: int | None = None,
) -> tuple[dict[str, tuple[TopQuantile, TopK]], list[tuple[str, str]]]:
    """Pass 1 over one block of a larger set, as partials that merge: per layer a sketch made
    for ``total_images`` images (:meth:`TopQuantile.merge` of the blocks' sketches is the
    sketch of the whole set) and the block's top images as a :class:`TopK`; and the block's
    images that failed to load (what a distributed run's workers compute)."""
    quantiles = {}
    for name, li in info.items():
        total = total_images * li.shape[1] * li.shape[2]
        quantiles[name] = TopQuantile(li.units, total, params.quantile, device=device,
                                      min_keep=tie_keep(total, params))
    tops = {name: TopK(li.units, params.top_k) for name, li in info.items()}
    layers = list(info)
    with ImageLoader(image_set, pre, batch_size=params.batch_size, workers=workers, indices=list(block)) as loader:
        for batch in loader:
            acts = forward_batch(backend, batch.array, layers, device)
            for name in layers:
                quantiles[name].update(acts[name])
                tops[name].add(acts[name].amax(dim=(2, 3)).cpu().numpy(), batch.indices)
        skipped = list(loader.skipped)
    return {name: (quantiles[name], tops[name]) for name in layers}, skipped


def tie_keep(total: int, params: DissectionParams) -> int:
    """Top values a unit's sketch keeps so that ties with ``T_k`` are counted exactly up to the
    tie limit ``tie_factor * q * total``."""
    return 0 if params.tie_factor is None or params.strict_mask else \
        math.floor(params.tie_factor * params.quantile * total) + 2


def tie_plan(quantile: TopQuantile, thresholds: np.ndarray, params: DissectionParams
             ) -> tuple[np.ndarray, np.ndarray]:
    """``(fallback, candidates)`` per unit from pass 1: the units known to fall back to
    ``S > T`` and those pass 2 must count under both rules (see
    :func:`engine.dissection.masks.tie_fallback`).

    A unit is tied when more than ``tie_factor * q * total`` values reach ``T_k``; with the
    exact sketch (which keeps that many values) the count bound decides it, and a tied unit
    whose largest value exceeds ``T_k`` falls back. Candidates: a tied unit whose maximum is
    ``T_k`` (it falls back only when more than half of its values equal ``T_k``, which pass 2
    counts) and any tie that the histogram sketch (approximate mode) cannot rule out.
    """
    k = quantile.n_units
    if params.tie_factor is None or params.strict_mask:
        return np.zeros(k, dtype=bool), np.zeros(k, dtype=bool)
    tied = quantile.count_bound(thresholds) > params.tie_factor * params.quantile * quantile.total
    if not quantile.exact:
        return np.zeros(k, dtype=bool), tied
    exceeds = quantile.max_values() > thresholds
    return tied & exceeds, tied & ~exceeds


def pass2(
    backend: Backend, concepts: ConceptDataset, image_set: ImageSet, pre: Preprocess,
    order: list[int], info: dict[str, LayerInfo], thresholds: dict[str, np.ndarray],
    ties: dict[str, tuple[np.ndarray, np.ndarray]], kept: Kept | None, labels: Labels, params: DissectionParams,
    device: torch.device, clock: Clock,
) -> Job[tuple[dict[str, SparseTally], list[tuple[str, str]]]]:
    """IoU tallies of every layer over the images ``order`` (a sub-generator); ``ties[layer]``
    is :func:`tie_plan`'s ``(fallback, candidates)``.

    Returns ``({layer: SparseTally}, failed)``: ``failed`` lists the images that loaded in
    pass 1 but not now (only when the model runs again); the tallies then lack them.
    """
    tallies = {name: SparseTally(li.units, labels, thresholds[name], params, device,
                                  candidates=ties[name][1], fallback=ties[name][0]) for name, li in info.items()}
    layers = list(info)
    n = len(order)
    done = 0
    failed: list[tuple[str, str]] = []
    prefetch = _LabelPrefetcher(concepts, order, ahead=3 * params.batch_size)
    try:
        for indices, acts in _pass2_batches(backend, image_set, pre, order, layers, kept, params,
                                            device, clock, failed):
            images = [_ImageLabels.of(s, labels) for s in prefetch.take(indices)]
            clock.lap("labels")
            for name in layers:
                tallies[name].update(acts[name], images, clock, name)
            done += len(indices)
            yield Progress(PASS1_SHARE + (1 - PASS1_SHARE) * done / n,
                           f"pass 2/2: {done}/{n} images")
            clock.lap("progress")
    finally:
        prefetch.close()
    return tallies, failed


def _pass2_batches(
    backend: Backend, image_set: ImageSet, pre: Preprocess, order: list[int],
    layers: list[str], kept: Kept | None, params: DissectionParams,
    device: torch.device, clock: Clock, failed: list[tuple[str, str]],
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(image indices, activations)`` per batch: from ``kept`` or from the model again (the
    images that fail to load then are appended to ``failed``)."""
    if kept is not None:
        wanted = set(order)
        rows = [j for j, i in enumerate(kept.rows) if i in wanted]
        for s in range(0, len(rows), params.batch_size):
            part = rows[s:s + params.batch_size]
            sel = slice(part[0], part[-1] + 1) if part[-1] - part[0] == len(part) - 1 else torch.as_tensor(part)
            yield [kept.rows[j] for j in part], {n: kept.maps[n][sel] for n in layers}
        return
    with ImageLoader(image_set, pre, batch_size=params.batch_size, indices=order) as loader:
        clock.lap("setup")
        for batch in loader:
            clock.lap("load")
            acts = forward_batch(backend, batch.array, layers, device)
            clock.lap("forward")
            yield batch.indices.tolist(), acts
        failed.extend(loader.skipped)
