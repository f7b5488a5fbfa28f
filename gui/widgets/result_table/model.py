"""Declared columns and the numpy-backed model of a :class:`~gui.widgets.result_table.ResultTable`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PySide6.QtCore import QAbstractTableModel, QModelIndex, QObject, QPersistentModelIndex, Qt
from PySide6.QtGui import QColor

__all__ = ["Column", "DType", "ResultTableModel", "RowId"]

DType = Literal["str", "int", "float", "bool"]
RowId = Any
"""A row id: a column's value, a tuple of column values, or the source row (plain data)."""

_DTYPES: dict[str, Any] = {"str": np.str_, "int": np.int64, "float": np.float64, "bool": np.bool_}
_MUTED = QColor(128, 128, 128)
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
_Index = QModelIndex | QPersistentModelIndex
_ROOT = QModelIndex()  # the (invalid) root index, as a default argument


@dataclass(frozen=True)
class Column:
    """One column of a :class:`ResultTable`.

    ``format``: a format spec (``".4f"``) or a function of the value giving the text; bools
    default to "yes"/"no". ``sort_key``: a function of the column's array giving the array to
    sort on (default: the values themselves). ``searchable``: the text filter looks in this
    column (when no column says so, every str column is searched).
    """

    key: str
    header: str = ""
    dtype: DType = "str"
    format: str | Callable[[Any], str] = ""
    sort_key: Callable[[np.ndarray], np.ndarray] | None = None
    searchable: bool = False
    tooltip: str = ""

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"column {self.key!r}: dtype must be one of {', '.join(_DTYPES)}, not {self.dtype!r}")

    @property
    def title(self) -> str:
        return self.header or self.key

    @property
    def numeric(self) -> bool:
        """Whether thresholds apply (int, float and bool columns)."""
        return self.dtype != "str"

    def text(self, value: Any) -> str:
        if callable(self.format):
            return self.format(value)
        if self.dtype == "float" and math.isnan(value):
            return ""
        if self.dtype == "bool" and not self.format:
            return "yes" if value else "no"
        return format(value, self.format)


