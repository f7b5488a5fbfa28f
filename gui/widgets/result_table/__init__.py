"""A sortable, filterable table of analysis results, backed by numpy arrays.

A view declares its columns as data and hands over rows; the widget does the rest::

    table = ResultTable(
        [Column("layer", "Layer"), Column("unit", "Unit", "int"),
         Column("label", "Label", searchable=True), Column("iou", "IoU", "float", format=".4f")],
        row_id=("layer", "unit"),
    )
    table.set_rows(result.to_rows())          # or table.set_arrays({"layer": ..., "unit": ...})
    table.row_selected.connect(show)          # show(("conv3", 12)): the row id, plain data
    table.set_threshold("iou", minimum=0.04)  # numeric filters, besides the text filter

Parts
-----
* :class:`Column`: key, header, dtype (``"str"``, ``"int"``, ``"float"``, ``"bool"``), display
  format, sort key, whether the text filter searches it.
* :class:`ResultTableModel`: one numpy array per column; display text under ``DisplayRole``,
  the raw Python value under ``UserRole``. Missing floats are NaN (shown empty, sorted last).
* :class:`ResultFilterProxy`: the rows that pass the text filter (case-insensitive substring of
  a searchable column) and every numeric threshold, in the chosen column's order. Like the image
  browser's proxy it is a numpy permutation, not a ``QSortFilterProxyModel`` (whose per-row
  ``filterAcceptsRow`` and per-comparison ``lessThan`` calls into Python cost about a second on
  20,000 rows); sorting is stable (ties keep the order shown before, so header clicks on B then
  A order by A, then B) and a re-sort or re-filter is a layout change, so the selection
  survives it. Sort and filters also survive new rows.
* :class:`ResultTable`: the text filter field (plus any widgets a view adds beside it), an
  optional column threshold control, and the table. ``row_selected`` carries the row id of the
  row the user chose (a click or the keyboard), never for :meth:`ResultTable.select_id`, so a
  view can mirror the shared selection without echoes. Ctrl+C copies the selected rows as CSV
  (column keys as header, full-precision values).
"""

from __future__ import annotations

from .model import Column, DType, ResultTableModel, RowId
from .proxy import ResultFilterProxy
from .widget import ResultTable

__all__ = ["Column", "DType", "ResultFilterProxy", "ResultTable", "ResultTableModel", "RowId"]
