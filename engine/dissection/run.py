"""The Network Dissection pipeline: two streaming passes over a concept data set.

Bau, Zhou, Khosla, Oliva, Torralba, "Network Dissection: Quantifying Interpretability of Deep
Visual Representations", CVPR 2017. For every unit ``k`` of the dissected layers:

1. **Pass 1** runs the model over the concept images and feeds every activation to a
   :class:`~engine.dissection.quantile.TopQuantile`, which gives the threshold ``T_k`` with
   ``P(a_k > T_k) = q`` (``q = 0.005``) over all spatial positions of all images, exactly
   (bounded memory, see that class). It also keeps each unit's top-k images by max activation.
2. **Pass 2** reuses the pass-1 activation maps when they fit ``params.map_budget_mb`` of
   memory (one forward pass, ``result.passes == 1``), else runs the model again; each activation map is upsampled bilinearly to the
   image's label-mask size and thresholded (``M_k = S_k >= T_k``), and ``|M_k ∩ L_c|`` and
   ``|M_k ∪ L_c|`` are summed over the images that carry a label of concept ``c``'s category,
   with the rules of :class:`~engine.dissection.tally.IoUTally`. Only the (image, unit) pairs
   whose mask can be non-empty are upsampled and counted (see :class:`~engine.dissection.sparse.SparseTally`). The
   label masks are decoded in a background thread while the model runs.

Nothing per position is written to disk, so disk use is the size of the result (the IoU
matrices), unlike NetDissect-Lite's float64 feature memmaps. A unit's label is its best-IoU
concept; it is a *detector* when that IoU exceeds ``iou_threshold`` (0.04).

Images are fed whole (``resize="stretch"`` whatever the model's own resize policy), so an
activation map covers the full label mask, as in the paper. Images that fail to load are
skipped and listed in the result, and both passes count the loaded images only: a failure in
pass 1 shrinks the quantile sketches' count (no restart); an image that loaded in pass 1 but
fails in pass 2 (changed on disk) makes both passes run again without it. Degenerate
thresholds (a mass of activations tied with ``T_k``) and 1x1 layers: see docs/dissection.md.

The result is cached (kind ``"dissection"``) under a key of everything that determines it, so a
repeat is instant; a cancelled run (``gen.close()``) writes nothing.

This module is the orchestrator (:func:`dissect`: cache, labels, the retries when images fail
to load, thresholds, tie plans, the result). *Where* the two passes run is a
:class:`PassStrategy`: :class:`LocalPasses` in this process by default, one sharding them over
a Ray cluster in ``engine.cluster.dissect``; every strategy gives the same result and cache
entry. The parts live beside it and are re-exported
here: :mod:`~engine.dissection.result` (params and result types, the layer summary),
:mod:`~engine.dissection.passes` (forward batches, pass 1, pass 2), :mod:`~engine.dissection.sparse`
(the sparse IoU tally), :mod:`~engine.dissection.labels` (labels and their prefetch),
:mod:`~engine.dissection.masks` (unit masks), :mod:`~engine.dissection.storage` (save/load) and
:mod:`~engine.dissection.timing`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

from engine.analysis import cached_job
from engine.backends.base import Backend
from engine.cache import Cache, make_key
from engine.concepts import ConceptDataset
from engine.data.images import DIGEST_SIZE, ImageSet, digest_files
from engine.dissection.labels import Labels, _GroupLabels, _ImageLabels, _LabelPrefetcher, restrict_categories
from engine.dissection.masks import TIE_FACTOR, float32_cut
from engine.dissection.passes import (
    PASS1_SHARE,
    Pass1,
    _phase_totals,
    _TopImages,
    compute_device,
    concept_image_set,
    dissection_preprocess,
    forward_batch,
    keeps_maps,
    map_bytes,
    one_position_warnings,
    pass1,
    pass2,
    spatial_layers,
    tie_plan,
)
from engine.dissection.result import (
    CACHE_KIND,
    FORMAT_VERSION,
    DissectionParams,
    DissectionResult,
    LayerDissection,
    MaskRule,
    summarize_layer,
)
from engine.dissection.sparse import SparseTally, pair_masks
from engine.dissection.storage import load_result, save_result
from engine.dissection.timing import Clock
from engine.jobs import Job
from engine.types import ConvLensError, LayerInfo, Preprocess, Progress

__all__ = [
    "CACHE_KIND", "FORMAT_VERSION", "TIE_FACTOR", "Clock", "DissectionInputs", "DissectionParams", "DissectionResult",
    "LayerDissection", "LocalPasses", "MaskRule", "PassStrategy", "_GroupLabels", "_ImageLabels",
    "_LabelPrefetcher", "_TopImages", "concept_image_set", "dissect", "dissection_key",
    "dissection_preprocess", "float32_cut", "forward_batch", "inputs_unchanged", "load_result", "pair_masks",
    "restrict_categories", "run", "save_result", "spatial_layers", "summarize_layer",
]

log = logging.getLogger("convlens.dissection")


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
    params: DissectionParams = DissectionParams(),  # noqa: B008 (frozen dataclass)
    *,
    cache: Cache | None = None,
    passes: PassFactory | None = None,
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

    ``passes`` says where the two passes run (default :class:`LocalPasses`: in this process);
    the key, the cache entry and the result do not depend on it (``engine.cluster`` passes
    one that shards them over a Ray cluster).
    """
    params.check()
    layers = list(dict.fromkeys(layers))
    info = spatial_layers(backend, layers)
    if params.categories is not None and tuple(params.categories) != concepts.categories:
        concepts = restrict_categories(concepts, params.categories)
    key = dissection_key(backend, model_sha, concepts, layers, params)
    result = yield from cached_job(
        cache, CACHE_KIND, key, load_result, save=save_result, found="dissection found in cache",
        compute=lambda: _compute(backend, model_sha, concepts, layers, info, params, passes or LocalPasses),
        accept=lambda r: inputs_unchanged(r, concepts))
    if result.from_cache:
        return replace(result, params=params)  # batch size and device are not in the key
    yield Progress(1.0, "; ".join(result.summary_line(n) for n in layers))
    return result


