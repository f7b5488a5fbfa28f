"""Inference graphs (Konforti et al., ECCV 2020): fit the dictionaries, explain a class or image.

:func:`run` (the fit job) extracts the chosen layers over an image set (through the activation
cache), fits one diagonal GMM per layer over its spatial columns (:mod:`engine.graphs.gmm`,
streamed from the cached float16 maps, so the columns never have to fit in memory), assigns
every column its visual word, keeps each word's best columns (their receptive fields are the
word's patches), and counts the transitions between consecutive layers
(:mod:`engine.graphs.transitions`); the class layer's word is the predicted class. The result,
:class:`GraphFit`, is cached (kind ``"graphs"``). :func:`explain` turns a fit into the graph of a
class (the images predicted as that class) or of one image, a :class:`GraphExplanation` with
node and edge lists, convertible to a networkx DiGraph.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.cache import Cache, DamagedEntry, check_array, load_array, make_key, read_meta, write_meta
from engine.data.images import ImageSet
from engine.jobs import Job, subjob
from engine.types import ConvLensError, LayerInfo, Progress

from .gmm import EMSettings, Mixture, assign, fit_gmm
from .transitions import TransitionTable, build_graph, transition_counts, window_bounds

log = logging.getLogger("convlens.graphs")

CACHE_KIND = "graphs"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class GraphParams:
    """Settings of a fit.

    ``k``: components per modelled layer (empty: :func:`default_k` for each; one value: every
    layer). ``max_iter`` / ``tol``: EM stops after ``max_iter`` iterations or when the mean
    log-likelihood per column improves by less than ``tol``. ``var_floor``: variances are at
    least ``var_floor`` times the layer's own per-channel variance (and at least ``reg``).
    ``init_sample``: columns sampled for the k-means++ initialisation. ``dtype``: float32 or
    float64 arithmetic (statistics are summed in float64 either way). ``top_patches``: best
    columns kept per word. ``seed``: initialisation. ``batch_columns`` (columns per EM batch)
    and ``device`` (None: CUDA when available) do not change the result beyond rounding.
    """

    k: tuple[int, ...] = ()
    max_iter: int = 100
    tol: float = 1e-3
    var_floor: float = 1e-3
    reg: float = 1e-6
    init_sample: int = 20000
    dtype: str = "float32"
    top_patches: int = 16
    seed: int = 0
    batch_columns: int = 65536
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["k"] = list(self.k)
        return d

    def result_key(self) -> dict[str, Any]:
        d = self.to_dict()
        del d["batch_columns"], d["device"]
        return d

    def check(self) -> None:
        if any(int(k) < 1 for k in self.k):
            raise ConvLensError(f"k must be >= 1 per layer, got {list(self.k)}")
        if self.max_iter < 1 or self.top_patches < 1 or self.init_sample < 1 or self.batch_columns < 1:
            raise ConvLensError("max_iter, top_patches, init_sample and batch_columns must be >= 1")
        if not (math.isfinite(self.tol) and self.tol >= 0):
            raise ConvLensError(f"tol must be a number >= 0, got {self.tol}")
        if not (self.var_floor >= 0 and self.reg > 0 and math.isfinite(self.var_floor)):
            raise ConvLensError(f"var_floor must be >= 0 and reg > 0, got {self.var_floor} and {self.reg}")
        if self.dtype not in ("float32", "float64"):
            raise ConvLensError(f"dtype must be float32 or float64, got {self.dtype!r}")

    def ks(self, infos: Sequence[LayerInfo]) -> list[int]:
        if not self.k:
            return [default_k(li) for li in infos]
        if len(self.k) == 1:
            return [int(self.k[0])] * len(infos)
        if len(self.k) != len(infos):
            raise ConvLensError(f"{len(self.k)} values of k for {len(infos)} layers "
                                f"({', '.join(li.name for li in infos)}): give one per layer, or one for all")
        return [int(k) for k in self.k]


def default_k(info: LayerInfo) -> int:
    """Components for a layer of C channels: ``min(32, max(4, C // 2))`` (the paper uses 500 on
    VGG-scale layers and many images; a few dozen suit a few hundred images)."""
    return min(32, max(4, info.units // 2))


@dataclass
class LayerModel:
    """One modelled layer: its mixture, words and best columns.

    ``words`` (N, h, w) int32: each column's visual word (-1 for unreadable images).
    ``top_columns`` (K, M, 3) int64: ``(image, i, j)`` of the word's best columns (highest
    ``log w_k N(x | k)`` among the columns assigned to k), best first, -1 pads; ``top_scores``
    (K, M) those values. ``counts`` (K,): columns per word. ``rf``: receptive field geometry
    ``{"size", "stride", "offset", "is_global"}`` in input pixels.
    """

    name: str
    shape: tuple[int, int, int]
    mixture: Mixture
    loglik: list[float]
    final_loglik: float
    n_iter: int
    converged: bool
    words: np.ndarray
    top_columns: np.ndarray
    top_scores: np.ndarray
    counts: np.ndarray
    rf: dict[str, Any]

    @property
    def k(self) -> int:
        return self.mixture.k

    def patch_boxes(self, word: int, input_size: tuple[int, int], m: int | None = None) -> list[dict[str, Any]]:
        """The receptive-field boxes ``{"image", "box": [top, left, bottom, right]}`` (input
        pixels, clipped to the image) of ``word``'s best columns."""
        out = []
        for img, i, j in self.top_columns[word][: m or None]:
            if img < 0:
                break
            out.append({"image": int(img), "box": list(_clipped_box(self.rf, int(i), int(j), input_size))})
        return out


