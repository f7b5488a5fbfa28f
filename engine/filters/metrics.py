"""Filter metrics of Interpretable CNNs (Zhang, Wu, Zhu, CVPR 2018) for any model and spatial layer.

Per filter ``f`` of a layer (any loaded model, trained with the filter loss or not):

* **category**: ``argmax_c`` of the filter's mean activation over the images of class ``c``
  (image labels of the image set; -1 without labels);
* **inter-category entropy** ``H(T' | X)`` and **spatial entropy**
  ``sum_x p(T+, x) H(T+ | X = x)`` of its maps over the whole image set, from ``p(T | x)`` and
  ``p(T_mu | x)`` as the paper defines them (:mod:`engine.filters.templates`), with ``-MI`` and
  ``H(T)``;
* **location instability** (with a landmark CSV ``image,landmark,x,y``): over the filter's
  ``top_k`` images by max activation, the receptive-field centre of its top position
  (:mod:`engine.models.receptive`, mapped back to the image's own pixels through the resize),
  and for each landmark ``k`` present in at least ``min_images`` of them, the standard deviation
  of ``||landmark_k - centre|| / image diagonal``; the filter's instability is the mean over
  landmarks (NaN when none qualifies), the layer's the mean over filters;
* **part interpretability** (with a Broden-layout set holding a ``part`` category): the
  dissection threshold ``T_f`` (top ``quantile`` = 0.005 of all positions of all images,
  exact), maps upsampled bilinearly to the masks and ``S >= T_f``, IoU with every part summed
  over the images that carry part labels; the filter's best part, and whether its IoU exceeds
  ``iou_threshold`` (0.2). A filter whose threshold is 0 (a ReLU filter silent at more than
  99.5% of positions) uses ``S > 0`` instead, so a silent filter never gets a whole-image mask.

:func:`filter_metrics` is a job; its result is cached (kind ``"filters"``).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.cache import Cache, DamagedEntry, check_array, load_array, make_key, read_meta, write_meta
from engine.jobs import Job, subjob
from engine.types import ConvLensError, ImageRecord, Preprocess, Progress

from .templates import FilterParams, mi_terms

log = logging.getLogger("convlens.filters")

CACHE_KIND = "filters"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class MetricsParams:
    """Settings of the filter metrics (see the module docstring)."""

    filter_params: FilterParams = field(default_factory=FilterParams)
    top_k: int = 20
    min_images: int = 3
    quantile: float = 0.005
    iou_threshold: float = 0.2
    batch_size: int = 64

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filter_params"] = self.filter_params.to_dict()
        return d

    def result_key(self) -> dict[str, Any]:
        d = self.to_dict()
        del d["batch_size"]
        return d

    def check(self) -> None:
        self.filter_params.check()
        if self.top_k < 1 or self.min_images < 2 or self.batch_size < 1:
            raise ConvLensError(f"top_k and batch_size must be >= 1 and min_images >= 2, got {self.top_k}, "
                                f"{self.batch_size} and {self.min_images}.")
        if not 0.0 < self.quantile < 1.0:
            raise ConvLensError(f"quantile must be in (0, 1), got {self.quantile}.")
        if not 0.0 <= self.iou_threshold <= 1.0:
            raise ConvLensError(f"iou_threshold must be in [0, 1], got {self.iou_threshold}.")


@dataclass
class FilterMetrics:
    """Per-filter metrics of one layer (arrays have one row per filter)."""

    layer: str
    shape: tuple[int, int, int]
    classes: tuple[str, ...]
    category_mode: str
    category: np.ndarray  # (C,) int64, index into classes, -1 when unknown
    class_means: np.ndarray  # (C, K) float64 mean activation per class
    loss: np.ndarray  # (C,) -MI
    h_t: np.ndarray
    inter: np.ndarray
    spatial: np.ndarray
    landmark_names: tuple[str, ...] = ()
    instability_per_landmark: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (C, L)
    instability: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (C,) NaN when unknown
    part_names: tuple[str, ...] = ()
    part_iou: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # (C, P)
    thresholds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (C,)
    n_images: int = 0
    n_part_images: int = 0
    params: MetricsParams = field(default_factory=MetricsParams)
    from_cache: bool = False

    @property
    def units(self) -> int:
        return self.shape[0]

    @property
    def has_landmarks(self) -> bool:
        return len(self.landmark_names) > 0

    @property
    def has_parts(self) -> bool:
        return len(self.part_names) > 0

    def best_part(self) -> tuple[np.ndarray, np.ndarray]:
        """(index of each filter's best part, its IoU); index -1 without parts."""
        if not self.has_parts:
            return np.full(self.units, -1), np.full(self.units, np.nan)
        idx = np.argmax(self.part_iou, axis=1)
        return idx, self.part_iou[np.arange(self.units), idx]

    def summary(self) -> dict[str, Any]:
        """The layer's headline numbers (JSON data)."""
        out: dict[str, Any] = {
            "layer": self.layer, "filters": self.units, "shape": list(self.shape), "images": self.n_images,
            "classes": list(self.classes), "category_mode": self.category_mode,
            "filters_per_category": {c: int((self.category == i).sum()) for i, c in enumerate(self.classes)},
            "mean_loss": float(np.mean(self.loss)), "mean_inter_category_entropy": float(np.mean(self.inter)),
            "mean_spatial_entropy": float(np.mean(self.spatial)), "h_t": float(np.mean(self.h_t)),
        }
        if self.has_landmarks:
            ok = np.isfinite(self.instability)
            out["mean_location_instability"] = float(np.mean(self.instability[ok])) if ok.any() else None
            out["filters_with_instability"] = int(ok.sum())
            out["landmarks"] = list(self.landmark_names)
        if self.has_parts:
            _, iou = self.best_part()
            out["part_images"] = self.n_part_images
            out["mean_part_iou"] = float(np.mean(iou))
            out["part_interpretability"] = float(np.mean(iou > self.params.iou_threshold))
            out["part_detectors"] = int((iou > self.params.iou_threshold).sum())
        out["params"] = self.params.to_dict()
        return out

    def rows(self) -> list[dict[str, Any]]:
        """One dict per filter, for the per-filter CSV and table."""
        idx, iou = self.best_part()
        rows = []
        for f in range(self.units):
            c = int(self.category[f])
            r: dict[str, Any] = {
                "filter": f, "category": self.classes[c] if c >= 0 else "",
                "inter_category_entropy": float(self.inter[f]), "spatial_entropy": float(self.spatial[f]),
                "loss": float(self.loss[f]),
            }
            if self.has_landmarks:
                r["location_instability"] = float(self.instability[f])
            if self.has_parts:
                r["part"] = self.part_names[int(idx[f])]
                r["part_iou"] = float(iou[f])
                r["part_interpretable"] = bool(iou[f] > self.params.iou_threshold)
            rows.append(r)
        return rows

    def write_csv(self, path: str | os.PathLike[str]) -> Path:
        from engine.cache import atomic_write_text

        rows = self.rows()
        cols = list(rows[0]) if rows else ["filter"]
        lines = [",".join(cols)]
        for r in rows:
            cells = []
            for c in cols:
                v = r[c]
                if isinstance(v, float):
                    cells.append("" if math.isnan(v) else f"{v:.6g}")
                elif isinstance(v, str) and any(ch in v for ch in ',"\n'):
                    cells.append('"' + v.replace('"', '""') + '"')
                else:
                    cells.append(str(v))
            lines.append(",".join(cells))
        return atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- pieces


def class_labels(records: Sequence[ImageRecord], classes: Sequence[str]) -> np.ndarray:
    """int64 (N,): index of each record's label in ``classes`` (-1 unlabelled or unknown)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(r.label, -1) if r.label is not None else -1 for r in records], dtype=np.int64)


def categories_from_means(means: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(category (C,), class means (C, K)) from per-image mean activations ``means`` (N, C)."""
    cm = np.full((means.shape[1], n_classes), np.nan)
    for k in range(n_classes):
        sel = labels == k
        if sel.any():
            cm[:, k] = means[sel].mean(axis=0)
    if n_classes == 0 or np.isnan(cm).all():
        return np.full(means.shape[1], -1, dtype=np.int64), cm
    return np.nanargmax(np.where(np.isnan(cm), -np.inf, cm), axis=1).astype(np.int64), cm


def entropy_terms(maps: np.ndarray, labels: np.ndarray | None, category: np.ndarray,
                  params: FilterParams, max_bytes: int = 128 * 2**20) -> tuple[np.ndarray, ...]:
    """(loss, h_t, inter, spatial) per filter over ``maps`` (N, C, h, w), in chunks of filters."""
    n, c, h, w = maps.shape
    per_filter = n * (h * w + 1) * 8 * 6
    step = max(1, int(max_bytes // max(per_filter, 1)))
    out = [np.zeros(c) for _ in range(4)]
    for lo in range(0, c, step):
        hi = min(c, lo + step)
        x = np.asarray(maps[:, lo:hi], dtype=np.float64)
        inc = None if labels is None else labels[:, None] == category[None, lo:hi]
        t = mi_terms(x, inc, params)
        for o, v in zip(out, (t.loss, t.h_t, t.inter, t.spatial), strict=True):
            o[lo:hi] = v
    return tuple(out)


def read_landmarks(path: str | os.PathLike[str], records: Sequence[ImageRecord],
                   root: str) -> tuple[tuple[str, ...], dict[int, dict[str, tuple[float, float]]]]:
    """Parse a landmark CSV (``image,landmark,x,y``; header optional) into
    ``(landmark names, {record index: {name: (x, y)}})``. Image paths are matched against the
    image set as absolute paths, relative to the CSV's folder or to the image set's root."""
    p = os.path.abspath(os.fspath(path))
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConvLensError(f"{p}: cannot read the landmark CSV ({e})") from None
    by_path = {os.path.normpath(r.path): i for i, r in enumerate(records)}
    base = os.path.dirname(p)
    names: dict[str, None] = {}
    out: dict[int, dict[str, tuple[float, float]]] = {}
    unmatched = 0
    start = 1 if rows and rows[0] and rows[0][0].strip().lower() in ("image", "path", "file") else 0
    for line, row in enumerate(rows[start:], start=start + 1):
        if not any(c.strip() for c in row):
            continue
        if len(row) < 4:
            raise ConvLensError(f"{p}: row {line}: expected image,landmark,x,y, got {len(row)} columns")
        img, name = row[0].strip(), row[1].strip()
        try:
            x, y = float(row[2]), float(row[3])
        except ValueError:
            raise ConvLensError(f"{p}: row {line}: x and y must be numbers, got {row[2]!r}, {row[3]!r}") from None
        if not (math.isfinite(x) and math.isfinite(y)):
            raise ConvLensError(f"{p}: row {line}: x and y must be finite")
        idx = None
        for cand in (img, os.path.join(base, img), os.path.join(root, img)):
            idx = by_path.get(os.path.normpath(os.path.abspath(cand)))
            if idx is not None:
                break
        if idx is None:
            unmatched += 1
            continue
        names[name] = None
        out.setdefault(idx, {})[name] = (x, y)
    if not out:
        raise ConvLensError(f"{p}: none of its images is in the image set ({root}); image paths are taken "
                            "relative to the CSV's folder or to the image folder")
    if unmatched:
        log.info("%s: %d landmark rows name images outside the image set", p, unmatched)
    return tuple(names), out


def to_image_coords(cy: float, cx: float, size_hw: tuple[int, int], pre: Preprocess) -> tuple[float, float]:
    """A model-input pixel coordinate (y, x) in the original image's pixel coordinates."""
    h, w = size_hw
    th, tw = pre.input_size
    if pre.resize == "shorter_side_crop":
        scale = max(th / pre.crop_fraction / h, tw / pre.crop_fraction / w)
        nh, nw = max(th, int(h * scale + 1e-6)), max(tw, int(w * scale + 1e-6))
        top, left = round((nh - th) / 2.0), round((nw - tw) / 2.0)
        return (cy + top + 0.5) * h / nh - 0.5, (cx + left + 0.5) * w / nw - 0.5
    return (cy + 0.5) * h / th - 0.5, (cx + 0.5) * w / tw - 0.5


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as im:
        return im.size[1], im.size[0]


def location_instability(maps: np.ndarray, maxes: np.ndarray, valid: np.ndarray, rf: Any,
                         records: Sequence[ImageRecord], landmarks: dict[int, dict[str, tuple[float, float]]],
                         names: Sequence[str], pre: Preprocess, top_k: int, min_images: int) -> np.ndarray:
    """(C, L) std of the normalised landmark-to-centre distance over each filter's top images."""
    _, c, _, w = maps.shape
    out = np.full((c, len(names)), np.nan)
    sizes: dict[int, tuple[int, int]] = {}
    score = np.where(valid[:, None], maxes, -np.inf)
    for f in range(c):
        order = np.argsort(-score[:, f], kind="stable")[:top_k]
        order = order[np.isfinite(score[order, f])]
        dists: dict[str, list[float]] = {k: [] for k in names}
        for i in (int(v) for v in order):
            if i not in landmarks:
                continue
            pos = int(np.argmax(np.asarray(maps[i, f], dtype=np.float32)))
            cy, cx = rf.centre(pos // w, pos % w)
            if i not in sizes:
                sizes[i] = _image_size(records[i].path)
            ih, iw = sizes[i]
            y, x = to_image_coords(cy, cx, (ih, iw), pre)
            diag = math.hypot(ih, iw)
            for name, (lx, ly) in landmarks[i].items():
                dists[name].append(math.hypot(lx - x, ly - y) / diag)
        for k, name in enumerate(names):
            if len(dists[name]) >= min_images:
                out[f, k] = float(np.std(dists[name]))
    return out


def layer_field(backend: Any, layer: str) -> Any:
    """The receptive field of ``layer``; a converted model is traced with its masks replaced by
    identities (a mask is spatially pointwise)."""
    from engine.models.receptive import layer_receptive_field, receptive_field

    from .convert import geometry_twin
    from .layer import InterpretableMask

    module = getattr(backend, "module", None)
    if module is not None and hasattr(module, "modules") and any(
            isinstance(m, InterpretableMask) for m in module.modules()):
        pre = backend.spec.preprocess
        return receptive_field(geometry_twin(module), layer, pre.input_size, pre.n_channels)
    return layer_receptive_field(backend, layer)


def part_ious(backend: Any, model_sha: str, parts: Any, layer: str, params: MetricsParams,
              cache: Cache | None) -> Job[tuple[tuple[str, ...], np.ndarray, np.ndarray, int]]:
    """(part names, IoU (C, P), thresholds (C,), images counted) against the ``part`` category."""
    import torch

    from engine.activations import extract
    from engine.dissection.masks import float32_cut, tie_fallback, unit_masks
    from engine.dissection.quantile import TopQuantile
    from engine.dissection.run import concept_image_set
    from engine.dissection.tally import IoUTally

    if "part" not in parts.categories:
        raise ConvLensError(f"{parts.root}: has no 'part' category (categories: {', '.join(parts.categories)})")
    part_concepts = [cpt for cpt in parts.concepts if cpt.category == "part"]
    if not part_concepts:
        raise ConvLensError(f"{parts.root}: label.csv lists no label of category 'part'")
    images = concept_image_set(parts)
    acts = yield from extract(backend, model_sha, images, [layer], batch_size=params.batch_size, cache=cache)
    maps = acts.maps(layer)
    valid = np.flatnonzero(acts.valid)
    _, c, h, w = maps.shape
    tq = TopQuantile(c, len(valid) * h * w, params.quantile)
    for lo in range(0, len(valid), 256):
        tq.update(torch.from_numpy(np.asarray(maps[valid[lo:lo + 256]], dtype=np.float32)))
    thresholds = tq.thresholds()
    # dissection's rule for tied thresholds (engine.dissection.masks.tie_fallback): a unit whose
    # threshold ties with a mass of activations (T = 0 on a sparse ReLU unit) uses S > T
    ge = torch.from_numpy(float32_cut(thresholds, strict=False)).reshape(1, -1, 1, 1)  # S >= T <=> S >= ge
    gt = torch.from_numpy(float32_cut(thresholds, strict=True)).reshape(1, -1, 1, 1)  # S > T <=> S > gt
    at, above = np.zeros(c, np.int64), np.zeros(c, bool)
    for lo in range(0, len(valid), 256):
        chunk = torch.from_numpy(np.asarray(maps[valid[lo:lo + 256]], dtype=np.float32))
        at += (chunk >= ge).sum(dim=(0, 2, 3)).numpy()
        above |= (chunk > gt).any(dim=3).any(dim=2).any(dim=0).numpy()
    fallback = tie_fallback(at, len(valid) * h * w, above, params.quantile)
    lc = parts.label_categories()
    part_cat = parts.categories.index("part")
    tally = IoUTally(c, np.where(lc < 0, part_cat, lc), len(parts.categories))
    counted = 0
    for k, i in enumerate(valid):
        sample = parts.sample(int(i))
        pix = [(part_cat, m) for cat, m in sample.pixel_labels if cat == "part"]
        if not any(m.any() for _, m in pix):
            continue
        a = torch.from_numpy(np.asarray(maps[i], dtype=np.float32))[None]
        masks = unit_masks(a, thresholds, sample.mask_size, strict=False, tie_fallback=fallback)[0]
        tally.update(masks, pix, [])
        counted += 1
        if k % 64 == 0:
            yield Progress(k / max(len(valid), 1), f"part IoU {k}/{len(valid)}")
    iou = tally.result().iou
    cols = [cpt.number for cpt in part_concepts]
    return tuple(cpt.name for cpt in part_concepts), iou[:, cols], np.asarray(thresholds, dtype=np.float64), counted


def _file_digest(path: str | os.PathLike[str]) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError as e:
        raise ConvLensError(f"{path}: cannot read ({e.strerror or e})") from None


def metrics_key(backend: Any, model_sha: str, images: Any, layer: str, params: MetricsParams,
                landmarks: str | None, parts: Any) -> str:
    spec = backend.spec
    return make_key(CACHE_KIND, FORMAT_VERSION, model_sha, spec.arch, spec.preprocess, spec.output_index,
                    backend.name, images.fingerprint(), layer, params.result_key(),
                    _file_digest(landmarks) if landmarks else None, parts.fingerprint() if parts is not None else None)


def filter_metrics(backend: Any, model_sha: str, images: Any, layer: str,
                   params: MetricsParams = MetricsParams(), *, landmarks: str | os.PathLike[str] | None = None,
                   parts: Any = None, cache: Cache | None = None) -> Job[FilterMetrics]:
    """Filter metrics of ``layer`` over ``images`` (a job). ``landmarks``: a landmark CSV;
    ``parts``: a :class:`~engine.concepts.ConceptDataset` with a ``part`` category."""
    params.check()
    cache = cache or Cache()
    backend.check_capture([layer])
    info = {li.name: li for li in backend.layers()}[layer]
    if not info.is_spatial:
        raise ConvLensError(f"{backend.spec.path}: layer '{layer}' has no spatial map (shape {list(info.shape)}); "
                            "filter metrics need a (filters, h, w) output")
    lm_path = os.path.abspath(os.fspath(landmarks)) if landmarks is not None else None
    key = metrics_key(backend, model_sha, images, layer, params, lm_path, parts)
    found = cache.get(CACHE_KIND, key)
    if found is not None:
        try:
            result = load_result(found)
            result.from_cache = True
            yield Progress(1.0, "filter metrics found in cache")
            return result
        except DamagedEntry as e:
            log.warning("damaged cache entry discarded, recomputing: %s", e)
            cache.discard(CACHE_KIND, key)
    from engine.activations import extract

    share = 0.6 if parts is not None else 0.9
    acts = yield from subjob(extract(backend, model_sha, images, [layer], batch_size=params.batch_size, cache=cache),
                             0.0, share * 0.7, "activations: ")
    maps_all = acts.maps(layer)
    stats = acts.stats(layer)
    valid = np.asarray(acts.valid, dtype=bool)
    vi = np.flatnonzero(valid)
    classes = images.labels if images.has_labels else ()
    labels = class_labels(images.records, classes)
    mode = params.filter_params.category_mode if classes else "none"
    category, class_means = categories_from_means(np.asarray(stats.mean, dtype=np.float64)[vi], labels[vi],
                                                  len(classes))
    yield Progress(share * 0.75, "entropies")
    maps = np.asarray(maps_all[vi], dtype=np.float32)
    loss, h_t, inter, spatial = entropy_terms(maps, labels[vi] if mode == "labels" else None, category,
                                              params.filter_params)
    c, h, w = int(maps_all.shape[1]), int(maps_all.shape[2]), int(maps_all.shape[3])
    result = FilterMetrics(layer=layer, shape=(c, h, w), classes=tuple(classes), category_mode=mode,
                           category=category, class_means=class_means, loss=loss, h_t=h_t, inter=inter,
                           spatial=spatial, n_images=int(valid.sum()), params=params)
    if lm_path is not None:
        yield Progress(share * 0.9, "location instability")
        names, marks = read_landmarks(lm_path, images.records, images.root)
        rf = layer_field(backend, layer)
        per = location_instability(maps_all, np.asarray(stats.max), valid, rf, images.records, marks, names,
                                   backend.spec.preprocess, params.top_k, params.min_images)
        result.landmark_names = names
        result.instability_per_landmark = per
        result.instability = np.array([float(np.nanmean(r)) if np.isfinite(r).any() else np.nan for r in per])
    if parts is not None:
        names_p, iou, thr, counted = yield from subjob(part_ious(backend, model_sha, parts, layer, params, cache),
                                                       share, 0.99, "parts: ")
        result.part_names, result.part_iou, result.thresholds, result.n_part_images = names_p, iou, thr, counted
    with cache.write(CACHE_KIND, key) as tmp:
        save_result(result, tmp)
    yield Progress(1.0, "filter metrics done")
    return result


# ----------------------------------------------------------------------------- storage

_ARRAYS = ("category", "class_means", "loss", "h_t", "inter", "spatial", "instability_per_landmark",
           "instability", "part_iou", "thresholds")


def save_result(result: FilterMetrics, folder: str | Path) -> Path:
    """``.npy`` arrays and ``meta.json`` (written last); no pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in _ARRAYS:
        arr = np.asarray(getattr(result, name))
        np.save(folder / f"{name}.npy", arr.astype(np.int64 if name == "category" else np.float64))
    write_meta(folder, {
        "version": FORMAT_VERSION, "kind": CACHE_KIND, "layer": result.layer, "shape": list(result.shape),
        "classes": list(result.classes), "category_mode": result.category_mode,
        "landmark_names": list(result.landmark_names), "part_names": list(result.part_names),
        "n_images": result.n_images, "n_part_images": result.n_part_images, "params": result.params.to_dict(),
    })
    return folder


def load_result(folder: str | Path) -> FilterMetrics:
    """Read what :func:`save_result` wrote; :class:`DamagedEntry` naming the folder otherwise."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"{folder}: not a filter-metrics result ({e}).") from e
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION or meta.get("kind") != CACHE_KIND:
        raise DamagedEntry(f"{folder}: not a filter-metrics result of format {FORMAT_VERSION}.")
    try:
        c = int(meta["shape"][0])
        k, nl, npart = len(meta["classes"]), len(meta["landmark_names"]), len(meta["part_names"])
        shapes = {"category": (c,), "class_means": (c, k), "loss": (c,), "h_t": (c,), "inter": (c,),
                  "spatial": (c,), "instability_per_landmark": (c, nl) if nl else (None, None),
                  "instability": (c,) if nl else (None,), "part_iou": (c, npart) if npart else (None, None),
                  "thresholds": (c,) if npart else (None,)}
        arrays = {}
        for name in _ARRAYS:
            check_array(folder, name, np.int64 if name == "category" else np.float64, shapes[name])
            arrays[name] = load_array(folder, name, mmap=False)
        p = dict(meta["params"])
        p["filter_params"] = FilterParams(**p["filter_params"])
        return FilterMetrics(layer=str(meta["layer"]), shape=tuple(int(v) for v in meta["shape"]),  # type: ignore[arg-type]
                             classes=tuple(meta["classes"]), category_mode=str(meta["category_mode"]),
                             landmark_names=tuple(meta["landmark_names"]), part_names=tuple(meta["part_names"]),
                             n_images=int(meta["n_images"]), n_part_images=int(meta["n_part_images"]),
                             params=MetricsParams(**p), **arrays)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedEntry(f"{folder}: inconsistent filter-metrics result ({type(e).__name__}: {e}).") from e
