"""The weight-randomisation sanity check (Adebayo et al., NeurIPS 2018) as a cached job.

For each step of a cascade (the top k layers randomised, k = 1 .. L, from the output down) or
of the independent mode (layer k alone randomised), the explanation is recomputed on a
randomised copy of the model and compared with the original's (see :mod:`.explanations` and
:mod:`.similarity`). An explanation that stays similar when the weights it should depend on are
destroyed fails the check: it does not explain the model.

The classes explained are the original model's predictions, at every step (the randomised
model explains the same class). The loaded model is never changed (see :mod:`.randomise`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import cached_job, method_key
from ..cache import Cache, DamagedEntry, check_array, check_meta, load_array, write_meta
from ..jobs import Job
from ..types import ConvLensError, Progress
from .explanations import EVIDENCE_METHODS, EXPLANATIONS, Inputs, evidence_available, scratch_cache
from .randomise import INITS, MODES, effective_layers, expand_layers, randomised_backends, steps, weight_layers

CACHE_KIND = "sanity"
FORMAT_VERSION = 2  # 2: containers named in ``layers`` randomise their weight layers; parametrized weights randomised


@dataclass(frozen=True)
class SanityParams:
    """Settings of a sanity check.

    ``explanation``: one of :data:`~engine.sanity.explanations.EXPLANATIONS` (``gradcam``,
    ``saliency``, ``guided_backprop``, ``ig``, ``occlusion``, ``heatmap``, ``dissection``,
    ``polytope``, ``filters``, ``graphs``). ``mode``: ``cascade`` or ``independent``. ``layer`` (and
    ``unit``): the layer Grad-CAM, the heatmap, dissection and filter metrics look at (Grad-CAM:
    None for its default). ``images``: how many images, spread evenly over the set (or
    ``indices``: exactly these image-set positions). ``layers``: the layers to randomise (None:
    every layer owning a weight that the classifier output depends on). ``seed``, ``init``:
    the random weights (see :mod:`.randomise`). ``keep_maps``: maps kept for display (the first
    images), ``batch_size`` does not change the result.
    """

    explanation: str = "gradcam"
    mode: str = "cascade"
    layer: str | None = None
    unit: int = 0
    images: int = 16
    indices: tuple[int, ...] | None = None
    layers: tuple[str, ...] | None = None
    seed: int = 0
    init: str = "normal"
    keep_maps: int = 8
    batch_size: int = 64

    def result_key(self) -> dict[str, Any]:
        d = asdict(self)
        del d["batch_size"]
        for k in ("indices", "layers"):
            d[k] = None if d[k] is None else list(d[k])
        return d

    def check(self) -> None:
        if self.explanation not in EXPLANATIONS:
            raise ConvLensError(f"explanation {self.explanation!r}: choose one of {', '.join(EXPLANATIONS)}")
        if self.mode not in MODES:
            raise ConvLensError(f"mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if self.init not in INITS:
            raise ConvLensError(f"init {self.init!r}: choose one of {', '.join(INITS)}")
        if not isinstance(self.images, int) or self.images < 1:
            raise ConvLensError(f"images must be a whole number >= 1, got {self.images!r}")
        if not isinstance(self.unit, int) or self.unit < 0:
            raise ConvLensError(f"unit must be a whole number >= 0, got {self.unit!r}")
        if self.keep_maps < 0 or self.batch_size < 1:
            raise ConvLensError(f"keep_maps must be >= 0 and batch_size >= 1, got {self.keep_maps}, {self.batch_size}")
        if self.indices is not None and (not self.indices or min(self.indices) < 0):
            raise ConvLensError("indices must name at least one image position >= 0")
        if self.layers is not None and not self.layers:
            raise ConvLensError("layers must name at least one layer to randomise (or be None for all)")
        if EXPLANATIONS[self.explanation].needs_layer and not self.layer:
            raise ConvLensError(f"the {self.explanation} sanity check needs a layer")


@dataclass
class SanityResult:
    """A sanity check's outcome (plain data).

    Step s randomised ``randomised[s]`` (cascade: the top s+1 layers; independent: one), whose
    newest layer is ``steps[s]``. ``values[s, m, i]``: metric ``metrics[m]`` at step s for item
    i (an image for maps and galleries, a unit for dissection labels; one value for per-layer
    correlations); NaN where undefined. ``indices``/``paths``/``targets``: the images and the
    classes explained. ``original_maps`` (K, H, W) and ``step_maps`` (S, K, H, W): the maps of
    the first K images (maps explanations only; else empty). ``dropped``: weight layers left out
    because the classifier output does not depend on them.
    """

    explanation: str
    title: str
    mode: str
    model: str
    layer: str | None
    unit: int
    params: SanityParams
    metrics: tuple[str, ...]
    item: str
    steps: tuple[str, ...]
    randomised: tuple[tuple[str, ...], ...]
    values: np.ndarray  # (S, M, I) float64
    indices: np.ndarray  # (N,) int64
    paths: tuple[str, ...]
    targets: np.ndarray  # (N,) int64
    class_names: tuple[str, ...] | None
    original_maps: np.ndarray  # (K, H, W) float32
    step_maps: np.ndarray  # (S, K, H, W) float32
    dropped: tuple[str, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    from_cache: bool = False

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    def mean(self) -> np.ndarray:
        """(S, M): the mean over items (NaN items left out)."""
        return _nan_reduce(np.nanmean, self.values)

    def spread(self) -> np.ndarray:
        """(S, M): the standard deviation over items (NaN items left out)."""
        return _nan_reduce(np.nanstd, self.values)

    def series(self, metric: str) -> np.ndarray:
        return self.mean()[:, self.metrics.index(metric)]

    def drop_step(self, metric: str, below: float = 0.5) -> int | None:
        """The first step whose mean ``metric`` is below ``below`` (None: it never is)."""
        s = self.series(metric)
        hit = np.nonzero(s < below)[0]
        return int(hit[0]) if hit.size else None

    def rows(self) -> list[dict[str, Any]]:
        """One row per step: the layer, the layers randomised, per metric the mean and spread."""
        mean, spread = self.mean(), self.spread()
        out = []
        for s in range(self.n_steps):
            row: dict[str, Any] = {"step": s + 1, "layer": self.steps[s], "randomised": " ".join(self.randomised[s])}
            for m, name in enumerate(self.metrics):
                row[f"{name}_mean"] = _num(mean[s, m])
                row[f"{name}_std"] = _num(spread[s, m])
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        """JSON data: the settings, the per-step table, and per metric the value at the last
        (fully randomised, in a cascade) step and the first step below 0.5."""
        last: dict[str, Any] = {}
        for name in self.metrics:
            d = self.drop_step(name)
            last[name] = {"final": _num(self.series(name)[-1]) if self.n_steps else None,
                          "drops_at": None if d is None else self.steps[d]}
        return {"explanation": self.explanation, "title": self.title, "mode": self.mode, "model": self.model,
                "layer": self.layer, "unit": self.unit, "item": self.item, "items": int(self.values.shape[2]),
                "images": len(self.indices), "metrics": list(self.metrics), "dropped_layers": list(self.dropped),
                "params": self.params.result_key(), "steps": self.rows(), "outcome": last,
                "skipped": [list(s) for s in self.skipped]}


def _num(v: Any) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 6)


def _nan_reduce(fn: Any, values: np.ndarray) -> np.ndarray:
    out = np.full(values.shape[:2], np.nan)
    ok = np.isfinite(values).any(axis=2)
    if ok.any():
        out[ok] = fn(values[ok], axis=-1)
    return out


# ------------------------------------------------------------------------------------ the job


def image_positions(n_records: int, params: SanityParams) -> np.ndarray:
    if params.indices is not None:
        idx = np.asarray(params.indices, np.int64)
        if idx.max() >= n_records:
            raise ConvLensError(f"image position {int(idx.max())} is out of range: the set has {n_records} images")
        return idx
    k = min(params.images, n_records)
    return np.unique(np.linspace(0, n_records - 1, k).round().astype(np.int64))


#: the package whose results each explanation recomputes: its format version joins the key, so
#: a change of meaning there recomputes the sanity checks built on it
_SOURCES = {**dict.fromkeys(EVIDENCE_METHODS, "engine.evidence.run"), "dissection": "engine.dissection.run",
            "polytope": "engine.polytope.run", "filters": "engine.filters.metrics", "graphs": "engine.graphs.model"}


def _source_version(explanation: str) -> int | None:
    import importlib

    mod = _SOURCES.get(explanation)
    if mod is None:
        return None
    try:
        return int(getattr(importlib.import_module(mod), "FORMAT_VERSION", 0))
    except ImportError:
        return None


def sanity_key(backend: Any, model_sha: str, image_set: Any, params: SanityParams) -> str:
    return method_key(CACHE_KIND, FORMAT_VERSION, backend, model_sha, image_set.fingerprint(), params,
                      _source_version(params.explanation))


def run(backend: Any, model_sha: str, image_set: Any, params: SanityParams = SanityParams(), *,
        cache: Cache | None = None) -> Job[SanityResult]:
    """The sanity check of ``params.explanation`` over images of ``image_set`` (a job)."""
    params.check()
    if params.explanation in EVIDENCE_METHODS and not evidence_available():
        raise ConvLensError(f"the {params.explanation} sanity check needs engine.evidence, which this installation lacks")
    weight_layers(backend)  # raises for a model whose weights cannot be randomised
    if EXPLANATIONS[params.explanation].needs_gradients and not backend.supports_gradients:
        raise ConvLensError(f"{backend.spec.path}: {params.explanation} needs gradients (an eager PyTorch model)")
    if not len(image_set.records):
        raise ConvLensError(f"{image_set.root}: the image set is empty")
    key = sanity_key(backend, model_sha, image_set, params)
    result = yield from cached_job(cache, CACHE_KIND, key, load_result, save=save_result,
                                   found="sanity check found in cache",
                                   compute=lambda: _compute(backend, model_sha, image_set, params, cache))
    if result.from_cache:
        return replace(result, params=params)
    return result


def _scaled(job: Job[Any], lo: float, hi: float, prefix: str) -> Job[Any]:
    while True:
        try:
            p = next(job)
        except StopIteration as s:
            return s.value
        f = lo if p.fraction is None else lo + (hi - lo) * p.fraction
        yield Progress(f, prefix + p.message)


def _padded(rows: list[np.ndarray]) -> np.ndarray:
    """Metrics of different item counts (per unit, and one per layer) as one (M, I) array, NaN-padded."""
    out = np.full((len(rows), max(len(r) for r in rows)), np.nan)
    for m, r in enumerate(rows):
        out[m, :len(r)] = r
    return out


def _compute(backend: Any, model_sha: str, image_set: Any, params: SanityParams,
             cache: Cache | None) -> Job[SanityResult]:
    from ..data.images import ImageLoader

    exp = EXPLANATIONS[params.explanation]
    pos = image_positions(len(image_set.records), params)
    yield Progress(0.0, f"loading {len(pos)} images")
    loader = ImageLoader(image_set, backend.spec.preprocess, batch_size=params.batch_size, indices=pos.tolist())
    parts = list(loader)
    if not parts:
        raise ConvLensError(f"{image_set.root}: none of the {len(pos)} chosen images could be read")
    batch = np.concatenate([b.array for b in parts])
    indices = np.concatenate([b.indices for b in parts])
    from engine.predict import display_class_names

    scores = backend.classifier_output(backend.forward(batch))
    targets = scores.argmax(axis=1).astype(np.int64)
    members = expand_layers(backend, params.layers) if params.layers is not None else None
    named = weight_layers(backend)
    if members is not None:  # the names given, in execution order (of their first weight layer): the steps go top down
        order = {n: i for i, n in enumerate(named)}
        named = sorted(members, key=lambda n: order[members[n][0]])
    layers, dropped = effective_layers(backend, named, batch[:8], params.seed, params.init, members)
    if not layers:
        raise ConvLensError(f"{backend.spec.path}: no layer with weights that the classifier output depends on")
    plan = steps(layers, params.mode)
    total = len(plan) + 1
    inputs = Inputs(batch, indices, targets, params.layer, params.unit, image_set, model_sha)
    original = yield from _scaled(exp.compute(backend, inputs, cache or Cache()), 0.0, 1 / total, "original: ")
    keep = min(params.keep_maps, len(indices)) if exp.kind == "maps" else 0
    values: list[np.ndarray] = []
    step_maps: list[np.ndarray] = []
    scratch, tmp = scratch_cache()
    try:
        gen = randomised_backends(backend, layers, params.mode, params.seed, params.init, members)
        try:
            for s, (names, rb) in enumerate(gen):
                lo = (s + 1) / total
                shown = f"step {s + 1}/{len(plan)} ({names[-1]} randomised): "
                yield Progress(lo, shown)
                step_inputs = replace(inputs, model_sha=f"{model_sha}:sanity:{params.init}:{params.seed}:"
                                                        f"{','.join(names)}")
                value = yield from _scaled(exp.compute(rb, step_inputs, scratch), lo, lo + 1 / total, shown)
                sims = exp.compare(original, value)
                values.append(_padded([np.asarray(sims[m], np.float64).ravel() for m in exp.metrics]))
                if keep:
                    step_maps.append(np.asarray(value[:keep], np.float32))
        finally:
            gen.close()
    finally:
        tmp.cleanup()
    yield Progress(1.0, "sanity check done")
    width = max(v.shape[1] for v in values)
    vals = np.full((len(values), len(exp.metrics), width), np.nan)
    for s, v in enumerate(values):
        vals[s, :, :v.shape[1]] = v
    rel = tuple(image_set.relative_path(image_set.records[int(i)]) for i in indices)
    omaps = np.asarray(original[:keep], np.float32) if keep else np.zeros((0, 0, 0), np.float32)
    smaps = np.stack(step_maps) if keep else np.zeros((len(plan), 0, 0, 0), np.float32)
    return SanityResult(
        explanation=exp.name, title=exp.title, mode=params.mode, model=backend.spec.path, layer=params.layer,
        unit=params.unit, params=params, metrics=exp.metrics, item=exp.item, steps=tuple(n[-1] for n in plan),
        randomised=tuple(tuple(n) for n in plan), values=vals, indices=indices.astype(np.int64), paths=rel,
        targets=targets, class_names=display_class_names(backend.spec, scores.shape[1]), original_maps=omaps, step_maps=smaps,
        dropped=tuple(dropped), skipped=tuple(loader.skipped))


# ------------------------------------------------------------------------------------ storage

_ARRAYS: dict[str, tuple[Any, tuple[int | None, ...]]] = {
    "values": (np.float64, (None, None, None)),
    "indices": (np.int64, (None,)),
    "targets": (np.int64, (None,)),
    "original_maps": (np.float32, (None, None, None)),
    "step_maps": (np.float32, (None, None, None, None)),
}
_META = ("explanation", "title", "mode", "model", "layer", "unit", "params", "metrics", "item", "steps",
         "randomised", "paths", "class_names", "dropped", "skipped")


def save_result(result: SanityResult, folder: str | Path) -> Path:
    """``.npy`` arrays and ``meta.json`` (last) into ``folder``; no pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (dtype, _shape) in _ARRAYS.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(result, name), dtype=dtype), allow_pickle=False)
    meta: dict[str, Any] = {"version": FORMAT_VERSION, "kind": CACHE_KIND}
    for k in _META:
        v = getattr(result, k)
        meta[k] = result.params.result_key() | {"batch_size": result.params.batch_size} if k == "params" else v
    write_meta(folder, json.loads(json.dumps(meta)))
    return folder