class ResultTableModel(QAbstractTableModel):
    """Rows of declared columns, one numpy array per column; see the module docstring.

    ``row_id``: the key (or tuple of keys) whose values identify a row, None for the row index.
    ``muted_unless``: rows whose value in this column is false are drawn grey.
    """

    def __init__(self, columns: Sequence[Column], *, row_id: str | tuple[str, ...] | None = None,
                 muted_unless: str | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.columns = tuple(columns)
        keys = [c.key for c in self.columns]
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate column keys in {keys}")
        named = [row_id] if isinstance(row_id, str) else list(row_id or ())
        for key in named + ([muted_unless] if muted_unless else []):
            if key not in keys:
                raise ValueError(f"{key!r} is not a column (columns: {', '.join(keys)})")
        self._row_id = row_id
        self._muted = muted_unless
        self._arrays: dict[str, np.ndarray] = {c.key: np.empty(0, _DTYPES[c.dtype]) for c in self.columns}
        self._folded: dict[str, np.ndarray] = {}
        self._ids: dict[Any, int] | None = None
        self._n = 0

    # -- content ------------------------------------------------------------------------------

    def set_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Replace the content with one row per mapping (extra keys are ignored)."""
        rows = list(rows)
        data: dict[str, list[Any]] = {}
        for c in self.columns:
            try:
                data[c.key] = [r[c.key] for r in rows]
            except KeyError:
                bad = next(i for i, r in enumerate(rows) if c.key not in r)
                raise ValueError(f"row {bad} has no value for column {c.key!r}") from None
        self.set_arrays(data, n=len(rows))

    def set_arrays(self, data: Mapping[str, Any], *, n: int | None = None) -> None:
        """Replace the content with one array (or list) per column key, all of one length."""
        arrays = {c.key: _as_array(c, data[c.key]) if c.key in data else None for c in self.columns}
        missing = [k for k, a in arrays.items() if a is None]
        if missing:
            raise ValueError(f"no values for column(s) {', '.join(missing)}")
        lengths = {k: len(a) for k, a in arrays.items() if a is not None}
        count = n if n is not None else next(iter(lengths.values()), 0)
        if any(m != count for m in lengths.values()):
            raise ValueError(f"columns of different lengths: {lengths}")
        self.beginResetModel()
        self._arrays = {k: a for k, a in arrays.items() if a is not None}
        for a in self._arrays.values():
            a.flags.writeable = False
        self._n = count
        self._folded = {}
        self._ids = None
        self.endResetModel()

    def clear(self) -> None:
        self.set_arrays({c.key: [] for c in self.columns})

    # -- access -------------------------------------------------------------------------------

    def column_index(self, key: str) -> int:
        for i, c in enumerate(self.columns):
            if c.key == key:
                return i
        raise KeyError(f"no column {key!r}")

    def values(self, key: str) -> np.ndarray:
        """The (read-only) array of column ``key``, in source row order."""
        return self._arrays[key]

    def value(self, row: int, key: str) -> Any:
        """The Python value (str, int, float or bool) of ``key`` in source ``row``."""
        v = self._arrays[key][row]
        return str(v) if isinstance(v, np.str_) else v.item()

    def row_data(self, row: int) -> dict[str, Any]:
        """Source ``row`` as a dict of column key -> Python value."""
        return {c.key: self.value(row, c.key) for c in self.columns}

    def row_id(self, row: int) -> RowId:
        if self._row_id is None:
            return row
        if isinstance(self._row_id, str):
            return self.value(row, self._row_id)
        return tuple(self.value(row, k) for k in self._row_id)

    def find_id(self, row_id: RowId) -> int:
        """The source row of ``row_id``, or -1."""
        if self._ids is None:
            self._ids = {}
            for r in range(self._n):
                self._ids.setdefault(self.row_id(r), r)
        try:
            return self._ids.get(row_id, -1)
        except TypeError:  # unhashable: no row has it
            return -1

    def folded(self, key: str) -> np.ndarray:
        """Column ``key`` as casefolded strings (for the text filter), computed once per content."""
        if key not in self._folded:
            self._folded[key] = np.array([str(s).casefold() for s in self._arrays[key]], dtype=str)
        return self._folded[key]

    def searchable_keys(self) -> list[str]:
        keys = [c.key for c in self.columns if c.searchable]
        return keys or [c.key for c in self.columns if c.dtype == "str"]

    # -- QAbstractTableModel ------------------------------------------------------------------

    def rowCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else self._n

    def columnCount(self, parent: _Index = _ROOT) -> int:
        return 0 if parent.isValid() else len(self.columns)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation != Qt.Orientation.Horizontal or not 0 <= section < len(self.columns):
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.columns[section].title
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.columns[section].tooltip or None
        return None

    def data(self, index: _Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        return self.cell(index.row(), index.column(), role) if index.isValid() else None

    def cell(self, row: int, column: int, role: int) -> Any:
        """``data()`` of (source ``row``, ``column``), without building a model index."""
        c = self.columns[column]
        if role == Qt.ItemDataRole.DisplayRole:
            return c.text(self.value(row, c.key))
        if role == Qt.ItemDataRole.UserRole:
            return self.value(row, c.key)
        if role == Qt.ItemDataRole.TextAlignmentRole and c.dtype in ("int", "float"):
            return _RIGHT
        if role == Qt.ItemDataRole.ForegroundRole and self._muted and not self._arrays[self._muted][row]:
            return _MUTED
        return None


def _as_array(column: Column, values: Any) -> np.ndarray:
    """``values`` as a fresh 1-d array of the column's dtype (None -> NaN for floats, "" for str)."""
    if column.dtype == "str":
        items = values.tolist() if isinstance(values, np.ndarray) else list(values)
        return np.array(["" if v is None else str(v) for v in items], dtype=str)
    if column.dtype == "float" and not isinstance(values, np.ndarray):
        values = [math.nan if v is None else v for v in values]
    try:
        array = np.array(values, dtype=_DTYPES[column.dtype])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {column.key!r}: values are not {column.dtype}: {exc}") from None
    if array.ndim != 1:
        raise ValueError(f"column {column.key!r}: expected one value per row, got shape {array.shape}")
    return array
