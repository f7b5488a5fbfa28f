"""Representative Interpretations (Lam, Chu et al., ICCV 2021): the polytope neighbour gallery job.

For every image x of an image set R (the reference set):

1. **Split** the model at ``layer`` (default :func:`~engine.polytope.head.default_layer`) into
   psi and the head G; check that G is piecewise linear (:class:`~engine.polytope.head.HeadProgram`
   names the op otherwise) and whether it is affine (then its only boundaries are the class-pair
   decision hyperplanes: the result says so and lists earlier split points whose head has hidden
   units, ``suggested_layers``).
2. **Local affine map and certificate**: the activation pattern of G at psi(x) (its region id:
   images with the same pattern share one linear region), ``A psi`` by forward-mode autograd on G
   and ``c`` from G with the pattern frozen, evaluated at 0, all in float64 on psi(x);
   ``certificate[x] = max |A psi(x) + c - G(psi(x))|`` (G in float64: how exactly the affine map
   reproduces the head), and ``float32_gap[x] = max |G(psi(x)) - f(x)|`` against the model's own
   float32 logits (the model's rounding, which grows with the logits' size).
3. **Candidates Q**: ``params.candidates`` boundaries sampled from the images of R (seeded):
   an image, then one of its boundaries: a hidden unit's pre-activation hyperplane ``z_i = t``
   (``W_i = dz_i/dpsi``, ``b_i`` from the frozen head at 0, minus the threshold t) or a decision
   boundary ``logit_pred - logit_k = 0`` for another class k. Boundaries that are the same for
   every image (units before any nonlinearity; decision boundaries of an affine head) are taken
   once. ``margins[j, q] = <W_q, psi(x_j)> + b_q``; each boundary's sides over R are a bitset.
   ``boundary_certificate`` is ``max |<W_q, psi> + b_q - z_q|`` at each boundary's own image.
4. **SCSC greedy** per image (:func:`~engine.polytope.scsc.scsc_greedy`): P(x), the covered
   images, ranked by Dist(x, x').
5. **Baselines** on the same psi: kNN by Euclidean and by cosine distance at the gallery's size,
   and the exact linear region (images with x's activation pattern): precision (share of the
   gallery predicted as x's class) and coverage (share of x's other same-class images held), mean
   over the images (:meth:`PolytopeResult.metrics`).
6. **Sanity check** (``params.sanity``): the head's weights re-initialised at random (seeded),
   the same construction on the same psi; ``sanity["mean_jaccard"]`` compares the galleries.

Cached under kind ``"polytope"``; the key holds the model, preprocessing, image-set fingerprint,
layer and :meth:`PolytopeParams.result_key`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from engine.analysis import cached_job, method_key
from engine.cache import Cache, DamagedEntry, check_array, check_meta, load_array, write_meta
from engine.jobs import Job
from engine.polytope import scsc
from engine.types import ConvLensError, Progress

log = logging.getLogger("convlens.polytope")
_R = TypeVar("_R")

CACHE_KIND = "polytope"
FORMAT_VERSION = 2  # 2: the kNN table as wide as the largest gallery


@dataclass(frozen=True)
class PolytopeParams:
    """Settings of a polytope gallery.

    ``layer``: where to split (None: the last convolution's output, see ``default_layer``).
    ``candidates``: |Q|, boundaries sampled from R (the paper's review reports 50).
    ``delta``: different-class images a gallery may hold (None: per image the smallest feasible).
    ``decision``: also sample class decision boundaries. ``seed``: the sampling seed.
    ``sanity``: also run the randomised-head sanity check. ``batch_size``, ``device`` (where the
    head runs; None: the backend's) do not change the result.
    """

    layer: str | None = None
    candidates: int = 50
    delta: int | None = None
    decision: bool = True
    seed: int = 0
    sanity: bool = False
    batch_size: int = 32
    device: str | None = None

    def result_key(self) -> dict[str, Any]:
        d = asdict(self)
        del d["batch_size"], d["device"]
        return d

    def check(self) -> None:
        if not isinstance(self.candidates, int) or self.candidates < 1:
            raise ConvLensError(f"candidates (|Q|) must be a positive whole number, got {self.candidates!r}")
        if self.delta is not None and (not isinstance(self.delta, int) or self.delta < 0):
            raise ConvLensError(f"delta must be a whole number >= 0 or None (smallest feasible), got {self.delta!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConvLensError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.layer is not None and (not isinstance(self.layer, str) or not self.layer):
            raise ConvLensError(f"layer must be a layer name or None, got {self.layer!r}")


@dataclass
class PolytopeResult:
    """A polytope gallery over an image set (plain data: numpy arrays and JSON fields).

    Per image j of the N loaded ones (``paths[j]``, record ``record_indices[j]`` of the set):
    ``logits`` (N, C) float32 and ``pred``; ``certificate[j]``; ``region_id[j]`` (equal ids: one
    linear region); ``active[j]`` hidden units on their active piece. Per candidate q of Q:
    ``q_image`` (the image it was sampled from, -1 for image-independent ones), ``q_kind`` (0 a
    hidden unit, 1 a decision boundary), ``q_a`` / ``q_b`` (unit: nonlinearity index and flat unit
    index; decision: the classes a vs b), ``q_threshold``, ``q_bias``. ``margins`` (N, Q) float64.
    Per image: ``chosen`` (flat) with ``chosen_offsets`` (N+1) giving P(x) in greedy order,
    ``delta`` used and ``feasible`` (smallest feasible), ``covers`` (N, W) uint64 bitsets (x
    included).
    """

    model: str
    model_sha256: str
    layer: str
    image_source: str
    paths: tuple[str, ...]
    record_indices: np.ndarray
    class_names: tuple[str, ...] | None
    params: PolytopeParams
    head: dict[str, Any]
    logits: np.ndarray
    pred: np.ndarray
    certificate: np.ndarray
    float32_gap: np.ndarray
    boundary_certificate: float
    region_id: np.ndarray
    active: np.ndarray
    q_image: np.ndarray
    q_kind: np.ndarray
    q_a: np.ndarray
    q_b: np.ndarray
    q_threshold: np.ndarray
    q_bias: np.ndarray
    margins: np.ndarray
    chosen: np.ndarray
    chosen_offsets: np.ndarray
    delta: np.ndarray
    feasible: np.ndarray
    covers: np.ndarray
    features_norm: np.ndarray  # (N,) |psi|
    knn: np.ndarray  # (N, k) nearest images by Euclidean distance on psi, nearest first; k: see knn_width
    baselines: dict[str, Any]
    seconds: dict[str, float]
    throughput: dict[str, float]
    sanity: dict[str, Any] | None = None
    skipped: tuple[tuple[str, str], ...] = ()
    from_cache: bool = False

    # ---------------------------------------------------------------- per image

    @property
    def n(self) -> int:
        return len(self.pred)

    def index_of(self, path: str) -> int:
        """The index of the image whose path (absolute or relative to the set) is ``path``."""
        import os

        want = os.path.abspath(path)
        for j, p in enumerate(self.paths):
            if p == path or os.path.abspath(os.path.join(self.image_source, p)) == want or \
                    os.path.abspath(p) == want:
                return j
        raise ConvLensError(f"{path}: not among the {self.n} images of {self.image_source} (the gallery is "
                            "built over the image set; give --image one of its files)")

    def class_name(self, c: int) -> str:
        if self.class_names and 0 <= c < len(self.class_names):
            return self.class_names[c]
        return str(c)

    def boundaries(self, j: int) -> np.ndarray:
        """P(x_j): indices into Q, in the order the greedy picked them."""
        return self.chosen[self.chosen_offsets[j]:self.chosen_offsets[j + 1]]

    def gallery(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """The covered images other than x_j, ranked by Dist, and their distances."""
        return scsc.rank(self.margins, j, self.boundaries(j), self.covers[j], self.n)

    def describe_boundary(self, q: int) -> dict[str, Any]:
        nl = self.head.get("nonlinear", [])
        if int(self.q_kind[q]) == 0:
            a = int(self.q_a[q])
            what = {"kind": "hidden unit", "module": nl[a]["module"] if a < len(nl) else "",
                    "node": nl[a]["node"] if a < len(nl) else "", "unit": int(self.q_b[q]),
                    "threshold": float(self.q_threshold[q])}
        else:
            what = {"kind": "decision", "classes": [self.class_name(int(self.q_a[q])),
                                                    self.class_name(int(self.q_b[q]))]}
        img = int(self.q_image[q])
        what.update({"index": q, "from_image": self.paths[img] if img >= 0 else None, "bias": float(self.q_bias[q])})
        return what

    def image_summary(self, j: int, top: int | None = None) -> dict[str, Any]:
        """JSON for one image: P(x), coverage, the certificate and the ranked neighbours."""
        idx, dist = self.gallery(j)
        same = self.pred[idx] == self.pred[j]
        n_same_all = int((self.pred == self.pred[j]).sum()) - 1
        shown = range(len(idx)) if top is None else range(min(top, len(idx)))
        return {
            "image": self.paths[j],
            "predicted": self.class_name(int(self.pred[j])),
            "logits": [float(v) for v in self.logits[j]],
            "certificate_error": float(self.certificate[j]),
            "float32_gap": float(self.float32_gap[j]),
            "region_id": int(self.region_id[j]),
            "active_hidden_units": int(self.active[j]),
            "boundaries": [self.describe_boundary(int(q)) for q in self.boundaries(j)],
            "n_boundaries": len(self.boundaries(j)),
            "delta": int(self.delta[j]),
            "smallest_feasible_delta": int(self.feasible[j]),
            "covered": len(idx),
            "covered_same_class": int(same.sum()),
            "covered_different_class": int((~same).sum()),
            "coverage": (int(same.sum()) / n_same_all) if n_same_all > 0 else None,
            "precision": (float(same.mean()) if len(idx) else None),
            "neighbours": [{"image": self.paths[int(idx[r])], "distance": float(dist[r]),
                            "predicted": self.class_name(int(self.pred[idx[r]])),
                            "same_class": bool(same[r])} for r in shown],
        }

    def metrics(self) -> dict[str, Any]:
        """Means over all images: the gallery and the baselines (see the module doc)."""
        return self.baselines

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model, "layer": self.layer, "images": self.n, "classes": len(self.logits[0]) if self.n else 0,
            "candidates": len(self.q_kind), "params": self.params.result_key(), "head": self.head,
            "certificate_max": float(self.certificate.max()) if self.n else None,
            "float32_gap_max": float(self.float32_gap.max()) if self.n else None,
            "boundary_certificate_max": self.boundary_certificate,
            "linear_regions": len(np.unique(self.region_id)),
            "metrics": self.baselines, "sanity": self.sanity, "seconds": self.seconds,
            "throughput": self.throughput, "skipped": [list(s) for s in self.skipped],
        }


# --------------------------------------------------------------------------------------------
# the core: from psi to galleries
# --------------------------------------------------------------------------------------------


@dataclass
class _Core:
    logits: np.ndarray
    pred: np.ndarray
    certificate: np.ndarray
    float32_gap: np.ndarray
    boundary_certificate: float
    region_id: np.ndarray
    active: np.ndarray
    q: dict[str, np.ndarray]
    margins: np.ndarray
    chosen: np.ndarray
    chosen_offsets: np.ndarray
    delta: np.ndarray
    feasible: np.ndarray
    covers: np.ndarray
    seconds: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=dict)


def _head_info(prog: Any, layer: str) -> dict[str, Any]:
    rep = prog.report
    return {
        "piecewise_linear": True,
        "affine": not rep.nonlinear,
        "ops": rep.ops,
        "nonlinear": [{"node": n.node, "module": n.module, "op": n.op, "kind": n.kind,
                       "thresholds": list(n.thresholds), "units": n.units, "image_independent": n.first}
                      for n in rep.nonlinear],
        "hidden_units": int(sum(n.units * len(n.thresholds) for n in rep.nonlinear if n.kind == "elementwise")),
        "note": (f"the head after '{layer}' is affine (only pooling and linear layers): its only boundaries are the "
                 "class-pair decision hyperplanes, the same for every image; split at an earlier layer for "
                 "hidden-unit boundaries") if not rep.nonlinear else "",
    }


def analyse(psi: Any, head: Any, params: PolytopeParams, device: Any) -> Job[tuple[_Core, Any]]:
    """Everything after psi: a job over the (N, ...) float32 feature tensor ``psi`` and a head."""
    import torch

    from engine.polytope.head import HeadProgram, boundary_rows, hidden_units, linear_parts

    t0 = time.perf_counter()
    prog = HeadProgram(head)
    n = int(psi.shape[0])
    bs = params.batch_size
    nl = hidden_units(prog, psi[:1].to(device))
    elem = [i for i, info in enumerate(nl) if info.kind == "elementwise"]
    logits = []
    cert = np.zeros(n)
    gap = np.zeros(n)
    active = np.zeros(n, np.int64)
    sigs: list[bytes] = []
    for s in range(0, n, bs):
        p32 = psi[s:s + bs].to(device)
        p64 = p32.to(torch.float64)
        with torch.no_grad():
            true = head(p32).to(torch.float64)
            rec = prog.run(p64)
        a_psi, zero = linear_parts(prog, p64, rec)
        err = (a_psi + zero.output - rec.output).abs().reshape(len(p32), -1).amax(dim=1)
        cert[s:s + len(p32)] = err.cpu().numpy()
        gap[s:s + len(p32)] = (rec.output - true).abs().reshape(len(p32), -1).amax(dim=1).cpu().numpy()
        for i in elem:
            g, _o = rec.pattern[nl[i].node]
            active[s:s + len(p32)] += (g == 1).reshape(len(p32), -1).sum(1).cpu().numpy()
        sigs += prog.pattern_signature(rec)
        logits.append(true.to(torch.float32).cpu().numpy())
        yield Progress(0.5 * (s + len(p32)) / n, "local linear maps")
    logits_np = np.concatenate(logits) if logits else np.zeros((0, 0), np.float32)
    pred = logits_np.argmax(axis=1).astype(np.int64)
    uniq: dict[bytes, int] = {}
    region_id = np.asarray([uniq.setdefault(sg, len(uniq)) for sg in sigs], dtype=np.int64)
    t1 = time.perf_counter()
    n_classes = logits_np.shape[1]

    # ---- candidate boundaries Q
    rng = np.random.default_rng(params.seed)
    units = [nl[i].units * len(nl[i].thresholds) for i in elem]
    starts = np.cumsum([0, *units])
    h_total = int(starts[-1])
    affine = not nl
    n_dec = n_classes - 1 if params.decision and n_classes > 1 else 0
    pool = h_total + n_dec
    if pool == 0:
        raise ConvLensError("the head has no hidden unit and a single output: there is no boundary to sample "
                            "(split at an earlier layer)")

    def key_of(img: int, e: int) -> tuple[Any, ...]:
        if e < h_total:
            k = int(np.searchsorted(starts, e, side="right") - 1)
            info = nl[elem[k]]
            local = e - int(starts[k])
            unit, th = divmod(local, len(info.thresholds))
            return ("h", k, unit, th) if info.first else ("h", k, unit, th, img)
        c = int(pred[img])
        other = e - h_total
        kk = other if other < c else other + 1
        return ("d", min(c, kk), max(c, kk)) if affine else ("d", c, kk, img)

    glob_h = sum(units[k] for k in range(len(elem)) if nl[elem[k]].first)
    universe = glob_h + (h_total - glob_h) * n + (n_dec * n if not affine else n_classes * (n_classes - 1) // 2)
    chosen_keys: dict[tuple[Any, ...], tuple[int, int]] = {}
    if universe <= params.candidates:
        for img in range(n):
            for e in range(pool):
                chosen_keys.setdefault(key_of(img, e), (img, e))
    else:
        tries = 0
        while len(chosen_keys) < params.candidates and tries < 50 * params.candidates:
            img = int(rng.integers(n))
            e = int(rng.integers(pool))
            chosen_keys.setdefault(key_of(img, e), (img, e))
            tries += 1
    items = list(chosen_keys.items())
    m = len(items)
    q_image = np.full(m, -1, np.int64)
    q_kind = np.zeros(m, np.int8)
    q_a = np.zeros(m, np.int64)
    q_b = np.zeros(m, np.int64)
    q_th = np.zeros(m)
    q_bias = np.zeros(m)
    q_src = np.zeros(m, np.int64)  # the image whose region gave W (and b)
    per_image: dict[int, list[int]] = {}
    for qi, (key, (img, _e)) in enumerate(items):
        q_src[qi] = img
        if key[0] == "h":
            _, k, unit, th = key[:4]
            q_kind[qi], q_a[qi], q_b[qi] = 0, elem[k], unit
            q_th[qi] = nl[elem[k]].thresholds[th]
            q_image[qi] = key[4] if len(key) > 4 else -1
        else:
            q_kind[qi] = 1
            if affine:
                q_a[qi], q_b[qi] = key[1], key[2]
            else:
                q_a[qi], q_b[qi] = key[1], key[2]
                q_image[qi] = key[3]
        per_image.setdefault(img, []).append(qi)
    d = int(np.prod(psi.shape[1:]))
    w = torch.zeros((m, d), dtype=torch.float64, device=device)
    z_true = np.zeros(m)
    imgs = sorted(per_image)
    done = 0
    node_names = [info.node for info in nl]
    for s in range(0, len(imgs), bs):
        chunk = imgs[s:s + bs]
        p64 = psi[chunk].to(device).to(torch.float64)
        select = []
        for img in chunk:
            sel = []
            for qi in per_image[img]:
                if q_kind[qi] == 0:
                    sel.append(("unit", int(q_a[qi]), int(q_b[qi])))
                else:
                    sel.append(("decision", int(q_a[qi]), int(q_b[qi])))
            select.append(sel)
        rows = boundary_rows(prog, p64, select)
        with torch.no_grad():
            rec = prog.run(p64)
            zero = prog.run(torch.zeros_like(p64), rec.pattern)
        for bi, img in enumerate(chunk):
            for r, qi in enumerate(per_image[img]):
                w[qi] = rows[bi, r]
                if q_kind[qi] == 0:
                    name = node_names[int(q_a[qi])]
                    unit, th = int(q_b[qi]), float(q_th[qi])
                    q_bias[qi] = float(zero.z[name].reshape(len(chunk), -1)[bi, unit]) - th
                    z_true[qi] = float(rec.z[name].reshape(len(chunk), -1)[bi, unit]) - th
                else:
                    a, b = int(q_a[qi]), int(q_b[qi])
                    q_bias[qi] = float(zero.output[bi, a] - zero.output[bi, b])
                    z_true[qi] = float(rec.output[bi, a] - rec.output[bi, b])
        done += len(chunk)
        yield Progress(0.5 + 0.3 * done / max(1, len(imgs)), "candidate boundaries")
    t2 = time.perf_counter()
    margins = np.zeros((n, m))
    for s in range(0, n, 256):
        p64 = psi[s:s + 256].to(device).to(torch.float64).reshape(-1, d)
        margins[s:s + 256] = (p64 @ w.T).cpu().numpy() + q_bias
    bcert = float(np.abs(margins[q_src, np.arange(m)] - z_true).max()) if m else 0.0
    t3 = time.perf_counter()

    # ---- SCSC greedy per image
    sides = scsc.pack((margins > 0).T)  # (Q, W)
    valid = scsc.valid_mask(n)
    chosen: list[np.ndarray] = []
    covers = np.zeros((n, scsc.words_for(n)), np.uint64)
    deltas = np.zeros(n, np.int64)
    feas = np.zeros(n, np.int64)
    for j in range(n):
        region = scsc.region_sets(sides, margins[j] > 0, valid)
        diff = scsc.pack(pred != pred[j])
        full = np.bitwise_and.reduce(region, axis=0) if m else valid
        f = int(scsc.popcount(full & diff))
        want = f if params.delta is None else max(params.delta, f)
        cov = scsc.scsc_greedy(region, diff, valid, want)
        chosen.append(cov.chosen)
        covers[j], deltas[j], feas[j] = cov.cover, cov.delta, cov.feasible
        if j % 64 == 63:
            yield Progress(0.8 + 0.15 * (j + 1) / n, "greedy cover")
    t4 = time.perf_counter()
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chosen])
    core = _Core(logits_np, pred, cert, gap, bcert, region_id, active,
                 {"image": q_image, "kind": q_kind, "a": q_a, "b": q_b, "threshold": q_th, "bias": q_bias},
                 margins, np.concatenate(chosen) if chosen else np.zeros(0, np.int64), offsets, deltas, feas, covers)
    core.seconds = {"local_maps": t1 - t0, "boundaries": t2 - t1, "margins": t3 - t2, "greedy": t4 - t3}
    core.throughput = {"local_maps_images_per_s": n / max(t1 - t0, 1e-9),
                       "boundaries_per_s": m / max(t2 - t1, 1e-9),
                       "greedy_images_per_s": n / max(t4 - t3, 1e-9)}
    return core, prog


def baselines(core: _Core, features: np.ndarray) -> dict[str, Any]:
    """Precision and coverage of the gallery and of the baselines at equal gallery size."""
    n = len(core.pred)
    f64 = np.asarray(features, dtype=np.float64)
    sq = (f64 ** 2).sum(axis=1)
    eu = co = np.zeros((0, n))
    base = 0
    rows: dict[str, dict[str, list[float | None]]] = {
        k: {"precision": [], "coverage": [], "size": []} for k in ("gallery", "knn_euclidean", "knn_cosine",
                                                                   "exact_region")}
    for j in range(n):
        if j - base >= len(eu):  # distances from the next rows only: memory O(256 N)
            base = j
            eu, co = _distance_rows(f64, sq, j, min(n, j + 256))
        cov = scsc.members(core.covers[j], n)
        g = cov[cov != j]
        k = len(g)
        galleries = {"gallery": g, "knn_euclidean": scsc.nearest(eu[j - base], j, k),
                     "knn_cosine": scsc.nearest(co[j - base], j, k)}
        reg = np.flatnonzero(core.region_id == core.region_id[j])
        galleries["exact_region"] = reg[reg != j]
        for name, gal in galleries.items():
            p, c = scsc.gallery_scores(core.pred, j, gal)
            rows[name]["precision"].append(p)
            rows[name]["coverage"].append(c)
            rows[name]["size"].append(float(len(gal)))
    out: dict[str, Any] = {}
    for name, r in rows.items():
        out[name] = {"precision": scsc.mean_or_none(r["precision"]), "coverage": scsc.mean_or_none(r["coverage"]),
                     "mean_size": scsc.mean_or_none(r["size"]),
                     "images": sum(1 for p in r["precision"] if p is not None)}
    out["mean_boundaries"] = float(np.mean(np.diff(core.chosen_offsets))) if n else None
    out["certificate_max"] = float(core.certificate.max()) if n else None
    out["float32_gap_max"] = float(core.float32_gap.max()) if n else None
    return out


def _distance_rows(f: np.ndarray, sq: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """(squared Euclidean, cosine) distances from rows lo..hi of ``f`` to every row (float64)."""
    gram = f[lo:hi] @ f.T
    eu = np.maximum(sq[lo:hi, None] + sq[None, :] - 2 * gram, 0.0)
    norms = np.sqrt(sq)
    co = 1.0 - gram / np.maximum(norms[lo:hi, None] * norms[None, :], 1e-300)
    return eu, co


#: the kNN table keeps at most this many entries (N x k int64: 8 M entries = 64 MB); past that, k
#: is cut to ``KNN_MAX_ENTRIES // N`` (at least :data:`KNN_MIN`) and the view says it is capped
KNN_MAX_ENTRIES = 8_000_000
KNN_MIN = 64


def knn_width(n: int, largest_gallery: int) -> int:
    """Columns of the kNN table: as many as the largest gallery holds (so that "kNN at the
    gallery's size" is never cut short), at least :data:`KNN_MIN`, at most N - 1 and within
    :data:`KNN_MAX_ENTRIES`."""
    k = max(KNN_MIN, largest_gallery)
    k = min(k, max(KNN_MIN, KNN_MAX_ENTRIES // max(1, n)))
    return max(0, min(k, n - 1))


def _knn_table(features: np.ndarray, k: int = KNN_MIN) -> np.ndarray:
    n = len(features)
    k = min(k, n - 1)
    f = np.asarray(features, dtype=np.float64)
    sq = (f ** 2).sum(axis=1)
    rows = []
    for lo in range(0, n, 256):
        eu, _ = _distance_rows(f, sq, lo, min(n, lo + 256))
        rows += [scsc.nearest(eu[j - lo], j, k) for j in range(lo, min(n, lo + 256))]
    return np.stack(rows) if rows else np.zeros((0, 0), np.int64)


def _randomised(head: Any, seed: int) -> Any:
    import torch

    h = copy.deepcopy(head)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in h.parameters():
            fan = p.shape[1] if p.dim() > 1 else max(1, p.numel())
            if p.dim() > 1:
                fan = int(np.prod(p.shape[1:]))
            p.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) / np.sqrt(fan)).to(p))
    return h


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


# --------------------------------------------------------------------------------------------
# the job
# --------------------------------------------------------------------------------------------


def polytope_key(backend: Any, model_sha: str, image_set: Any, layer: str, params: PolytopeParams) -> str:
    """Cache key: the model (hash, architecture, preprocessing, output, backend), the image set's
    fingerprint, the layer and the result-changing parameters."""
    return method_key(CACHE_KIND, FORMAT_VERSION, backend, model_sha, image_set.fingerprint(), params, layer)


def run(backend: Any, model_sha: str, image_set: Any, params: PolytopeParams = PolytopeParams(),
        *, cache: Cache | None = None) -> Job[PolytopeResult]:
    """The polytope gallery of every image of ``image_set`` (a job; see the module doc).

    Raises :class:`ConvLensError` when the model cannot be split at the layer, its head is not
    piecewise linear (naming the op), or fewer than two images load.
    """
    from engine.polytope.head import default_layer

    params.check()
    if not getattr(backend, "supports_split", False):
        if params.layer:
            backend.split(params.layer)  # raises the backend's own explanation
        raise ConvLensError(
            f"{backend.spec.path}: the polytope gallery splits the model at a layer, which needs an eager PyTorch "
            f"model or a torch.export (.pt2) archive, and this one runs on {backend.name}"
            f"{' (TorchScript)' if getattr(backend, 'is_script', False) else ''}; load the PyTorch checkpoint "
            "(a state dict with --arch, or a .pt2 archive) with --backend torch")
    layer = params.layer or default_layer(backend)
    key = polytope_key(backend, model_sha, image_set, layer, params)
    result = yield from cached_job(
        cache, CACHE_KIND, key, load_result, save=save_result, found="polytope gallery found in cache",
        compute=lambda: _compute(backend, model_sha, image_set, layer, params))
    if result.from_cache:
        return replace(result, params=params)  # batch size and device are not in the key
    return result


def split_checked(backend: Any, layer: str) -> tuple[Any, Any]:
    """``(split, HeadProgram)``, raising a ConvLensError naming the op of a non-PL head and the
    later split points where the head is piecewise linear."""
    from engine.polytope.head import HeadProgram, NotPiecewiseLinearError

    sp = backend.split(layer)
    try:
        prog = HeadProgram(sp.head)
    except NotPiecewiseLinearError as e:
        later = _later_pl_layers(backend, layer)
        hint = (f" The head is piecewise linear when split at: {', '.join(later)}." if later else
                " No later split point gives a piecewise-linear head (a softmax or sigmoid at the very end: load "
                "the model so that it outputs logits, e.g. with --output-index).")
        raise NotPiecewiseLinearError(f"{backend.spec.path}: split at '{layer}': {e}.{hint}") from None
    return sp, prog


def _later_pl_layers(backend: Any, layer: str, limit: int = 3) -> list[str]:
    from engine.polytope.head import HeadProgram

    cands = backend.split_candidates()
    out: list[str] = []
    if layer not in cands:
        return out
    for c in cands[cands.index(layer) + 1:][:12]:
        try:
            HeadProgram(backend.split(c).head)
        except ConvLensError:
            continue
        out.append(c)
        if len(out) >= limit:
            break
    return out


def suggest_earlier(backend: Any, layer: str, limit: int = 3) -> list[str]:
    """Spatial split points before ``layer`` whose head has hidden units (nearest first).

    ``layer`` itself need not be spatial: for a split after the flatten (RNet ``prelu4``, a
    VGG classifier layer) the nearest earlier spatial layers are suggested."""
    from engine.polytope.head import HeadProgram

    spatial = backend.split_candidates(spatial_only=True)
    order = spatial if layer in spatial else backend.split_candidates()
    if layer not in order:
        return []
    keep = set(spatial)
    earlier = [c for c in order[:order.index(layer)] if c in keep]
    out: list[str] = []
    for c in reversed(earlier):
        if any(c.startswith(o + ".") for o in out):  # the last child of a block already listed
            continue
        try:
            prog = HeadProgram(backend.split(c).head)
        except ConvLensError:
            continue
        if prog.report.nonlinear:
            out.append(c)
            if len(out) >= limit:
                break
    return out


def _compute(backend: Any, model_sha: str, image_set: Any, layer: str, params: PolytopeParams) -> Job[PolytopeResult]:
    import torch

    from engine.data.images import ImageLoader

    t0 = time.perf_counter()
    sp, prog = split_checked(backend, layer)
    device = torch.device(params.device) if params.device else backend.torch_device
    if device != backend.torch_device:
        raise ConvLensError(f"device {params.device}: the split runs where the model is ({backend.torch_device})")
    feats: list[Any] = []
    idx: list[np.ndarray] = []
    loader = ImageLoader(image_set, backend.spec.preprocess, batch_size=params.batch_size)
    total = len(image_set)
    try:
        for batch in loader:
            x = backend.to_tensor(batch.array)
            with torch.no_grad():
                try:
                    feats.append(sp.psi(x).detach().float().cpu())
                except RuntimeError as e:
                    from engine.backends.base import forward_error

                    raise forward_error(backend.spec.path, batch.array.shape, e) from None
            idx.append(batch.indices)
            yield Progress(0.3 * sum(len(i) for i in idx) / max(1, total), "features")
    finally:
        loader.close()
    n = sum(len(i) for i in idx)
    if n < 2:
        raise ConvLensError(f"{image_set.source}: a gallery needs at least two readable images, got {n}")
    psi = torch.cat(feats)
    t1 = time.perf_counter()
    core, prog = yield from _scaled(analyse(psi, sp.head, params, device), 0.3, 0.9)
    head_info = _head_info(prog, layer)
    head_info["suggested_layers"] = suggest_earlier(backend, layer) if head_info["affine"] else []
    features = psi.reshape(n, -1).double().numpy()
    base = baselines(core, features)
    sanity = None
    if params.sanity:
        rand_head = _randomised(sp.head, params.seed)
        try:
            rcore, _ = yield from _scaled(analyse(psi, rand_head, params, device), 0.9, 1.0)
        finally:
            del rand_head
        js = []
        for j in range(n):
            a = scsc.members(core.covers[j], n)
            b = scsc.members(rcore.covers[j], n)
            js.append(jaccard(a[a != j], b[b != j]))
        changed_pred = float((rcore.pred != core.pred).mean())
        sanity = {"mean_jaccard": float(np.mean(js)), "identical_galleries": int(sum(1 for v in js if v == 1.0)),
                  "images": n, "predictions_changed": changed_pred,
                  "randomised_metrics": baselines(rcore, features)}
    records = np.concatenate(idx)
    seconds = {"features": t1 - t0, **core.seconds, "total": time.perf_counter() - t0}
    yield Progress(1.0, "done")
    return PolytopeResult(
        model=backend.spec.path, model_sha256=model_sha, layer=layer, image_source=image_set.root,
        paths=tuple(image_set.relative_path(image_set.records[int(i)]) for i in records),
        record_indices=records.astype(np.int64),
        class_names=tuple(backend.spec.classes) if backend.spec.classes else None,
        params=params, head=head_info, logits=core.logits, pred=core.pred, certificate=core.certificate,
        float32_gap=core.float32_gap,
        boundary_certificate=core.boundary_certificate, region_id=core.region_id, active=core.active,
        q_image=core.q["image"], q_kind=core.q["kind"], q_a=core.q["a"], q_b=core.q["b"],
        q_threshold=core.q["threshold"], q_bias=core.q["bias"], margins=core.margins, chosen=core.chosen,
        chosen_offsets=core.chosen_offsets, delta=core.delta, feasible=core.feasible, covers=core.covers,
        features_norm=np.linalg.norm(features, axis=1), baselines=base,
        knn=_knn_table(features, knn_width(n, int(scsc.popcount(core.covers).max(initial=1)) - 1)),
        seconds=seconds,
        throughput=core.throughput, sanity=sanity, skipped=tuple(loader.skipped),
    )


def _scaled(job: Job[_R], lo: float, hi: float) -> Job[_R]:
    while True:
        try:
            p = next(job)
        except StopIteration as s:
            return s.value
        yield Progress(None if p.fraction is None else lo + (hi - lo) * p.fraction, p.message)


# --------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------

_ARRAYS: dict[str, Any] = {
    "record_indices": (np.int64, (None,)), "logits": (np.float32, (None, None)), "pred": (np.int64, (None,)),
    "certificate": (np.float64, (None,)),
    "float32_gap": (np.float64, (None,)), "region_id": (np.int64, (None,)), "active": (np.int64, (None,)),
    "q_image": (np.int64, (None,)), "q_kind": (np.int8, (None,)), "q_a": (np.int64, (None,)),
    "q_b": (np.int64, (None,)), "q_threshold": (np.float64, (None,)), "q_bias": (np.float64, (None,)),
    "margins": (np.float64, (None, None)), "chosen": (np.int64, (None,)), "chosen_offsets": (np.int64, (None,)),
    "delta": (np.int64, (None,)), "feasible": (np.int64, (None,)), "covers": (np.uint64, (None, None)),
    "features_norm": (np.float64, (None,)), "knn": (np.int64, (None, None)),
}
_META = ("model", "model_sha256", "layer", "image_source", "paths", "class_names", "params", "head",
         "boundary_certificate", "baselines", "seconds", "throughput", "sanity", "skipped")


def save_result(result: PolytopeResult, folder: str | Path) -> None:
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
        elif k in ("paths", "class_names") and v is not None:
            v = list(v)
        elif k == "skipped":
            v = [list(s) for s in v]
        meta[k] = v
    meta = json.loads(json.dumps(meta, default=_plain))
    write_meta(folder, meta)


def _plain(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def load_result(folder: str | Path) -> PolytopeResult:
    """Read :func:`save_result`'s folder; :class:`~engine.cache.DamagedEntry` when anything is
    missing, truncated, of another format version or inconsistent."""
    folder = Path(folder)
    meta = check_meta(folder, FORMAT_VERSION, _META)
    shapes = {name: check_array(folder, name, dtype, shape) for name, (dtype, shape) in _ARRAYS.items()}
    n = shapes["pred"][0]
    q = shapes["q_kind"][0]
    want = {"logits": n, "certificate": n, "float32_gap": n, "region_id": n, "active": n, "record_indices": n,
            "delta": n, "feasible": n, "features_norm": n, "knn": n, "q_image": q, "q_a": q, "q_b": q, "q_threshold": q,
            "q_bias": q}
    bad = [k for k, v in want.items() if shapes[k][0] != v]
    if bad or shapes["margins"] != (n, q) or shapes["covers"] != (n, scsc.words_for(n)) or \
            shapes["chosen_offsets"] != (n + 1,) or len(meta["paths"]) != n:
        raise DamagedEntry(f"{folder}: arrays of inconsistent sizes ({', '.join(bad) or 'margins/covers/paths'})")
    arrays = {name: np.array(load_array(folder, name)) for name in _ARRAYS}
    off = arrays["chosen_offsets"]
    if n and (off[0] != 0 or off[-1] != shapes["chosen"][0] or np.any(np.diff(off) < 0)):
        raise DamagedEntry(f"{folder}: chosen_offsets do not index chosen")
    try:
        pfields = {f.name for f in fields(PolytopeParams)}
        params = PolytopeParams(**{k: v for k, v in meta["params"].items() if k in pfields})
        return PolytopeResult(
            model=meta["model"], model_sha256=meta["model_sha256"], layer=meta["layer"],
            image_source=meta["image_source"], paths=tuple(meta["paths"]),
            class_names=tuple(meta["class_names"]) if meta["class_names"] is not None else None,
            params=params, head=meta["head"], boundary_certificate=float(meta["boundary_certificate"]),
            baselines=meta["baselines"], seconds=meta["seconds"], throughput=meta["throughput"],
            sanity=meta["sanity"], skipped=tuple(tuple(s) for s in meta["skipped"]),
            **arrays)  # type: ignore[arg-type]
    except (TypeError, ValueError, KeyError) as e:
        raise DamagedEntry(f"{folder}: meta.json does not describe a polytope result ({e})") from e


def digest(result: PolytopeResult) -> str:
    """A short digest of the galleries (tests compare runs with it)."""
    h = hashlib.sha256()
    h.update(result.covers.tobytes())
    h.update(result.chosen.tobytes())
    return h.hexdigest()[:16]
