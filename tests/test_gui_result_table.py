"""The reusable result table: declared columns, sorting, filters, selection signal, CSV copy.

Real Qt (offscreen): clicks on the real header and rows, real key events, the real clipboard.
"""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest
from PySide6.QtCore import QItemSelectionModel, QPoint, Qt
from PySide6.QtGui import QGuiApplication

from gui.widgets.result_table import Column, ResultTable

COLUMNS = (
    Column("layer", "Layer"),
    Column("unit", "Unit", "int"),
    Column("label", "Label", searchable=True),
    Column("iou", "IoU", "float", format=".3f"),
    Column("detector", "Detector", "bool"),
)
ROWS = [  # unit 10 sorts after 9 numerically; two IoU ties; one missing IoU
    {"layer": "conv1", "unit": 9, "label": "Red", "iou": 0.20, "detector": True},
    {"layer": "conv1", "unit": 10, "label": "stripes", "iou": 0.05, "detector": True},
    {"layer": "conv2", "unit": 2, "label": "sky", "iou": 0.20, "detector": True},
    {"layer": "conv2", "unit": 0, "label": "red-ish", "iou": None, "detector": False},
    {"layer": "conv2", "unit": 1, "label": "grass", "iou": 0.01, "detector": False, "extra": "ignored"},
]


@pytest.fixture
def table(qtbot) -> ResultTable:
    t = ResultTable(COLUMNS, row_id=("layer", "unit"), muted_unless="detector", threshold_filter=True,
                    multi_select=True)
    qtbot.addWidget(t)
    t.resize(700, 400)
    t.show()
    qtbot.waitExposed(t)
    t.set_rows(ROWS)
    return t


def units(t: ResultTable) -> list[int]:
    return [r["unit"] for r in t.visible_rows()]


