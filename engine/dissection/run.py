"""The Network Dissection pipeline: two streaming passes over a concept data set.

Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying Interpretability of Deep
Visual Representations", CVPR 2017. For every unit ``k`` of the dissected layers:

1. **Pass 1** runs the model over the concept images and feeds every activation to a
   :class:`~engine.dissection.quantile.TopQuantile`, which gives the threshold ``T_k`` with
   ``P(a_k > T_k) = q`` (``q = 0.005``) over all spatial positions of all images, exactly
   (bounded memory, see that class). It also keeps each unit's top-k images by max activation.
2. **Pass 2** runs the model again (or, on the CPU, reuses the pass-1 activations when they
   fit in ``_KEEP_BYTES`` of memory); each activation map is upsampled bilinearly to the
   image's label-mask size and thresholded (``M_k = S_k >= T_k``), and ``|M_k ∩ L_c|`` and
   ``|M_k ∪ L_c|`` are summed over the images that carry a label of concept ``c``'s category,
   with the rules of :class:`~engine.dissection.tally.IoUTally`. Only the (image, unit) pairs
   whose mask can be non-empty are upsampled and counted (see :class:`_SparseTally`). The
   label masks are decoded in a background thread while the model runs.

Nothing per position is written to disk, so disk use is the size of the result (the IoU
matrices), unlike NetDissect-Lite's float64 feature memmaps. A unit's label is its best-IoU
concept; it is a *detector* when that IoU exceeds ``iou_threshold`` (0.04).

Images are fed whole (``resize="stretch"`` whatever the model's own resize policy), so an
activation map covers the full label mask, as in the paper. Images that fail to load are
skipped and listed in the result; the thresholds then count the loaded images only (pass 1 is
repeated over them, since :class:`TopQuantile` needs the count up front).

The result is cached (kind ``"dissection"``) under a key of everything that determines it, so a
repeat is instant; a cancelled run (``gen.close()``) writes nothing.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.analysis import cached_job
from engine.backends.base import Backend, forward_error
from engine.backends.torch_backend import TorchBackend
from engine.cache import (
    Cache,
    DamagedEntry,
    check_array,
    load_array,
    make_key,
    read_meta,
    write_meta,
)
from engine.concepts import ConceptDataset, ConceptSample, open_broden
from engine.data.images import DIGEST_SIZE, ImageLoader, ImageSet, digest_files
from engine.dissection.masks import TIE_FACTOR, cut_masks, float32_cut, mask_cuts, tie_fallback  # noqa: F401 (float32_cut: re-exported)
from engine.dissection.quantile import TopQuantile
from engine.dissection.tally import LayerSummary, summarize
from engine.jobs import Job
from engine.types import ConvLensError, ImageRecord, LayerInfo, Preprocess, Progress

log = logging.getLogger("convlens.dissection")

FORMAT_VERSION = 2
"""2: per-unit tie fallback and P(A >= T), passes, notes and warnings."""
CACHE_KIND = "dissection"

MaskRule = Literal["paper", "lite"]

_CHUNK_ELEMENTS = 2**24
"""Pass 2 upsamples at most this many mask elements (unit maps x pixels) at once, which bounds
the temporary float32/bool masks to about 100 MB whatever the layer."""

_KEEP_BYTES = 512 * 2**20
"""Pass 1 keeps the activations in memory (float32) for pass 2 when they fit in this many
bytes and the computation runs on the CPU, where the forward pass is the costliest step."""

_PASS1_SHARE = 0.3
"""Fraction of the progress bar given to pass 1 (pass 2, which tallies, is the longer)."""


@dataclass(frozen=True)
class DissectionParams:
    """Settings of a dissection (Bau et al. 2017 defaults).

    ``quantile``: the top fraction ``q`` of activations that a unit's mask keeps (0.005).
    ``iou_threshold``: a unit is a detector when its best IoU is above this (0.04).
    ``mask_rule``: ``"paper"`` or ``"lite"`` union rule (see :class:`IoUTally`).
    ``strict_mask``: ``M = S > T`` (NetDissect-Lite) instead of ``S >= T`` (the paper).
    ``batch_size``: images per forward pass. ``top_k``: top images kept per unit.
    ``categories``: the concept categories to score (None: all of the data set).
    ``tie_factor``: a unit whose ``P(A_k >= T_k)`` exceeds ``tie_factor * quantile`` (a mass of
    activations ties with its threshold) uses ``S > T`` instead of ``S >= T`` (see
    :mod:`engine.dissection.masks`); None applies the paper's rule literally to every unit.
    ``device``: where thresholds and tallies are computed (None: the backend's device for
    torch models, CUDA if available else CPU for ONNX models).
    """

    quantile: float = 0.005
    iou_threshold: float = 0.04
    mask_rule: MaskRule = "paper"
    strict_mask: bool = False
    batch_size: int = 32
    top_k: int = 10
    categories: tuple[str, ...] | None = None
    device: str | None = None
    tie_factor: float | None = TIE_FACTOR

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["categories"] = None if self.categories is None else list(self.categories)
        return d

    def result_key(self) -> dict[str, Any]:
        """The settings that change the result (batch size and device do not)."""
        d = self.to_dict()
        del d["batch_size"], d["device"]
        return d

    def check(self) -> None:
        """Raise :class:`ConvLensError` for settings outside their ranges."""
        if not 0.0 < self.quantile < 1.0:
            raise ConvLensError(f"quantile must be in (0, 1), got {self.quantile}.")
        if self.mask_rule not in ("paper", "lite"):
            raise ConvLensError(f'mask_rule must be "paper" or "lite", got {self.mask_rule!r}.')
        if self.tie_factor is not None and not self.tie_factor >= 1.0:
            raise ConvLensError(f"tie_factor must be >= 1 (or None), got {self.tie_factor}.")
        if self.batch_size < 1 or self.top_k < 1:
            raise ConvLensError(
                f"batch_size and top_k must be >= 1, got {self.batch_size} and {self.top_k}."
            )


@dataclass
class LayerDissection:
    """One dissected layer (plain numpy data).

    ``thresholds[k]`` is ``T_k``; ``iou[k, c]`` the IoU of unit ``k`` with global label number
    ``c`` (column 0, unlabelled, and labels outside the scored categories are 0);
    ``summary`` the best label per unit and the layer's detector counts;
    ``top_images[k]`` the concept-data-set indices of the unit's ``top_k`` images by max
    activation, best first (-1 pads when fewer images), with those maxima in ``top_values``.
    """

    layer: str
    units: int
    shape: tuple[int, ...]  # (K, h, w)
    thresholds: np.ndarray  # (K,) float64
    iou: np.ndarray  # (K, L) float64
    summary: LayerSummary
    top_images: np.ndarray  # (K, top_k) int64
    top_values: np.ndarray  # (K, top_k) float32
    tie_fallback: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    """(K,) bool: the units whose threshold tied with a mass of activations
    (``P(A_k >= T_k) > tie_factor * q``), so that their masks use ``S > T`` instead of the
    paper's ``S >= T`` (see :mod:`engine.dissection.masks`); all False with ``strict_mask``."""
    at_threshold: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """(K,) float64: ``P(A_k >= T_k)`` over all positions of all images (about ``q`` for a unit
    without ties)."""


