"""The class-evidence job: maps, causal check, deletion/insertion and Average Drop over an image set.

``run(backend, model_sha, image_set, params, *, cache=None, indices=None)`` loads the images (all,
or the image-set positions ``indices``), ``params.batch_size`` at a time, and per batch computes
the evidence maps (:func:`engine.evidence.maps.evidence_maps`) for the target class (default the
predicted one), then the checks of :mod:`engine.evidence.metrics`. The result is plain data,
saved as ``.npy`` files plus ``meta.json`` and cached by content (``engine.analysis.cached_job``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import cached_job, method_key
from ..cache import Cache, DamagedEntry, check_array, check_meta, load_array, write_meta
from ..jobs import Job
from ..types import ConvLensError, Progress
from .maps import BASELINES, BLURS, METHODS, evidence_maps
from .metrics import average_drop_increase, causal_check, deletion_insertion, score_kind

CACHE_KIND = "evidence"
FORMAT_VERSION = 2  # 2: one-output classifiers get a sigmoid; RISE's insertion blur; Average Drop on max(map, 0)


@dataclass(frozen=True)
class EvidenceParams:
    """What to explain and how to check it. ``target`` None: each image's predicted class."""

    method: str = "gradcam"
    layer: str | None = None  # Grad-CAM's layer (None: the last spatial layer)
    target: int | None = None
    window: int | None = None  # occlusion patch (None: an eighth of the shorter side)
    stride: int | None = None  # occlusion stride (None: the largest up to half the window that tiles the input)
    ig_steps: int = 32
    method_baseline: str = "zero"  # what occlusion / IG replace the image with
    top_fraction: float = 0.2  # the causal check's top region
    threshold: float = 0.05  # a blob is causal when masking it drops the probability this much
    mask_baseline: str = "mean"
    max_blobs: int = 8
    min_area: int = 1
    steps: int = 50  # deletion / insertion points (plus the start)
    deletion_baseline: str = "zero"
    insertion_baseline: str = "blur"
    blur: str = "rise"  # the blur baseline: RISE's 11x11 kernel, or "relative" (sigma 1/8 of the shorter side)
    blur_sigma: float | None = None  # given: a Gaussian of this sigma (pixels) instead
    batch_size: int = 32

    def result_key(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("batch_size")
        return d

    def method_options(self) -> dict[str, Any]:
        if self.method == "occlusion":
            return {"window": self.window, "stride": self.stride, "baseline": self.method_baseline, "blur": self.blur}
        if self.method == "ig":
            return {"steps": self.ig_steps, "baseline": self.method_baseline, "blur": self.blur}
        return {}

    def check(self) -> None:
        if self.method not in METHODS:
            raise ConvLensError(f"evidence method {self.method!r}: expected one of {', '.join(METHODS)}")
        for name in ("method_baseline", "mask_baseline", "deletion_baseline", "insertion_baseline"):
            if getattr(self, name) not in BASELINES:
                raise ConvLensError(f"{name} {getattr(self, name)!r}: expected one of {', '.join(BASELINES)}")
        if not 0 < self.top_fraction <= 1:
            raise ConvLensError(f"top fraction {self.top_fraction}: must be in (0, 1]")
        if not 0 <= self.threshold <= 1:
            raise ConvLensError(f"causal threshold {self.threshold}: must be in [0, 1] (a probability drop)")
        for name, low in (("ig_steps", 1), ("max_blobs", 1), ("min_area", 1), ("steps", 1), ("batch_size", 1)):
            if int(getattr(self, name)) < low:
                raise ConvLensError(f"{name} {getattr(self, name)}: must be at least {low}")
        for name in ("window", "stride"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConvLensError(f"occlusion {name} {v}: must be at least 1")
        if self.window is not None and self.stride is not None and self.stride > self.window:
            raise ConvLensError(f"occlusion stride {self.stride} is larger than the window {self.window}: pixels between "
                                "the windows would never be occluded; give a stride <= the window")
        if self.target is not None and self.target < 0:
            raise ConvLensError(f"class {self.target}: must be a class index, 0 or more")
        if self.blur not in BLURS:
            raise ConvLensError(f"blur {self.blur!r}: expected one of {', '.join(BLURS)}")
        if self.blur_sigma is not None and not self.blur_sigma > 0:
            raise ConvLensError(f"blur sigma {self.blur_sigma}: must be positive")


#: arrays of a result: name -> (dtype, shape with None for any length)
_ARRAYS: dict[str, tuple[Any, tuple[int | None, ...]]] = {
    "record_indices": (np.int64, (None,)),
    "images": (np.uint8, (None, None, None, 3)),
    "maps": (np.float32, (None, None, None)),
    "targets": (np.int64, (None,)),
    "scores": (np.float32, (None,)),
    "probs": (np.float32, (None,)),
    "blob_labels": (np.int16, (None, None, None)),
    "blob_image": (np.int64, (None,)),
    "blob_id": (np.int32, (None,)),
    "blob_area": (np.int64, (None,)),
    "blob_mass": (np.float32, (None,)),
    "blob_centroid": (np.float32, (None, 2)),
    "blob_prob_after": (np.float32, (None,)),
    "blob_drop": (np.float32, (None,)),
    "blob_causal": (np.bool_, (None,)),
    "region_prob": (np.float32, (None,)),
    "fractions": (np.float32, (None,)),
    "deletion": (np.float32, (None, None)),
    "insertion": (np.float32, (None, None)),
    "deletion_auc": (np.float32, (None,)),
    "insertion_auc": (np.float32, (None,)),
    "explanation_prob": (np.float32, (None,)),
    "avg_drop": (np.float32, (None,)),
    "increase": (np.bool_, (None,)),
}
_META = ("params", "model", "paths", "classes", "layer", "score_kind", "skipped", "seconds")


@dataclass
class EvidenceResult:
    """Per image (row ``i``, image-set position ``record_indices[i]``): the map, the class it
    explains, that class's output and probability, the causal blobs, the deletion / insertion
    curves and their AUC, and the Average Drop / Increase terms. Blob rows (``blob_*``) are
    image by image; ``blob_labels[i] == blob_id`` marks a blob's pixels."""

    params: EvidenceParams
    model: str
    paths: tuple[str, ...]
    classes: tuple[str, ...]
    layer: str | None
    score_kind: str
    skipped: tuple[tuple[str, str], ...]
    seconds: float
    record_indices: np.ndarray
    images: np.ndarray  # uint8 (N, H, W, 3): the image as the model sees it (resized), for overlays
    maps: np.ndarray
    targets: np.ndarray
    scores: np.ndarray
    probs: np.ndarray
    blob_labels: np.ndarray
    blob_image: np.ndarray
    blob_id: np.ndarray
    blob_area: np.ndarray
    blob_mass: np.ndarray
    blob_centroid: np.ndarray
    blob_prob_after: np.ndarray
    blob_drop: np.ndarray
    blob_causal: np.ndarray
    region_prob: np.ndarray
    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray
    deletion_auc: np.ndarray
    insertion_auc: np.ndarray
    explanation_prob: np.ndarray
    avg_drop: np.ndarray
    increase: np.ndarray
    from_cache: bool = False

    @property
    def n(self) -> int:
        return len(self.record_indices)

    def index_of(self, path: str | Path) -> int:
        """The row of image ``path`` (as given, or resolved)."""
        want = {str(path), str(Path(path).resolve())}
        for i, p in enumerate(self.paths):
            if p in want:
                return i
        raise ConvLensError(f"{path}: not among the images of this result")

    def blobs_of(self, i: int) -> np.ndarray:
        """The blob rows of image row ``i``."""
        return np.flatnonzero(self.blob_image == i)

    def class_name(self, k: int) -> str:
        return self.classes[k] if 0 <= k < len(self.classes) else str(k)

    def image_rows(self) -> list[dict[str, Any]]:
        """One dict per image (the CSV / JSON table)."""
        rows = []
        for i in range(self.n):
            b = self.blobs_of(i)
            rows.append({"image": self.paths[i], "class": self.class_name(int(self.targets[i])),
                         "class_index": int(self.targets[i]), "score": float(self.scores[i]),
                         "probability": float(self.probs[i]), "deletion_auc": float(self.deletion_auc[i]),
                         "insertion_auc": float(self.insertion_auc[i]), "average_drop": float(self.avg_drop[i]),
                         "increase": bool(self.increase[i]), "explanation_probability": float(self.explanation_prob[i]),
                         "blobs": len(b), "causal_blobs": int(self.blob_causal[b].sum()),
                         "region_drop": float(self.probs[i] - self.region_prob[i])})
        return rows

    def blob_rows(self) -> list[dict[str, Any]]:
        """One dict per blob (the causal-check table)."""
        return [{"image": self.paths[int(self.blob_image[r])], "class": self.class_name(int(self.targets[self.blob_image[r]])),
                 "blob": int(self.blob_id[r]), "area": int(self.blob_area[r]), "mass": float(self.blob_mass[r]),
                 "row": float(self.blob_centroid[r, 0]), "col": float(self.blob_centroid[r, 1]),
                 "probability": float(self.probs[self.blob_image[r]]), "probability_masked": float(self.blob_prob_after[r]),
                 "drop": float(self.blob_drop[r]), "causal": bool(self.blob_causal[r])}
                for r in range(len(self.blob_image))]

    def summary(self) -> dict[str, Any]:
        """Means over the images (and per explained class): deletion / insertion AUC, Average
        Drop (%), Average Increase (% of images), blobs and the share that is causal."""

        def block(rows: np.ndarray) -> dict[str, Any]:
            b = np.isin(self.blob_image, rows)
            return {"images": len(rows),
                    "deletion_auc": float(self.deletion_auc[rows].mean()) if len(rows) else None,
                    "insertion_auc": float(self.insertion_auc[rows].mean()) if len(rows) else None,
                    "average_drop": float(self.avg_drop[rows].mean()) if len(rows) else None,
                    "average_increase": float(100.0 * self.increase[rows].mean()) if len(rows) else None,
                    "blobs": int(b.sum()), "causal_blobs": int(self.blob_causal[b].sum())}

        per_class = {self.class_name(int(k)): block(np.flatnonzero(self.targets == k)) for k in np.unique(self.targets)}
        return {"method": self.params.method, "layer": self.layer, "model": self.model,
                "score_kind": self.score_kind, "params": self.params.result_key(), **block(np.arange(self.n)),
                "per_class": per_class, "skipped": len(self.skipped), "seconds": self.seconds}


def display_images(batch: np.ndarray, preprocess: Any) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB of a preprocessed batch (the image as the model sees it)."""
    c = preprocess.n_channels
    mean = np.asarray(preprocess.mean[:c], np.float32)[None, :, None, None]
    std = np.asarray(preprocess.std[:c], np.float32)[None, :, None, None]
    px = (batch * std + mean) * 255.0
    if c == 1:
        px = np.repeat(px, 3, axis=1)
    elif preprocess.channels == "bgr":
        px = px[:, ::-1]
    return np.clip(np.rint(px), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1).copy()


def evidence_key(backend: Any, model_sha: str, image_set: Any, params: EvidenceParams,
                 indices: list[int] | None) -> str:
    return method_key(CACHE_KIND, FORMAT_VERSION, backend, model_sha, image_set.fingerprint(), params, indices)


def run(backend: Any, model_sha: str, image_set: Any, params: EvidenceParams = EvidenceParams(), *,
        cache: Cache | None = None, indices: list[int] | None = None) -> Job[EvidenceResult]:
    """The evidence result for ``image_set`` (or its positions ``indices``): a cached job."""
    params.check()
    idx = None if indices is None else [int(i) for i in indices]
    key = evidence_key(backend, model_sha, image_set, params, idx)
    result = yield from cached_job(cache, CACHE_KIND, key, load_result, save=save_result,
                                   found="class evidence found in cache",
                                   compute=lambda: _compute(backend, model_sha, image_set, params, idx))
    if result.from_cache:
        return dataclasses.replace(result, params=params)  # batch size is not in the key
    return result


def _compute(backend: Any, model_sha: str, image_set: Any, params: EvidenceParams,
             indices: list[int] | None) -> Job[EvidenceResult]:
    from ..data.images import ImageLoader
    from ..predict import class_names

    t0 = time.perf_counter()
    pre = backend.spec.preprocess
    loader = ImageLoader(image_set, pre, batch_size=params.batch_size, indices=indices)
    total = len(loader.indices)
    parts: list[dict[str, Any]] = []
    layer: str | None = None
    kind: str | None = None
    done = 0
    n_classes = 0
    yield Progress(0.0, f"class evidence ({params.method}): {total} images")
    with loader:
        for batch in loader:
            x = batch.array
            ev = evidence_maps(backend, x, params.method, layer=params.layer, target=params.target,
                               **params.method_options())
            layer = ev.layer
            if kind is None:
                from .maps import classifier_scores

                out = classifier_scores(backend, x, params.batch_size)
                n_classes = out.shape[1]
                kind = score_kind(backend, out)
            common: dict[str, Any] = {"kind": kind, "batch_size": max(params.batch_size, 64)}
            cc = causal_check(backend, x, ev.maps, ev.targets, top_fraction=params.top_fraction,
                              threshold=params.threshold, baseline=params.mask_baseline, max_blobs=params.max_blobs,
                              min_area=params.min_area, sigma=params.blur_sigma, blur=params.blur, **common)
            cu = deletion_insertion(backend, x, ev.maps, ev.targets, steps=params.steps,
                                    deletion_baseline=params.deletion_baseline,
                                    insertion_baseline=params.insertion_baseline, sigma=params.blur_sigma, blur=params.blur,
                                    **common)
            di = average_drop_increase(backend, x, ev.maps, ev.targets, **common)
            parts.append({
                "record_indices": batch.indices, "images": display_images(x, pre), "maps": ev.maps,
                "targets": ev.targets, "scores": ev.scores, "probs": cc.base_prob,
                "blob_labels": cc.blobs.labels.astype(np.int16), "blob_image": cc.blobs.image + done,
                "blob_id": cc.blobs.blob, "blob_area": cc.blobs.area, "blob_mass": cc.blobs.mass,
                "blob_centroid": cc.blobs.centroid, "blob_prob_after": cc.prob_after, "blob_drop": cc.drop,
                "blob_causal": cc.causal, "region_prob": cc.region_prob, "fractions": cu.fractions,
                "deletion": cu.deletion, "insertion": cu.insertion, "deletion_auc": cu.deletion_auc,
                "insertion_auc": cu.insertion_auc, "explanation_prob": di.explanation_prob, "avg_drop": di.drop,
                "increase": di.increase})
            done += len(batch)
            yield Progress(done / max(1, total), f"class evidence ({params.method}): {done}/{total} images")
    h, w = pre.input_size
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, _shape) in _ARRAYS.items():
        if name == "fractions":
            arrays[name] = parts[0][name] if parts else np.linspace(0, 1, params.steps + 1).astype(np.float32)
            continue
        if parts:
            arrays[name] = np.concatenate([p[name] for p in parts]).astype(dtype)
        else:
            empty = {"images": (0, h, w, 3), "maps": (0, h, w), "blob_labels": (0, h, w), "blob_centroid": (0, 2),
                     "deletion": (0, params.steps + 1), "insertion": (0, params.steps + 1)}
            arrays[name] = np.zeros(empty.get(name, (0,)), dtype=dtype)
    if n_classes == 0:
        n_classes = backend.classifier_output(backend.forward(backend.dummy_batch(1))).shape[1]
    if params.target is not None and params.target >= n_classes:
        raise ConvLensError(f"{backend.spec.path}: class {params.target} is out of range: the classifier has "
                            f"{n_classes} classes (0 to {n_classes - 1})")
    return EvidenceResult(
        params=params, model=Path(backend.spec.path).name,
        paths=tuple(image_set.records[int(i)].path for i in arrays["record_indices"]),
        classes=tuple(class_names(backend.spec, n_classes)), layer=layer or params.layer,
        score_kind=kind or "logits", skipped=tuple(loader.skipped), seconds=time.perf_counter() - t0,
        **arrays)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- storage


def save_result(result: EvidenceResult, folder: str | Path) -> None:
    """``.npy`` arrays and ``meta.json`` (written last) into ``folder``; no pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (dtype, _shape) in _ARRAYS.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(result, name), dtype=dtype), allow_pickle=False)
    meta: dict[str, Any] = {"version": FORMAT_VERSION, "kind": CACHE_KIND}
    for k in _META:
        v = getattr(result, k)
        if k == "params":
            v = asdict(v)
        elif k in ("paths", "classes"):
            v = list(v)
        elif k == "skipped":
            v = [list(s) for s in v]
        meta[k] = v
    write_meta(folder, json.loads(json.dumps(meta)))


