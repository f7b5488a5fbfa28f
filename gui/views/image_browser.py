"""The image browser: a virtualized thumbnail grid of the image set, filters, and one image.

Structure
---------
* :class:`ImageListModel`: one row per image of the selection's image set (row = image index),
  with the file name, label, thumbnail and, once :meth:`ImageBrowser.set_predictions` was
  called, the predicted class, confidence and correctness. Everything the filters and sort keys
  need is kept in numpy arrays, so a filter or sort over 20,000 rows costs milliseconds.
* :class:`ImageFilterProxy`: the filtered, sorted rows the grid shows. It is a
  ``QAbstractProxyModel`` over a numpy permutation rather than a ``QSortFilterProxyModel``:
  the latter sorts by calling ``lessThan`` once per comparison, which from Python costs
  0.7-1 s for 20,000 rows (bench/browser_scroll.py); here the order is one ``np.lexsort``.
* :class:`ThumbnailDelegate` paints each cell (thumbnail, file name, label, prediction and a
  green/red correctness marker) from one ``data()`` call (:attr:`Role.CELL`); the view is a
  ``QListView`` in icon mode with uniform item sizes and batched layout, so only visible cells
  cost anything. Thumbnails come from :class:`gui.thumbnails.ThumbnailCache`.
* :class:`ImageDetail`: the current image scaled to fit, its name, label and the model's top
  classes with probability bars. The full image is decoded on a worker thread.

Selection
---------
The grid mirrors the shared :class:`~gui.selection.Selection`: the current item is
``selection.current_image`` and the selected items are ``selection.selected_images``, both as
image indices (source rows). Changes made in the grid are written to the selection; changes
made elsewhere select and scroll to the item. A guard flag stops the echo. Filtering never
changes the selection: hidden images stay selected until the user selects something else.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Literal, NamedTuple

import numpy as np
from PySide6.QtCore import (
    QAbstractListModel,
    QAbstractProxyModel,
    QItemSelection,
    QItemSelectionModel,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
    QRect,
    QSize,
    Qt,
    QTimer,
    Signal,
    Slot,
)
from PySide6.QtGui import (
    QColor,
    QFont,
    QImage,
    QPainter,
    QPaintEvent,
    QPalette,
    QPen,
    QPixmap,
    QResizeEvent,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QApplication,
    QComboBox,
    QDoubleSpinBox,
    QGridLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListView,
    QProgressBar,
    QSizePolicy,
    QSplitter,
    QStyle,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QVBoxLayout,
    QWidget,
)

from engine.data.images import ImageSet
from engine.predict import Predictions
from gui.context import AppContext
from gui.views.base import View
from gui.thumbnails import ThumbnailCache, load_preview, placeholder_image

__all__ = [
    "NO_LABEL",
    "PREVIEW_MAX_SIDE",
    "READY_COALESCE_MS",
    "THUMB_SIZE",
    "TOP_K",
    "Correctness",
    "ImageBrowser",
    "ImageDetail",
    "ImageFilterProxy",
    "ImageListModel",
    "Cell",
    "Role",
    "RowFilter",
    "SortKey",
    "ThumbnailDelegate",
]

THUMB_SIZE = 96
"""Thumbnail size in pixels (both sides bounded, aspect kept)."""

TOP_K = 5
"""Number of top classes the single-image pane lists."""

PREVIEW_MAX_SIDE = 1024
"""The pane's image is decoded at most this large; it is scaled down further to fit."""

NO_LABEL = -1
"""``RowFilter.label`` value selecting the unlabelled images."""

READY_COALESCE_MS = 50
"""Thumbnail arrivals are turned into ``dataChanged`` at most this often."""

_PAD = 4
_CELL_WIDTH = THUMB_SIZE + 32
_CORRECT_COLOR = QColor(46, 160, 67)
_WRONG_COLOR = QColor(218, 54, 51)

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


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


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

    def rowCount(self, parent: _Index = _ROOT) -> int:  # noqa: N802
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
        for first, last in _runs(rows):
            self.dataChanged.emit(self.index(first), self.index(last), roles)


