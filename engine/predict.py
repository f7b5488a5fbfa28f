"""Predictions over an image set: class, confidence, accuracy where labels exist.

Which output holds the class scores (:func:`choose_output`), for a model with several outputs
or one that may not be a classifier at all, by this rule:

1. An output is *class scores* when, past the batch axis, it has exactly one axis longer than 1
   (trailing axes of length 1 are ignored: ``(N, K)`` and ``(N, K, 1, 1)`` are scores over K
   classes). An output with two or more such axes (``(N, 1, H, W)``, ``(N, C, H, W)``) is a map,
   and one of size 1 is a single number: neither is class scores.
2. ``--output-index`` / ``output_index`` in the model config, when given, is used as it is.
3. Otherwise, when class names are known, only the class-score outputs with that many classes
   count; of those left, an output whose values on a probe image are probabilities
   (non-negative, summing to 1 over the class axis) is preferred; then the first.
4. No class-score output: predictions and accuracy are skipped (layers, heatmaps and
   dissection still work).

A model with several outputs always gets a warning that names every output with its shape and
kind and the one used.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .activations import Activations
from .types import ConvLensError, ModelSpec


def to_probabilities(outputs: np.ndarray, kind: str = "auto") -> tuple[np.ndarray, str]:
    """Class probabilities from a classifier output: softmax of logits, or the output itself
    when it already is a distribution (``kind="auto"`` checks: non-negative rows summing to 1)."""
    ok = ~np.isnan(outputs).any(axis=1)
    if kind == "auto":
        rows = outputs[ok]
        is_probs = rows.size > 0 and bool((rows >= -1e-6).all() and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))
        kind = "probs" if is_probs else "logits"
    if kind == "probs":
        return outputs.astype(np.float32), kind
    probs = np.full(outputs.shape, np.nan, dtype=np.float32)
    z = outputs[ok] - outputs[ok].max(axis=1, keepdims=True)
    e = np.exp(z)
    probs[ok] = e / e.sum(axis=1, keepdims=True)
    return probs, kind


def imagenet_names_apply(spec: ModelSpec, n_outputs: int) -> bool:
    """A torchvision architecture with 1000 outputs and no class names given: its classes are
    ImageNet-1k's (``resources/imagenet_classes.txt``)."""
    from .models.names import TORCHVISION_CLASSIFIERS

    return spec.classes is None and n_outputs == 1000 and spec.arch in TORCHVISION_CLASSIFIERS


def display_class_names(spec: ModelSpec, n_outputs: int) -> tuple[str, ...] | None:
    """The names a result shows for the model's classes: :func:`class_names` (ImageNet names for
    a torchvision 1000-way head) where they apply to ``n_outputs`` outputs; else the names the
    user gave (a one-output binary head may name both classes), or None (class indices)."""
    if n_outputs > 1:
        try:
            return class_names(spec, n_outputs)
        except ConvLensError:
            pass
    return tuple(spec.classes) if spec.classes else None


def class_names(spec: ModelSpec, n_outputs: int) -> tuple[str, ...]:
    if spec.classes is None:
        if imagenet_names_apply(spec, n_outputs):
            from resources import imagenet_classes

            return imagenet_classes()
        return tuple(str(i) for i in range(n_outputs))
    if len(spec.classes) != n_outputs:
        raise ConvLensError(
            f"{spec.path}: {len(spec.classes)} class names given but the model has {n_outputs} outputs"
        )
    return spec.classes


