"""The transformation probe (Worrall et al., ICCV 2017; Remelli et al., CVPR 2020): how a CNN's
features move when a known transformation is applied to its input.

For every image x of a set and every value theta of a sweep, the image is transformed
(:mod:`engine.probes.transforms`: rotation, translation, scale or brightness, applied to the
decoded image *before* the model's preprocessing, with a stated fill) and run through the model
once, capturing every chosen layer in the same forward pass. The identity transformation is
always run too (it is the reference, whether or not the sweep holds it). Per layer psi:

* **invariance**: the normalised feature distance ``||psi(T_theta x) - psi(x)|| / ||psi(x)||``
  on the whole (flattened) feature map, per image, and its mean over the set vs theta
  (0: invariant; images whose reference features are all zero are left out of the mean);
* **per-unit responses**: each unit's spatially averaged activation per image and theta (the
  response curve of a unit is its mean over the set vs theta);
* the **predictions** along the sweep (class, its probability, the probability of the class
  predicted for the untransformed image, and the share of images whose prediction is kept);
* the **linear map** M_theta with ``psi(T_theta x) ~ M_theta psi(x)``, fitted by ridge least
  squares on a seeded ``train_fraction`` of the images and tested on the rest: the relative
  error ``||Y - X M^T||_F / ||Y||_F`` on the held-out images, beside the error of the identity
  map (what "the features do not move" predicts). Features are, by ``features``: ``pooled``
  (the spatial mean of each unit: C numbers per image; the default), or ``flat`` (the whole map
  flattened, projected to ``projection`` dimensions by a seeded Gaussian random projection
  when larger; the result says which). The ridge penalty is ``ridge * ||X||_F^2 / d`` (``ridge``
  times the mean eigenvalue of X^T X, so it does not depend on the features' scale); with
  ``affine`` a constant feature is appended (M then has a bias);
* **composition**: for every pair (a, b) of sweep values whose composition (a + b; a * b for
  scale) is also a sweep value k: the relative Frobenius error ``||M_a M_b - M_k||_F / ||M_k||_F``
  and the held-out error of the composed map ``M_a M_b`` predicting psi(T_k x).

Cached under kind ``"probe"``; the key holds the model, the image set's fingerprint, the layers
and :meth:`ProbeParams.result_key`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine.analysis import cached_job, method_key
from engine.cache import Cache, DamagedEntry, check_array, check_meta, load_array, write_meta
from engine.jobs import Job
from engine.probes import transforms as tf
from engine.types import ConvLensError, Progress

CACHE_KIND = "probe"
FORMAT_VERSION = 2  # 2: one-output classifiers get a sigmoid (score_kind); translation in model-input pixels under crops
FEATURES = ("pooled", "flat")


@dataclass(frozen=True)
class ProbeParams:
    """Settings of a transformation probe.

    ``transform`` (see :data:`~engine.probes.transforms.TRANSFORMS`) and its ``values`` (the
    sweep; :func:`~engine.probes.transforms.parse_range` reads ``"-45:45:5"``), ``fill`` for the
    pixels a geometric transformation brings in. ``layers``: the layers probed (empty: the
    model's default spatial layers, :func:`engine.models.layers.default_layers`). Linear maps:
    ``features`` (``pooled`` or ``flat``), ``projection`` (the largest flat dimension kept; larger
    maps are randomly projected), ``ridge``, ``affine``, ``train_fraction`` of the images to fit
    on, ``seed`` (split and projection). ``max_images``: at most this many images of the set
    (a seeded subset; None: all). ``batch_size`` does not change the result.
    """

    transform: str = "rotate"
    values: tuple[float, ...] = tf.parse_range("-45:45:5")
    fill: str = "reflect"
    layers: tuple[str, ...] = ()
    features: str = "pooled"
    projection: int = 256
    ridge: float = 1e-3
    affine: bool = False
    train_fraction: float = 0.7
    seed: int = 0
    max_images: int | None = None
    batch_size: int = 128

    def result_key(self) -> dict[str, Any]:
        d = asdict(self)
        del d["batch_size"]
        d["values"] = [float(v) for v in self.values]
        d["layers"] = list(self.layers)
        return d

    def check(self) -> None:
        tf.check_transform(self.transform)
        tf.check_fill(self.fill)
        tf.check_values(self.transform, self.values)
        if len(set(self.values)) != len(self.values):
            raise ConvLensError("the sweep values must be distinct")
        if self.features not in FEATURES:
            raise ConvLensError(f"features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if not isinstance(self.projection, int) or self.projection < 1:
            raise ConvLensError(f"projection must be a positive whole number, got {self.projection!r}")
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise ConvLensError(f"ridge must be a number >= 0, got {self.ridge!r}")
        if not 0 < self.train_fraction < 1:
            raise ConvLensError(f"train_fraction must be in (0, 1), got {self.train_fraction!r}")
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise ConvLensError(f"max_images must be a positive whole number or None, got {self.max_images!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConvLensError(f"batch_size must be >= 1, got {self.batch_size!r}")


@dataclass
class ProbeResult:
    """A transformation probe over an image set (plain data).

    ``values`` (T,) the sweep; per image j of the N read (``paths[j]``, record
    ``record_indices[j]``): ``distance`` (L, N, T) normalised feature distances (``input_distance``
    (N, T) the same on the model input), ``pred`` (N, T)
    predicted class, ``prob`` (N, T) its probability, ``ref_prob`` (N, T) the probability of the
    class predicted for the untransformed image (``ref_pred`` (N,)). ``pooled[l]`` (N, T, C_l):
    each unit's spatial mean; ``pooled_ref[l]`` (N, C_l) the same for the untransformed image.
    Linear maps (None when there are too few images to fit and test): ``lin_train``,
    ``lin_test``, ``lin_identity`` (L, T) relative errors (train, held out, identity map on the
    held out), ``feature_dims`` (L,) the dimension d of the features they map. Composition:
    ``comp_pairs`` (P, 3) indices (a, b, k) into ``values`` with T_a T_b = T_k, ``comp_frob`` and
    ``comp_test`` (L, P); ``comp_direct`` (L, P) the held-out error of M_k itself.
    """

    model: str
    model_sha256: str
    image_source: str
    paths: tuple[str, ...]
    record_indices: np.ndarray
    class_names: tuple[str, ...] | None
    params: ProbeParams
    layers: tuple[str, ...]
    layer_shapes: tuple[tuple[int, ...], ...]
    values: np.ndarray
    distance: np.ndarray
    input_distance: np.ndarray
    pred: np.ndarray
    prob: np.ndarray
    ref_pred: np.ndarray
    ref_prob: np.ndarray
    pooled: tuple[np.ndarray, ...]
    pooled_ref: tuple[np.ndarray, ...]
    feature_dims: np.ndarray
    feature_note: str
    n_train: int
    n_test: int
    lin_train: np.ndarray | None
    lin_test: np.ndarray | None
    lin_identity: np.ndarray | None
    comp_pairs: np.ndarray
    comp_frob: np.ndarray
    comp_test: np.ndarray
    comp_direct: np.ndarray
    seconds: dict[str, float]
    skipped: tuple[tuple[str, str], ...] = ()
    #: how the classifier output became probabilities: ``softmax`` (logits), ``probs`` (as
    #: given), ``sigmoid`` (one output: a single logit; classes 0 (below 0.5) and 1)
    score_kind: str = "softmax"
    from_cache: bool = False

    @property
    def n(self) -> int:
        return len(self.paths)

    @property
    def transform(self) -> str:
        return self.params.transform

    def class_name(self, c: int) -> str:
        if self.class_names and 0 <= c < len(self.class_names):
            return self.class_names[c]
        return str(c)

    def layer_index(self, layer: str) -> int:
        if layer not in self.layers:
            raise ConvLensError(f"layer {layer!r} was not probed (probed: {', '.join(self.layers)})")
        return self.layers.index(layer)

    def invariance(self) -> np.ndarray:
        """(L, T) mean normalised distance over the images (NaN entries left out)."""
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.distance, axis=1) if self.n else np.full(self.distance.shape[::2], np.nan)

    def input_invariance(self) -> np.ndarray:
        """(T,) the same normalised distance on the model input itself (the preprocessed pixels):
        the reference a layer's curve compares with (above it: the layer moves more than the pixels)."""
        with np.errstate(invalid="ignore"):
            return np.nanmean(self.input_distance, axis=0) if self.n else np.full(len(self.values), np.nan)

    def invariance_std(self) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            return np.nanstd(self.distance, axis=1) if self.n else np.full(self.distance.shape[::2], np.nan)

    def responses(self, layer: str | int) -> np.ndarray:
        """(T, C) mean over the images of each unit's spatially averaged activation."""
        i = layer if isinstance(layer, int) else self.layer_index(layer)
        return self.pooled[i].mean(axis=0)

    def response_ref(self, layer: str | int) -> np.ndarray:
        i = layer if isinstance(layer, int) else self.layer_index(layer)
        return self.pooled_ref[i].mean(axis=0)

    def top_units(self, layer: str | int, k: int = 5) -> list[int]:
        """The units whose mean response varies most along the sweep (range of the curve)."""
        r = self.responses(layer)
        spread = r.max(axis=0) - r.min(axis=0)
        return [int(u) for u in np.argsort(-spread, kind="stable")[:k]]

    def agreement(self) -> np.ndarray:
        """(T,) share of images predicted as the untransformed image is."""
        return (self.pred == self.ref_pred[:, None]).mean(axis=0) if self.n else np.zeros(len(self.values))

    def value_index(self, value: float) -> int:
        hits = np.flatnonzero(np.isclose(self.values, value, rtol=0, atol=1e-9))
        if not len(hits):
            raise ConvLensError(f"{value:g} is not a value of the sweep ({', '.join(f'{v:g}' for v in self.values)})")
        return int(hits[0])

    def composition_summary(self) -> list[dict[str, Any]]:
        """Per layer: mean over the pairs of the composition errors, and the same for the pairs
        a = b (M_a^2 vs M_2a)."""
        out = []
        for li, name in enumerate(self.layers):
            d: dict[str, Any] = {"layer": name, "pairs": len(self.comp_pairs)}
            if len(self.comp_pairs):
                same = self.comp_pairs[:, 0] == self.comp_pairs[:, 1]
                d.update({"frobenius_mean": float(np.mean(self.comp_frob[li])),
                          "composed_test_mean": float(np.mean(self.comp_test[li])),
                          "direct_test_mean": float(np.mean(self.comp_direct[li])),
                          "frobenius_square_mean": float(np.mean(self.comp_frob[li][same])) if same.any() else None})
            out.append(d)
        return out

    def summary(self) -> dict[str, Any]:
        inv = self.invariance()
        layers = []
        for li, name in enumerate(self.layers):
            row: dict[str, Any] = {"layer": name, "shape": list(self.layer_shapes[li]),
                                   "feature_dim": int(self.feature_dims[li]),
                                   "invariance": [_num(v) for v in inv[li]]}
            if self.lin_test is not None and self.lin_train is not None and self.lin_identity is not None:
                row.update({"linear_train_error": [_num(v) for v in self.lin_train[li]],
                            "linear_test_error": [_num(v) for v in self.lin_test[li]],
                            "identity_map_error": [_num(v) for v in self.lin_identity[li]]})
            layers.append(row)
        return {"model": self.model, "images": self.n, "transform": self.transform,
                "unit": tf.UNITS[self.transform], "values": [float(v) for v in self.values],
                "params": self.params.result_key(), "features": self.feature_note, "score_kind": self.score_kind,
                "n_train": self.n_train, "n_test": self.n_test, "layers": layers,
                "input_invariance": [_num(v) for v in self.input_invariance()],
                "prediction_agreement": [float(v) for v in self.agreement()],
                "composition": self.composition_summary(), "seconds": self.seconds,
                "skipped": [list(s) for s in self.skipped]}


def _num(v: float) -> float | None:
    return None if not math.isfinite(float(v)) else float(v)


# --------------------------------------------------------------------------------------------
# linear maps
# --------------------------------------------------------------------------------------------


def fit_map(x: np.ndarray, y: np.ndarray, ridge: float, affine: bool = False) -> np.ndarray:
    """The (d', d') matrix M minimising ``||Y - X M^T||^2 + lam ||M||^2`` with
    ``lam = ridge * ||X||_F^2 / d`` (float64). With ``affine`` a constant 1 is appended to every
    row of X and Y first (d' = d + 1; M's last row is then (0, ..., 0, 1))."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if affine:
        x, y = augment(x), augment(y)
    d = x.shape[1]
    gram = x.T @ x
    lam = ridge * float(np.trace(gram)) / max(d, 1)
    a = gram + lam * np.eye(d)
    try:
        mt = np.linalg.solve(a, x.T @ y)
    except np.linalg.LinAlgError:
        mt = np.linalg.lstsq(a, x.T @ y, rcond=None)[0]
    m: np.ndarray = mt.T
    if affine:
        m[-1] = 0.0
        m[-1, -1] = 1.0
    return m


def augment(x: np.ndarray) -> np.ndarray:
    return np.hstack([x, np.ones((len(x), 1), dtype=x.dtype)])


def relative_error(y: np.ndarray, pred: np.ndarray) -> float:
    den = float(np.linalg.norm(y))
    return float(np.linalg.norm(y - pred)) / den if den > 0 else float("nan")


def apply_map(m: np.ndarray, x: np.ndarray, affine: bool) -> np.ndarray:
    """``x M^T`` (rows of x mapped), with the constant feature handled for affine maps."""
    x = np.asarray(x, dtype=np.float64)
    if affine:
        return (augment(x) @ m.T)[:, :-1]
    out: np.ndarray = x @ m.T
    return out


def composition_pairs(transform: str, values: Sequence[float]) -> np.ndarray:
    """(P, 3) indices (a, b, k), a <= b, neither the identity, with T_a T_b = T_k in ``values``."""
    ident = tf.identity(transform)
    vals = np.asarray(values, dtype=np.float64)
    out = []
    for a in range(len(vals)):
        for b in range(a, len(vals)):
            if vals[a] == ident or vals[b] == ident:
                continue
            want = tf.compose(transform, float(vals[a]), float(vals[b]))
            hits = np.flatnonzero(np.isclose(vals, want, rtol=1e-9, atol=1e-9))
            if len(hits):
                out.append((a, b, int(hits[0])))
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def linear_analysis(ref: np.ndarray, swept: np.ndarray, train: np.ndarray, test: np.ndarray, pairs: np.ndarray,
                    ridge: float, affine: bool) -> dict[str, np.ndarray]:
    """Linear maps of one layer: ``ref`` (N, d) features of the untransformed images, ``swept``
    (N, T, d); ``train`` / ``test`` image indices. Returns per theta the train, held-out and
    identity-map errors, and per pair the composition errors (see the module doc)."""
    t_count = swept.shape[1]
    xtr, xte = ref[train], ref[test]
    maps = []
    tr_err, te_err, id_err = np.zeros(t_count), np.zeros(t_count), np.zeros(t_count)
    for t in range(t_count):
        m = fit_map(xtr, swept[train, t], ridge, affine)
        maps.append(m)
        tr_err[t] = relative_error(swept[train, t], apply_map(m, xtr, affine))
        te_err[t] = relative_error(swept[test, t], apply_map(m, xte, affine))
        id_err[t] = relative_error(swept[test, t], xte)
    frob, comp, direct = np.zeros(len(pairs)), np.zeros(len(pairs)), np.zeros(len(pairs))
    for p, (a, b, k) in enumerate(pairs):
        mab = maps[a] @ maps[b]
        den = float(np.linalg.norm(maps[k]))
        frob[p] = float(np.linalg.norm(mab - maps[k])) / den if den > 0 else float("nan")
        comp[p] = relative_error(swept[test, k], apply_map(mab, xte, affine))
        direct[p] = te_err[k]
    return {"train": tr_err, "test": te_err, "identity": id_err, "frob": frob, "comp": comp, "direct": direct}


def split_indices(n: int, train_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(n)`` into sorted train and test indices (both non-empty for n >= 2)."""
    perm = np.random.default_rng(seed).permutation(n)
    k = min(n - 1, max(1, round(train_fraction * n)))
    return np.sort(perm[:k]), np.sort(perm[k:])


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------


def resolve_layers(backend: Any, params: ProbeParams) -> list[str]:
    """The probed layers: ``params.layers``, else the spec's, else the default spatial layers."""
    from engine.models.layers import default_layers

    if params.layers:
        layers = list(params.layers)
    elif backend.spec.layers:
        layers = list(backend.spec.layers)
    else:
        layers = default_layers(backend.layers())
    if not layers:
        raise ConvLensError(f"{backend.spec.path}: no layer to probe (name some with --layers)")
    backend.check_capture(layers)
    return layers


def probe_key(backend: Any, model_sha: str, image_set: Any, layers: Sequence[str], params: ProbeParams) -> str:
    return method_key(CACHE_KIND, FORMAT_VERSION, backend, model_sha, image_set.fingerprint(), params, list(layers))


def run(backend: Any, model_sha: str, image_set: Any, params: ProbeParams = ProbeParams(),
        *, cache: Cache | None = None) -> Job[ProbeResult]:
    """The transformation probe of ``image_set`` (a job; see the module doc)."""
    params.check()
    layers = resolve_layers(backend, params)
    key = probe_key(backend, model_sha, image_set, layers, params)
    result = yield from cached_job(cache, CACHE_KIND, key, load_result, save=save_result,
                                   found="transformation probe found in cache",
                                   compute=lambda: _compute(backend, model_sha, image_set, layers, params))
    if result.from_cache:
        return replace(result, params=params)  # the batch size is not in the key
    return result


def single_image_set(path: str) -> Any:
    """An image set of the one file ``path`` (its folder is the root), for probing one image."""
    import os

    from engine.data.images import IMAGE_EXTENSIONS, ImageError, ImageSet
    from engine.types import ImageRecord

    full = os.path.abspath(path)
    if not os.path.isfile(full):
        raise ImageError(full, "no such file")
    if Path(full).suffix.lower() not in IMAGE_EXTENSIONS:
        raise ImageError(full, f"not an image file (image extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ImageSet(os.path.dirname(full), (ImageRecord(full),))


def chosen_records(n: int, params: ProbeParams) -> np.ndarray:
    if params.max_images is None or params.max_images >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(params.seed)
    return np.sort(rng.choice(n, size=params.max_images, replace=False)).astype(np.int64)


def sweep_inputs(img: np.ndarray, params: ProbeParams, preprocess: Any, values: Sequence[float]) -> np.ndarray:
    """(len(values), C, H, W) model inputs of ``img`` transformed by each value."""
    from engine.data.images import preprocess as prep

    size = tuple(preprocess.input_size)
    return np.stack([prep(tf.apply(img, params.transform, v, params.fill, size, resize=preprocess.resize,
                                   crop_fraction=preprocess.crop_fraction), preprocess) for v in values])


def sweep_views(img: np.ndarray, transform: str, values: Sequence[float], fill: str, preprocess: Any) -> list[np.ndarray]:
    """What the model sees of ``img`` at each value: the transformed image resized as the
    model's preprocessing does, as uint8 RGB (for figures and the GUI strip)."""
    from PIL import Image

    from engine.data.images import _resize_cover_and_crop

    h, w = preprocess.input_size
    out = []
    for v in values:
        t = Image.fromarray(tf.apply(img, transform, v, fill, (h, w), resize=preprocess.resize,
                                     crop_fraction=preprocess.crop_fraction), "RGB")
        if preprocess.grayscale:
            t = t.convert("L").convert("RGB")
        if preprocess.resize == "shorter_side_crop":
            t = _resize_cover_and_crop(t, h, w, preprocess.crop_fraction)
        else:
            t = t.resize((w, h), Image.Resampling.BILINEAR)
        out.append(np.asarray(t, dtype=np.uint8))
    return out


class _Projector:
    """Flattened features, randomly projected (seeded Gaussian, 1/sqrt(k) scaled) when larger than k."""

    def __init__(self, dim: int, k: int, seed: int, layer_index: int) -> None:
        self.dim = dim
        self.matrix: np.ndarray | None = None
        if dim > k:
            rng = np.random.default_rng([seed, layer_index, dim])
            self.matrix = (rng.standard_normal((dim, k)) / math.sqrt(k)).astype(np.float32)

    @property
    def out_dim(self) -> int:
        return self.dim if self.matrix is None else self.matrix.shape[1]

    def __call__(self, flat: np.ndarray) -> np.ndarray:
        return flat if self.matrix is None else flat @ self.matrix


def _distances(full: np.ndarray) -> np.ndarray:
    """(n, S) ``||f[:, s] - f[:, 0]|| / ||f[:, 0]||`` of (n, S, D) features (NaN where f[:, 0] is 0)."""
    base = full[:, :1]
    num = np.linalg.norm((full - base).astype(np.float64), axis=2)
    den = np.linalg.norm(base.astype(np.float64), axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return d.astype(np.float32)


def class_probabilities(out: np.ndarray, scores: str = "auto") -> tuple[np.ndarray, str]:
    """(N, K) class probabilities of classifier outputs and how they were made (see
    :attr:`ProbeResult.score_kind`). One output (a binary classifier) gives two columns,
    ``1 - p`` and ``p``, with ``p`` the sigmoid of the logit or (``scores="probs"``, or ``auto``
    with every value in [0, 1]) the output itself."""
    from engine.predict import to_probabilities

    out = out.reshape(len(out), -1)
    if out.shape[1] == 1:
        rows = out[~np.isnan(out).any(axis=1)]
        given = scores == "probs" or (scores == "auto" and rows.size > 0 and bool(((rows >= -1e-6) & (rows <= 1 + 1e-6)).all()))
        with np.errstate(over="ignore"):
            p = out[:, 0].astype(np.float64) if given else 1.0 / (1.0 + np.exp(-out[:, 0].astype(np.float64)))
        return np.stack([1.0 - p, p], axis=1), "probs" if given else "sigmoid"
    p, kind = to_probabilities(out, scores)
    return p, "softmax" if kind == "logits" else kind


def _compute(backend: Any, model_sha: str, image_set: Any, layers: list[str], params: ProbeParams) -> Job[ProbeResult]:
    from engine.data.images import ImageError, load_image
    t0 = time.perf_counter()
    score_kind = "softmax"
    spec = backend.spec
    pre = spec.preprocess
    values = [float(v) for v in params.values]
    sweep = [tf.identity(params.transform), *values]  # column 0: the reference
    t_count = len(values)
    records = chosen_records(len(image_set.records), params)
    infos = {li.name: li for li in backend.layers()}
    shapes = [tuple(infos[name].shape) if name in infos else () for name in layers]

    dist: list[list[np.ndarray]] = [[] for _ in layers]
    input_dist: list[np.ndarray] = []
    pooled: list[list[np.ndarray]] = [[] for _ in layers]
    flats: list[list[np.ndarray]] = [[] for _ in layers]
    projectors: list[_Projector | None] = [None] * len(layers)
    preds, probs, ref_probs, ref_preds = [], [], [], []
    n_outputs = 0
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    per_chunk = max(1, params.batch_size // len(sweep))
    total = len(records)
    done = 0
    yield Progress(0.0, f"{params.transform}: {len(records)} images x {len(sweep)} values")
    for s in range(0, total, per_chunk):
        chunk = []
        for r in records[s:s + per_chunk]:
            path = image_set.records[int(r)].path
            try:
                img = load_image(path)
            except ImageError as e:
                skipped.append((e.path, e.cause))
                continue
            chunk.append((int(r), img))
        done += len(records[s:s + per_chunk])
        if not chunk:
            continue
        batch = np.concatenate([sweep_inputs(img, params, pre, sweep) for _r, img in chunk])
        input_dist.append(_distances(batch.reshape(len(chunk), len(sweep), -1))[:, 1:])
        outs, acts = [], {name: [] for name in layers}  # type: ignore[var-annotated]
        for b in range(0, len(batch), params.batch_size):
            res = backend.forward(batch[b:b + params.batch_size], layers)
            outs.append(backend.classifier_output(res))
            for name in layers:
                acts[name].append(res.activations[name])
        out = np.concatenate(outs).astype(np.float64)
        n_outputs = out.shape[1]
        p, score_kind = class_probabilities(out, spec.scores)
        p = p.reshape(len(chunk), len(sweep), -1)
        cls = p.argmax(axis=2)
        ref = cls[:, 0]
        preds.append(cls[:, 1:])
        probs.append(np.take_along_axis(p, cls[:, :, None], axis=2)[:, 1:, 0])
        ref_preds.append(ref)
        ref_probs.append(np.take_along_axis(p, np.broadcast_to(ref[:, None, None], (*cls.shape, 1)), axis=2)[:, 1:, 0])
        for li, name in enumerate(layers):
            raw = np.concatenate(acts[name]).astype(np.float32)
            raw = raw.reshape(len(chunk), len(sweep), *raw.shape[1:])
            full = raw.reshape(len(chunk), len(sweep), -1)
            units = raw.reshape(len(chunk), len(sweep), raw.shape[2], -1).mean(axis=3) if raw.ndim > 3 else full
            dist[li].append(_distances(full)[:, 1:])
            pooled[li].append(units.astype(np.float32))
            if params.features == "flat":
                if projectors[li] is None:
                    projectors[li] = _Projector(full.shape[2], params.projection, params.seed, li)
                proj = projectors[li]
                assert proj is not None
                flats[li].append(proj(full.reshape(-1, full.shape[2])).reshape(len(chunk), len(sweep), -1))
        kept += [r for r, _img in chunk]
        yield Progress(0.9 * done / max(1, total), f"{params.transform} sweep: {done}/{total} images")
    t1 = time.perf_counter()
    n = len(kept)
    if n == 0:
        raise ConvLensError(f"{image_set.source}: no image could be read for the probe")

    def cat(parts: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(shape, np.float32)

    pooled_all = [cat(pooled[li], (0, len(sweep), 0)) for li in range(len(layers))]
    feats = pooled_all if params.features == "pooled" else [cat(flats[li], (0, len(sweep), 0)) for li in range(len(layers))]
    dims = np.asarray([f.shape[2] for f in feats], dtype=np.int64)
    if params.features == "pooled":
        note = "pooled: the spatial mean of each unit (C numbers per image)"
    else:
        parts = []
        for li, name in enumerate(layers):
            proj = projectors[li]
            if proj is not None and proj.matrix is not None:
                parts.append(f"{name}: {proj.dim} -> {proj.out_dim} (random projection)")
            else:
                parts.append(f"{name}: {int(dims[li])}")
        note = "flat: the whole map flattened; " + ", ".join(parts)
    if affine_note := (" + a constant feature (affine maps)" if params.affine else ""):
        note += affine_note
    pairs = composition_pairs(params.transform, values)
    lin_tr = lin_te = lin_id = None
    n_train = n_test = 0
    frob = np.zeros((len(layers), len(pairs)))
    comp = np.zeros((len(layers), len(pairs)))
    direct = np.zeros((len(layers), len(pairs)))
    if n >= 3:
        train, test = split_indices(n, params.train_fraction, params.seed)
        n_train, n_test = len(train), len(test)
        lin_tr, lin_te, lin_id = (np.zeros((len(layers), t_count)) for _ in range(3))
        for li in range(len(layers)):
            f = feats[li].astype(np.float64)
            r = linear_analysis(f[:, 0], f[:, 1:], train, test, pairs, params.ridge, params.affine)
            lin_tr[li], lin_te[li], lin_id[li] = r["train"], r["test"], r["identity"]
            frob[li], comp[li], direct[li] = r["frob"], r["comp"], r["direct"]
            yield Progress(0.9 + 0.1 * (li + 1) / len(layers), f"linear maps at {layers[li]}")
    else:
        pairs = pairs[:0]
        frob, comp, direct = frob[:, :0], comp[:, :0], direct[:, :0]
    t2 = time.perf_counter()
    kept_arr = np.asarray(kept, dtype=np.int64)
    yield Progress(1.0, "done")
    return ProbeResult(
        model=spec.path, model_sha256=model_sha, image_source=image_set.root,
        paths=tuple(image_set.relative_path(image_set.records[int(i)]) for i in kept_arr), record_indices=kept_arr,
        class_names=_display_class_names(spec, n_outputs), params=params, layers=tuple(layers),
        layer_shapes=tuple(tuple(int(v) for v in s) for s in shapes), values=np.asarray(values, dtype=np.float64),
        distance=np.stack([cat(dist[li], (0, t_count)) for li in range(len(layers))]),
        input_distance=cat(input_dist, (0, t_count)),
        pred=np.concatenate(preds).astype(np.int64), prob=np.concatenate(probs).astype(np.float32),
        ref_pred=np.concatenate(ref_preds).astype(np.int64), ref_prob=np.concatenate(ref_probs).astype(np.float32),
        pooled=tuple(np.ascontiguousarray(p[:, 1:]) for p in pooled_all),
        pooled_ref=tuple(np.ascontiguousarray(p[:, 0]) for p in pooled_all),
        feature_dims=dims, feature_note=note, n_train=n_train, n_test=n_test,
        lin_train=lin_tr, lin_test=lin_te, lin_identity=lin_id, comp_pairs=pairs, comp_frob=frob, comp_test=comp,
        comp_direct=direct, seconds={"sweep": t1 - t0, "linear_maps": t2 - t1, "total": t2 - t0},
        skipped=tuple(skipped), score_kind=score_kind)


# --------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------

_ARRAYS: dict[str, tuple[Any, tuple[int | None, ...]]] = {
    "record_indices": (np.int64, (None,)), "values": (np.float64, (None,)),
    "distance": (np.float32, (None, None, None)), "input_distance": (np.float32, (None, None)),
    "pred": (np.int64, (None, None)), "prob": (np.float32, (None, None)),
    "ref_pred": (np.int64, (None,)), "ref_prob": (np.float32, (None, None)), "feature_dims": (np.int64, (None,)),
    "comp_pairs": (np.int64, (None, 3)), "comp_frob": (np.float64, (None, None)),
    "comp_test": (np.float64, (None, None)), "comp_direct": (np.float64, (None, None)),
}
_LINEAR = ("lin_train", "lin_test", "lin_identity")
_META = ("model", "model_sha256", "image_source", "paths", "class_names", "params", "layers", "layer_shapes",
         "feature_note", "n_train", "n_test", "has_linear", "seconds", "skipped")


def save_result(result: ProbeResult, folder: str | Path) -> None:
    """``.npy`` arrays and ``meta.json`` (written last) into ``folder``; no pickle."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (dtype, _shape) in _ARRAYS.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(getattr(result, name), dtype=dtype), allow_pickle=False)
    for name in _LINEAR:
        v = getattr(result, name)
        if v is not None:
            np.save(folder / f"{name}.npy", np.ascontiguousarray(v, dtype=np.float64), allow_pickle=False)
    for i, (p, r) in enumerate(zip(result.pooled, result.pooled_ref, strict=True)):
        np.save(folder / f"pooled_{i}.npy", np.ascontiguousarray(p, dtype=np.float32), allow_pickle=False)
        np.save(folder / f"pooled_ref_{i}.npy", np.ascontiguousarray(r, dtype=np.float32), allow_pickle=False)
    meta: dict[str, Any] = {"version": FORMAT_VERSION, "kind": CACHE_KIND, "model": result.model,
                            "model_sha256": result.model_sha256, "image_source": result.image_source,
                            "paths": list(result.paths),
                            "class_names": list(result.class_names) if result.class_names is not None else None,
                            "params": result.params.result_key() | {"batch_size": result.params.batch_size},
                            "layers": list(result.layers), "layer_shapes": [list(s) for s in result.layer_shapes],
                            "feature_note": result.feature_note, "n_train": result.n_train, "n_test": result.n_test,
                            "has_linear": result.lin_test is not None, "seconds": result.seconds,
                            "skipped": [list(s) for s in result.skipped], "score_kind": result.score_kind}
    write_meta(folder, json.loads(json.dumps(meta)))


def load_result(folder: str | Path) -> ProbeResult:
    """Read :func:`save_result`'s folder; :class:`~engine.cache.DamagedEntry` when anything is
    missing, truncated, of another format version or inconsistent."""
    folder = Path(folder)
    meta = check_meta(folder, FORMAT_VERSION, _META)
    shapes = {name: check_array(folder, name, dtype, shape) for name, (dtype, shape) in _ARRAYS.items()}
    try:
        layers = tuple(str(x) for x in meta["layers"])
        n, t, n_l = len(meta["paths"]), shapes["values"][0], len(layers)
        p_count = shapes["comp_pairs"][0]
        want = {"record_indices": (n,), "distance": (n_l, n, t), "input_distance": (n, t), "pred": (n, t), "prob": (n, t), "ref_pred": (n,),
                "ref_prob": (n, t), "feature_dims": (n_l,), "comp_frob": (n_l, p_count), "comp_test": (n_l, p_count),
                "comp_direct": (n_l, p_count)}
        bad = [k for k, v in want.items() if shapes[k] != v]
        lin_shapes = {k: check_array(folder, k, np.float64, (n_l, t)) for k in _LINEAR} if meta["has_linear"] else {}
        pooled_shapes = [(check_array(folder, f"pooled_{i}", np.float32, (n, t, None)),
                          check_array(folder, f"pooled_ref_{i}", np.float32, (n, None))) for i in range(n_l)]
        bad += [f"pooled_{i}" for i, (a, b) in enumerate(pooled_shapes) if a[2] != b[1]]
        if bad or len(meta["layer_shapes"]) != n_l:
            raise DamagedEntry(f"{folder}: arrays of inconsistent sizes ({', '.join(bad) or 'layer_shapes'})")
        arrays = {name: np.array(load_array(folder, name)) for name in _ARRAYS}
        lin = {k: np.array(load_array(folder, k)) for k in lin_shapes} if lin_shapes else dict.fromkeys(_LINEAR)
        pfields = {f.name for f in fields(ProbeParams)}
        pd = {k: v for k, v in meta["params"].items() if k in pfields}
        pd["values"] = tuple(float(v) for v in pd.get("values", ()))
        pd["layers"] = tuple(pd.get("layers", ()))
        return ProbeResult(
            model=meta["model"], model_sha256=meta["model_sha256"], image_source=meta["image_source"],
            paths=tuple(meta["paths"]),
            class_names=tuple(meta["class_names"]) if meta["class_names"] is not None else None,
            params=ProbeParams(**pd), layers=layers, layer_shapes=tuple(tuple(s) for s in meta["layer_shapes"]),
            pooled=tuple(np.array(load_array(folder, f"pooled_{i}")) for i in range(n_l)),
            pooled_ref=tuple(np.array(load_array(folder, f"pooled_ref_{i}")) for i in range(n_l)),
            feature_note=meta["feature_note"], n_train=int(meta["n_train"]), n_test=int(meta["n_test"]),
            seconds=meta["seconds"], skipped=tuple(tuple(s) for s in meta["skipped"]),
            score_kind=str(meta.get("score_kind", "softmax")),
            lin_train=lin["lin_train"], lin_test=lin["lin_test"], lin_identity=lin["lin_identity"],
            **arrays)  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError) as e:
        raise DamagedEntry(f"{folder}: meta.json does not describe a probe result ({e})") from e


def _display_class_names(spec: Any, n_outputs: int) -> tuple[str, ...] | None:
    from engine.predict import display_class_names

    return display_class_names(spec, n_outputs)