class ImageFilterProxy(QAbstractProxyModel):
    """The rows of an :class:`ImageListModel` that pass a :class:`RowFilter`, in
    :class:`SortKey` order. Any change of filter, sort or source content resets this model
    (restoring the selection is the view's business)."""

    def __init__(self, source: ImageListModel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._source = source
        self._filter = RowFilter()
        self._sort = SortKey.PATH
        self._order = np.empty(0, np.int64)  # proxy row -> source row
        self._inverse = np.empty(0, np.int64)  # source row -> proxy row, -1 when hidden
        self.setSourceModel(source)
        source.modelAboutToBeReset.connect(self.beginResetModel)
        source.modelReset.connect(self._source_reset)
        source.predictions_changed.connect(self._refresh)
        source.dataChanged.connect(self._source_data_changed)
        self._recompute()

    def set_filter(self, f: RowFilter) -> None:
        if f != self._filter:
            self._filter = f
            self._refresh()

    def set_sort(self, key: SortKey) -> None:
        if key is not self._sort:
            self._sort = key
            self._refresh()

    def source_row(self, row: int) -> int:
        """The image index shown at proxy ``row``."""
        return int(self._order[row])

    def proxy_row(self, source_row: int) -> int:
        """Where image ``source_row`` is shown; -1 when it is filtered out (or unknown)."""
        if 0 <= source_row < len(self._inverse):
            return int(self._inverse[source_row])
        return -1

    def source_rows(self, selection: QItemSelection) -> tuple[int, ...]:
        """The sorted image indices of a selection of proxy rows."""
        parts = [self._order[r.top() : r.bottom() + 1] for r in selection]
        rows = np.unique(np.concatenate(parts)) if parts else np.empty(0, np.int64)
        return tuple(rows.tolist())

    def proxy_selection(self, source_rows: Sequence[int]) -> QItemSelection:
        """A selection of the visible rows among ``source_rows``."""
        rows = np.asarray(source_rows, dtype=np.int64)
        rows = rows[(rows >= 0) & (rows < len(self._inverse))]
        shown = np.sort(self._inverse[rows])
        selection = QItemSelection()
        for first, last in _runs(shown[shown >= 0].tolist()):
            selection.select(self.index(first, 0), self.index(last, 0))
        return selection

    def _refresh(self) -> None:
        self.beginResetModel()
        self._recompute()
        self.endResetModel()

    def _source_reset(self) -> None:
        self._recompute()
        self.endResetModel()

    def _recompute(self) -> None:
        n = self._source.rowCount()
        if self._sort.needs_predictions and not self._source.has_predictions:
            self._sort = SortKey.PATH
        order = self._source.sort_order(self._sort)
        self._order = order[self._source.filter_mask(self._filter)[order]]
        self._inverse = np.full(n, -1, np.int64)
        self._inverse[self._order] = np.arange(len(self._order))

    def _source_data_changed(
        self, top_left: QModelIndex, bottom_right: QModelIndex, roles: list[int]
    ) -> None:
        shown = self._inverse[top_left.row() : bottom_right.row() + 1]
        shown = np.sort(shown[shown >= 0])
        if len(shown) == len(self._order) and len(shown):
            self.dataChanged.emit(self.index(0, 0), self.index(len(shown) - 1, 0), roles)
            return
        for first, last in _runs(shown.tolist()):
            self.dataChanged.emit(self.index(first, 0), self.index(last, 0), roles)

    # -- QAbstractProxyModel ------------------------------------------------------------------

    def data(self, index: _Index, role: int = 0) -> object:
        # Straight to the source's rows: no source QModelIndex per call while painting.
        if not index.isValid() or index.row() >= len(self._order):
            return None
        return self._source.row_data(int(self._order[index.row()]), role)

    def rowCount(self, parent: _Index = _ROOT) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self._order)

    def columnCount(self, parent: _Index = _ROOT) -> int:  # noqa: N802
        return 0 if parent.isValid() else 1

    def hasChildren(self, parent: _Index = _ROOT) -> bool:  # noqa: N802
        return not parent.isValid() and len(self._order) > 0

    def index(
        self,
        row: int,
        column: int,
        parent: _Index = _ROOT,
    ) -> QModelIndex:
        if parent.isValid() or column != 0 or not 0 <= row < len(self._order):
            return QModelIndex()
        return self.createIndex(row, 0)

    def parent(self, child: _Index = _ROOT) -> QModelIndex:
        return QModelIndex()

    def mapToSource(self, proxy_index: _Index) -> QModelIndex:  # noqa: N802
        if not proxy_index.isValid() or proxy_index.row() >= len(self._order):
            return QModelIndex()
        return self._source.index(int(self._order[proxy_index.row()]), 0)

    def mapFromSource(self, source_index: _Index) -> QModelIndex:  # noqa: N802
        row = self.proxy_row(source_index.row()) if source_index.isValid() else -1
        return self.createIndex(row, 0) if row >= 0 else QModelIndex()


