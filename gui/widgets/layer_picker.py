"""A checkable list of layers grouped by block, with a filter box and each layer's shape.

A ResNet-18 has 67 capturable layers: they are grouped by their first name component
(``layer1``, ``layer2``, ... or an ONNX path's first folder), each group checkable as a whole;
layers whose name has no block of its own (``conv1``, ``fc``) stay at the top level. The filter
keeps the layers whose name contains the typed text (case-insensitive).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QHeaderView,
    QLineEdit,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

__all__ = ["LayerPicker", "block_of"]

_ROLE = Qt.ItemDataRole.UserRole


def block_of(name: str) -> str:
    """The group a layer goes in: its first name component, or "" for a plain name."""
    parts = [p for p in re.split(r"[./:]+", name) if p]
    return parts[0] if len(parts) > 1 else ""


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape) if shape else "?"


class LayerPicker(QWidget):
    """Layers with check boxes, grouped by block; ``changed`` when the ticked set changes."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.filter_edit = QLineEdit()
        self.filter_edit.setPlaceholderText("Filter layers…")
        self.filter_edit.setClearButtonEnabled(True)
        self.filter_edit.textChanged.connect(self._apply_filter)
        self.tree = QTreeWidget()
        self.tree.setColumnCount(2)
        self.tree.setHeaderLabels(["Layer", "Output"])
        self.tree.setRootIsDecorated(True)
        self.tree.setUniformRowHeights(True)
        self.tree.header().setStretchLastSection(False)
        self.tree.header().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.tree.header().setSectionResizeMode(1, QHeaderView.ResizeMode.ResizeToContents)
        self.tree.header().setMinimumSectionSize(40)
        self.tree.setMinimumWidth(180)
        self.tree.setTextElideMode(Qt.TextElideMode.ElideMiddle)
        self.tree.itemChanged.connect(lambda _item, _col: self.changed.emit())
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addWidget(self.filter_edit)
        layout.addWidget(self.tree, 1)
        self._order: list[str] = []
        self._items: dict[str, QTreeWidgetItem] = {}

    def set_layers(self, layers: Iterable[object], checked: Iterable[str] = ()) -> None:
        """Show ``layers`` (engine ``LayerInfo``: name, kind, shape), ticking ``checked``."""
        ticked = set(checked)
        self.tree.blockSignals(True)
        self.tree.clear()
        self._order, self._items = [], {}
        groups: dict[str, list[object]] = {}
        for li in layers:
            groups.setdefault(block_of(li.name), []).append(li)  # type: ignore[attr-defined]
        # a container named like a block (``layer1`` beside ``layer1.0.conv1``) heads its group
        for li in list(groups.get("", [])):
            if li.name in groups and li.name:  # type: ignore[attr-defined]
                groups[""].remove(li)
                groups[li.name].insert(0, li)  # type: ignore[attr-defined]
        # a block holding a single layer is not worth a group of its own
        for key in [k for k, v in groups.items() if k and len(v) == 1]:
            groups.setdefault("", []).extend(groups.pop(key))
        top_order = [li.name for li in layers]  # type: ignore[attr-defined]
        flags = Qt.ItemFlag.ItemIsUserCheckable | Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
        for li in sorted(groups.get("", []), key=lambda li: top_order.index(li.name)):  # type: ignore[attr-defined]
            self.tree.addTopLevelItem(self._leaf(li, ticked, flags))
        for key, members in groups.items():
            if not key:
                continue
            group = QTreeWidgetItem([key, f"{len(members)} layers"])
            group.setFlags(flags | Qt.ItemFlag.ItemIsAutoTristate)
            group.setToolTip(0, f"every layer of {key}")
            self.tree.addTopLevelItem(group)
            for li in members:
                group.addChild(self._leaf(li, ticked, flags))
            group.setExpanded(any(li.name in ticked for li in members))  # type: ignore[attr-defined]
        self._order = top_order
        self.tree.blockSignals(False)
        self._apply_filter(self.filter_edit.text())
        self.changed.emit()

    def _leaf(self, li: object, ticked: set[str], flags: Qt.ItemFlag) -> QTreeWidgetItem:
        name, kind, shape = li.name, li.kind, li.shape  # type: ignore[attr-defined]
        item = QTreeWidgetItem([name, _shape(shape)])
        item.setData(0, _ROLE, name)
        item.setFlags(flags)
        item.setCheckState(0, Qt.CheckState.Checked if name in ticked else Qt.CheckState.Unchecked)
        units = shape[0] if shape else 0
        item.setToolTip(0, f"{name}: {kind}, {units} units, output {_shape(shape)}")
        item.setToolTip(1, f"output shape (channels × height × width) of {name}")
        self._items[name] = item
        return item

    def layers(self) -> list[str]:
        """Every layer shown (filter or not), in model order."""
        return list(self._order)

    def checked_layers(self) -> list[str]:
        """The ticked layers, in model order."""
        return [n for n in self._order if self._items[n].checkState(0) == Qt.CheckState.Checked]

    def set_checked_layers(self, names: Iterable[str]) -> None:
        """Tick exactly ``names`` (unknown names are ignored)."""
        wanted = set(names)
        self.tree.blockSignals(True)
        for name, item in self._items.items():
            item.setCheckState(0, Qt.CheckState.Checked if name in wanted else Qt.CheckState.Unchecked)
            parent = item.parent()
            if parent is not None and name in wanted:
                parent.setExpanded(True)
        self.tree.blockSignals(False)
        self.changed.emit()

    def visible_layers(self) -> list[str]:
        """The layers the filter leaves shown, in model order."""
        return [n for n in self._order if not self._items[n].isHidden()]

    def _apply_filter(self, text: str) -> None:
        needle = text.strip().casefold()
        for name, item in self._items.items():
            item.setHidden(bool(needle) and needle not in name.casefold())
        for i in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(i)
            if top.childCount():
                shown = any(not top.child(j).isHidden() for j in range(top.childCount()))
                top.setHidden(not shown)
                if needle and shown:
                    top.setExpanded(True)
