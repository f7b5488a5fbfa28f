"""The one export dialog: view, figure, format, size, DPI, what to include and the file.

It replaces a chain of modal questions: everything is on one form, and the folder, format,
size and DPI chosen last are remembered in ``QSettings`` (:data:`FOLDER_KEY` and friends), so
the next export starts where the last one went. "Export" writes the file through
:func:`gui.export.export_figure`; an error is shown in the dialog, which stays open.

The main window opens it with ``ExportDialog(window.views, window.current_view(),
window.settings, window).exec()``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .model import SIZE_PRESETS, FigureOptions

__all__ = ["FOLDER_KEY", "ExportDialog", "remembered_folder"]

FOLDER_KEY = "export/folder"
FORMAT_KEY = "export/format"
SIZE_KEY = "export/size"
DPI_KEY = "export/dpi"
_FORMATS = {"png": "PNG image (raster, chosen DPI)", "svg": "SVG (vector)", "pdf": "PDF (vector)"}


def remembered_folder(settings: QSettings) -> str:
    """The folder of the last export, or the home folder (when none or it is gone)."""
    folder = str(settings.value(FOLDER_KEY, "", str) or "")
    return folder if folder and os.path.isdir(folder) else str(Path.home())


class ExportDialog(QDialog):
    """Export one view's composed figure; ``written`` is the file written, once accepted."""

    def __init__(self, views: Mapping[str, Any] | Sequence[Any], current: Any, settings: QSettings,
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Export figure")
        self.settings = settings
        self.written: Path | None = None
        self._views = [v for v in (views.values() if isinstance(views, Mapping) else views) if v.figure_kinds()]
        self.view_combo = QComboBox()
        for v in self._views:
            self.view_combo.addItem(v.title, v.object_name)
        if current is not None and current in self._views:
            self.view_combo.setCurrentIndex(self._views.index(current))
        self.kind_combo = QComboBox()
        self.format_combo = QComboBox()
        for key, text in _FORMATS.items():
            self.format_combo.addItem(text, key)
        self.format_combo.setCurrentIndex(max(0, self.format_combo.findData(settings.value(FORMAT_KEY, "png", str))))
        self.size_combo = QComboBox()
        for key, (text, _inches) in SIZE_PRESETS.items():
            self.size_combo.addItem(text, key)
        self.size_combo.setCurrentIndex(max(0, self.size_combo.findData(settings.value(SIZE_KEY, "full", str))))
        self.dpi_spin = QSpinBox()
        self.dpi_spin.setRange(72, 1200)
        self.dpi_spin.setSingleStep(50)
        self.dpi_spin.setSuffix(" dpi")
        self.dpi_spin.setValue(int(str(settings.value(DPI_KEY, 300, int) or 300)))
        self.dpi_spin.setToolTip("Pixels per inch of the PNG; in SVG and PDF, the resolution of the image panels")
        self.include_box = QWidget()
        self._include_layout = QVBoxLayout(self.include_box)
        self._include_layout.setContentsMargins(0, 0, 0, 0)
        self.include_checks: dict[str, QCheckBox] = {}
        self.path_edit = QLineEdit()
        browse = QPushButton("Browse…")
        browse.clicked.connect(self.browse)
        path_row = QHBoxLayout()
        path_row.addWidget(self.path_edit, 1)
        path_row.addWidget(browse)
        self.error_label = QLabel()
        self.error_label.setWordWrap(True)
        self.error_label.setStyleSheet("color: #b00020")
        self.error_label.hide()

        form = QFormLayout()
        form.addRow("View", self.view_combo)
        form.addRow("Figure", self.kind_combo)
        form.addRow("Format", self.format_combo)
        form.addRow("Size", self.size_combo)
        form.addRow("Resolution", self.dpi_spin)
        form.addRow("Include", self.include_box)
        form.addRow("File", path_row)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Cancel)
        self.export_button = buttons.addButton("Export", QDialogButtonBox.ButtonRole.AcceptRole)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.error_label)
        layout.addWidget(buttons)

        self.view_combo.currentIndexChanged.connect(lambda _i: self._view_changed())
        self.kind_combo.currentIndexChanged.connect(lambda _i: self._kind_changed())
        self.format_combo.currentIndexChanged.connect(lambda _i: self._format_changed())
        self._view_changed()

    # ------------------------------------------------------------------ state

    @property
    def view(self) -> Any:
        i = self.view_combo.currentIndex()
        return self._views[i] if 0 <= i < len(self._views) else None

    @property
    def fmt(self) -> str:
        return self.format_combo.currentData()

    def options(self) -> FigureOptions:
        """The :class:`FigureOptions` the form describes."""
        return FigureOptions(kind=self.kind_combo.currentData() or "", size=self.size_combo.currentData(),
                             dpi=self.dpi_spin.value(),
                             include={k: c.isChecked() for k, c in self.include_checks.items()})

    def path(self) -> Path:
        """The file to write, its suffix following the format."""
        text = self.path_edit.text().strip()
        path = Path(os.path.expanduser(text)) if text else Path(remembered_folder(self.settings)) / self._default_name()
        if path.suffix.lower() != f".{self.fmt}":
            path = path.with_suffix(f".{self.fmt}") if path.suffix.lower() in (".png", ".svg", ".pdf") \
                else path.with_name(path.name + f".{self.fmt}")
        return path

    def _default_name(self) -> str:
        view = self.view
        kind = self.kind_combo.currentData() or ""
        return f"{view.object_name if view is not None else 'figure'}{'-' + kind if kind else ''}.{self.fmt}"

    def _view_changed(self) -> None:
        view = self.view
        self.kind_combo.blockSignals(True)
        self.kind_combo.clear()
        for k in (view.figure_kinds() if view is not None else []):
            self.kind_combo.addItem(k.label, k.key)
        self.kind_combo.blockSignals(False)
        self._kind_changed()

    def _kind_changed(self) -> None:
        for check in self.include_checks.values():
            check.deleteLater()
        self.include_checks = {}
        view, kind = self.view, self.kind_combo.currentData()
        for opt in (view.figure_options() if view is not None else []):
            if opt.kinds and kind not in opt.kinds:
                continue
            check = QCheckBox(opt.label)
            check.setChecked(opt.default)
            self._include_layout.addWidget(check)
            self.include_checks[opt.key] = check
        self.path_edit.setText(str(Path(self._folder()) / self._default_name()))

    def _format_changed(self) -> None:
        self.path_edit.setText(str(self.path()))

    def _folder(self) -> str:
        text = self.path_edit.text().strip()
        if text and os.path.isdir(os.path.dirname(os.path.expanduser(text)) or "."):
            return os.path.dirname(os.path.expanduser(text)) or "."
        return remembered_folder(self.settings)

    def browse(self) -> None:
        """Choose the file with a save dialog that opens in the remembered folder."""
        name, _ = QFileDialog.getSaveFileName(self, "Export figure to", str(self.path()),
                                              ";;".join(f"{t} (*.{k})" for k, t in _FORMATS.items()))
        if name:
            self.path_edit.setText(name)
            suffix = Path(name).suffix.lower().lstrip(".")
            if suffix in _FORMATS:
                self.format_combo.setCurrentIndex(self.format_combo.findData(suffix))

    # ------------------------------------------------------------------ export

    def export(self) -> Path:
        """Write the figure; remember the folder, format, size and DPI. Raises on failure."""
        from ..export import export_figure

        view = self.view
        if view is None:
            raise ValueError("no view has a figure to export")
        path = self.path()
        out = export_figure(view, path, self.options())
        self.settings.setValue(FOLDER_KEY, str(out.resolve().parent))
        self.settings.setValue(FORMAT_KEY, self.fmt)
        self.settings.setValue(SIZE_KEY, self.size_combo.currentData())
        self.settings.setValue(DPI_KEY, self.dpi_spin.value())
        self.settings.sync()
        self.written = out
        return out

    def accept(self) -> None:
        try:
            self.export()
        except (OSError, ValueError) as e:
            self.error_label.setText(f"Export failed: {e}")
            self.error_label.show()
            return
        super().accept()
