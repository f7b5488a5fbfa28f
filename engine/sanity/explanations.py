"""The explanations the sanity check can recompute on a randomised model, each a small adapter:
``compute(backend, inputs, cache) -> value`` (the explanation of the model behind ``backend``)
and ``compare(original, other) -> {metric: per-item values}``.

* maps (one (H, W) map per image, compared image by image with Spearman rank correlation of the
  absolute and signed maps and SSIM): the class evidence methods of :mod:`engine.evidence`
  (``gradcam``, ``saliency``, ``guided_backprop``, ``ig``, ``occlusion``) for the original
  model's predicted class, and ``heatmap``: the activation map of one unit of a layer
  (upsampled bilinearly to the input size, as the heatmap view overlays it);
* ``dissection``: Network Dissection labels of a layer's units on a small built-in concept set
  (``label_agreement`` per unit, and the Spearman correlation of the units' best IoU);
* ``polytope``: the polytope gallery of every image (``jaccard`` of the gallery per image);
* ``filters``: the per-filter metrics of a layer (Spearman correlation over filters of each
  metric: ``loss``, ``inter``, ``spatial``);
* ``graphs``: the inference graph of each of the first images (``node_overlap``: per node of
  the original graph, the best Jaccard overlap of the image columns its visual word covers with
  a node of the same layer of the randomised model's graph of that image).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..cache import Cache
from ..jobs import Job
from ..types import ConvLensError, Progress
from .similarity import MAP_METRICS, jaccard, label_agreement, map_similarity, spearman

EVIDENCE_METHODS = ("gradcam", "saliency", "guided_backprop", "ig", "occlusion")


@dataclass
class Inputs:
    """What every step explains: the images (preprocessed batch and image-set positions), the
    classes explained (the original model's predictions), the layer and unit, the image set."""

    batch: np.ndarray  # (N, C, H, W) float32
    indices: np.ndarray  # (N,) positions in image_set.records
    targets: np.ndarray  # (N,) int64
    layer: str | None
    unit: int
    image_set: Any
    model_sha: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Explanation:
    """One explanation the sanity check supports."""

    name: str
    title: str
    kind: str  # "maps": one map per image (kept for display); "values": anything else
    metrics: tuple[str, ...]
    compute: Callable[[Any, Inputs, Cache], Job[Any]]
    compare: Callable[[Any, Any], dict[str, np.ndarray]]
    needs_gradients: bool = False
    needs_layer: bool = False  # a spatial layer (gradcam: optional, its default otherwise)
    item: str = "image"  # what the per-item values are over: image, unit, filter


# ------------------------------------------------------------------------------------ maps


def _evidence(method: str) -> Callable[[Any, Inputs, Cache], Job[Any]]:
    def compute(backend: Any, inputs: Inputs, cache: Cache) -> Job[np.ndarray]:
        yield Progress(None, f"{method} maps")
        layer = inputs.layer if method == "gradcam" else None
        opts = dict(inputs.options.get(method, {}))
        res = _evidence_fn()(backend, inputs.batch, method, layer=layer, target=inputs.targets, **opts)
        return np.asarray(res.maps, dtype=np.float32)

    return compute


def _evidence_fn() -> Callable[..., Any]:
    """``engine.evidence.evidence_maps`` (from its module when the package does not re-export it)."""
    import importlib

    fn = getattr(importlib.import_module("engine.evidence"), "evidence_maps", None)
    if fn is None:
        fn = importlib.import_module("engine.evidence.maps").evidence_maps
    return fn


def has_relu(backend: Any) -> bool:
    """Whether the model has ``nn.ReLU`` modules (guided backprop changes their backward pass;
    without them it would be plain gradients, and engine.evidence refuses it)."""
    import torch

    module = getattr(backend, "module", None)
    return module is not None and any(isinstance(m, torch.nn.ReLU) for m in module.modules())


def unit_heatmaps(backend: Any, batch: np.ndarray, layer: str, unit: int) -> np.ndarray:
    """Unit ``unit``'s activation map at ``layer`` for each image, upsampled bilinearly to the
    input size: (N, H, W) float32."""
    import torch
    import torch.nn.functional as F

    infos = {li.name: li for li in backend.layers()}
    if layer not in infos:
        backend.check_capture([layer])
    if not infos[layer].is_spatial:
        raise ConvLensError(f"{backend.spec.path}: layer '{layer}' has no spatial map (shape {list(infos[layer].shape)}); "
                            "unit heatmaps need a (units, h, w) output")
    if not 0 <= unit < infos[layer].units:
        raise ConvLensError(f"unit {unit} is out of range: layer '{layer}' has {infos[layer].units} units")
    act = backend.forward(batch, capture=[layer]).activations[layer][:, unit:unit + 1]
    up = F.interpolate(torch.from_numpy(np.ascontiguousarray(act, np.float32)), size=batch.shape[2:],
                       mode="bilinear", align_corners=False)
    return up[:, 0].numpy()


def _heatmap(backend: Any, inputs: Inputs, cache: Cache) -> Job[np.ndarray]:
    yield Progress(None, "unit heatmaps")
    if inputs.layer is None:
        raise ConvLensError("the heatmap sanity check needs a layer (and a unit)")
    return unit_heatmaps(backend, inputs.batch, inputs.layer, inputs.unit)


# ------------------------------------------------------------------------------------ others


def _sub(job: Job[Any]) -> Job[Any]:
    """A nested engine job, its progress passed on without fractions (the step owns those)."""
    while True:
        try:
            p = next(job)
        except StopIteration as s:
            return s.value
        yield Progress(None, p.message)


def _dissection(backend: Any, inputs: Inputs, cache: Cache) -> Job[dict[str, np.ndarray]]:
    from engine.concepts.generate import builtin_concepts
    from engine.dissection.run import DissectionParams, dissect

    if inputs.layer is None:
        raise ConvLensError("the dissection sanity check needs a spatial layer")
    n, size = inputs.options.get("dissection_images", 300), inputs.options.get("dissection_size", 64)
    concepts = yield from _sub(builtin_concepts(n, size))
    res = yield from _sub(dissect(backend, inputs.model_sha, concepts, [inputs.layer], DissectionParams(), cache=cache))
    s = res.layers[inputs.layer].summary
    return {"labels": np.asarray(s.label_name, dtype=str), "iou": np.asarray(s.iou, np.float64)}


def _compare_dissection(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"label_agreement": label_agreement(list(a["labels"]), list(b["labels"])),
            "iou_spearman": np.array([spearman(a["iou"], b["iou"])])}


def _polytope(backend: Any, inputs: Inputs, cache: Cache) -> Job[list[np.ndarray]]:
    from engine.polytope.run import PolytopeParams, run

    params = PolytopeParams(layer=inputs.layer, candidates=int(inputs.options.get("polytope_candidates", 50)))
    res = yield from _sub(run(backend, inputs.model_sha, inputs.image_set, params, cache=cache))
    order = {int(r): j for j, r in enumerate(res.record_indices)}
    return [np.asarray(res.record_indices[res.gallery(order[int(i)])[0]], np.int64) if int(i) in order
            else np.zeros(0, np.int64) for i in inputs.indices]


def _compare_polytope(a: list[np.ndarray], b: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {"jaccard": np.array([jaccard(x, y) for x, y in zip(a, b, strict=True)])}


FILTER_METRICS = ("loss", "inter", "spatial")


def _filters(backend: Any, inputs: Inputs, cache: Cache) -> Job[dict[str, np.ndarray]]:
    from engine.filters.metrics import filter_metrics

    if inputs.layer is None:
        raise ConvLensError("the filter-metrics sanity check needs a spatial layer")
    res = yield from _sub(filter_metrics(backend, inputs.model_sha, inputs.image_set, inputs.layer, cache=cache))
    return {k: np.asarray(getattr(res, k), np.float64) for k in FILTER_METRICS}


def _compare_filters(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {f"{k}_spearman": np.array([spearman(a[k], b[k])]) for k in FILTER_METRICS}


def _graphs(backend: Any, inputs: Inputs, cache: Cache) -> Job[list[dict[str, set[tuple[int, int, int]]]]]:
    """The inference graph of each of the first images (at most ``graph_images``, 8) over the
    layers modelled (``inputs.layer`` alone, or the model's default spatial layers): per graph,
    per node (``layer:word``) the set of columns ``(image, i, j)`` of the fit set its word covers."""
    from engine.graphs.model import GraphParams, explain, run
    from engine.models.layers import default_layers

    infos = backend.layers()
    spatial = [li.name for li in infos if li.is_spatial]
    layers = [inputs.layer] if inputs.layer else [n for n in (list(backend.spec.layers) or default_layers(infos))
                                                  if n in spatial]
    if not layers:
        raise ConvLensError(f"{backend.spec.path}: no spatial layer to model an inference graph on")
    params = GraphParams(seed=0, max_iter=int(inputs.options.get("graph_iterations", 30)))
    fit = yield from _sub(run(backend, inputs.model_sha, inputs.image_set, layers, params, cache=cache))
    by_name = {lm.name: lm for lm in fit.layers}
    graphs = []
    for i in inputs.indices[: int(inputs.options.get("graph_images", 8))]:
        g = explain(fit, image=inputs.image_set.records[int(i)].path, n=int(inputs.options.get("graph_nodes", 3)),
                    patches=0)
        nodes: dict[str, set[tuple[int, int, int]]] = {}
        for nd in g.nodes:
            lm = by_name.get(nd.get("layer", ""))
            if lm is not None:
                cols = np.argwhere(lm.words == int(nd["word"]))
                nodes[f"{lm.name}:{int(nd['word'])}"] = {(int(a), int(b), int(c)) for a, b, c in cols}
        graphs.append(nodes)
    return graphs


def _compare_graphs(a: list[dict[str, set[tuple[int, int, int]]]],
                    b: list[dict[str, set[tuple[int, int, int]]]]) -> dict[str, np.ndarray]:
    """Per image, per node of its original graph: the best Jaccard overlap of the node's columns
    with a node of the same layer in the image's other graph (words are cluster numbers that two
    fits do not share: nodes are matched by the image columns their words cover)."""
    out = []
    for ga, gb in zip(a, b, strict=True):
        for name, cols in ga.items():
            layer = name.rsplit(":", 1)[0]
            best = 0.0
            for other, ocols in gb.items():
                if other.rsplit(":", 1)[0] == layer and (cols or ocols):
                    best = max(best, len(cols & ocols) / len(cols | ocols))
            out.append(best)
    return {"node_overlap": np.asarray(out, np.float64)}


def _compare_maps(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return map_similarity(a, b)


_TITLES = {"gradcam": "Grad-CAM", "saliency": "Gradients (saliency)", "guided_backprop": "Guided Backprop",
           "ig": "Integrated gradients", "occlusion": "Occlusion"}

EXPLANATIONS: dict[str, Explanation] = {
    **{m: Explanation(m, _TITLES[m], "maps", MAP_METRICS, _evidence(m), _compare_maps,
                      needs_gradients=m != "occlusion") for m in EVIDENCE_METHODS},
    "heatmap": Explanation("heatmap", "Unit heatmap", "maps", MAP_METRICS, _heatmap, _compare_maps,
                           needs_layer=True),
    "dissection": Explanation("dissection", "Dissection labels", "values", ("label_agreement", "iou_spearman"),
                              _dissection, _compare_dissection, needs_layer=True, item="unit"),
    "polytope": Explanation("polytope", "Polytope gallery", "values", ("jaccard",), _polytope, _compare_polytope),
    "graphs": Explanation("graphs", "Inference graph", "values", ("node_overlap",), _graphs, _compare_graphs,
                          item="node"),
    "filters": Explanation("filters", "Filter metrics", "values", tuple(f"{k}_spearman" for k in FILTER_METRICS),
                           _filters, _compare_filters, needs_layer=True, item="filter"),
}


def evidence_available() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("engine.evidence") is not None
    except (ImportError, ValueError):
        return False


def supported(backend: Any) -> list[str]:
    """The explanations the sanity check can run on the model behind ``backend`` (randomising
    weights needs an eager PyTorch model; gradient methods need gradients)."""
    if getattr(backend, "name", "") != "torch" or getattr(backend, "is_script", True):
        return []
    have_evidence = evidence_available()
    out = []
    for name, e in EXPLANATIONS.items():
        if name in EVIDENCE_METHODS and not have_evidence:
            continue
        if e.needs_gradients and not getattr(backend, "supports_gradients", False):
            continue
        if name == "guided_backprop" and not has_relu(backend):
            continue
        out.append(name)
    return out


def scratch_cache() -> tuple[Cache, Any]:
    """A throwaway cache for the randomised models' nested runs (never the user's cache: the
    randomised weights have no file to be keyed by), and its temporary folder to clean up."""
    tmp = tempfile.TemporaryDirectory(prefix="convlens-sanity-")
    return Cache(tmp.name), tmp
