"""The filtered, sorted rows of a :class:`~gui.widgets.result_table.model.ResultTableModel`."""

from __future__ import annotations

from typing import Any

import numpy as np
from PySide6.QtCore import QAbstractProxyModel, QModelIndex, QObject, QPersistentModelIndex, Qt

from .model import ResultTableModel

__all__ = ["ResultFilterProxy"]

_Index = QModelIndex | QPersistentModelIndex
_ROOT = QModelIndex()  # the (invalid) root index, as a default argument


class ResultFilterProxy(QAbstractProxyModel):
    """The rows of a :class:`ResultTableModel` that pass the filters, in sort order."""

    def __init__(self, source: ResultTableModel, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._source = source
        self._text = ""
        self._thresholds: dict[str, tuple[float | None, float | None]] = {}
        self._sort_column = -1
        self._sort_order = Qt.SortOrder.AscendingOrder
        self._sorted_rows = np.empty(0, np.int64)  # every source row, in sort order
        self._order = np.empty(0, np.int64)  # proxy row -> source row
        self._inverse = np.empty(0, np.int64)  # source row -> proxy row, -1 when hidden
        self.setSourceModel(source)
        source.modelAboutToBeReset.connect(self.beginResetModel)
        source.modelReset.connect(self._source_reset)
        self._source_reset_rows()
        self._recompute()

    # -- filters and order --------------------------------------------------------------------

    @property
    def text_filter(self) -> str:
        return self._text

    @property
    def thresholds(self) -> dict[str, tuple[float | None, float | None]]:
        """Column key -> (minimum, maximum), either None for no bound."""
        return dict(self._thresholds)

    def set_text_filter(self, text: str) -> None:
        """Keep rows where a searchable column contains ``text`` (case-insensitive, trimmed)."""
        text = text.strip().casefold()
        if text != self._text:
            self._text = text
            self._relayout()

    def set_threshold(self, key: str, minimum: float | None = None, maximum: float | None = None) -> None:
        """Keep rows with ``minimum <= value <= maximum`` in numeric column ``key`` (NaN never
        passes); both None removes the column's threshold."""
        column = self._source.columns[self._source.column_index(key)]
        if not column.numeric:
            raise ValueError(f"column {key!r} holds text: thresholds need a numeric column")
        bounds = (minimum, maximum)
        if bounds == (None, None):
            changed = self._thresholds.pop(key, None) is not None
        else:
            changed = self._thresholds.get(key) != bounds
            self._thresholds[key] = bounds
        if changed:
            self._relayout()

    def sort(self, column: int, order: Qt.SortOrder = Qt.SortOrder.AscendingOrder) -> None:
        """Order rows by ``column`` (-1: source order). The sort is stable: ties keep the order
        shown before, so sorting by B and then by A orders by A, then B (as
        ``QSortFilterProxyModel`` does); new rows start from their own order."""
        if (column, order) != (self._sort_column, self._sort_order):
            self._sort_column, self._sort_order = column, order
            self._sorted_rows = self._sorted(self._sorted_rows)
            self._relayout()

    def sort_column(self) -> int:
        return self._sort_column

    def sort_order(self) -> Qt.SortOrder:
        return self._sort_order

    def source_row(self, row: int) -> int:
        """The source row shown at proxy ``row``."""
        return int(self._order[row])

    def proxy_row(self, source_row: int) -> int:
        """Where source ``source_row`` is shown; -1 when it is filtered out (or unknown)."""
        return int(self._inverse[source_row]) if 0 <= source_row < len(self._inverse) else -1

    def shown_rows(self) -> np.ndarray:
        """The source rows in shown order (read-only)."""
        return self._order

    def filter_mask(self) -> np.ndarray:
        """Boolean mask over source rows: which rows the filters keep."""
        m = self._source
        mask = np.ones(m.rowCount(), dtype=bool)
        if self._text:
            hit = np.zeros_like(mask)
            for key in m.searchable_keys():
                hit |= np.char.find(m.folded(key), self._text) >= 0
            mask &= hit
        for key, (lo, hi) in self._thresholds.items():
            values = m.values(key).astype(np.float64)
            if lo is not None:
                mask &= values >= lo
            if hi is not None:
                mask &= values <= hi
        return mask

    def _sorted(self, rows: np.ndarray) -> np.ndarray:
        """``rows`` stably sorted by the sort column: missing values last, then by value, ties
        in their order in ``rows``."""
        if not 0 <= self._sort_column < len(self._source.columns):
            return np.sort(rows)
        column = self._source.columns[self._sort_column]
        values = self._source.values(column.key)[rows]
        keys = np.asarray(column.sort_key(values) if column.sort_key is not None else values)
        missing = np.isnan(keys) if keys.dtype.kind == "f" else np.zeros(len(rows), dtype=bool)
        rank = np.unique(keys, return_inverse=True)[1].reshape(-1).astype(np.int64)
        if self._sort_order == Qt.SortOrder.DescendingOrder:
            rank = -rank
        return rows[np.lexsort((np.arange(len(rows)), rank, missing))]

    def _source_reset_rows(self) -> None:
        self._sorted_rows = self._sorted(np.arange(self._source.rowCount(), dtype=np.int64))

    def _recompute(self) -> None:
        n = self._source.rowCount()
        self._order = self._sorted_rows[self.filter_mask()[self._sorted_rows]]
        self._order.flags.writeable = False
        self._inverse = np.full(n, -1, np.int64)
        self._inverse[self._order] = np.arange(len(self._order))

    def _relayout(self) -> None:
        """Recompute the rows as a layout change: persistent indices (the selection, the
        current row) follow their source rows, or become invalid when filtered out."""
        self.layoutAboutToBeChanged.emit()
        old = self.persistentIndexList()
        sources = [(int(self._order[i.row()]), i.column()) if i.isValid() else (-1, 0) for i in old]
        self._recompute()
        new = [self.index(self.proxy_row(r), c) if r >= 0 and self.proxy_row(r) >= 0 else QModelIndex()
               for r, c in sources]
        self.changePersistentIndexList(old, new)
        self.layoutChanged.emit()

    def _source_reset(self) -> None:
        self._source_reset_rows()
        self._recompute()
        self.endResetModel()

    # -- QAbstractProxyModel ------------------------------------------------------------------

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or index.row() >= len(self._order):
            return None
        return self._source.cell(int(self._order[index.row()]), index.column(), role)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        return self._source.headerData(section, orientation, role)  # shown even when no row is

    def flags(self, index: _Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.ItemFlag.NoItemFlags
        return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable

    def rowCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self._order)

    def columnCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self._source.columns)

    def hasChildren(self, parent: _Index = _ROOT) -> bool:
        return not parent.isValid() and len(self._order) > 0

    def index(self, row: int, column: int, parent: _Index = _ROOT) -> QModelIndex:
        if parent.isValid() or not (0 <= row < len(self._order) and 0 <= column < len(self._source.columns)):
            return QModelIndex()
        return self.createIndex(row, column)

    def parent(self, child: _Index = _ROOT) -> QModelIndex:
        return QModelIndex()

    def mapToSource(self, proxy_index: _Index) -> QModelIndex:
        if not proxy_index.isValid() or proxy_index.row() >= len(self._order):
            return QModelIndex()
        return self._source.index(int(self._order[proxy_index.row()]), proxy_index.column())

    def mapFromSource(self, source_index: _Index) -> QModelIndex:
        row = self.proxy_row(source_index.row()) if source_index.isValid() else -1
        return self.createIndex(row, source_index.column()) if row >= 0 else QModelIndex()
