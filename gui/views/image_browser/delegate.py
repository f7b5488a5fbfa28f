"""Painting one cell of the image grid: :class:`ThumbnailDelegate`.

The grid is a ``QListView`` in icon mode with uniform item sizes and batched layout, so only
visible cells cost anything; each is painted from one ``data()`` call (:attr:`Role.CELL`).
"""

from __future__ import annotations

from PySide6.QtCore import QModelIndex, QObject, QPersistentModelIndex, QRect, QSize, Qt
from PySide6.QtGui import QColor, QPainter, QPalette, QPen
from PySide6.QtWidgets import QApplication, QStyle, QStyledItemDelegate, QStyleOptionViewItem

from .model import THUMB_SIZE, Cell, Role

__all__ = ["ThumbnailDelegate"]

_PAD = 4
_CELL_WIDTH = THUMB_SIZE + 32
_CORRECT_COLOR = QColor(46, 160, 67)
_WRONG_COLOR = QColor(218, 54, 51)
_Index = QModelIndex | QPersistentModelIndex


class ThumbnailDelegate(QStyledItemDelegate):
    """Paints a grid cell: thumbnail, correctness marker, file name, label, prediction."""

    def __init__(self, thumb_size: int, line_height: int, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.thumb_size = thumb_size
        self.line_height = line_height
        self.cell = QSize(_CELL_WIDTH, _PAD + thumb_size + _PAD + 3 * line_height + _PAD)

    def sizeHint(
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
