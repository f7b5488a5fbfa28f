"""The :class:`ResultTable` widget: filter bar, threshold control, table, selection, CSV copy."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PySide6.QtCore import QItemSelectionModel, QModelIndex, Qt, Signal
from PySide6.QtGui import QGuiApplication, QKeyEvent, QKeySequence, QMouseEvent
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QHeaderView,
    QLineEdit,
    QTableView,
    QVBoxLayout,
    QWidget,
)

from .model import Column, ResultTableModel, RowId
from .proxy import ResultFilterProxy

__all__ = ["ResultTable"]


class _TableView(QTableView):
    """A table view that reports Ctrl+C (instead of copying one cell) and mouse presses."""

    copy_requested = Signal()
    press_started = Signal()  # before the press changes the current row

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.matches(QKeySequence.StandardKey.Copy):
            self.copy_requested.emit()
            event.accept()
            return
        super().keyPressEvent(event)

    def mousePressEvent(self, event: QMouseEvent) -> None:
        self.press_started.emit()
        super().mousePressEvent(event)


class ResultTable(QWidget):
    """Filter field(s) and a sortable table of declared columns; see the module docstring.

    ``placeholder``: the text filter's hint. ``threshold_filter``: show a column chooser and a
    "≥" field for one numeric threshold (the API takes any number). ``sort``: the initial
    order, ``(key, descending)``; None keeps the rows' order until a header is clicked.
    ``multi_select``: extended row selection (default: one row).
    """

    row_selected = Signal(object)
    """The row id the user chose: a click, or moving the current row with keys."""

    def __init__(self, columns: Sequence[Column], *, row_id: str | tuple[str, ...] | None = None,
                 muted_unless: str | None = None, placeholder: str = "Filter…",
                 threshold_filter: bool = False, sort: tuple[str, bool] | None = None,
                 multi_select: bool = False, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = ResultTableModel(columns, row_id=row_id, muted_unless=muted_unless, parent=self)
        self.proxy = ResultFilterProxy(self.model, self)
        self._programmatic = False
        self._fresh = False  # the current row changed since the last mouse press
        self._ui_threshold: str | None = None  # the column the threshold control filters

        self.filter_edit = QLineEdit(self)
        self.filter_edit.setPlaceholderText(placeholder)
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self.proxy.set_text_filter)
        self.filter_bar = QHBoxLayout()
        self.filter_bar.addWidget(self.filter_edit, 1)
        self.threshold_column = QComboBox(self)
        self.threshold_column.setToolTip("Keep rows whose value in this column is at least the minimum")
        self.threshold_column.addItem("No threshold", None)
        for c in self.model.columns:
            if c.numeric:
                self.threshold_column.addItem(c.title, c.key)
        self.threshold_value = QDoubleSpinBox(self)
        self.threshold_value.setPrefix("≥ ")
        self.threshold_value.setEnabled(False)
        for w in (self.threshold_column, self.threshold_value):
            w.setVisible(threshold_filter)
            self.filter_bar.addWidget(w)
        self.threshold_column.currentIndexChanged.connect(self._threshold_column_changed)
        self.threshold_value.valueChanged.connect(self._apply_threshold)

        self.view = _TableView(self)
        self.view.setModel(self.proxy)
        self.view.setSortingEnabled(True)
        if sort is not None:
            order = Qt.SortOrder.DescendingOrder if sort[1] else Qt.SortOrder.AscendingOrder
            self.view.sortByColumn(self.model.column_index(sort[0]), order)
        else:  # the rows' own order until a header is clicked
            self.view.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection if multi_select
                                   else QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setDefaultSectionSize(self.fontMetrics().height() + 6)
        self.view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.view.setAlternatingRowColors(True)
        self.view.selectionModel().currentRowChanged.connect(self._current_row_changed)
        self.view.clicked.connect(self._clicked)
        self.view.copy_requested.connect(self.copy_selection)
        self.view.press_started.connect(self._pressed)
        self.model.modelReset.connect(self._update_threshold_range)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self.filter_bar)
        layout.addWidget(self.view)

    # -- content and filters ------------------------------------------------------------------

    def set_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        self.model.set_rows(rows)

    def set_arrays(self, data: Mapping[str, Any]) -> None:
        self.model.set_arrays(data)

    def add_filter_widget(self, widget: QWidget) -> None:
        """Put a view's own filter control (a check box, ...) beside the text filter."""
        self.filter_bar.insertWidget(self.filter_bar.indexOf(self.threshold_column), widget)

    def set_threshold(self, key: str, minimum: float | None = None, maximum: float | None = None) -> None:
        """See :meth:`ResultFilterProxy.set_threshold`."""
        self.proxy.set_threshold(key, minimum, maximum)

    def visible_rows(self) -> list[dict[str, Any]]:
        """The rows as shown (filtered and sorted), as dicts."""
        return [self.model.row_data(int(r)) for r in self.proxy.shown_rows()]

    # -- selection ----------------------------------------------------------------------------

    def current_id(self) -> RowId | None:
        index = self.view.currentIndex()
        return self.model.row_id(self.proxy.source_row(index.row())) if index.isValid() else None

    def selected_ids(self) -> list[RowId]:
        """Ids of the selected rows, in shown order."""
        rows = sorted({i.row() for i in self.view.selectionModel().selectedRows()})
        return [self.model.row_id(self.proxy.source_row(r)) for r in rows]

    def select_id(self, row_id: RowId | None) -> bool:
        """Make ``row_id``'s row current and selected, scrolled to; clear the selection when it
        is None or not shown. Emits no ``row_selected``. Returns whether the row is shown."""
        source = self.model.find_id(row_id) if row_id is not None else -1
        row = self.proxy.proxy_row(source)
        self._programmatic = True
        try:
            if row >= 0:
                index = self.proxy.index(row, 0)
                flags = QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows
                self.view.selectionModel().setCurrentIndex(index, flags)
                self.view.scrollTo(index)
            else:
                self.view.clearSelection()
        finally:
            self._programmatic = False
        return row >= 0

    def selection_csv(self) -> str:
        """The selected rows (shown order) as CSV: a header of column keys, then raw values."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([c.key for c in self.model.columns])
        rows = sorted({i.row() for i in self.view.selectionModel().selectedRows()})
        for r in rows:
            w.writerow([_csv_value(v) for v in self.model.row_data(self.proxy.source_row(r)).values()])
        return buf.getvalue()

    def copy_selection(self) -> str:
        """Put :meth:`selection_csv` on the clipboard (nothing when no row is selected)."""
        text = self.selection_csv() if self.view.selectionModel().hasSelection() else ""
        if text:
            QGuiApplication.clipboard().setText(text)
        return text

    def _pressed(self) -> None:
        self._fresh = False

    def _current_row_changed(self, current: QModelIndex, _previous: QModelIndex) -> None:
        if self._programmatic or not current.isValid():
            return
        self._fresh = True
        self.row_selected.emit(self.model.row_id(self.proxy.source_row(current.row())))

    def _clicked(self, index: QModelIndex) -> None:
        """A click on the row that already was current chooses it again (a view may re-show it)."""
        if self._fresh:
            self._fresh = False
        elif index.isValid():
            self.row_selected.emit(self.model.row_id(self.proxy.source_row(index.row())))

    # -- threshold control --------------------------------------------------------------------

    def _threshold_column_changed(self) -> None:
        if self._ui_threshold is not None:
            self.proxy.set_threshold(self._ui_threshold)
        self._ui_threshold = self.threshold_column.currentData()
        self._update_threshold_range()

    def _update_threshold_range(self) -> None:
        key = self.threshold_column.currentData()
        spin = self.threshold_value
        spin.setEnabled(key is not None)
        if key is None:
            return
        values = self.model.values(key).astype(np.float64)
        values = values[np.isfinite(values)]
        lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 0.0)
        is_float = self.model.columns[self.model.column_index(key)].dtype == "float"
        spin.blockSignals(True)
        spin.setDecimals(4 if is_float else 0)
        spin.setSingleStep((hi - lo) / 20 if is_float and hi > lo else 1.0)
        spin.setRange(math.floor(lo * 1e4) / 1e4, math.ceil(hi * 1e4) / 1e4)
        spin.blockSignals(False)
        self._apply_threshold()  # the value may have been clamped to the new range

    def _apply_threshold(self) -> None:
        key = self.threshold_column.currentData()
        if key is not None:
            spin = self.threshold_value
            at_minimum = spin.value() <= spin.minimum()
            self.proxy.set_threshold(key, None if at_minimum else spin.value())


def _csv_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)