def _clipped_box(rf: dict[str, Any], i: int, j: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    from engine.models.receptive import ReceptiveField

    f = ReceptiveField(tuple(rf["size"]), tuple(rf["stride"]), tuple(rf["offset"]), bool(rf["is_global"]))
    if f.is_global:
        return (0, 0, size[0], size[1])
    return f.clipped_box(i, j, size)


@dataclass
class GraphFit:
    """A fitted inference-graph model (plain data).

    ``layers`` lowest first; ``pair_counts[j]`` the transition counts (K_upper, K_lower) between
    ``layers[j + 1]`` (the class layer for the last) and ``layers[j]``, with ``pair_bounds[j]``
    the receptive-field windows (rows, cols) used (None for the class pair). ``predicted`` (N,):
    each image's predicted class (-1 unreadable), ``class_scores`` (N,) its output for that class.
    """

    model: str
    model_sha256: str
    backend: str
    image_root: str
    image_paths: tuple[str, ...]
    classes: tuple[str, ...]
    input_size: tuple[int, int]
    preprocess: dict[str, Any]
    params: GraphParams
    layers: list[LayerModel]
    predicted: np.ndarray
    class_scores: np.ndarray
    pair_counts: list[np.ndarray]
    pair_bounds: list[tuple[np.ndarray, np.ndarray] | None]
    seconds: dict[str, float] = field(default_factory=dict)
    from_cache: bool = False

    @property
    def layer_names(self) -> list[str]:
        return [lm.name for lm in self.layers]

    def tables(self) -> list[TransitionTable]:
        return [TransitionTable.of(c) for c in self.pair_counts]

    def class_index(self, name: str) -> int:
        if name in self.classes:
            return self.classes.index(name)
        if name.strip().lstrip("-").isdigit() and 0 <= int(name) < len(self.classes):
            return int(name)
        raise ConvLensError(f"no class {name!r} (classes: {', '.join(self.classes)})")

    def image_index(self, path: str | Path) -> int | None:
        p = Path(path)
        want = {str(p), str(p.resolve())} if p.exists() else {str(p)}
        for i, q in enumerate(self.image_paths):
            if q in want or str(Path(q).resolve()) in want:
                return i
        return None


# ----------------------------------------------------------------------------- the fit job


@dataclass
class LayerColumns:
    """The spatial columns of one layer's cached maps (N, C, h, w), valid images only, as rows
    of C float32 values, ``batch_rows`` at a time (whole images). Row ``r`` is position
    ``r % (h w)`` (row-major) of image ``images[r // (h w)]``."""

    maps: np.ndarray
    images: np.ndarray
    batch_rows: int = 65536

    @property
    def dim(self) -> int:
        return int(self.maps.shape[1])

    @property
    def hw(self) -> int:
        return int(self.maps.shape[2] * self.maps.shape[3])

    @property
    def batch(self) -> int:
        return max(1, self.batch_rows // self.hw) * self.hw

    def __len__(self) -> int:
        return len(self.images) * self.hw

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        per = max(1, self.batch_rows // self.hw)
        c = self.dim
        for lo in range(0, len(self.images), per):
            ii = self.images[lo:lo + per]
            if ii[-1] - ii[0] == len(ii) - 1:  # contiguous: a slice of the memory map
                block = self.maps[ii[0]:ii[-1] + 1]
            else:
                block = self.maps[ii]
            rows = np.asarray(block, dtype=np.float32).transpose(0, 2, 3, 1).reshape(-1, c)
            yield lo * self.hw, rows


def graph_key(backend: Any, model_sha: str, image_set: ImageSet, layers: Sequence[str], params: GraphParams) -> str:
    """Cache key: the model (content hash, architecture, preprocessing, output index, backend),
    the image set's fingerprint, the layers and the result-changing parameters."""
    spec = backend.spec
    return make_key(CACHE_KIND, FORMAT_VERSION, model_sha, spec.arch, spec.preprocess, spec.output_index,
                    backend.name, image_set.fingerprint(), list(layers), params.result_key())


def _device(params: GraphParams) -> str:
    if params.device:
        return params.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _rf_dict(rf: Any) -> dict[str, Any]:
    return {"size": list(rf.size), "stride": list(rf.stride), "offset": list(rf.offset),
            "is_global": bool(rf.is_global)}


def run(
    backend: Any,
    model_sha: str,
    image_set: ImageSet,
    layers: Sequence[str],
    params: GraphParams = GraphParams(),
    *,
    cache: Cache | None = None,
    batch_size: int = 64,
) -> Job[GraphFit]:
    """Fit the inference-graph model of ``layers`` (lowest first) over ``image_set`` (a job).

    Yields Progress at least once per EM batch; returns a :class:`GraphFit`. A complete earlier
    fit with the same key comes from the cache; a cancelled fit (``gen.close()``) writes nothing.
    """
    from engine.activations import extract
    from engine.models.receptive import layer_receptive_field
    from engine.predict import class_names

    params.check()
    cache = cache if cache is not None else Cache()
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ConvLensError("name at least one spatial layer to model")
    known = {li.name: li for li in backend.layers()}
    infos = []
    for name in layers:
        if name not in known:
            raise ConvLensError(f"{backend.spec.path}: no layer '{name}' (see convlens info)")
        if not known[name].is_spatial:
            raise ConvLensError(f"{backend.spec.path}: layer '{name}' has shape {known[name].shape}, not "
                                "(C, H, W): only spatial layers have columns to model")
        infos.append(known[name])
    ks = params.ks(infos)
    key = graph_key(backend, model_sha, image_set, layers, params)
    found = cache.get(CACHE_KIND, key)
    if found is not None:
        try:
            hit = load_result(found)
        except DamagedEntry as e:
            log.warning("damaged cache entry discarded, recomputing: %s", e)
            cache.discard(CACHE_KIND, key)
        else:
            yield Progress(1.0, "inference-graph fit found in cache")
            return dataclasses.replace(hit, params=params, from_cache=True)

    t0 = time.perf_counter()
    rfs = {name: layer_receptive_field(backend, name) for name in layers}
    acts = yield from subjob(extract(backend, model_sha, image_set, layers, batch_size=batch_size, cache=cache),
                             0.0, 0.1, "extract: ")
    seconds = {"extract": time.perf_counter() - t0}
    valid = np.asarray(acts.valid)
    images = np.flatnonzero(valid)
    if len(images) == 0:
        raise ConvLensError(f"{image_set.source}: none of the images could be read")
    outputs = np.asarray(acts.outputs, dtype=np.float32)
    classes = class_names(backend.spec, outputs.shape[1])
    predicted = np.full(len(valid), -1, dtype=np.int64)
    predicted[images] = outputs[images].argmax(1)
    class_scores = np.full(len(valid), np.nan, dtype=np.float32)
    class_scores[images] = outputs[images, predicted[images]]
    device = _device(params)
    models: list[LayerModel] = []
    span = 0.9 / len(layers)
    for li_, (info, k) in enumerate(zip(infos, ks, strict=True)):
        t1 = time.perf_counter()
        maps = acts.maps(info.name)
        src = LayerColumns(maps, images, params.batch_columns)
        settings = EMSettings(k=k, max_iter=params.max_iter, tol=params.tol, var_floor=params.var_floor,
                              reg=params.reg, init_sample=params.init_sample, dtype=params.dtype,
                              seed=params.seed, device=device)
        start = 0.1 + li_ * span
        fit = yield from subjob(fit_gmm(src, settings, what=info.name), start, start + 0.9 * span)
        asg = yield from subjob(assign(src, fit.mixture, params.top_patches, dtype=params.dtype, device=device,
                                       what=info.name), start + 0.9 * span, start + span)
        _c, h, w = maps.shape[1:]
        words = np.full((len(valid), h, w), -1, dtype=np.int32)
        words[images] = asg.words.reshape(len(images), h, w)
        rows = asg.top_rows
        top = np.full((*rows.shape, 3), -1, dtype=np.int64)
        ok = rows >= 0
        pos = rows[ok] % (h * w)
        top[ok] = np.stack([images[rows[ok] // (h * w)], pos // w, pos % w], 1)
        models.append(LayerModel(info.name, (int(maps.shape[1]), int(h), int(w)), fit.mixture, fit.loglik,
                                 fit.final_loglik, fit.n_iter, fit.converged, words, top, asg.top_scores,
                                 asg.counts, _rf_dict(rfs[info.name])))
        seconds[f"fit[{info.name}]"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    counts, bounds = _pair_counts(models, predicted, len(classes))
    seconds["transitions"] = time.perf_counter() - t2
    seconds["total"] = time.perf_counter() - t0
    result = GraphFit(
        model=backend.spec.path, model_sha256=model_sha, backend=backend.name, image_root=str(image_set.source),
        image_paths=tuple(r.path for r in image_set.records), classes=tuple(classes),
        input_size=tuple(backend.spec.preprocess.input_size), preprocess=backend.spec.preprocess.to_dict(),
        params=params, layers=models, predicted=predicted, class_scores=class_scores,
        pair_counts=counts, pair_bounds=bounds, seconds=seconds,
    )
    with cache.write(CACHE_KIND, key) as tmp:
        save_result(result, tmp)
    yield Progress(1.0, "; ".join(f"{m.name}: K={m.k}, {m.n_iter} EM iterations, log-likelihood "
                                  f"{m.final_loglik:.3f}" for m in models))
    return result


def _rf_object(rf: dict[str, Any]) -> Any:
    from engine.models.receptive import ReceptiveField

    return ReceptiveField(tuple(rf["size"]), tuple(rf["stride"]), tuple(rf["offset"]), bool(rf["is_global"]))


def _pair_counts(models: Sequence[LayerModel], predicted: np.ndarray, n_classes: int,
                 images: Sequence[int] | np.ndarray | None = None) -> tuple[list[np.ndarray], list[Any]]:
    counts: list[np.ndarray] = []
    bounds: list[Any] = []
    for j, low in enumerate(models):
        if j + 1 < len(models):
            up = models[j + 1]
            b = window_bounds(_rf_object(up.rf), _rf_object(low.rf), up.shape[1:], low.shape[1:])
            counts.append(transition_counts(up.words, low.words, b, up.k, low.k, images))
        else:
            b = None
            counts.append(transition_counts(predicted, low.words, None, n_classes, low.k, images))
        bounds.append(b)
    return counts, bounds


# ----------------------------------------------------------------------------- explanations


@dataclass
class GraphExplanation:
    """An inference graph: ``nodes`` (dicts with ``id`` and the attributes of
    :func:`~engine.graphs.transitions.build_graph`, plus ``patches``: the word's best receptive
    fields ``{"image", "path", "box"}``) and ``edges`` (dicts with ``source``, ``target`` and the
    edge attributes). ``kind`` is ``"class"`` or ``"image"``; ``target`` the class name or image
    path; ``images`` how many images the local counts come from."""

    kind: str
    target: str
    class_name: str
    class_index: int
    layers: list[str]
    n: int
    images: int
    nodes: list[dict[str, Any]]
    edges: list[dict[str, Any]]
    input_size: tuple[int, int] = (0, 0)

    def to_networkx(self) -> Any:
        import networkx as nx

        g = nx.DiGraph(kind=self.kind, target=self.target, class_name=self.class_name,
                       layers=",".join(self.layers), n=self.n, images=self.images)
        for nd in self.nodes:
            g.add_node(nd["id"], **{k: v for k, v in nd.items() if k != "id"})
        for e in self.edges:
            g.add_edge(e["source"], e["target"], **{k: v for k, v in e.items() if k not in ("source", "target")})
        return g

    def node_link(self) -> dict[str, Any]:
        """JSON node-link data (networkx's format, ``edges`` key) with the graph's settings."""
        import networkx as nx

        d = nx.node_link_data(self.to_networkx(), edges="edges")
        d["graph"].update({"layers": list(self.layers), "input_size": list(self.input_size)})
        return d

    def write(self, folder: str | Path) -> list[Path]:
        """``graph.json`` (node-link) and ``graph.graphml`` (every node has ``layer``; list
        attributes such as ``patches`` are JSON strings there) into ``folder``."""
        import networkx as nx

        from engine.cache import atomic_write_text

        folder = Path(folder)
        out = [atomic_write_text(folder / "graph.json", json.dumps(self.node_link(), indent=1) + "\n")]
        g = self.to_networkx()
        for _n, attrs in g.nodes(data=True):
            for k, v in list(attrs.items()):
                if not isinstance(v, str | int | float | bool):
                    attrs[k] = json.dumps(v)
        text = "\n".join(nx.generate_graphml(g)) + "\n"
        out.append(atomic_write_text(folder / "graph.graphml", text))
        return out


def image_words(fit: GraphFit, backend: Any, path: str | Path) -> tuple[list[np.ndarray], int, float]:
    """Words of one image outside the fit set: the model run on it, each column assigned to
    its word under the fitted mixtures. Returns (per layer (1, h, w) words, predicted class,
    its output)."""
    from engine.data.images import load_image, preprocess
    from engine.types import Preprocess

    pre = Preprocess(**{**fit.preprocess, "input_size": tuple(fit.preprocess["input_size"]),
                        "mean": tuple(fit.preprocess["mean"]), "std": tuple(fit.preprocess["std"])})
    x = preprocess(load_image(path), pre)[None]
    res = backend.forward(x, fit.layer_names)
    out = backend.classifier_output(res)[0]
    words = []
    for lm in fit.layers:
        a = np.asarray(res.activations[lm.name], dtype=np.float32)[0]  # (C, h, w)
        cols = a.reshape(a.shape[0], -1).T
        words.append(lm.mixture.log_joint(cols).argmax(1).astype(np.int32).reshape(1, *a.shape[1:]))
    c = int(np.argmax(out))
    return words, c, float(out[c])


def explain(fit: GraphFit, *, class_name: str | None = None, image: str | Path | None = None,
            n: int = 3, patches: int = 8, backend: Any = None) -> GraphExplanation:
    """The inference graph of a class (local counts over the images predicted as it) or of one
    image (an image of the fit set, or any image file when ``backend`` runs the model), with at
    most ``n`` nodes per layer and ``patches`` patches per node."""
    if (class_name is None) == (image is None):
        raise ConvLensError("explain a class or an image (one of them)")
    if n < 1 or patches < 0:
        raise ConvLensError(f"n must be >= 1 and patches >= 0, got {n} and {patches}")
    tables = fit.tables()
    names = fit.layer_names
    if class_name is not None:
        ci = fit.class_index(class_name)
        idx = np.flatnonzero(fit.predicted == ci)
        if len(idx) == 0:
            raise ConvLensError(f"no image of {fit.image_root} is predicted as '{fit.classes[ci]}': "
                                "nothing to explain")
        local, _ = _pair_counts(fit.layers, fit.predicted, len(fit.classes), idx)
        kind, target, count = "class", fit.classes[ci], len(idx)
    else:
        i = fit.image_index(image)  # type: ignore[arg-type]
        if i is not None:
            if fit.predicted[i] < 0:
                raise ConvLensError(f"{image}: the image could not be read when the fit ran")
            ci = int(fit.predicted[i])
            local, _ = _pair_counts(fit.layers, fit.predicted, len(fit.classes), [i])
        else:
            if backend is None:
                raise ConvLensError(f"{image}: not an image of the fit ({fit.image_root}); give the model "
                                    "to explain another image")
            words, ci, _score = image_words(fit, backend, image)  # type: ignore[arg-type]
            one = [dataclasses.replace(lm, words=w) for lm, w in zip(fit.layers, words, strict=True)]
            local, _ = _pair_counts(one, np.array([ci]), len(fit.classes))
        kind, target, count = "image", str(image), 1

    def extra(layer_index: int, word: int) -> dict[str, Any]:
        if layer_index == len(names):  # the class node: its best-scored images, whole
            cls_idx = np.flatnonzero(fit.predicted == word)
            order = cls_idx[np.argsort(-fit.class_scores[cls_idx], kind="stable")][:patches]
            whole = [0, 0, fit.input_size[0], fit.input_size[1]]
            boxes: list[dict[str, Any]] = [{"image": int(j), "box": list(whole)} for j in order]
        else:
            boxes = fit.layers[layer_index].patch_boxes(word, fit.input_size, patches) if patches else []
        for b in boxes:
            b["path"] = fit.image_paths[int(b["image"])]
        lm = fit.layers[layer_index] if layer_index < len(names) else None
        return {"patches": boxes[:patches],
                "columns": int(lm.counts[word]) if lm is not None else int((fit.predicted == word).sum())}

    g = build_graph(names, fit.classes[ci], ci, tables, local, n, extra)
    nodes = [{"id": k, **v} for k, v in g.nodes(data=True)]
    edges = [{"source": a, "target": b, **v} for a, b, v in g.edges(data=True)]
    return GraphExplanation(kind, target, fit.classes[ci], ci, names, n, count, nodes, edges,
                            (int(fit.input_size[0]), int(fit.input_size[1])))


# ----------------------------------------------------------------------------- storage


def save_result(result: GraphFit, folder: str | Path) -> Path:
    """Write ``result`` into ``folder``: ``.npy`` arrays, ``meta.json`` last (no pickle)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    layers = []
    for i, lm in enumerate(result.layers):
        s = f"layer{i}"
        np.save(folder / f"{s}_weights.npy", np.asarray(lm.mixture.weights, np.float64))
        np.save(folder / f"{s}_means.npy", np.asarray(lm.mixture.means, np.float64))
        np.save(folder / f"{s}_variances.npy", np.asarray(lm.mixture.variances, np.float64))
        np.save(folder / f"{s}_words.npy", np.asarray(lm.words, np.int32))
        np.save(folder / f"{s}_top_columns.npy", np.asarray(lm.top_columns, np.int64))
        np.save(folder / f"{s}_top_scores.npy", np.asarray(lm.top_scores, np.float64))
        np.save(folder / f"{s}_counts.npy", np.asarray(lm.counts, np.int64))
        layers.append({"name": lm.name, "stem": s, "shape": list(lm.shape), "k": lm.k, "loglik": lm.loglik,
                       "final_loglik": lm.final_loglik, "n_iter": lm.n_iter, "converged": lm.converged,
                       "rf": lm.rf})
    for j, (c, b) in enumerate(zip(result.pair_counts, result.pair_bounds, strict=True)):
        np.save(folder / f"pair{j}_counts.npy", np.asarray(c, np.int64))
        if b is not None:
            np.save(folder / f"pair{j}_rows.npy", np.asarray(b[0], np.int64))
            np.save(folder / f"pair{j}_cols.npy", np.asarray(b[1], np.int64))
    np.save(folder / "predicted.npy", np.asarray(result.predicted, np.int64))
    np.save(folder / "class_scores.npy", np.asarray(result.class_scores, np.float32))
    write_meta(folder, {
        "version": FORMAT_VERSION, "kind": CACHE_KIND, "model": result.model,
        "model_sha256": result.model_sha256, "backend": result.backend, "image_root": result.image_root,
        "image_paths": list(result.image_paths), "classes": list(result.classes),
        "input_size": list(result.input_size), "preprocess": result.preprocess,
        "params": result.params.to_dict(), "layers": layers, "seconds": result.seconds,
    })
    return folder


def load_result(folder: str | Path) -> GraphFit:
    """Read a fit written by :func:`save_result`; :class:`DamagedEntry` naming the folder for
    anything unreadable, of another format or inconsistent."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except (OSError, ValueError) as e:
        raise DamagedEntry(f"{folder}: not an inference-graph fit ({e})") from e
    if not isinstance(meta, dict) or meta.get("kind") != CACHE_KIND:
        raise DamagedEntry(f"{folder}: not an inference-graph fit (meta.json is not one)")
    if meta.get("version") != FORMAT_VERSION:
        raise DamagedEntry(f"{folder}: inference-graph format {meta.get('version')}, expected {FORMAT_VERSION}")
    try:
        return _read(folder, meta)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise DamagedEntry(f"{folder}: inconsistent inference-graph fit ({type(e).__name__}: {e})") from e


def _read(folder: Path, meta: dict[str, Any]) -> GraphFit:
    p = dict(meta["params"])
    p["k"] = tuple(int(k) for k in p["k"])
    params = GraphParams(**p)
    paths = tuple(str(x) for x in meta["image_paths"])
    n_img, classes = len(paths), tuple(str(c) for c in meta["classes"])

    def arr(name: str, dtype: Any, shape: tuple[int | None, ...]) -> np.ndarray:
        check_array(folder, name, dtype, shape)
        return load_array(folder, name, mmap=False)

    layers = []
    for e in meta["layers"]:
        s, k = str(e["stem"]), int(e["k"])
        c, h, w = (int(x) for x in e["shape"])
        m = arr(f"{s}_top_scores", np.float64, (k, None)).shape[1]
        layers.append(LayerModel(
            name=str(e["name"]), shape=(c, h, w),
            mixture=Mixture(arr(f"{s}_weights", np.float64, (k,)), arr(f"{s}_means", np.float64, (k, c)),
                            arr(f"{s}_variances", np.float64, (k, c))),
            loglik=[float(v) for v in e["loglik"]], final_loglik=float(e["final_loglik"]),
            n_iter=int(e["n_iter"]), converged=bool(e["converged"]),
            words=arr(f"{s}_words", np.int32, (n_img, h, w)),
            top_columns=arr(f"{s}_top_columns", np.int64, (k, m, 3)),
            top_scores=load_array(folder, f"{s}_top_scores", mmap=False),
            counts=arr(f"{s}_counts", np.int64, (k,)), rf=dict(e["rf"])))
    counts: list[np.ndarray] = []
    bounds: list[tuple[np.ndarray, np.ndarray] | None] = []
    for j, lm in enumerate(layers):
        up_k = layers[j + 1].k if j + 1 < len(layers) else len(classes)
        counts.append(arr(f"pair{j}_counts", np.int64, (up_k, lm.k)))
        if j + 1 < len(layers):
            hu, wu = layers[j + 1].shape[1:]
            bounds.append((arr(f"pair{j}_rows", np.int64, (hu, 2)), arr(f"pair{j}_cols", np.int64, (wu, 2))))
        else:
            bounds.append(None)
    return GraphFit(
        model=str(meta["model"]), model_sha256=str(meta["model_sha256"]), backend=str(meta["backend"]),
        image_root=str(meta["image_root"]), image_paths=paths, classes=classes,
        input_size=(int(meta["input_size"][0]), int(meta["input_size"][1])), preprocess=dict(meta["preprocess"]),
        params=params, layers=layers, predicted=arr("predicted", np.int64, (n_img,)),
        class_scores=arr("class_scores", np.float32, (n_img,)), pair_counts=counts, pair_bounds=bounds,
        seconds={str(k): float(v) for k, v in meta["seconds"].items()},
    )
