"""The rows the image grid shows: :class:`ImageFilterProxy`, a filtered, sorted view of an
:class:`~gui.views.image_browser.model.ImageListModel`.

It is a ``QAbstractProxyModel`` over a numpy permutation rather than a
``QSortFilterProxyModel``: the latter sorts by calling ``lessThan`` once per comparison, which
from Python costs 0.7-1 s for 20,000 rows (bench/browser_scroll.py); here the order is one
``np.lexsort``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PySide6.QtCore import (
    QAbstractProxyModel,
    QItemSelection,
    QModelIndex,
    QObject,
    QPersistentModelIndex,
)

from .model import ImageListModel, RowFilter, SortKey, consecutive_runs

__all__ = ["ImageFilterProxy"]

_Index = QModelIndex | QPersistentModelIndex
_ROOT = QModelIndex()  # the (invalid) root index, as a default argument


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
        for first, last in consecutive_runs(shown[shown >= 0].tolist()):
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
        for first, last in consecutive_runs(shown.tolist()):
            self.dataChanged.emit(self.index(first, 0), self.index(last, 0), roles)

    # -- QAbstractProxyModel ------------------------------------------------------------------

    def data(self, index: _Index, role: int = 0) -> object:
        # Straight to the source's rows: no source QModelIndex per call while painting.
        if not index.isValid() or index.row() >= len(self._order):
            return None
        return self._source.row_data(int(self._order[index.row()]), role)

    def rowCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self._order)

    def columnCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else 1

    def hasChildren(self, parent: _Index = _ROOT) -> bool:
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

    def mapToSource(self, proxy_index: _Index) -> QModelIndex:
        if not proxy_index.isValid() or proxy_index.row() >= len(self._order):
            return QModelIndex()
        return self._source.index(int(self._order[proxy_index.row()]), 0)

    def mapFromSource(self, source_index: _Index) -> QModelIndex:
        row = self.proxy_row(source_index.row()) if source_index.isValid() else -1
        return self.createIndex(row, 0) if row >= 0 else QModelIndex()
