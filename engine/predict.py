"""Predictions over an image set: class, confidence, accuracy where labels exist."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

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


def class_names(spec: ModelSpec, n_outputs: int) -> tuple[str, ...]:
    if spec.classes is None:
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
        return sorted({lab for lab, i in zip(self.labels, li) if lab is not None and i < 0})

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