def load_result(folder: str | Path) -> SanityResult:
    """Read :func:`save_result`'s folder; :class:`DamagedEntry` when anything is missing,
    truncated, of another format version or inconsistent."""
    folder = Path(folder)
    meta = check_meta(folder, FORMAT_VERSION, _META)
    shapes = {name: check_array(folder, name, dtype, shape) for name, (dtype, shape) in _ARRAYS.items()}
    s, m, _i = shapes["values"]
    n = shapes["indices"][0]
    if (shapes["targets"][0] != n or len(meta["steps"]) != s or len(meta["metrics"]) != m
            or len(meta["paths"]) != n or shapes["step_maps"][0] != s
            or shapes["step_maps"][1:] != shapes["original_maps"]):
        raise DamagedEntry(f"{folder}: arrays of inconsistent sizes")
    arrays = {name: np.array(load_array(folder, name)) for name in _ARRAYS}
    try:
        pf = {f.name for f in fields(SanityParams)}
        p = {k: v for k, v in meta["params"].items() if k in pf}
        for k in ("indices", "layers"):
            if p.get(k) is not None:
                p[k] = tuple(p[k])
        return SanityResult(
            explanation=meta["explanation"], title=meta["title"], mode=meta["mode"], model=meta["model"],
            layer=meta["layer"], unit=int(meta["unit"]), params=SanityParams(**p), metrics=tuple(meta["metrics"]),
            item=meta["item"], steps=tuple(meta["steps"]), randomised=tuple(tuple(r) for r in meta["randomised"]),
            paths=tuple(meta["paths"]),
            class_names=None if meta["class_names"] is None else tuple(meta["class_names"]),
            dropped=tuple(meta["dropped"]), skipped=tuple(tuple(x) for x in meta["skipped"]),
            **arrays)  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError) as e:
        raise DamagedEntry(f"{folder}: meta.json does not describe a sanity check ({e})") from e


def explanation_names() -> Sequence[str]:
    return tuple(EXPLANATIONS)


__all__ = ["CACHE_KIND", "FORMAT_VERSION", "SanityParams", "SanityResult", "load_result", "run",
           "save_result"]