run = dissect
"""The job under the name every method package uses (see :class:`engine.analysis.Method`)."""


def inputs_unchanged(result: DissectionResult, concepts: ConceptDataset) -> bool:
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


@dataclass(frozen=True)
class DissectionInputs:
    """What the passes of one dissection read (built by :func:`dissect` for its
    :class:`PassStrategy`): the concept images in dissection order (``image_set`` record ``i``
    is concept image ``i``), their preprocessing, the layers and the scored labels."""

    backend: Backend
    concepts: ConceptDataset
    image_set: ImageSet
    pre: Preprocess
    info: dict[str, LayerInfo]
    labels: Labels
    params: DissectionParams


class PassStrategy(Protocol):
    """Where and how the two passes of a dissection run over the concept images.

    :func:`dissect` does the rest (cache, labels, retries when images fail to load, thresholds,
    tie plans, the result), so every strategy gives the same result. ``clock`` is the
    driver's phase clock (the thresholds are charged to it); ``passes`` is the number of
    forward passes per image, as ``result.passes`` reports it.
    """

    clock: Clock
    passes: int

    def describe(self) -> str:
        """A few words for the pass-1 progress message (how the passes run)."""
        ...

    def begin(self) -> Job[None]:
        """Anything before the first pass (a cluster connects here); may yield progress."""
        ...

    def pass1(self, order: list[int]) -> Job[Pass1]:
        """:func:`engine.dissection.passes.pass1`'s result over the images ``order``: the
        sketches told the count of the images that loaded."""
        ...

    def pass2(self, p1: Pass1, thresholds: dict[str, np.ndarray],
              ties: dict[str, tuple[np.ndarray, np.ndarray]]) -> Job[tuple[dict[str, SparseTally], list[tuple[str, str]]]]:
        """:func:`engine.dissection.passes.pass2`'s result over the images ``p1`` loaded."""
        ...

    def notes(self, n_images: int) -> list[str]:
        """The result's notes on how the passes ran (before the tie notes)."""
        ...

    def seconds(self, layers: Sequence[str]) -> dict[str, float]:
        """``result.seconds`` but ``total``."""
        ...


PassFactory = Callable[[DissectionInputs], PassStrategy]
"""Makes the :class:`PassStrategy` of one run from its inputs."""


class LocalPasses:
    """Both passes in this process on :func:`~engine.dissection.passes.compute_device`: one
    forward pass when the maps fit ``params.map_budget_mb`` (kept for pass 2), else two."""

    def __init__(self, inputs: DissectionInputs) -> None:
        self.inputs = inputs
        self.device = compute_device(inputs.backend, inputs.params)
        self.clock = Clock(self.device)
        self.keep = keeps_maps(inputs.info, len(inputs.concepts), inputs.params)
        self.passes = 1 if self.keep else 2

    def describe(self) -> str:
        return "one forward pass, maps kept" if self.keep else "two forward passes"

    def begin(self) -> Job[None]:
        yield from ()

    def pass1(self, order: list[int]) -> Job[Pass1]:
        i = self.inputs
        return (yield from pass1(i.backend, i.image_set, i.pre, order, i.info, i.params, self.device, self.clock,
                                 keep=self.keep))

    def pass2(self, p1: Pass1, thresholds: dict[str, np.ndarray],
              ties: dict[str, tuple[np.ndarray, np.ndarray]]) -> Job[tuple[dict[str, SparseTally], list[tuple[str, str]]]]:
        i = self.inputs
        return (yield from pass2(i.backend, i.concepts, i.image_set, i.pre, p1.loaded, i.info, thresholds, ties,
                                 p1.kept, i.labels, i.params, self.device, self.clock))

    def notes(self, n_images: int) -> list[str]:
        size = map_bytes(self.inputs.info, n_images) / 2**20
        budget = self.inputs.params.map_budget_mb
        return [f"one forward pass: the maps of {n_images} images ({size:.0f} MB float32) fit map_budget_mb="
                f"{budget:g} and were kept for the tally" if self.keep else
                f"two forward passes: the maps of {n_images} images ({size:.0f} MB float32) exceed map_budget_mb="
                f"{budget:g}"]

    def seconds(self, layers: Sequence[str]) -> dict[str, float]:
        return _phase_totals(self.clock.seconds, layers)


