"""The open-model dialog: choose a file, complete what the file does not say, load it.

The format is detected from the file; fields are prefilled from what ConvLens knows (the
architecture's defaults, an ONNX input shape, a TOML file beside the checkpoint) and stay
editable. OK loads the model on the worker; an engine error is shown in the dialog, with its
cause, and the dialog stays open to fix it.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt
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

from engine.types import ModelSpec

from .session import Session

NEEDS_ARCH = ("state_dict", "safetensors")
FORMAT_NAMES = {"torchscript": "TorchScript", "export": "torch.export archive (.pt2)", "state_dict": "state dict",
                "safetensors": "safetensors", "onnx": "ONNX", "pickled_module": "pickled module"}


def architecture_names() -> list[str]:
    """'rnet' and torchvision's classification models, from a static list (no torch import here)."""
    from engine.models.names import architecture_names as names

    return names()


class OpenModelDialog(QDialog):
    def __init__(self, session: Session, parent: QWidget | None = None, *, path: str | None = None,
                 start_dir: str = "") -> None:
        super().__init__(parent)
        self.setWindowTitle("Open model")
        self.session = session
        self.start_dir = start_dir
        self.spec: ModelSpec | None = None
        self._handle: Any = None

        self.path = QLineEdit()
        self.path.setPlaceholderText("model file: .pt .pth .pt2 .onnx .safetensors …")
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        self.format_label = QLabel("")
        self.arch = QComboBox()
        self.arch.setEditable(True)
        self.arch.setToolTip("torchvision name, 'rnet', or your own class as path/to/file.py:ClassName")
        arch_file = QPushButton("Class file…")
        arch_file.clicked.connect(self._browse_class)
        self.height, self.width = QSpinBox(), QSpinBox()
        for s in (self.height, self.width):
            s.setRange(1, 8192)
        self.mean, self.std = QLineEdit(), QLineEdit()
        self.channels = QComboBox()
        self.channels.addItems(["rgb", "bgr"])
        self.resize_policy = QComboBox()
        self.resize_policy.addItems(["stretch", "shorter_side_crop"])
        self.grayscale = QCheckBox("the model takes one (grey) channel")
        self.classes = QLineEdit()
        self.classes.setPlaceholderText("class names: comma-separated, or a file with one per line")
        classes_file = QPushButton("File…")
        classes_file.clicked.connect(self._browse_classes)
        self.backend = QComboBox()
        self.backend.addItems(["auto", "torch", "onnx"])
        self.device = QComboBox()
        self.device.addItems(["auto", "cpu", "cuda"])
        self.strict = QCheckBox("strict: refuse missing or unexpected weights")
        self.strict.setChecked(True)
        self.allow_pickle = QCheckBox("Allow pickled code (runs code stored in the file; trusted files only)")
        self.error = QLabel("")
        self.error.setWordWrap(True)
        self.error.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.error.setProperty("role", "error")  # coloured by resources/style.qss

        form = QFormLayout()
        form.addRow("File", _row(self.path, browse))
        form.addRow("Format", self.format_label)
        form.addRow("Architecture", _row(self.arch, arch_file))
        form.addRow("Input size (H × W)", _row(self.height, QLabel("×"), self.width))
        form.addRow("Mean (0–1)", self.mean)
        form.addRow("Std (0–1)", self.std)
        form.addRow("Channel order", self.channels)
        form.addRow("Resize", self.resize_policy)
        form.addRow("", self.grayscale)
        form.addRow("Classes", _row(self.classes, classes_file))
        form.addRow("Backend", _row(self.backend, QLabel("device"), self.device))
        form.addRow("", self.strict)
        form.addRow("", self.allow_pickle)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        self.buttons.accepted.connect(self.load)
        self.buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.error)
        lay.addWidget(self.buttons)
        self.arch.addItems(["", *architecture_names()])
        self._prefilled = ""
        self.path.editingFinished.connect(lambda: self.prefill() if self.path.text().strip() != self._prefilled else None)
        self.arch.currentTextChanged.connect(lambda _t: self.prefill(keep_arch=True))
        if path:
            self.path.setText(path)
            self.prefill()

    # ------------------------------------------------------------------ prefilling

    def _browse(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Open model", self.start_dir,
                                           "Models (*.pt *.pth *.pt2 *.onnx *.safetensors *.bin *.ts);;All files (*)")
        if f:
            self.path.setText(f)
            self.prefill()

    def _browse_class(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Python file with the model class", "", "Python (*.py)")
        if f:
            from PySide6.QtWidgets import QInputDialog

            name, ok = QInputDialog.getText(self, "Class name", f"Class in {f}:")
            if ok and name:
                self.arch.setCurrentText(f"{f}:{name}")

    def _browse_classes(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Class names", "", "Text (*.txt);;All files (*)")
        if f:
            self.classes.setText(f)

    def prefill(self, keep_arch: bool = False) -> None:
        """Fill the fields from what the file (and a TOML beside it) says."""
        from engine.models import build_spec, detect_format

        path = self.path.text().strip()
        if not path:
            return
        self._prefilled = path
        from engine.models.config import find_config_beside, is_code_arch

        try:
            fmt = detect_format(path)
            # building a spec runs nothing: the class file named by a TOML beside the model is
            # shown in the architecture field, and runs only when the user presses OK
            spec = build_spec(path, arch=(self.arch.currentText() or None) if keep_arch else None, allow_code=True)
        except Exception as e:  # noqa: BLE001 - shown in the dialog
            self.format_label.setText("")
            self.error.setText(str(e))
            return
        toml = find_config_beside(path)
        if not keep_arch and toml is not None and is_code_arch(spec.arch):
            self.error.setText(f"{toml.name} names Python code as the architecture ({spec.arch}); "
                               "it is imported and run when you press OK.")
        else:
            self.error.setText("")
        hint = " — needs an architecture" if fmt in NEEDS_ARCH and not spec.arch else ""
        self.format_label.setText(FORMAT_NAMES.get(fmt, fmt) + hint)
        self.arch.setEnabled(fmt in NEEDS_ARCH)
        if spec.arch and not keep_arch:
            self.arch.blockSignals(True)
            self.arch.setCurrentText(spec.arch)
            self.arch.blockSignals(False)
        self.fill(spec)

    def fill(self, spec: ModelSpec) -> None:
        pre = spec.preprocess
        self.height.setValue(pre.input_size[0])
        self.width.setValue(pre.input_size[1])
        self.mean.setText(", ".join(f"{v:.4g}" for v in pre.mean))
        self.std.setText(", ".join(f"{v:.4g}" for v in pre.std))
        self.channels.setCurrentText(pre.channels)
        self.resize_policy.setCurrentText(pre.resize)
        self.grayscale.setChecked(pre.grayscale)
        if spec.classes:
            self.classes.setText(", ".join(spec.classes))
        self.backend.setCurrentText(spec.backend)
        self.device.setCurrentText(spec.device)
        self.strict.setChecked(spec.strict)

    # ------------------------------------------------------------------ loading

    def build(self) -> ModelSpec:
        from engine.models import build_spec

        return build_spec(
            self.path.text().strip(), arch=self.arch.currentText().strip() or None,
            input_size=f"{self.height.value()}x{self.width.value()}", mean=self.mean.text(), std=self.std.text(),
            channels=self.channels.currentText(), resize=self.resize_policy.currentText(),
            grayscale=self.grayscale.isChecked(), classes=self.classes.text().strip() or None,
            backend=self.backend.currentText(), device=self.device.currentText(), strict=self.strict.isChecked(),
            allow_pickle=self.allow_pickle.isChecked(),
        )

    def load(self) -> None:
        """Validate and load on the worker; close on success, show the cause on failure."""
        try:
            spec = self.build()
        except Exception as e:  # noqa: BLE001 - shown in the dialog
            self.error.setText(str(e))
            return
        self.error.setText("Loading…")
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(False)
        self._handle = self.session.load_model(spec)
        self._handle.finished.connect(lambda _r: self._loaded(spec))
        self._handle.failed.connect(self._failed)

    def _loaded(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.accept()

    def _failed(self, e: BaseException) -> None:
        from .session import _message

        self.error.setText(_message(e))
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(True)


def _row(*widgets: QWidget) -> QWidget:
    w = QWidget()
    lay = QHBoxLayout(w)
    lay.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        lay.addWidget(x)
    return w
