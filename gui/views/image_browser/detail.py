"""The single-image pane: :class:`ImageDetail` shows the current image scaled to fit, its name,
label, prediction and the model's top classes with probability bars."""

from __future__ import annotations

import os

from PySide6.QtCore import QSize, Qt
from PySide6.QtGui import QFont, QImage, QPainter, QPaintEvent, QPalette, QPixmap
from PySide6.QtWidgets import (
    QGridLayout,
    QLabel,
    QProgressBar,
    QSizePolicy,
    QVBoxLayout,
    QWidget,
)

from .model import TOP_K

__all__ = ["ImageDetail"]


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

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        if self._image is None or self._image.isNull():
            painter.setPen(self.palette().color(QPalette.ColorRole.PlaceholderText))
            painter.drawText(self.rect().adjusted(6, 6, -6, -6),
                             Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap, self._message)
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

    def sizeHint(self) -> QSize:
        return QSize(300, 300)

    def top_classes(self) -> list[tuple[str, str]]:
        """The listed classes with their percentages as shown, best first."""
        return [
            (name.text(), value.text())
            for name, value in zip(self.class_labels, self.class_values, strict=True)
            if not name.isHidden()
        ]