def _compute(backend: Backend, model_sha: str, concepts: ConceptDataset, layers: list[str],
             info: dict[str, LayerInfo], params: DissectionParams, passes: PassFactory) -> Job[DissectionResult]:
    """The two passes (run by ``passes``) and the summary (a job returning the result, not
    cached here)."""
    if len(concepts) == 0:
        raise ConvLensError(f"{concepts.root}: the concept data set has no images.")
    # hashed before they are read: a file changed during the run makes the entry stale, never
    # a stale entry look fresh
    yield Progress(0.0, f"hashing {len(concepts)} concept images and their masks")
    input_digests = digest_files(concepts.content_files())
    labels = Labels.of(concepts)
    if not labels.scored.any():
        raise ConvLensError(f"{concepts.root}: no concept to score in categories "
                            f"{', '.join(concepts.categories) or '(none)'}.")
    image_set = concept_image_set(concepts)
    pre = dissection_preprocess(backend.spec.preprocess)
    strategy = passes(DissectionInputs(backend, concepts, image_set, pre, info, labels, params))
    clock = strategy.clock
    t0 = time.perf_counter()
    yield from strategy.begin()
    order = list(range(len(concepts)))
    skipped: list[tuple[str, str]] = []
    for _attempt in range(3):
        t1 = time.perf_counter()
        yield Progress(0.0, f"pass 1/2: thresholds of {len(layers)} layers over {len(order)} images "
                            f"({strategy.describe()})")
        p1 = yield from strategy.pass1(order)
        skipped.extend(p1.skipped)
        order = p1.loaded
        if not order:
            raise ConvLensError(f"{concepts.root}: none of the {len(concepts)} concept images could be read.")
        thresholds = {}
        for name in layers:
            thresholds[name] = p1.quantiles[name].thresholds()
            clock.lap(f"quantile[{name}]")
        clock.seconds["pass1"] = clock.seconds.get("pass1", 0.0) + time.perf_counter() - t1
        t2 = time.perf_counter()
        ties = {name: tie_plan(p1.quantiles[name], thresholds[name], params) for name in layers}
        yield Progress(PASS1_SHARE, f"pass 2/2: IoU of {len(layers)} layers over {len(order)} images")
        tallies, failed = yield from strategy.pass2(p1, thresholds, ties)
        clock.seconds["pass2"] = clock.seconds.get("pass2", 0.0) + time.perf_counter() - t2
        if not failed:
            break
        # loaded in pass 1 but not in pass 2 (changed on disk): thresholds again without them
        log.warning("%s: %d image(s) failed to load in the second pass (first: %s); recomputing the "
                    "thresholds without them", concepts.root, len(failed), failed[0][0])
        skipped.extend(failed)
        bad = {p for p, _ in failed}
        order = [i for i in order if image_set.records[i].path not in bad]
        if not order:
            raise ConvLensError(f"{concepts.root}: none of the {len(concepts)} concept images could be read.")
    else:
        raise ConvLensError(f"{concepts.root}: images keep failing to load; first: {skipped[0]}")
    tops = p1.tops
    del p1  # the kept maps

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
    notes = strategy.notes(len(order))
    notes += [tie_note(name, out[name].tie_fallback, params) for name in layers if out[name].tie_fallback.any()]
    seconds = strategy.seconds(layers)
    seconds["total"] = time.perf_counter() - t0
    result = DissectionResult(
        model=backend.spec.path, model_sha256=model_sha, concepts_root=concepts.root,
        params=params, layers=out, concept_names=labels.names,
        concept_categories=labels.categories_of, categories=labels.categories,
        n_images=len(order), seconds=seconds, skipped=tuple(skipped), input_digests=input_digests,
        passes=strategy.passes, notes=tuple(notes), warnings=tuple(one_position_warnings(info)),
    )
    return result


def tie_note(layer: str, fallback: np.ndarray, params: DissectionParams) -> str:
    """The sentence saying which units of ``layer`` fell back to ``S > T``."""
    units = np.flatnonzero(fallback).tolist()
    shown = ", ".join(map(str, units[:20])) + (", ..." if len(units) > 20 else "")
    return (f"{layer}: {len(units)} unit{'' if len(units) == 1 else 's'} ({shown}) tie with the threshold "
            f"(P(A >= T) > {params.tie_factor:g} x {params.quantile:g}); their masks use S > T")