@dataclass
class Predictions:
    """Per image: predicted class index and confidence; the label's class index (-1: none)."""

    paths: tuple[str, ...]
    labels: tuple[str | None, ...]
    classes: tuple[str, ...]
    probs: np.ndarray  # (N, K) float32; NaN rows for unreadable images
    valid: np.ndarray  # (N,) bool
    score_kind: str  # "logits" (softmax applied) or "probs"

    @property
    def predicted(self) -> np.ndarray:
        p = np.where(self.valid[:, None], np.nan_to_num(self.probs, nan=-1.0), -1.0)
        return np.where(self.valid, p.argmax(axis=1), -1)

    @property
    def confidence(self) -> np.ndarray:
        return np.where(self.valid, np.nan_to_num(self.probs, nan=0.0).max(axis=1), np.nan)

    @property
    def label_index(self) -> np.ndarray:
        """Folder labels matched to class names (or to output indices when labels are numbers)."""
        lookup = {c: i for i, c in enumerate(self.classes)}
        out = []
        for lab in self.labels:
            if lab is None:
                out.append(-1)
            elif lab in lookup:
                out.append(lookup[lab])
            elif lab.isascii() and lab.isdigit() and int(lab) < len(self.classes):  # "²".isdigit() too
                out.append(int(lab))
            else:
                out.append(-1)
        return np.asarray(out, dtype=np.int64)

    @property
    def correct(self) -> np.ndarray:
        li = self.label_index
        return (li >= 0) & self.valid & (self.predicted == li)

    @property
    def n_scored(self) -> int:
        return int(((self.label_index >= 0) & self.valid).sum())

    @property
    def accuracy(self) -> float | None:
        n = self.n_scored
        return float(self.correct.sum() / n) if n else None

    def unmatched_labels(self) -> list[str]:
        li = self.label_index
        return sorted({lab for lab, i in zip(self.labels, li, strict=True) if lab is not None and i < 0})

    def top(self, i: int, k: int = 5) -> list[tuple[str, float]]:
        if not self.valid[i]:
            return []
        order = np.argsort(-self.probs[i])[:k]
        return [(self.classes[j], float(self.probs[i, j])) for j in order]

    def write_csv(self, path: str | Path) -> Path:
        """One row per image: ``path, label, predicted, confidence, correct, status``.

        ``status`` is ``ok`` or ``unreadable`` (then predicted, confidence and correct are
        empty); ``correct`` is ``true``/``false``, or empty for an image without a matched
        label. Paths that are not valid UTF-8 are written as their raw bytes (the file's real
        name, as ``open(..., errors="surrogateescape")`` reads it back).
        """
        import io

        from .cache import atomic_write_bytes

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "label", "predicted", "confidence", "correct", "status"])
        pred, conf, li = self.predicted, self.confidence, self.label_index
        for i, p in enumerate(self.paths):
            if not self.valid[i]:
                w.writerow([p, self.labels[i] or "", "", "", "", "unreadable"])
                continue
            corr = "" if li[i] < 0 else str(bool(pred[i] == li[i])).lower()
            w.writerow([p, self.labels[i] or "", self.classes[pred[i]], f"{conf[i]:.6f}", corr, "ok"])
        return atomic_write_bytes(path, buf.getvalue().encode("utf-8", "surrogateescape"))


def write_unscored_csv(acts: Activations, path: str | Path) -> Path:
    """For a model whose output is not class scores: one row per image, ``path, label, status``."""
    import io

    from .cache import atomic_write_bytes

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "status"])
    for r, ok in zip(acts.image_set.records, acts.valid, strict=True):
        w.writerow([r.path, r.label or "", "ok" if ok else "unreadable"])
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8", "surrogateescape"))


def predictions_from(acts: Activations, spec: ModelSpec) -> Predictions:
    """Predictions from an extraction pass's stored classifier outputs."""
    outputs = np.asarray(acts.outputs)
    probs, kind = to_probabilities(outputs, spec.scores)
    return Predictions(
        paths=tuple(r.path for r in acts.image_set.records),
        labels=tuple(r.label for r in acts.image_set.records),
        classes=class_names(spec, outputs.shape[1]),
        probs=probs,
        valid=acts.valid.copy(),
        score_kind=kind,
    )


# ----------------------------------------------------------------------------- which output


@dataclass(frozen=True)
class OutputInfo:
    """One model output on a probe image: its shape past the batch axis and what it holds."""

    index: int
    shape: tuple[int, ...]
    kind: str  # "scores" (class scores), "map" (two or more axes longer than 1) or "single" (size 1)
    score_kind: str | None  # for scores: "probs" (rows are distributions) or "logits"

    @property
    def n_classes(self) -> int | None:
        return int(np.prod(self.shape)) if self.kind == "scores" else None

    def describe(self) -> str:
        what = {"scores": (f"probabilities over {self.n_classes}" if self.score_kind == "probs"
                           else f"{self.n_classes} values"),
                "map": "a map, not class scores", "single": "one number, not class scores"}[self.kind]
        return f"{self.index}: {tuple(self.shape)} {what}"

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "shape": list(self.shape), "kind": self.kind, "score_kind": self.score_kind}