def load_result(folder: str | Path) -> EvidenceResult:
    """Read :func:`save_result`'s folder; :class:`~engine.cache.DamagedEntry` when anything is
    missing, truncated, of another format version or inconsistent."""
    folder = Path(folder)
    meta = check_meta(folder, FORMAT_VERSION, _META)
    shapes = {name: check_array(folder, name, dtype, shape) for name, (dtype, shape) in _ARRAYS.items()}
    n, nb, pts = shapes["record_indices"][0], shapes["blob_image"][0], shapes["fractions"][0]
    per_image = [k for k in _ARRAYS if (k != "fractions" and not k.startswith("blob_")) or k == "blob_labels"]
    per_blob = [k for k in _ARRAYS if k.startswith("blob_") and k != "blob_labels"]
    bad = [k for k in per_image if shapes[k][0] != n] + [k for k in per_blob if shapes[k][0] != nb]
    bad += [k for k in ("deletion", "insertion") if shapes[k][1] != pts]
    bad += [k for k in ("images", "blob_labels") if shapes[k][1:3] != shapes["maps"][1:3]]
    if bad or len(meta["paths"]) != n:
        raise DamagedEntry(f"{folder}: arrays of inconsistent sizes ({', '.join(bad) or 'paths'})")
    arrays = {name: np.array(load_array(folder, name)) for name in _ARRAYS}
    if nb and (arrays["blob_image"].min() < 0 or arrays["blob_image"].max() >= n):
        raise DamagedEntry(f"{folder}: blob rows name images that are not there")
    try:
        pf = {f.name for f in fields(EvidenceParams)}
        params = EvidenceParams(**{k: v for k, v in meta["params"].items() if k in pf})
        return EvidenceResult(
            params=params, model=str(meta["model"]), paths=tuple(meta["paths"]), classes=tuple(meta["classes"]),
            layer=meta["layer"], score_kind=str(meta["score_kind"]),
            skipped=tuple((str(a), str(b)) for a, b in meta["skipped"]), seconds=float(meta["seconds"]),
            **arrays)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise DamagedEntry(f"{folder}: meta.json does not describe an evidence result ({e})") from e