@dataclass
class DissectionResult:
    """A whole dissection. ``concept_names[c]`` / ``concept_categories[c]`` describe global
    label number ``c`` ("" for numbers that are no scored concept); ``categories`` are the
    scored categories; ``n_images`` the images dissected, ``skipped`` the ``(path, cause)`` of
    those that could not be read; ``seconds`` the time per phase (see :func:`dissect`)."""

    model: str
    model_sha256: str
    concepts_root: str
    params: DissectionParams
    layers: dict[str, LayerDissection]
    concept_names: tuple[str, ...]
    concept_categories: tuple[str, ...]
    categories: tuple[str, ...]
    n_images: int
    seconds: dict[str, float]
    skipped: tuple[tuple[str, str], ...] = ()
    input_digests: np.ndarray | None = None
    """(F, 16) uint8: content digest of each of the concept set's ``content_files()`` as
    dissected (None for results saved without them)."""
    passes: int = 2
    """Forward passes over the images: 1 when the maps were kept for the tally (they fit
    ``params.map_budget_mb``), else 2."""
    notes: tuple[str, ...] = ()
    """How the run went beyond the numbers, as sentences (passes, tie fallbacks)."""
    warnings: tuple[str, ...] = ()
    """What the user should know about the result (e.g. a 1x1 layer scored image-level)."""
    from_cache: bool = False

    def summary_line(self, layer: str) -> str:
        """``"layer4: 12/512 units are detectors covering 9 concepts"`` (the paper's per-layer count)."""
        s = self.layers[layer].summary
        return (
            f"{layer}: {s.n_detectors}/{self.layers[layer].units} units are detectors covering "
            f"{s.n_unique_concepts} concept{'' if s.n_unique_concepts == 1 else 's'}"
        )

    def to_rows(self) -> list[dict[str, Any]]:
        """One row per (layer, unit): layer, unit, category, label, iou, detector, and per
        category ``best_<cat>`` (its best label) and ``iou_<cat>``."""
        rows: list[dict[str, Any]] = []
        for name, ld in self.layers.items():
            s = ld.summary
            for k in range(ld.units):
                row: dict[str, Any] = {
                    "layer": name,
                    "unit": k,
                    "category": s.category_name[k],
                    "label": s.label_name[k],
                    "iou": float(s.iou[k]),
                    "detector": bool(s.is_detector[k]),
                }
                for g, cat in enumerate(self.categories):
                    c = int(s.category_label[k, g])
                    row[f"best_{cat}"] = self.concept_names[c] if c >= 0 else ""
                    row[f"iou_{cat}"] = float(s.category_iou[k, g])
                rows.append(row)
        return rows


# ----------------------------------------------------------------------------- helpers


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


def _compute_device(backend: Backend, params: DissectionParams) -> torch.device:
    if params.device:
        return torch.device(params.device)
    if isinstance(backend, TorchBackend):
        return backend.torch_device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    """Wait for queued device work so that phase timings are true on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock:
    """Accumulates seconds per phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Charge the time since the previous lap to ``phase``."""
        _sync(self.device)
        now = time.perf_counter()
        self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._t
        self._t = now


class _LabelPrefetcher:
    """Decodes concept samples (label-mask PNGs) ahead of use in a worker thread.

    Samples are requested in ``order``; an index the image loader skipped is dropped when a
    later one is taken. At most ``ahead`` samples are queued or held.
    """

    def __init__(self, concepts: ConceptDataset, order: Sequence[int], ahead: int) -> None:
        self._concepts = concepts
        self._todo = iter(order)
        self._ahead = ahead
        self._queue: deque[tuple[int, Future[ConceptSample]]] = deque()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="convlens-labels")
        self._fill()

    def _fill(self) -> None:
        while len(self._queue) < self._ahead and (i := next(self._todo, None)) is not None:
            self._queue.append((i, self._pool.submit(self._concepts.sample, i)))

    def take(self, indices: Sequence[int]) -> list[ConceptSample]:
        """The samples of ``indices`` (increasing, in ``order``)."""
        out = []
        for i in indices:
            while True:
                if not self._queue:
                    self._fill()
                j, fut = self._queue.popleft()
                if j == i:
                    out.append(fut.result())
                    break
                fut.cancel()
            self._fill()
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


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


@dataclass
class _Labels:
    """What the tally needs to know about the data set's labels."""

    names: tuple[str, ...]  # per global label number ("" when no scored concept)
    categories_of: tuple[str, ...]  # per global label number ("" likewise)
    category_index: np.ndarray  # (L,) int64, -1 when not scored
    categories: tuple[str, ...]
    scored: np.ndarray = field(init=False)  # (L,) bool

    def __post_init__(self) -> None:
        self.scored = self.category_index >= 0

    @classmethod
    def of(cls, concepts: ConceptDataset) -> _Labels:
        cats = concepts.label_categories()
        names = [""] * concepts.n_labels
        cat_names = [""] * concepts.n_labels
        for c in concepts.concepts:
            if cats[c.number] >= 0:
                names[c.number] = c.name
                cat_names[c.number] = c.category
        return cls(tuple(names), tuple(cat_names), cats, tuple(concepts.categories))