@dataclass(frozen=True)
class OutputChoice:
    """The outputs of a model and the one taken as class scores (``index`` None: none)."""

    outputs: tuple[OutputInfo, ...]
    index: int | None
    reason: str  # why that one, in words ("given", "the only class-score output", ...)

    @property
    def chosen(self) -> OutputInfo | None:
        return self.outputs[self.index] if self.index is not None else None

    def describe(self) -> str:
        return "; ".join(o.describe() for o in self.outputs)

    def message(self, name: str) -> str | None:
        """What to tell the user, or None when there is nothing to say (one class-score output)."""
        if self.index is None:
            tail = "no predictions or accuracy; layers, heatmaps and dissection still work"
            if len(self.outputs) == 1:
                only = self.outputs[0]
                what = "a map" if only.kind == "map" else "one number"
                return f"{name}: its output {tuple(only.shape)} is {what}, not class scores: {tail}"
            return f"{name}: {self.reason} ({self.describe()}): {tail}"
        if len(self.outputs) == 1 or self.reason == "given":
            return None
        return (f"{name} has {len(self.outputs)} outputs ({self.describe()}); using output {self.index} as the "
                f"class scores ({self.reason}); --output-index N chooses another")

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen
        return {"output_index": self.index, "reason": self.reason,
                "score_kind": chosen.score_kind if chosen else None,
                "outputs": [o.to_dict() for o in self.outputs]}


def describe_output(index: int, out: np.ndarray) -> OutputInfo:
    """What output ``index`` (batch first) holds, by rule 1 of the module docstring."""
    shape = tuple(int(d) for d in out.shape[1:])
    long_axes = [d for d in shape if d > 1]
    if len(long_axes) >= 2:
        return OutputInfo(index, shape, "map", None)
    if not long_axes:
        return OutputInfo(index, shape, "single", None)
    rows = np.asarray(out, dtype=np.float64).reshape(out.shape[0], -1)
    finite = rows[np.isfinite(rows).all(axis=1)]
    probs = finite.size > 0 and bool((finite >= -1e-6).all() and np.allclose(finite.sum(axis=1), 1.0, atol=1e-3))
    return OutputInfo(index, shape, "scores", "probs" if probs else "logits")


def choose_output(outputs: Sequence[np.ndarray], n_classes: int | None = None,
                  given: int | None = None) -> OutputChoice:
    """The class-score output among ``outputs`` (each batch first) by the rule of the module
    docstring; ``given``: the output index the user named."""
    infos = tuple(describe_output(i, o) for i, o in enumerate(outputs))
    if given is not None:
        if not -len(infos) <= given < len(infos):
            raise ConvLensError(f"output index {given}, but the model has {len(infos)} output"
                                f"{'s' if len(infos) != 1 else ''} ({'; '.join(o.describe() for o in infos)})")
        info = infos[given]
        if info.kind != "scores":
            return OutputChoice(infos, None, f"output {info.index}, as given, is not class scores")
        return OutputChoice(infos, info.index, "given")
    scores = [o for o in infos if o.kind == "scores"]
    if not scores:
        return OutputChoice(infos, None, "no output is class scores")
    if len(scores) == 1:
        return OutputChoice(infos, scores[0].index, "the only output that looks like class scores")
    pool, why = scores, ""
    if n_classes is not None:
        fits = [o for o in scores if o.n_classes == n_classes]
        if fits:
            pool, why = fits, f"its size matches the {n_classes} class names"
    probs = [o for o in pool if o.score_kind == "probs"]
    if probs:
        why = f"{why}; its values are probabilities" if why else "its values are probabilities"
        pool = probs
    if len(pool) > 1 or not why:
        why = f"{why}; the first such output" if why else "the first output that looks like class scores"
    return OutputChoice(infos, pool[0].index, why)


def probe_batch(spec: ModelSpec, n: int = 1) -> np.ndarray:
    """``n`` preprocessed probe images: seeded uniform noise in pixel space, normalised as the
    model expects (what a real image looks like to the model's first layer, roughly)."""
    pre = spec.preprocess
    rng = np.random.default_rng(0)
    c = pre.n_channels
    pixels = rng.random((n, c, *pre.input_size), dtype=np.float32)
    mean = np.asarray(pre.mean[:c], dtype=np.float32).reshape(1, c, 1, 1)
    std = np.asarray(pre.std[:c], dtype=np.float32).reshape(1, c, 1, 1)
    return (pixels - mean) / std
