"""A combo box that elides its current text in the middle: long layer names
(``/backbone/stage3/block2/conv/Conv_output_0  256×14×14``) keep their start and end."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtGui import QPaintEvent
from PySide6.QtWidgets import (
    QComboBox,
    QStyle,
    QStyleOptionComboBox,
    QStylePainter,
    QWidget,
)

__all__ = ["ElidingComboBox"]


class ElidingComboBox(QComboBox):
    """``QComboBox`` whose closed box shows the current text elided in the middle, and whose
    width follows ``minimum_chars`` rather than its longest item; the popup lists whole names
    (elided in the middle only when wider than the screen allows)."""

    def __init__(self, minimum_chars: int = 18, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(minimum_chars)
        self.view().setTextElideMode(Qt.TextElideMode.ElideMiddle)

    def displayed_text(self) -> str:
        """The current text as the closed box shows it."""
        opt = QStyleOptionComboBox()
        self.initStyleOption(opt)
        field = self.style().subControlRect(QStyle.ComplexControl.CC_ComboBox, opt,
                                            QStyle.SubControl.SC_ComboBoxEditField, self)
        return self.fontMetrics().elidedText(self.currentText(), Qt.TextElideMode.ElideMiddle, field.width())

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QStylePainter(self)
        opt = QStyleOptionComboBox()
        self.initStyleOption(opt)
        painter.drawComplexControl(QStyle.ComplexControl.CC_ComboBox, opt)
        opt.currentText = self.displayed_text()
        painter.drawControl(QStyle.ControlElement.CE_ComboBoxLabel, opt)