def _runs(rows: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(first, last)`` of each run of consecutive integers in sorted ``rows``."""
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


# --------------------------------------------------------------------------------------------
# Grid painting
# --------------------------------------------------------------------------------------------


class ThumbnailDelegate(QStyledItemDelegate):
    """Paints a grid cell: thumbnail, correctness marker, file name, label, prediction."""

    def __init__(self, thumb_size: int, line_height: int, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.thumb_size = thumb_size
        self.line_height = line_height
        self.cell = QSize(_CELL_WIDTH, _PAD + thumb_size + _PAD + 3 * line_height + _PAD)

    def sizeHint(  # noqa: N802
        self, option: QStyleOptionViewItem, index: _Index
    ) -> QSize:
        return self.cell

    def paint(
        self,
        painter: QPainter,
        option: QStyleOptionViewItem,
        index: _Index,
    ) -> None:
        info: Cell = index.data(Role.CELL)
        image = info.thumbnail
        widget = option.widget  # type: ignore[attr-defined]
        style = widget.style() if widget is not None else QApplication.style()
        rect: QRect = option.rect  # type: ignore[attr-defined]
        state = option.state  # type: ignore[attr-defined]
        palette: QPalette = option.palette  # type: ignore[attr-defined]
        selected = bool(state & QStyle.StateFlag.State_Selected)

        painter.save()
        style.drawPrimitive(QStyle.PrimitiveElement.PE_PanelItemViewItem, option, painter, widget)
        size = self.thumb_size
        x = rect.x() + (rect.width() - image.width()) // 2
        y = rect.y() + _PAD + (size - image.height()) // 2
        painter.drawImage(x, y, image)
        if info.correct is not None:
            painter.setRenderHint(QPainter.RenderHint.Antialiasing)
            painter.setPen(QPen(Qt.GlobalColor.white, 1.5))
            painter.setBrush(_CORRECT_COLOR if info.correct else _WRONG_COLOR)
            d = max(8, size // 8)
            painter.drawEllipse(x + image.width() - d - 3, y + 3, d, d)

        group = (
            QPalette.ColorGroup.Active
            if state & QStyle.StateFlag.State_Active
            else QPalette.ColorGroup.Inactive
        )
        text_role = QPalette.ColorRole.HighlightedText if selected else QPalette.ColorRole.Text
        text_color = palette.color(group, text_role)
        muted = text_color if selected else palette.color(group, QPalette.ColorRole.PlaceholderText)
        fm = option.fontMetrics  # type: ignore[attr-defined]
        width = rect.width() - 2 * _PAD
        line = QRect(rect.x() + _PAD, rect.y() + 2 * _PAD + size, width, self.line_height)
        center = Qt.AlignmentFlag.AlignHCenter | Qt.AlignmentFlag.AlignVCenter
        for text, color in (
            (info.name, text_color),
            (info.label, muted),
            (info.prediction, self._prediction_color(info.correct, selected, text_color)),
        ):
            if text:
                painter.setPen(color)
                elided = fm.elidedText(text, Qt.TextElideMode.ElideMiddle, width)
                painter.drawText(line, center, elided)
            line.translate(0, self.line_height)
        if state & QStyle.StateFlag.State_HasFocus:
            style.drawPrimitive(QStyle.PrimitiveElement.PE_FrameFocusRect, option, painter, widget)
        painter.restore()

    @staticmethod
    def _prediction_color(correct: bool | None, selected: bool, text: QColor) -> QColor:
        if selected or correct is None:
            return text
        return (_CORRECT_COLOR if correct else _WRONG_COLOR).darker(120)


# --------------------------------------------------------------------------------------------
# Single-image pane
# --------------------------------------------------------------------------------------------


class _PreviewBridge(QObject):
    """Emitted from the preview worker; lives on the GUI thread, so delivery is queued."""

    loaded = Signal(int, object)  # request token, QImage (a null image: unreadable)


class _PreviewLoader(QObject):
    """Decodes the most recently requested image on a worker thread.

    One request at a time; requests made while one is decoding replace each other, so holding
    an arrow key down decodes only the images the user stops on. ``loaded`` fires on the GUI
    thread for the newest request only.
    """

    loaded = Signal(object)  # QImage | None (unreadable)

    def __init__(self, max_side: int, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._max_side = max_side
        self._lock = threading.Lock()
        self._token = 0
        self._wanted: tuple[int, str] | None = None
        self._busy = False
        self._bridge = _PreviewBridge(self)  # dies with the loader; see _work
        self._bridge.loaded.connect(self._deliver)

    def request(self, path: str) -> None:
        with self._lock:
            self._token += 1
            self._wanted = (self._token, path)
            if self._busy:
                return
            self._busy = True
        threading.Thread(target=self._work, name="convlens-preview", daemon=True).start()

    def cancel(self) -> None:
        """Forget the pending request; a result in flight is dropped."""
        with self._lock:
            self._token += 1
            self._wanted = None

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._wanted is None:
                    self._busy = False
                    return
                token, path = self._wanted
                self._wanted = None
            image = load_preview(path, self._max_side)
            try:
                self._bridge.loaded.emit(token, image if image is not None else QImage())
            except RuntimeError:  # the loader was deleted (its view closed)
                return

    @Slot(int, object)
    def _deliver(self, token: int, image: QImage) -> None:
        if token == self._token:
            self.loaded.emit(None if image.isNull() else image)


class _ImageCanvas(QWidget):
    """An image scaled to fit (aspect kept, smooth), or a centred message."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._image: QImage | None = None
        self._scaled: QPixmap | None = None
        self._message = ""
        self.setMinimumSize(96, 96)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    def set_image(self, image: QImage | None, message: str = "") -> None:
        self._image, self._scaled, self._message = image, None, message
        self.update()

    def paintEvent(self, event: QPaintEvent) -> None:  # noqa: N802
        painter = QPainter(self)
        if self._image is None or self._image.isNull():
            painter.setPen(self.palette().color(QPalette.ColorRole.PlaceholderText))
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, self._message)
            return
        if self._scaled is None or not _fits(self._scaled.size(), self.size()):
            enlarging = self._image.width() * 2 <= self.width() and self._image.height() * 2 <= self.height()
            scaled = self._image.scaled(  # tiny images enlarge with their true pixels, not a blur
                self.size(),
                Qt.AspectRatioMode.KeepAspectRatio,
                Qt.TransformationMode.FastTransformation if enlarging else Qt.TransformationMode.SmoothTransformation,
            )
            self._scaled = QPixmap.fromImage(scaled)
        x = (self.width() - self._scaled.width()) // 2
        y = (self.height() - self._scaled.height()) // 2
        painter.drawPixmap(x, y, self._scaled)