def summarize_layer(iou: np.ndarray, names: Sequence[str], category_index: np.ndarray,
                    categories: Sequence[str], threshold: float) -> LayerSummary:
    """:func:`summarize` over the scored labels only (``category_index >= 0``), with label
    numbers mapped back to global ones; a unit whose IoU is 0 with every concept gets no label
    (label 0, name and category ``""``, category -1)."""
    cols = np.concatenate(([0], np.flatnonzero(category_index >= 0)))
    s = summarize(iou[:, cols], [names[c] for c in cols],
                  np.where(cols == 0, 0, category_index[cols]), categories, threshold)
    none = s.iou <= 0  # IoU 0 with every concept (e.g. a mask that is always empty): no label
    return replace(
        s,
        label=np.where(none, 0, cols[s.label]),
        label_name=tuple("" if n else name for n, name in zip(none, s.label_name, strict=True)),
        category=np.where(none, -1, s.category),
        category_name=tuple("" if n else name for n, name in zip(none, s.category_name, strict=True)),
        category_label=np.where(s.category_label >= 0, cols[np.maximum(s.category_label, 0)], -1),
    )


# ----------------------------------------------------------------------------- the job


def dissection_key(backend: Backend, model_sha: str, concepts: ConceptDataset,
                   layers: Sequence[str], params: DissectionParams) -> str:
    """Cache key: model hash and architecture, preprocessing, backend, the concept set's
    fingerprint and categories, the layers and the result-changing parameters."""
    spec = backend.spec
    return make_key(CACHE_KIND, FORMAT_VERSION, model_sha, spec.arch,
                    dissection_preprocess(spec.preprocess), backend.name, concepts.fingerprint(),
                    list(concepts.categories), list(layers), params.result_key())


def dissect(
    backend: Backend,
    model_sha: str,
    concepts: ConceptDataset,
    layers: Sequence[str],
    params: DissectionParams = DissectionParams(),
    *,
    cache: Cache | None = None,
) -> Job[DissectionResult]:
    """Dissect ``layers`` of the model behind ``backend`` on ``concepts`` (a job).

    Yields :class:`Progress` at least once per batch and returns a :class:`DissectionResult`.
    ``params.categories`` restricts the scored categories. With ``cache`` (default: the user
    cache) a complete earlier result with the same key is returned without running the model;
    the result is stored only once complete.

    ``result.seconds`` holds the time per phase: ``load`` (waiting for decoded images),
    ``forward`` (the model; in pass 2 only when the activations were not kept), ``quantile``
    (threshold updates), ``top_images``, ``keep`` (copying activations for pass 2),
    ``labels`` (waiting for decoded label masks), ``masks`` (upsampling and thresholding),
    ``tally`` (IoU sums), ``summary``, per layer ``quantile[<layer>]`` and ``tally[<layer>]``
    (masks + tally), and ``pass1``, ``pass2``, ``total``.
    """
    params.check()
    layers = list(dict.fromkeys(layers))
    info = spatial_layers(backend, layers)
    if params.categories is not None and tuple(params.categories) != concepts.categories:
        concepts = restrict_categories(concepts, params.categories)
    key = dissection_key(backend, model_sha, concepts, layers, params)
    result = yield from cached_job(
        cache, CACHE_KIND, key, load_result, save=save_result, found="dissection found in cache",
        compute=lambda: _compute(backend, model_sha, concepts, layers, info, params),
        accept=lambda r: _inputs_unchanged(r, concepts))
    if result.from_cache:
        return replace(result, params=params)  # batch size and device are not in the key
    yield Progress(1.0, "; ".join(result.summary_line(n) for n in layers))
    return result


run = dissect
"""The job under the name every method package uses (see :class:`engine.analysis.Method`)."""


def _inputs_unchanged(result: DissectionResult, concepts: ConceptDataset) -> bool:
    """Whether every image and mask file still has the content it had when ``result`` was
    computed (a file rewritten with the same size and modification time, ``cp -p`` or
    ``rsync -t``, is not seen by the fingerprint); logs a warning naming the first change."""
    files = concepts.content_files()
    stored = result.input_digests
    if stored is None or stored.shape != (len(files), DIGEST_SIZE):
        log.warning("%s: cached dissection has no content digests of its %d files; recomputing",
                    concepts.root, len(files))
        return False
    changed = np.flatnonzero((stored != digest_files(files)).any(axis=1))
    if changed.size:
        log.warning("%s: %d concept file%s changed since the cached dissection although size and "
                    "modification time did not (first: %s); recomputing", concepts.root, changed.size,
                    "s" if changed.size != 1 else "", files[int(changed[0])])
        return False
    return True