def click_header(qtbot, t: ResultTable, key: str) -> None:
    header = t.view.horizontalHeader()
    section = t.model.column_index(key)
    x = header.sectionViewportPosition(section) + header.sectionSize(section) // 2
    qtbot.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=QPoint(x, header.height() // 2))


def click_row(qtbot, t: ResultTable, row: int, modifier=Qt.KeyboardModifier.NoModifier) -> None:
    rect = t.view.visualRect(t.proxy.index(row, 0))
    qtbot.mouseClick(t.view.viewport(), Qt.MouseButton.LeftButton, modifier, rect.center())


def test_declared_columns_show_text_raw_values_alignment_and_muted_rows(table: ResultTable) -> None:
    p = table.proxy
    assert [p.headerData(c, Qt.Orientation.Horizontal) for c in range(5)] == ["Layer", "Unit", "Label", "IoU",
                                                                             "Detector"]
    assert units(table) == [9, 10, 2, 0, 1]  # no sort declared: the rows' own order
    assert [p.index(0, c).data() for c in range(5)] == ["conv1", "9", "Red", "0.200", "yes"]
    assert p.index(3, 3).data() == "" and math.isnan(p.index(3, 3).data(Qt.ItemDataRole.UserRole))
    assert p.index(3, 4).data() == "no" and p.index(3, 4).data(Qt.ItemDataRole.UserRole) is False
    assert p.index(1, 1).data(Qt.ItemDataRole.UserRole) == 10
    right = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
    assert [p.index(0, c).data(Qt.ItemDataRole.TextAlignmentRole) for c in range(5)] == [None, right, None,
                                                                                        right, None]
    assert p.index(0, 0).data(Qt.ItemDataRole.ForegroundRole) is None
    assert p.index(4, 0).data(Qt.ItemDataRole.ForegroundRole) is not None  # not a detector: grey
    assert table.model.row_data(4) == {k: v for k, v in ROWS[4].items() if k != "extra"}
    assert table.model.find_id(("conv2", 1)) == 4 and table.model.find_id(("conv9", 1)) == -1
    assert table.model.find_id(["unhashable"]) == -1


def test_header_clicks_sort_numerically_stably_with_missing_last(qtbot, table: ResultTable) -> None:
    click_header(qtbot, table, "unit")
    assert table.proxy.sort_column() == 1
    first = units(table)
    click_header(qtbot, table, "unit")
    second = units(table)
    assert sorted([first, second]) == [[0, 1, 2, 9, 10], [10, 9, 2, 1, 0]]  # 10 after 9, not "10" < "9"

    table.view.sortByColumn(3, Qt.SortOrder.DescendingOrder)
    assert units(table) == [9, 2, 10, 1, 0]  # the 0.20 tie keeps the rows' order; NaN last
    table.view.sortByColumn(3, Qt.SortOrder.AscendingOrder)
    assert units(table) == [1, 10, 9, 2, 0]  # NaN last in both orders
    table.view.sortByColumn(2, Qt.SortOrder.AscendingOrder)
    assert [r["label"] for r in table.visible_rows()] == ["Red", "grass", "red-ish", "sky", "stripes"]

    table.set_rows(ROWS[::-1])  # new rows keep the order chosen
    assert [r["label"] for r in table.visible_rows()] == ["Red", "grass", "red-ish", "sky", "stripes"]


def test_sorting_by_b_then_a_orders_by_a_then_b(qtbot, table: ResultTable) -> None:
    click_header(qtbot, table, "label")  # ascending
    table.view.sortByColumn(0, Qt.SortOrder.DescendingOrder)
    assert [(r["layer"], r["label"]) for r in table.visible_rows()] == [
        ("conv2", "grass"), ("conv2", "red-ish"), ("conv2", "sky"), ("conv1", "Red"), ("conv1", "stripes")]
    table.filter_edit.setText("s")  # filtering keeps that order
    assert [r["label"] for r in table.visible_rows()] == ["grass", "red-ish", "sky", "stripes"]


def test_sort_key_and_initial_sort(qtbot) -> None:
    t = ResultTable([Column("name", sort_key=np.char.lower), Column("n", dtype="int")],
                    sort=("name", False))
    qtbot.addWidget(t)
    t.set_arrays({"name": np.array(["b", "A", "c", "B"]), "n": np.arange(4)})
    assert [r["name"] for r in t.visible_rows()] == ["A", "b", "B", "c"]
    assert t.view.horizontalHeader().sortIndicatorSection() == 0
    assert t.current_id() is None and t.model.row_id(2) == 2  # no row_id: the source row


def test_text_filter_is_case_insensitive_over_searchable_columns(qtbot, table: ResultTable) -> None:
    qtbot.keyClicks(table.filter_edit, "  RED")
    assert units(table) == [9, 0]
    table.filter_edit.setText("conv1")  # the layer column is not searchable
    assert units(table) == []
    assert table.proxy.headerData(0, Qt.Orientation.Horizontal) == "Layer"  # headers stay with no rows
    table.filter_edit.clear()
    assert units(table) == [9, 10, 2, 0, 1]


def test_numeric_thresholds(table: ResultTable) -> None:
    table.set_threshold("iou", minimum=0.05)
    assert units(table) == [9, 10, 2]  # NaN never passes
    table.set_threshold("iou", minimum=0.05, maximum=0.1)
    assert units(table) == [10]
    table.set_threshold("iou", maximum=0.1)
    table.set_threshold("detector", minimum=1)  # a bool column: detectors only
    assert units(table) == [10] and table.proxy.thresholds == {"iou": (None, 0.1), "detector": (1, None)}
    table.filter_edit.setText("grass")
    assert units(table) == []
    table.filter_edit.clear()
    table.set_threshold("iou")
    table.set_threshold("detector")
    assert units(table) == [9, 10, 2, 0, 1] and table.proxy.thresholds == {}
    with pytest.raises(ValueError, match="'label' holds text"):
        table.set_threshold("label", minimum=1)
    with pytest.raises(KeyError, match="nope"):
        table.set_threshold("nope", minimum=1)


def test_threshold_control(qtbot, table: ResultTable) -> None:
    table.set_threshold("detector", minimum=1)  # set by a view: the control leaves it alone
    combo, spin = table.threshold_column, table.threshold_value
    assert [combo.itemText(i) for i in range(combo.count())] == ["No threshold", "Unit", "IoU", "Detector"]
    assert not spin.isEnabled()
    combo.setCurrentIndex(combo.findData("iou"))
    assert spin.isEnabled() and (spin.minimum(), spin.maximum()) == (0.01, 0.2)
    assert units(table) == [9, 10, 2]  # at the minimum: no IoU threshold yet
    spin.setValue(0.1)
    assert units(table) == [9, 2] and table.proxy.thresholds["iou"] == (pytest.approx(0.1), None)
    combo.setCurrentIndex(combo.findData("unit"))
    assert (spin.minimum(), spin.maximum(), spin.decimals()) == (0, 10, 0)
    spin.setValue(5)
    assert units(table) == [9, 10] and set(table.proxy.thresholds) == {"unit", "detector"}
    table.set_rows(ROWS[2:])  # units 0..2: the value is clamped, and the filter follows it
    assert (spin.maximum(), spin.value()) == (2, 2) and units(table) == [2]
    assert table.proxy.thresholds["unit"] == (2, None)
    combo.setCurrentIndex(0)
    assert units(table) == [2] and set(table.proxy.thresholds) == {"detector"}


def test_user_choice_emits_the_row_id_once(qtbot, table: ResultTable) -> None:
    got: list[object] = []
    table.row_selected.connect(got.append)
    with qtbot.waitSignal(table.row_selected) as blocker:
        click_row(qtbot, table, 2)
    assert blocker.args == [("conv2", 2)] and got == [("conv2", 2)]
    assert table.current_id() == ("conv2", 2) and table.selected_ids() == [("conv2", 2)]
    click_row(qtbot, table, 2)  # the current row again: chosen again (a view may re-show it)
    assert got == [("conv2", 2)] * 2
    qtbot.keyClick(table.view, Qt.Key.Key_Down)
    assert got[-1] == ("conv2", 0) and len(got) == 3
    click_row(qtbot, table, 3)  # the current row after a key press: still a choice
    assert got[-1] == ("conv2", 0) and len(got) == 4

    assert table.select_id(("conv1", 10)) is True  # programmatic: selects, emits nothing
    assert len(got) == 4 and table.current_id() == ("conv1", 10) and table.selected_ids() == [("conv1", 10)]
    table.view.sortByColumn(1, Qt.SortOrder.AscendingOrder)  # a re-sort keeps the selection
    assert table.selected_ids() == [("conv1", 10)] and table.current_id() == ("conv1", 10)
    assert table.view.currentIndex().row() == 4 and len(got) == 4
    table.filter_edit.setText("red")  # filtered out: nothing selected, nothing chosen
    assert table.selected_ids() == [] and len(got) == 4
    assert table.select_id(("conv1", 10)) is False and table.select_id(("conv9", 1)) is False
    assert table.select_id(("conv1", 9)) is True and table.selected_ids() == [("conv1", 9)]
    assert table.select_id(None) is False and table.selected_ids() == []


def test_ctrl_c_copies_the_selected_rows_as_csv(qtbot, table: ResultTable) -> None:
    clipboard = QGuiApplication.clipboard()
    clipboard.setText("before")
    qtbot.keyClick(table.view, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    assert clipboard.text() == "before"  # nothing selected: nothing copied
    table.view.sortByColumn(1, Qt.SortOrder.AscendingOrder)
    click_row(qtbot, table, 0)
    click_row(qtbot, table, 3, Qt.KeyboardModifier.ControlModifier)
    assert table.selected_ids() == [("conv2", 0), ("conv1", 9)]
    qtbot.keyClick(table.view, Qt.Key.Key_C, Qt.KeyboardModifier.ControlModifier)
    rows = list(csv.reader(io.StringIO(clipboard.text())))
    assert rows == [["layer", "unit", "label", "iou", "detector"],
                    ["conv2", "0", "red-ish", "", "false"],
                    ["conv1", "9", "Red", "0.2", "true"]]  # raw values, not the 3-decimal display
    assert table.selection_csv() == clipboard.text()


def test_many_rows_match_a_numpy_reference(qtbot) -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    data = {"name": np.array([f"img_{i:05d}_{'cat' if i % 3 else 'dog'}" for i in range(n)]),
            "score": rng.random(n).round(2), "count": rng.integers(0, 50, n)}
    t = ResultTable([Column("name", searchable=True), Column("score", dtype="float"), Column("count", dtype="int")],
                    row_id="name")
    qtbot.addWidget(t)
    t.set_arrays(data)
    t.view.sortByColumn(1, Qt.SortOrder.DescendingOrder)
    t.filter_edit.setText("DOG")
    t.set_threshold("count", minimum=10, maximum=39)
    keep = np.flatnonzero(np.char.find(data["name"], "dog") >= 0)
    keep = keep[(data["count"][keep] >= 10) & (data["count"][keep] <= 39)]
    expected = keep[np.lexsort((keep, -data["score"][keep]))]
    np.testing.assert_array_equal(t.proxy.shown_rows(), expected)
    assert t.proxy.rowCount() == len(expected) > 1000
    assert t.select_id(str(data["name"][expected[100]])) and t.view.currentIndex().row() == 100


def test_bad_declarations_and_data_are_clear_errors(qtbot) -> None:
    with pytest.raises(ValueError, match="dtype must be one of"):
        Column("x", dtype="complex")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="duplicate column keys"):
        ResultTable([Column("a"), Column("a")])
    with pytest.raises(ValueError, match="'id' is not a column"):
        ResultTable([Column("a")], row_id="id")
    t = ResultTable([Column("a"), Column("n", dtype="int")])
    qtbot.addWidget(t)
    with pytest.raises(ValueError, match="row 1 has no value for column 'n'"):
        t.set_rows([{"a": "x", "n": 1}, {"a": "y"}])
    with pytest.raises(ValueError, match=r"no values for column\(s\) n"):
        t.set_arrays({"a": ["x"]})
    with pytest.raises(ValueError, match="different lengths"):
        t.set_arrays({"a": ["x", "y"], "n": [1]})
    with pytest.raises(ValueError, match="column 'n': values are not int"):
        t.set_arrays({"a": ["x"], "n": ["seven"]})
    assert t.model.rowCount() == 0  # nothing was replaced
    t.set_rows([{"a": "x", "n": 1}])
    t.view.selectionModel().select(t.proxy.index(0, 0), QItemSelectionModel.SelectionFlag.ClearAndSelect
                                   | QItemSelectionModel.SelectionFlag.Rows)
    t.model.clear()
    assert t.model.rowCount() == 0 and t.selected_ids() == [] and t.selection_csv() == "a,n\n"


def test_view_filter_widgets_sit_between_the_text_filter_and_the_threshold(qtbot, table: ResultTable) -> None:
    from PySide6.QtWidgets import QCheckBox

    first, second = QCheckBox("first"), QCheckBox("second")
    table.add_filter_widget(first)
    table.add_filter_widget(second)
    bar = table.filter_bar
    order = [bar.itemAt(i).widget() for i in range(bar.count())]
    assert order == [table.filter_edit, first, second, table.threshold_column, table.threshold_value]