def _fits(scaled: QSize, box: QSize) -> bool:
    """Whether an image scaled earlier still exactly fits ``box`` along one side."""
    return (
        scaled.width() <= box.width()
        and scaled.height() <= box.height()
        and (scaled.width() == box.width() or scaled.height() == box.height())
    )


class ImageDetail(QWidget):
    """The current image: picture, file name, label, prediction and top classes."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.canvas = _ImageCanvas(self)
        self.title = QLabel(self)
        self.title.setWordWrap(True)
        self.title.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        bold = QFont(self.title.font())
        bold.setBold(True)
        self.title.setFont(bold)
        self.info = QLabel(self)
        self.info.setWordWrap(True)
        self.class_labels: list[QLabel] = []
        self.class_bars: list[QProgressBar] = []
        self.class_values: list[QLabel] = []
        grid = QGridLayout()
        grid.setColumnStretch(1, 1)
        for k in range(TOP_K):
            name = QLabel(self)
            bar = QProgressBar(self)
            bar.setRange(0, 1000)
            bar.setTextVisible(False)
            bar.setMaximumHeight(name.sizeHint().height())
            value = QLabel(self)
            value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            value.setMinimumWidth(value.fontMetrics().horizontalAdvance("100.0 %"))
            for column, w in enumerate((name, bar, value)):
                grid.addWidget(w, k, column)
            self.class_labels.append(name)
            self.class_bars.append(bar)
            self.class_values.append(value)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.canvas, 1)
        layout.addWidget(self.title)
        layout.addWidget(self.info)
        layout.addLayout(grid)
        self.show_record(None, "", None, "", [])

    def show_record(
        self,
        path: str | None,
        label: str,
        correct: bool | None,
        prediction: str,
        top: list[tuple[str, float]],
    ) -> None:
        """Show the text of one image (``path`` None: no image). The picture comes separately
        through :meth:`set_image`."""
        if path is None:
            self.title.setText("")
            self.info.setText("")
            self.canvas.set_image(None, "No image selected")
        else:
            self.title.setText(os.path.basename(path))
            self.title.setToolTip(path)
            lines = [f"Label: {label or '(none)'}"]
            if prediction:
                verdict = {True: " ✓", False: " ✗", None: ""}[correct]
                lines.append(f"Predicted: {prediction}{verdict}")
            self.info.setText("\n".join(lines))
        rows = zip(self.class_labels, self.class_bars, self.class_values, strict=True)
        for k, (name, bar, value) in enumerate(rows):
            shown = k < len(top)
            for w in (name, bar, value):
                w.setVisible(shown)
            if shown:
                cls, p = top[k]
                font = QFont(name.font())
                font.setBold(cls == label)
                name.setFont(font)
                name.setText(cls)
                bar.setValue(round(1000 * p))
                value.setText(f"{100 * p:.1f} %")

    def set_image(self, image: QImage | None, message: str = "") -> None:
        self.canvas.set_image(image, message)

    def sizeHint(self) -> QSize:  # noqa: N802
        return QSize(300, 300)

    def top_classes(self) -> list[tuple[str, str]]:
        """The listed classes with their percentages as shown, best first."""
        return [
            (name.text(), value.text())
            for name, value in zip(self.class_labels, self.class_values, strict=True)
            if not name.isHidden()
        ]


# --------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------


class ImageBrowser(View):
    """Dockable image browser: filter/sort toolbar, thumbnail grid, single-image pane."""

    title = "Images"
    object_name = "images"
    area = Qt.DockWidgetArea.LeftDockWidgetArea
    order = 10

    def __init__(
        self,
        ctx: AppContext,
        parent: QWidget | None = None,
        thumbnails: ThumbnailCache | None = None,
    ) -> None:
        """``thumbnails``: the cache to use (default: a new one with the on-disk cache)."""
        super().__init__(ctx, parent)
        selection = ctx.selection
        self.selection = selection
        self._syncing = False
        if thumbnails is None:
            thumbnails = ThumbnailCache(THUMB_SIZE, parent=self)
            self.destroyed.connect(thumbnails.close)
        self.thumbnails = thumbnails
        self.model = ImageListModel(thumbnails, self)
        self.proxy = ImageFilterProxy(self.model, self)

        self._build_toolbar()
        self.view = QListView(self)
        self.view.setViewMode(QListView.ViewMode.IconMode)
        self.view.setMovement(QListView.Movement.Static)
        self.view.setResizeMode(QListView.ResizeMode.Adjust)
        self.view.setLayoutMode(QListView.LayoutMode.Batched)
        self.view.setBatchSize(1000)
        self.view.setUniformItemSizes(True)
        self.view.setWrapping(True)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setVerticalScrollMode(QAbstractItemView.ScrollMode.ScrollPerPixel)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        delegate = ThumbnailDelegate(thumbnails.size, self.view.fontMetrics().height(), self.view)
        self.view.setItemDelegate(delegate)
        self.view.setGridSize(delegate.cell)
        self.view.verticalScrollBar().setSingleStep(delegate.cell.height() // 3)
        self.view.setModel(self.proxy)
        sm = self.view.selectionModel()
        sm.currentChanged.connect(self._view_current_changed)
        sm.selectionChanged.connect(self._view_selection_changed)

        self.detail = ImageDetail(self)
        self._preview = _PreviewLoader(PREVIEW_MAX_SIDE, self)
        self._preview.loaded.connect(self._preview_loaded)
        self.splitter = QSplitter(Qt.Orientation.Horizontal, self)
        self.splitter.addWidget(self.view)
        self.splitter.addWidget(self.detail)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setChildrenCollapsible(False)
        self._split_set = False

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.splitter, 1)

        self.proxy.modelReset.connect(self._proxy_reset)
        selection.images_changed.connect(self._images_changed)
        selection.current_image_changed.connect(self._current_image_changed)
        selection.selected_images_changed.connect(self._selected_images_changed)
        self._images_changed(selection.images)
        if ctx.session is not None:
            ctx.session.predictions_changed.connect(self.set_predictions)
            if ctx.session.predictions is not None:
                self.set_predictions(ctx.session.predictions)

    # -- public API ---------------------------------------------------------------------------

    def set_predictions(self, preds: Predictions | None) -> None:
        """Show the model's predictions (matched to images by path); None removes them."""
        self.model.set_predictions(preds)
        self._fill_prediction_controls()
        self._show_current(reload_image=False)

    def export_target(self) -> QWidget:
        """The widget figure export renders: the thumbnail grid."""
        return self.view

    # -- toolbar ------------------------------------------------------------------------------

    def _build_toolbar(self) -> None:
        """Two rows, so every control stays visible in a narrow dock: search, sort and count on
        top; the label, prediction, correctness and confidence filters below."""
        self.toolbar = QWidget(self)
        self.text_filter = QLineEdit(self)
        self.text_filter.setPlaceholderText("Filter file names…")
        self.text_filter.setClearButtonEnabled(True)
        self.label_filter = QComboBox(self)
        self.label_filter.setToolTip("Show images with this label")
        self.prediction_filter = QComboBox(self)
        self.prediction_filter.setToolTip("Show images predicted as this class")
        self.correctness_filter = QComboBox(self)
        self.correctness_filter.setToolTip("Correctly or wrongly predicted labelled images")
        for text, value in (("All", "all"), ("Correct", "correct"), ("Incorrect", "incorrect")):
            self.correctness_filter.addItem(text, value)
        self.min_confidence = QDoubleSpinBox(self)
        self.min_confidence.setRange(0.0, 1.0)
        self.min_confidence.setSingleStep(0.05)
        self.min_confidence.setDecimals(2)
        self.min_confidence.setPrefix("conf ≥ ")
        self.min_confidence.setToolTip("Minimum confidence of the prediction")
        self.sort_combo = QComboBox(self)
        self.sort_combo.setToolTip("Sort order")
        for key in SortKey:
            self.sort_combo.addItem(key.value, key)
        self.count_label = QLabel(self)
        self.count_label.setContentsMargins(6, 0, 6, 0)
        rows = QVBoxLayout(self.toolbar)
        rows.setContentsMargins(4, 4, 4, 4)
        rows.setSpacing(4)
        for widgets in ((self.text_filter, self.sort_combo, self.count_label),
                        (self.label_filter, self.prediction_filter, self.correctness_filter, self.min_confidence)):
            row = QHBoxLayout()
            row.setSpacing(4)
            for w in widgets:
                w.setSizePolicy(QSizePolicy.Policy.Expanding if w is not self.count_label else QSizePolicy.Policy.Fixed,
                                QSizePolicy.Policy.Fixed)
                row.addWidget(w)
            rows.addLayout(row)

        self.text_filter.textChanged.connect(self._apply_filter)
        self.label_filter.currentIndexChanged.connect(self._apply_filter)
        self.prediction_filter.currentIndexChanged.connect(self._apply_filter)
        self.correctness_filter.currentIndexChanged.connect(self._apply_filter)
        self.min_confidence.valueChanged.connect(self._apply_filter)
        self.sort_combo.currentIndexChanged.connect(self._apply_sort)

    def _fill_label_controls(self) -> None:
        combo = self.label_filter
        combo.blockSignals(True)
        combo.clear()
        combo.addItem(f"All labels ({self.model.rowCount()})", None)
        for i, count in self.model.label_counts():
            name = "(unlabelled)" if i == NO_LABEL else self.model.labels[i]
            combo.addItem(f"{name} ({count})", i)
        combo.setEnabled(bool(self.model.labels))
        combo.blockSignals(False)

    def _fill_prediction_controls(self) -> None:
        has_preds = self.model.has_predictions
        combo = self.prediction_filter
        previous = combo.currentData()
        combo.blockSignals(True)
        combo.clear()
        combo.addItem("All predictions", None)
        for c, count in sorted(self.model.class_counts(), key=lambda t: self.model.classes[t[0]]):
            combo.addItem(f"{self.model.classes[c]} ({count})", c)
        combo.setCurrentIndex(max(0, combo.findData(previous)))
        combo.setEnabled(has_preds)
        combo.blockSignals(False)
        scored = self.model.has_scored
        self.correctness_filter.setEnabled(scored)
        if not scored:
            self.correctness_filter.setCurrentIndex(0)
        self.min_confidence.setEnabled(has_preds)
        sort_items = self.sort_combo.model()
        for row in range(self.sort_combo.count()):
            key: SortKey = self.sort_combo.itemData(row)
            enabled = has_preds or not key.needs_predictions
            sort_items.item(row).setEnabled(enabled)  # type: ignore[attr-defined]
        if not has_preds:
            self.sort_combo.setCurrentIndex(0)
        self._apply_filter()

    def _current_filter(self) -> RowFilter:
        return RowFilter(
            text=self.text_filter.text(),
            label=self.label_filter.currentData(),
            predicted=self.prediction_filter.currentData(),
            correctness=self.correctness_filter.currentData() or "all",
            min_confidence=self.min_confidence.value() if self.min_confidence.isEnabled() else 0.0,
        )

    def _apply_filter(self) -> None:
        self.proxy.set_filter(self._current_filter())
        self._update_count()

    def _apply_sort(self) -> None:
        self.proxy.set_sort(self.sort_combo.currentData())

    def _update_count(self) -> None:
        self.count_label.setText(f"{self.proxy.rowCount()} of {self.model.rowCount()} images")

    # -- selection sync -----------------------------------------------------------------------

    @contextmanager
    def _sync(self) -> Iterator[None]:
        """Mark changes made while mirroring, so that they are not echoed back."""
        old, self._syncing = self._syncing, True
        try:
            yield
        finally:
            self._syncing = old

    def _images_changed(self, images: object) -> None:
        with self._sync():
            self.model.set_images(images if isinstance(images, ImageSet) else None)
            self.text_filter.blockSignals(True)
            self.text_filter.clear()
            self.text_filter.blockSignals(False)
            self._fill_label_controls()
            self._fill_prediction_controls()
        self._show_current(reload_image=True)

    def _proxy_reset(self) -> None:
        self._mirror_selection(scroll=True)
        self._update_count()

    def _current_image_changed(self, index: int) -> None:
        if not self._syncing:
            self._mirror_selection(scroll=True)
        self._show_current(reload_image=True)

    def _selected_images_changed(self, rows: object) -> None:
        if not self._syncing:
            self._mirror_selection(scroll=False)

    def _mirror_selection(self, scroll: bool) -> None:
        """Make the grid's current item and selection those of ``self.selection``."""
        sm = self.view.selectionModel()
        current = self.selection.current_image
        selected = self.selection.selected_images
        with self._sync():
            items = self.proxy.proxy_selection(selected)
            row = self.proxy.proxy_row(current)
            if row >= 0:
                index = self.proxy.index(row, 0)
                if current not in selected:
                    items.select(index, index)
                sm.setCurrentIndex(index, QItemSelectionModel.SelectionFlag.NoUpdate)
                if scroll:
                    self.view.scrollTo(index)
            else:
                sm.clearCurrentIndex()
            sm.select(items, QItemSelectionModel.SelectionFlag.ClearAndSelect)

    def _view_current_changed(self, current: QModelIndex, previous: QModelIndex) -> None:
        if self._syncing or not current.isValid():
            return
        with self._sync():
            self.selection.current_image = self.proxy.source_row(current.row())

    def _view_selection_changed(self, selected: QItemSelection, deselected: QItemSelection) -> None:
        if self._syncing:
            return
        rows = self.proxy.source_rows(self.view.selectionModel().selection())
        with self._sync():
            self.selection.selected_images = rows

    # -- single-image pane --------------------------------------------------------------------

    def _show_current(self, reload_image: bool) -> None:
        row = self.selection.current_image
        if not 0 <= row < self.model.rowCount():
            self._preview.cancel()
            self.detail.show_record(None, "", None, "", [])
            return
        m = self.model
        label = m.label(row) or ""
        self.detail.show_record(
            m.path(row), label, m.correct(row), m.prediction_text(row), m.top_classes(row)
        )
        if reload_image:
            self.detail.set_image(None, "Loading…")
            self._preview.request(m.path(row))

    def _preview_loaded(self, image: QImage | None) -> None:
        self.detail.set_image(image, "" if image is not None else "Cannot read this image")

    # -- layout -------------------------------------------------------------------------------

    def resizeEvent(self, event: QResizeEvent) -> None:  # noqa: N802
        """Put the single-image pane beside the grid when wide, below it when tall."""
        super().resizeEvent(event)
        wide = self.width() >= 1.2 * self.height()
        orientation = Qt.Orientation.Horizontal if wide else Qt.Orientation.Vertical
        if self.splitter.orientation() != orientation or not self._split_set:
            self.splitter.setOrientation(orientation)
            self.splitter.setSizes([3000, 1000])  # scaled to the space: 3/4 grid, 1/4 pane
            self._split_set = True