def _compute(backend: Backend, model_sha: str, concepts: ConceptDataset, layers: list[str],
             info: dict[str, LayerInfo], params: DissectionParams) -> Job[DissectionResult]:
    """The two passes and the summary (a job returning the result, not cached here)."""
    if len(concepts) == 0:
        raise ConvLensError(f"{concepts.root}: the concept data set has no images.")
    # hashed before they are read: a file changed during the run makes the entry stale, never
    # a stale entry look fresh
    yield Progress(0.0, f"hashing {len(concepts)} concept images and their masks")
    input_digests = digest_files(concepts.content_files())
    device = _compute_device(backend, params)
    labels = _Labels.of(concepts)
    if not labels.scored.any():
        raise ConvLensError(f"{concepts.root}: no concept to score in categories "
                            f"{', '.join(concepts.categories) or '(none)'}.")
    image_set = concept_image_set(concepts)
    pre = dissection_preprocess(backend.spec.preprocess)
    clock = _Clock(device)
    t0 = time.perf_counter()
    order = list(range(len(concepts)))
    skipped: list[tuple[str, str]] = []
    for _attempt in range(2):
        yield Progress(0.0, f"pass 1/2: thresholds of {len(layers)} layers over {len(order)} images")
        quantiles, tops, kept, newly = yield from _pass1(backend, image_set, pre, order, info,
                                                         params, device, clock)
        if not newly:
            break
        skipped.extend(newly)
        bad = {p for p, _ in newly}
        order = [i for i in order if image_set.records[i].path not in bad]
        if not order:
            raise ConvLensError(f"{concepts.root}: none of the {len(concepts)} concept images "
                                "could be read.")
    else:
        raise ConvLensError(f"{concepts.root}: images keep failing to load; first: {skipped[0]}")
    thresholds = {}
    for name in layers:
        thresholds[name] = quantiles[name].thresholds()
        clock.lap(f"quantile[{name}]")
    clock.seconds["pass1"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    factor = params.tie_factor or 1.0
    candidates = {name: quantiles[name].count_bound(thresholds[name])
                  > factor * params.quantile * quantiles[name].total for name in layers}
    tallies = yield from _pass2(backend, concepts, image_set, pre, order, info, thresholds,
                                candidates, kept, labels, params, device, clock)
    del kept
    clock.seconds["pass2"] = time.perf_counter() - t1

    out: dict[str, LayerDissection] = {}
    for name in layers:
        iou = tallies[name].iou()
        top_images, top_values = tops[name].arrays()
        out[name] = LayerDissection(
            layer=name, units=info[name].units, shape=tuple(info[name].shape),
            thresholds=thresholds[name], iou=iou,
            summary=summarize_layer(iou, labels.names, labels.category_index, labels.categories,
                                    params.iou_threshold),
            top_images=top_images, top_values=top_values,
            tie_fallback=tallies[name].tie_fallback(),
            at_threshold=tallies[name].at_threshold_fraction(),
        )
    clock.lap("summary")
    notes = [tie_note(name, out[name].tie_fallback, params) for name in layers
             if out[name].tie_fallback.any()]
    seconds = _phase_totals(clock.seconds, layers)
    seconds["total"] = time.perf_counter() - t0
    result = DissectionResult(
        model=backend.spec.path, model_sha256=model_sha, concepts_root=concepts.root,
        params=params, layers=out, concept_names=labels.names,
        concept_categories=labels.categories_of, categories=labels.categories,
        n_images=len(order), seconds=seconds, skipped=tuple(skipped), input_digests=input_digests,
        notes=tuple(notes), warnings=tuple(one_position_warnings(info)),
    )
    return result


def tie_note(layer: str, fallback: np.ndarray, params: DissectionParams) -> str:
    """The sentence saying which units of ``layer`` fell back to ``S > T``."""
    units = np.flatnonzero(fallback).tolist()
    shown = ", ".join(map(str, units[:20])) + (", ..." if len(units) > 20 else "")
    return (f"{layer}: {len(units)} unit{'' if len(units) == 1 else 's'} ({shown}) tie with the threshold "
            f"(P(A >= T) > {params.tie_factor:g} x {params.quantile:g}); their masks use S > T")


def restrict_categories(concepts: ConceptDataset, categories: Sequence[str]) -> ConceptDataset:
    """``concepts`` (same images, in order) scored on ``categories`` only; images without a
    label of those categories drop out, as in NetDissect."""
    narrowed = open_broden(concepts.root, categories=categories)
    where = {narrowed.image_path(i): i for i in range(len(narrowed))}
    paths = (concepts.image_path(i) for i in range(len(concepts)))
    return narrowed.subset([where[p] for p in paths if p in where])


def _phase_totals(seconds: dict[str, float], layers: Sequence[str]) -> dict[str, float]:
    """Per-layer laps plus their sums per phase (``quantile``, ``masks``, ``tally``)."""
    out = dict(seconds)
    for phase in ("quantile", "masks", "tally"):
        out[phase] = out.get(phase, 0.0) + sum(seconds.get(f"{phase}[{n}]", 0.0) for n in layers)
    for n in layers:
        out[f"tally[{n}]"] = seconds.get(f"masks[{n}]", 0.0) + seconds.get(f"tally[{n}]", 0.0)
        out.pop(f"masks[{n}]", None)
    return out


def _pass1(
    backend: Backend, image_set: ImageSet, pre: Preprocess, order: list[int],
    info: dict[str, LayerInfo], params: DissectionParams, device: torch.device, clock: _Clock,
) -> Job[tuple[dict[str, TopQuantile], dict[str, _TopImages], dict[str, torch.Tensor] | None,
               list[tuple[str, str]]]]:
    """Thresholds and top images (a sub-generator).

    Returns ``(quantiles, tops, kept, skipped)``: ``kept`` holds every activation (float32,
    row ``j`` = image ``order[j]``) when the compute device is the CPU and they fit in
    ``_KEEP_BYTES``, so that pass 2 need not run the model again; else None.
    """
    n = len(order)
    quantiles = {name: TopQuantile(li.units, n * li.shape[1] * li.shape[2], params.quantile,
                                   device=device) for name, li in info.items()}
    tops = {name: _TopImages(li.units, params.top_k, device) for name, li in info.items()}
    size = sum(4 * n * int(np.prod(li.shape)) for li in info.values())
    kept = ({name: torch.empty((n, *li.shape), dtype=torch.float32) for name, li in info.items()}
            if device.type == "cpu" and size <= _KEEP_BYTES else None)
    layers = list(info)
    done = 0
    with ImageLoader(image_set, pre, batch_size=params.batch_size, indices=order) as loader:
        clock.lap("setup")
        for batch in loader:
            clock.lap("load")
            acts = forward_batch(backend, batch.array, layers, device)
            clock.lap("forward")
            idx = torch.as_tensor(batch.indices, device=device)
            for name in layers:
                quantiles[name].update(acts[name])
                clock.lap(f"quantile[{name}]")
                tops[name].update(acts[name], idx)
                clock.lap("top_images")
                if kept is not None:
                    kept[name][done:done + len(batch)] = acts[name]
                    clock.lap("keep")
            done += len(batch)
            yield Progress(_PASS1_SHARE * done / n, f"pass 1/2: {done}/{n} images")
            clock.lap("progress")
        skipped = list(loader.skipped)
    return quantiles, tops, kept, skipped


def _pass2(
    backend: Backend, concepts: ConceptDataset, image_set: ImageSet, pre: Preprocess,
    order: list[int], info: dict[str, LayerInfo], thresholds: dict[str, np.ndarray],
    candidates: dict[str, np.ndarray], kept: dict[str, torch.Tensor] | None, labels: _Labels, params: DissectionParams,
    device: torch.device, clock: _Clock,
) -> Job[dict[str, _SparseTally]]:
    """IoU tallies of every layer; returns ``{layer: _SparseTally}`` (a sub-generator)."""
    tallies = {name: _SparseTally(li.units, labels, thresholds[name], params, device, candidates[name])
               for name, li in info.items()}
    layers = list(info)
    n = len(order)
    done = 0
    prefetch = _LabelPrefetcher(concepts, order, ahead=3 * params.batch_size)
    try:
        for indices, acts in _pass2_batches(backend, image_set, pre, order, layers, kept, params,
                                            device, clock):
            images = [_ImageLabels.of(s, labels) for s in prefetch.take(indices)]
            clock.lap("labels")
            for name in layers:
                tallies[name].update(acts[name], images, clock, name)
            done += len(indices)
            yield Progress(_PASS1_SHARE + (1 - _PASS1_SHARE) * done / n,
                           f"pass 2/2: {done}/{n} images")
            clock.lap("progress")
    finally:
        prefetch.close()
    return tallies


def _pass2_batches(
    backend: Backend, image_set: ImageSet, pre: Preprocess, order: list[int],
    layers: list[str], kept: dict[str, torch.Tensor] | None, params: DissectionParams,
    device: torch.device, clock: _Clock,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """``(image indices, activations)`` per batch: from ``kept`` or from the model again."""
    if kept is not None:
        for s in range(0, len(order), params.batch_size):
            yield order[s:s + params.batch_size], {n: kept[n][s:s + params.batch_size]
                                                   for n in layers}
        return
    with ImageLoader(image_set, pre, batch_size=params.batch_size, indices=order) as loader:
        clock.lap("setup")
        for batch in loader:
            clock.lap("load")
            acts = forward_batch(backend, batch.array, layers, device)
            clock.lap("forward")
            yield batch.indices.tolist(), acts


@dataclass
class _ImageLabels:
    """One image's labels by category index (scored labels only; others set to 0)."""

    mask_size: tuple[int, int]
    pixel_labels: list[tuple[int, np.ndarray]]  # (category index, (H, W) label map)
    image_labels: list[tuple[int, int]]  # (category index, label)

    @classmethod
    def of(cls, sample: ConceptSample, labels: _Labels) -> _ImageLabels:
        cat_index = {c: g for g, c in enumerate(labels.categories)}
        drop = not labels.scored[1:].all()
        pixel = [(cat_index[cat], np.where(labels.scored[m], m, 0) if drop else m)
                 for cat, m in sample.pixel_labels]
        whole = [(cat_index[cat], lab) for cat, lab in sample.image_labels if labels.scored[lab]]
        return cls((int(sample.mask_size[0]), int(sample.mask_size[1])), pixel, whole)


def pair_masks(maps: torch.Tensor, cuts: torch.Tensor, mask_size: tuple[int, int], *,
               strict: bool) -> torch.Tensor:
    """Masks of N unit maps ``(N, h, w)`` with their own :func:`float32_cut` cuts ``(N,)``:
    bool (N, H, W) (kept for callers of the former name; see :mod:`engine.dissection.masks`)."""
    c = cuts.to(maps.device, torch.float32)
    if strict:
        c = torch.nextafter(c, torch.tensor(float("inf"), device=c.device))
    return cut_masks(maps, c, mask_size)


_SKIP_MARGIN = 2.0**-20
"""Relative margin of the empty-mask test: bilinear upsampling in float32 can exceed the
largest input by a few float32 ulps (2**-24 each), far below this."""


class _SparseTally:
    """Exact IoU sums that upsample only the (image, unit) pairs whose mask can be non-empty.

    Bilinear upsampling (``align_corners=False``) makes every output value a convex
    combination of input values, so ``max S_k(x) <= max A_k(x)``: when a unit's largest
    activation on an image is below ``T_k`` its mask is empty (NetDissect-Lite skips these
    pairs the same way). With ``q = 0.005`` most pairs are empty, which makes this far cheaper
    than upsampling every map. The test keeps a margin of ``2**-20 max|A_k(x)|`` against
    float32 rounding, so no non-empty mask is ever skipped.

    The sums are those of :class:`IoUTally` (the same ``L_c(x)`` as a set of pixels, an
    image-level label covering the whole mask, each label counted in its primary category,
    the ``"paper"`` and ``"lite"`` union rules), and tests check that the result equals one
    :class:`IoUTally` fed every unit's :func:`unit_masks`. They are computed from the masked
    pixels of the active pairs only (one ``bincount`` per chunk): per image and unit,
    ``union = |M| [counted] + |L_c| - |M ∩ L_c|``, so over the data set
    ``union[k, c] = sum_x |L_c(x)| + sum_{x active for k} (|M_k(x)| [counted] - |M ∩ L_c|)``:
    an empty mask contributes only ``|L_c(x)|``.
    """

    def __init__(self, units: int, labels: _Labels, thresholds: np.ndarray,
                 params: DissectionParams, device: torch.device,
                 candidates: np.ndarray | None = None) -> None:
        n_labels = len(labels.names)
        self.n_labels = n_labels
        self.units = units
        self.params = params
        self.device = device
        self.label_category = torch.as_tensor(
            np.where(labels.scored, labels.category_index, 0), device=device)
        self.n_categories = len(labels.categories)
        # Rows: one per unit with the requested rule, then one per tie candidate with S > T
        # (the row the unit takes if its tie count calls for the fallback).
        cand = np.zeros(0, dtype=np.int64) if params.strict_mask or params.tie_factor is None else (
            np.arange(units) if candidates is None else np.flatnonzero(np.asarray(candidates, dtype=bool)))
        self.candidates = cand
        self.row_unit = torch.as_tensor(np.concatenate((np.arange(units), cand)), device=device)
        t = np.asarray(thresholds, dtype=np.float64)
        self.thresholds = torch.as_tensor(t, device=device)
        cut = np.concatenate((mask_cuts(t, strict=params.strict_mask), mask_cuts(t[cand], strict=True)))
        self.cut = torch.as_tensor(cut, device=device)
        self.ge_cut = torch.as_tensor(mask_cuts(t, strict=False), device=device)
        rows = units + len(cand)
        self.inter = torch.zeros((rows, n_labels), dtype=torch.int64, device=device)
        self.extra_union = torch.zeros((rows, n_labels), dtype=torch.int64, device=device)
        self.label_area = torch.zeros(n_labels, dtype=torch.int64, device=device)
        self.at_threshold = torch.zeros(units, dtype=torch.int64, device=device)  # count A_k >= T_k
        self.positions = 0  # positions per unit seen (images x h x w)
        self.unit_max = torch.full((units,), -torch.inf, dtype=torch.float64, device=device)
        self.scored = labels.scored

    def update(self, acts: torch.Tensor, images: Sequence[_ImageLabels], clock: _Clock,
               name: str) -> None:
        """Add a batch: ``acts`` (B, K, h, w) and the B images' labels."""
        acts = acts.to(self.device)
        self.at_threshold += (acts >= self.ge_cut[None, :, None, None]).sum(dim=(0, 2, 3))
        self.positions += acts.shape[0] * acts.shape[2] * acts.shape[3]
        hi = acts.amax(dim=(2, 3)).double()
        lo = acts.amin(dim=(2, 3)).double()
        if len(hi):
            self.unit_max = torch.maximum(self.unit_max, hi.amax(dim=0))
        margin = _SKIP_MARGIN * torch.maximum(hi.abs(), lo.abs())
        active = (hi + margin >= self.thresholds[None])[:, self.row_unit].cpu().numpy()  # (B, R)
        by_size: dict[tuple[int, int], list[int]] = {}
        for b, im in enumerate(images):
            by_size.setdefault(im.mask_size, []).append(b)
        for size, rows in by_size.items():
            group = _GroupLabels.of([images[b] for b in rows], self.n_labels, self.device)
            self.label_area += group.area.sum(dim=0)
            present = self._categories_present(group.area)  # (n, G)
            pairs = [(j, np.flatnonzero(active[b])) for j, b in enumerate(rows)]
            step = max(1, _CHUNK_ELEMENTS // (size[0] * size[1]))  # pairs per upsampling
            start = 0
            while start < len(pairs):
                chunk: list[tuple[int, np.ndarray]] = []
                count = 0
                while start < len(pairs) and (not chunk or count + len(pairs[start][1]) <= step):
                    chunk.append(pairs[start])
                    count += len(pairs[start][1])
                    start += 1
                self._tally_chunk(acts[torch.as_tensor(rows, device=acts.device)], chunk,
                                  group, present, size, clock, name)

    def _categories_present(self, area: torch.Tensor) -> torch.Tensor:
        """(n, G) bool: the image has a label of the category (positive area)."""
        hit = torch.zeros((area.shape[0], self.n_categories), dtype=torch.int64,
                          device=self.device)
        hit.index_add_(1, self.label_category, (area > 0).long())
        return hit > 0

    def _tally_chunk(self, acts: torch.Tensor, chunk: list[tuple[int, np.ndarray]],
                     group: _GroupLabels, present: torch.Tensor, size: tuple[int, int],
                     clock: _Clock, name: str) -> None:
        dev = self.device
        img = torch.as_tensor(np.concatenate([np.full(len(u), j) for j, u in chunk]),
                              dtype=torch.int64, device=dev)
        unit = torch.as_tensor(np.concatenate([u for _, u in chunk]), dtype=torch.int64,
                               device=dev)  # rows (see __init__)
        masks = cut_masks(acts[img.to(acts.device), self.row_unit[unit].to(acts.device)],
                          self.cut[unit].to(acts.device), size).to(dev).flatten(1)  # (N, P)
        clock.lap(f"masks[{name}]")
        n, lab = len(unit), self.n_labels
        if n == 0:
            return
        pair, pixel = torch.nonzero(masks, as_tuple=True)
        area = torch.bincount(pair, minlength=n)  # (N,) |M|
        labels = group.maps[img[pair], pixel]  # (nnz, M), de-duplicated per pixel
        key = (pair[:, None] * lab + labels).flatten()
        inter = torch.bincount(key, minlength=n * lab).reshape(n, lab)
        inter[:, 0] = 0
        inter = torch.where(group.whole[img], area[:, None], inter)  # image-level labels
        if self.params.mask_rule == "paper":
            counted = present[img]  # (N, G)
        else:
            touched = torch.zeros((n, self.n_categories), dtype=torch.int64, device=dev)
            touched.index_add_(1, self.label_category, inter)
            counted = touched > 0
        union_part = area[:, None] * counted[:, self.label_category] - inter
        self.inter.index_add_(0, unit, inter)
        self.extra_union.index_add_(0, unit, union_part)
        clock.lap(f"tally[{name}]")

    def merge(self, other: _SparseTally) -> _SparseTally:
        """The tally of both tallies' images together (int64 sums: any split and order of the
        images gives the one-pass counts exactly); neither is changed."""
        if other.inter.shape != self.inter.shape or not torch.equal(other.cut.cpu(), self.cut.cpu()) \
                or not np.array_equal(other.candidates, self.candidates) \
                or other.params.result_key() != self.params.result_key():
            raise ConvLensError("cannot merge IoU tallies of different layers, labels, thresholds or settings.")
        out = copy.copy(self)
        out.inter = self.inter + other.inter.to(self.device)
        out.extra_union = self.extra_union + other.extra_union.to(self.device)
        out.label_area = self.label_area + other.label_area.to(self.device)
        out.at_threshold = self.at_threshold + other.at_threshold.to(self.device)
        out.positions = self.positions + other.positions
        out.unit_max = torch.maximum(self.unit_max, other.unit_max.to(self.device))
        return out

    def at_threshold_fraction(self) -> np.ndarray:
        """(K,) float64 ``P(A_k >= T_k)`` over the positions seen."""
        return self.at_threshold.cpu().numpy() / max(self.positions, 1)

    def tie_fallback(self) -> np.ndarray:
        """(K,) bool: the units whose ``S >= T`` mask falls back to ``S > T`` (never with
        ``strict_mask``): :func:`engine.dissection.masks.tie_fallback` of the counts."""
        out = np.zeros(self.units, dtype=bool)
        if self.params.tie_factor is not None and len(self.candidates):
            c = self.candidates
            out[c] = tie_fallback(self.at_threshold.cpu().numpy()[c], self.positions,
                                  self.unit_max.cpu().numpy()[c] > self.thresholds.cpu().numpy()[c],
                                  self.params.quantile, self.params.tie_factor)
        return out

    def iou(self) -> np.ndarray:
        """(K, L) float64 IoU over the data set (0 for unscored labels and empty unions), each
        unit by its rule (the tie fallback applied)."""
        inter = self.inter.cpu().numpy()
        union = self.label_area.cpu().numpy()[None] + self.extra_union.cpu().numpy()
        union[:, 0] = 0
        union[:, ~self.scored] = 0
        rows = np.divide(inter, union, out=np.zeros(union.shape), where=union > 0)
        out = rows[:self.units].copy()
        fallback = self.tie_fallback()
        if fallback.any():
            row_of = np.full(self.units, -1)
            row_of[self.candidates] = self.units + np.arange(len(self.candidates))
            out[fallback] = rows[row_of[fallback]]
        return out


@dataclass
class _GroupLabels:
    """Labels of n images sharing a mask size, as tensors.

    ``maps`` (n, M, P): each image's pixel maps, padded with zeros to M maps, a label repeated
    at a pixel in a later map set to 0 (``L_c(x)`` is a set of pixels); ``whole`` (n, L): the
    image-level labels; ``area`` (n, L): ``|L_c(x)|`` (the whole mask for image-level labels).
    """

    maps: torch.Tensor
    whole: torch.Tensor
    area: torch.Tensor

    @classmethod
    def of(cls, images: Sequence[_ImageLabels], n_labels: int, device: torch.device
           ) -> _GroupLabels:
        h, w = images[0].mask_size
        p = h * w
        n_maps = max(1, *(len(im.pixel_labels) for im in images))
        maps = np.zeros((len(images), n_maps, p), dtype=np.int64)
        whole = np.zeros((len(images), n_labels), dtype=bool)
        for j, im in enumerate(images):
            for m, (_, lab) in enumerate(im.pixel_labels):
                maps[j, m] = lab.reshape(-1)
            for _, label in im.image_labels:
                whole[j, label] = True
        for m in range(1, n_maps):
            repeated = (maps[:, m:m + 1] == maps[:, :m]).any(axis=1)
            maps[:, m][repeated] = 0
        t = torch.as_tensor(maps, device=device)
        key = (torch.arange(len(images), device=device)[:, None, None] * n_labels + t).flatten()
        area = torch.bincount(key, minlength=len(images) * n_labels).reshape(-1, n_labels)
        area[:, 0] = 0
        whole_t = torch.as_tensor(whole, device=device)
        area = torch.where(whole_t, p, area)
        return cls(t.transpose(1, 2).contiguous(), whole_t, area)


# ----------------------------------------------------------------------------- storage


def save_result(result: DissectionResult, folder: str | Path) -> Path:
    """Write ``result`` into ``folder`` as ``.npy`` arrays and ``meta.json`` (written last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, (name, ld) in enumerate(result.layers.items()):
        stem = f"layer{i}"
        np.save(folder / f"{stem}_thresholds.npy", np.asarray(ld.thresholds, dtype=np.float64))
        np.save(folder / f"{stem}_iou.npy", np.asarray(ld.iou, dtype=np.float64))
        np.save(folder / f"{stem}_top_images.npy", np.asarray(ld.top_images, dtype=np.int64))
        np.save(folder / f"{stem}_top_values.npy", np.asarray(ld.top_values, dtype=np.float32))
        np.save(folder / f"{stem}_tie_fallback.npy", np.asarray(ld.tie_fallback, dtype=bool))
        np.save(folder / f"{stem}_at_threshold.npy", np.asarray(ld.at_threshold, dtype=np.float64))
        layers.append({"name": name, "stem": stem, "units": ld.units, "shape": list(ld.shape)})
    if result.input_digests is not None:
        np.save(folder / "input_digests.npy", np.asarray(result.input_digests, dtype=np.uint8))
    write_meta(folder, {
        "version": FORMAT_VERSION,
        "model": result.model,
        "model_sha256": result.model_sha256,
        "concepts_root": result.concepts_root,
        "params": result.params.to_dict(),
        "layers": layers,
        "concept_names": list(result.concept_names),
        "concept_categories": list(result.concept_categories),
        "categories": list(result.categories),
        "n_images": result.n_images,
        "seconds": result.seconds,
        "skipped": [list(s) for s in result.skipped],
        "input_digests": result.input_digests is not None,
        "passes": result.passes,
        "notes": list(result.notes),
        "warnings": list(result.warnings),
    })
    return folder


def load_result(folder: str | Path) -> DissectionResult:
    """Read a result written by :func:`save_result` (no pickle).

    Raises :class:`engine.cache.DamagedEntry` (a ConvLensError) naming the folder when
    meta.json is unreadable, of another format version or inconsistent, or when an array it
    lists is missing, truncated or of the wrong shape or dtype (checked from the headers).
    """
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"{folder}: not a dissection result ({e}).") from e
    if not isinstance(meta, dict):
        raise DamagedEntry(f"{folder}: not a dissection result (meta.json is not an object).")
    if meta.get("version") != FORMAT_VERSION:
        raise DamagedEntry(f"{folder}: dissection format {meta.get('version')}, "
                           f"expected {FORMAT_VERSION}.")
    try:
        return _read_result(folder, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise DamagedEntry(f"{folder}: inconsistent dissection result ({type(e).__name__}: {e}).") from e


def _read_result(folder: Path, meta: dict[str, Any]) -> DissectionResult:
    p = meta["params"]
    params = DissectionParams(**{**p, "categories": None if p["categories"] is None
                                 else tuple(p["categories"])})
    names = tuple(str(n) for n in meta["concept_names"])
    cat_names = tuple(meta["concept_categories"])
    categories = tuple(meta["categories"])
    if len(cat_names) != len(names):
        raise ValueError(f"{len(names)} concept names but {len(cat_names)} categories")
    category_index = np.array([categories.index(c) if c else -1 for c in cat_names],
                              dtype=np.int64)
    layers = {}
    for entry in meta["layers"]:
        stem, units = str(entry["stem"]), int(entry["units"])
        check_array(folder, f"{stem}_thresholds", np.float64, (units,))
        check_array(folder, f"{stem}_iou", np.float64, (units, len(names)))
        k = check_array(folder, f"{stem}_top_images", np.int64, (units, None))[1]
        check_array(folder, f"{stem}_top_values", np.float32, (units, k))
        check_array(folder, f"{stem}_tie_fallback", np.bool_, (units,))
        check_array(folder, f"{stem}_at_threshold", np.float64, (units,))
        iou = load_array(folder, f"{stem}_iou", mmap=False)
        layers[entry["name"]] = LayerDissection(
            layer=entry["name"], units=units, shape=tuple(int(d) for d in entry["shape"]),
            thresholds=load_array(folder, f"{stem}_thresholds", mmap=False), iou=iou,
            summary=summarize_layer(iou, names, category_index, categories,
                                    params.iou_threshold),
            top_images=load_array(folder, f"{stem}_top_images", mmap=False),
            top_values=load_array(folder, f"{stem}_top_values", mmap=False),
            tie_fallback=load_array(folder, f"{stem}_tie_fallback", mmap=False),
            at_threshold=load_array(folder, f"{stem}_at_threshold", mmap=False),
        )
    digests = None
    if meta.get("input_digests"):
        check_array(folder, "input_digests", np.uint8, (None, DIGEST_SIZE))
        digests = load_array(folder, "input_digests", mmap=False)
    return DissectionResult(
        model=meta["model"], model_sha256=meta["model_sha256"],
        concepts_root=meta["concepts_root"], params=params, layers=layers,
        concept_names=names, concept_categories=cat_names, categories=categories,
        n_images=int(meta["n_images"]), seconds={k: float(v) for k, v in meta["seconds"].items()},
        skipped=tuple((str(a), str(b)) for a, b in meta["skipped"]), input_digests=digests,
        passes=int(meta["passes"]), notes=tuple(str(n) for n in meta["notes"]),
        warnings=tuple(str(w) for w in meta["warnings"]),
    )
