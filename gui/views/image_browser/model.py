"""The image browser's data: one row per image, with the numpy arrays filters and sorts use.

:class:`ImageListModel` holds one row per image of the selection's image set (row = image
index), with the file name, label, thumbnail and, once predictions are attached, the predicted
class, confidence and correctness. Everything the filters and sort keys need is kept in numpy
arrays, so a filter or sort over 20,000 rows costs milliseconds. :class:`RowFilter` and
:class:`SortKey` say what :class:`~gui.views.image_browser.proxy.ImageFilterProxy` shows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Literal, NamedTuple

import numpy as np
from PySide6.QtCore import (
    QAbstractListModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    Qt,
    QTimer,
    Signal,
    Slot,
)
from PySide6.QtGui import QImage

from engine.data.images import ImageSet
from engine.predict import Predictions
from gui.thumbnails import ThumbnailCache, placeholder_image

__all__ = [
    "NO_LABEL",
    "READY_COALESCE_MS",
    "THUMB_SIZE",
    "TOP_K",
    "Cell",
    "Correctness",
    "ImageListModel",
    "Role",
    "RowFilter",
    "SortKey",
    "consecutive_runs",
]

THUMB_SIZE = 96
"""Thumbnail size in pixels (both sides bounded, aspect kept)."""

TOP_K = 5
"""Number of top classes the single-image pane lists."""

NO_LABEL = -1
"""``RowFilter.label`` value selecting the unlabelled images."""

READY_COALESCE_MS = 50
"""Thumbnail arrivals are turned into ``dataChanged`` at most this often."""

Correctness = Literal["all", "correct", "incorrect"]
_Index = QModelIndex | QPersistentModelIndex
_ROOT = QModelIndex()  # the (invalid) root index, as a default argument


class Role(IntEnum):
    """Item data roles of :class:`ImageListModel` beyond Display/Decoration/ToolTip."""

    PATH = Qt.ItemDataRole.UserRole + 1  # str: absolute file path
    LABEL = Qt.ItemDataRole.UserRole + 2  # str | None
    PREDICTED = Qt.ItemDataRole.UserRole + 3  # str | None: predicted class name
    CONFIDENCE = Qt.ItemDataRole.UserRole + 4  # float | None
    CORRECT = Qt.ItemDataRole.UserRole + 5  # bool | None (None: unlabelled or no prediction)
    CELL = Qt.ItemDataRole.UserRole + 6  # Cell: everything the delegate paints, in one call


class Cell(NamedTuple):
    """What one grid cell shows."""

    name: str
    label: str
    prediction: str  # "dog 87%" or ""
    correct: bool | None
    thumbnail: QImage  # the thumbnail, or the "loading" placeholder


class SortKey(Enum):
    """Orders the grid can show; ties are broken by file path."""

    PATH = "File path"
    LABEL = "Label"
    PREDICTION = "Prediction"
    CONFIDENCE_ASC = "Confidence ↑"
    CONFIDENCE_DESC = "Confidence ↓"

    @property
    def needs_predictions(self) -> bool:
        return self in (SortKey.PREDICTION, SortKey.CONFIDENCE_ASC, SortKey.CONFIDENCE_DESC)


@dataclass(frozen=True)
class RowFilter:
    """Which images the grid shows; every condition must hold.

    ``text``: case-insensitive substring of the file name. ``label``: index into
    :attr:`ImageListModel.labels`, :data:`NO_LABEL` for unlabelled images, None for any.
    ``predicted``: class index or None for any. ``correctness``: ``"correct"`` and
    ``"incorrect"`` only keep labelled images with a prediction. ``min_confidence``: above 0
    it drops images without a prediction.
    """

    text: str = ""
    label: int | None = None
    predicted: int | None = None
    correctness: Correctness = "all"
    min_confidence: float = 0.0



class ImageListModel(QAbstractListModel):
    """One row per image of an :class:`ImageSet`; row ``i`` is ``image_set.records[i]``."""

    predictions_changed = Signal()
    """Emitted after :meth:`set_predictions` (a new image set resets the model instead)."""

    def __init__(self, thumbnails: ThumbnailCache, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thumbs = thumbnails
        self._loading = placeholder_image(thumbnails.size, cross=False)
        self._predictions: Predictions | None = None
        self._paths: tuple[str, ...] = ()
        self._labels_of: tuple[str | None, ...] = ()
        self._names: list[str] = []
        self._names_folded: list[str] = []
        self.labels: tuple[str, ...] = ()
        """Sorted unique labels of the image set."""
        self.classes: tuple[str, ...] = ()
        """Class names of the predictions (empty without predictions)."""
        self._label_idx = np.empty(0, np.int32)  # index into labels, NO_LABEL when unlabelled
        self._pred_row = np.empty(0, np.int64)  # row in the Predictions, -1 when absent
        self._pred = np.empty(0, np.int32)  # predicted class, -1 when none
        self._conf = np.empty(0, np.float32)  # NaN when no prediction
        self._correct = np.empty(0, np.int8)  # 1 correct, 0 incorrect, -1 unknown
        self._path_rank: np.ndarray | None = None
        self._dirty: set[int] = set()
        self._flush = QTimer(self)
        self._flush.setSingleShot(True)
        self._flush.setInterval(READY_COALESCE_MS)
        self._flush.timeout.connect(self._emit_thumbnails_changed)
        thumbnails.ready.connect(self._thumbnail_ready)

    # -- content ------------------------------------------------------------------------------

    @property
    def has_predictions(self) -> bool:
        return bool((self._pred >= 0).any())

    @property
    def has_scored(self) -> bool:
        """Whether some image has both a label the model knows and a prediction."""
        return bool((self._correct >= 0).any())

    def set_images(self, image_set: ImageSet | None) -> None:
        """Show ``image_set`` (None: nothing). Predictions are kept for the paths they cover."""
        self.beginResetModel()
        records = image_set.records if image_set is not None else ()
        self._paths = tuple(r.path for r in records)
        self._labels_of = tuple(r.label for r in records)
        self._names = [os.path.basename(p) for p in self._paths]
        self._names_folded = [n.casefold() for n in self._names]
        self.labels = image_set.labels if image_set is not None else ()
        lookup = {label: i for i, label in enumerate(self.labels)}
        self._label_idx = np.fromiter(
            (NO_LABEL if lab is None else lookup[lab] for lab in self._labels_of),
            dtype=np.int32,
            count=len(self._paths),
        )
        self._path_rank = None
        self._dirty.clear()
        self._thumbs.set_paths(self._paths)
        self._map_predictions()
        self.endResetModel()

    def set_predictions(self, predictions: Predictions | None) -> None:
        """Attach predictions (matched to rows by path); None removes them."""
        self._predictions = predictions
        self._map_predictions()
        if self._paths:
            self.dataChanged.emit(self.index(0), self.index(len(self._paths) - 1))
        self.predictions_changed.emit()

    def _map_predictions(self) -> None:
        n = len(self._paths)
        self._pred_row = np.full(n, -1, np.int64)
        self._pred = np.full(n, -1, np.int32)
        self._conf = np.full(n, np.nan, np.float32)
        self._correct = np.full(n, -1, np.int8)
        p = self._predictions
        self.classes = p.classes if p is not None else ()
        if p is None or n == 0:
            return
        if p.paths == self._paths:
            rows = np.arange(n, dtype=np.int64)
        else:
            lookup = {path: i for i, path in enumerate(p.paths)}
            rows = np.fromiter((lookup.get(path, -1) for path in self._paths), np.int64, n)
        has = rows >= 0
        src = rows[has]
        predicted = p.predicted[src]
        label_index = p.label_index[src]  # a Python loop over the labels: computed once
        scored = (label_index >= 0) & p.valid[src]
        self._pred_row = rows
        self._pred[has] = predicted
        self._conf[has] = p.confidence[src]
        self._correct[has] = np.where(scored, predicted == label_index, -1)

    # -- per-row access -----------------------------------------------------------------------

    def path(self, row: int) -> str:
        return self._paths[row]

    def label(self, row: int) -> str | None:
        return self._labels_of[row]

    def predicted_class(self, row: int) -> str | None:
        c = int(self._pred[row])
        return self.classes[c] if c >= 0 else None

    def confidence(self, row: int) -> float | None:
        c = float(self._conf[row])
        return None if np.isnan(c) else c

    def correct(self, row: int) -> bool | None:
        c = int(self._correct[row])
        return None if c < 0 else bool(c)

    def top_classes(self, row: int, k: int = TOP_K) -> list[tuple[str, float]]:
        """The ``k`` most probable classes of ``row`` (empty without a valid prediction)."""
        if self._predictions is None or not 0 <= row < len(self._pred_row):
            return []
        i = int(self._pred_row[row])
        return self._predictions.top(i, k) if i >= 0 else []

    def thumbnail(self, row: int) -> QImage:
        """The thumbnail of ``row``, or a placeholder while it is being decoded."""
        image = self._thumbs.get(row)
        return image if image is not None else self._loading

    def prediction_text(self, row: int) -> str:
        """``"dog 87%"`` or ``""`` without a prediction."""
        c, conf = self.predicted_class(row), self.confidence(row)
        return "" if c is None or conf is None else f"{c} {conf:.0%}"

    def rowCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self._paths)

    def data(self, index: _Index, role: int = 0) -> object:
        return self.row_data(index.row(), role) if index.isValid() else None

    def row_data(self, row: int, role: int) -> object:
        """``data()`` of ``row``, without building a model index."""
        if role == Role.CELL:
            label = self._labels_of[row]
            return Cell(
                self._names[row],
                label or "",
                self.prediction_text(row),
                self.correct(row),
                self.thumbnail(row),
            )
        if role == Qt.ItemDataRole.DecorationRole:
            return self.thumbnail(row)
        if role == Qt.ItemDataRole.DisplayRole:
            return self._names[row]
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(row)
        if role == Role.PATH:
            return self._paths[row]
        if role == Role.LABEL:
            return self._labels_of[row]
        if role == Role.PREDICTED:
            return self.predicted_class(row)
        if role == Role.CONFIDENCE:
            return self.confidence(row)
        if role == Role.CORRECT:
            return self.correct(row)
        return None

    def _tooltip(self, row: int) -> str:
        lines = [self._paths[row], f"label: {self._labels_of[row] or '(none)'}"]
        pred = self.prediction_text(row)
        if pred:
            verdict = {True: " (correct)", False: " (wrong)", None: ""}[self.correct(row)]
            lines.append(f"predicted: {pred}{verdict}")
        return "\n".join(lines)

    # -- filtering and sorting ----------------------------------------------------------------

    def filter_mask(self, f: RowFilter) -> np.ndarray:
        """Boolean mask over rows: which rows ``f`` keeps."""
        n = len(self._paths)
        mask = np.ones(n, dtype=bool)
        needle = f.text.strip().casefold()
        if needle:
            mask &= np.fromiter((needle in s for s in self._names_folded), bool, n)
        if f.label is not None:
            mask &= self._label_idx == f.label
        if f.predicted is not None:
            mask &= self._pred == f.predicted
        if f.correctness == "correct":
            mask &= self._correct == 1
        elif f.correctness == "incorrect":
            mask &= self._correct == 0
        if f.min_confidence > 0:
            mask &= np.nan_to_num(self._conf, nan=-1.0) >= f.min_confidence
        return mask

    def sort_order(self, key: SortKey) -> np.ndarray:
        """All rows in ``key`` order (a permutation); ties by path, missing values last."""
        rank = self._ranks_by_path()
        if key is SortKey.PATH:
            return np.argsort(rank, kind="stable")
        if key is SortKey.LABEL:
            labels = np.where(self._label_idx < 0, len(self.labels), self._label_idx)
            return np.lexsort((rank, labels))
        if key is SortKey.PREDICTION:
            by_name = np.argsort(np.argsort(np.asarray(self.classes, dtype=object)))
            names = np.where(self._pred < 0, len(self.classes), by_name[np.maximum(self._pred, 0)])
            return np.lexsort((rank, -np.nan_to_num(self._conf, nan=-1.0), names))
        missing = np.isnan(self._conf)
        conf = self._conf if key is SortKey.CONFIDENCE_ASC else -self._conf
        return np.lexsort((rank, np.where(missing, np.inf, conf)))

    def _ranks_by_path(self) -> np.ndarray:
        if self._path_rank is None:
            order = sorted(range(len(self._paths)), key=self._paths.__getitem__)
            rank = np.empty(len(order), np.int64)
            rank[np.asarray(order, dtype=np.int64)] = np.arange(len(order))
            self._path_rank = rank
        return self._path_rank

    def class_counts(self) -> list[tuple[int, int]]:
        """``(class index, number of images predicted as it)`` for every predicted class."""
        counts = np.bincount(self._pred[self._pred >= 0], minlength=len(self.classes))
        return [(int(c), int(counts[c])) for c in np.flatnonzero(counts)]

    def label_counts(self) -> list[tuple[int, int]]:
        """``(label index or NO_LABEL, number of images)``, unlabelled first when present."""
        counts = np.bincount(self._label_idx + 1, minlength=len(self.labels) + 1)
        return [(int(i) - 1, int(counts[i])) for i in np.flatnonzero(counts)]

    # -- thumbnails ---------------------------------------------------------------------------

    @Slot(int)
    def _thumbnail_ready(self, row: int) -> None:
        self._dirty.add(row)
        if not self._flush.isActive():
            self._flush.start()

    def _emit_thumbnails_changed(self) -> None:
        rows, self._dirty = sorted(self._dirty), set()
        roles = [Qt.ItemDataRole.DecorationRole, Role.CELL]
        for first, last in consecutive_runs(rows):
            self.dataChanged.emit(self.index(first), self.index(last), roles)


def consecutive_runs(rows: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(first, last)`` of each run of consecutive integers in sorted ``rows`` (shared with the
    proxy: contiguous rows become one ``dataChanged`` or selection range)."""
    it = iter(rows)
    first = last = next(it, None)
    if first is None:
        return
    for r in it:
        if r != last + 1:
            yield first, last
            first = r
        last = r
    yield first, last

