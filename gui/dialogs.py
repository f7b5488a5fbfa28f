"""The open-model dialog: choose a file, complete what the file does not say, load it.

The format is detected from the file; fields are prefilled from what ConvLens knows (the
architecture's defaults, an ONNX input shape, a TOML file beside the checkpoint) and stay
editable. Values nothing stated are named under the fields ("Assumed: ..."), and stop being
assumed once edited. When opening the file runs no code the user has not agreed to, the model is
probed on the worker (one image) and the Output field lists every output with its shape and kind,
with the choice of :func:`engine.predict.choose_output` as its default ("auto"); Score kind says
whether that output holds logits or probabilities. OK loads the model on the worker; an engine
error is shown in the dialog, with its cause, and the dialog stays open to fix it.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, QTimer
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
        self.output = QComboBox()
        self.output.setToolTip("which output holds the class scores when the model has several (auto: the rule "
                               "of ConvLens chooses: class-score shaped, matching the class names, probabilities first)")
        self.output.addItem("auto: the rule chooses", None)
        self.check_outputs = QPushButton("Check outputs")
        self.check_outputs.setToolTip("open the model on one probe image and list its outputs")
        self.check_outputs.clicked.connect(self.probe_outputs)
        self.scores = QComboBox()
        self.scores.addItem("auto: probabilities if rows sum to 1", "auto")
        self.scores.addItem("logits (softmax applied)", "logits")
        self.scores.addItem("probabilities", "probs")
        self.outputs_label = QLabel("")
        self.outputs_label.setWordWrap(True)
        self.assumed_label = QLabel("")
        self.assumed_label.setWordWrap(True)
        self.assumed_label.setObjectName("assumed_label")
        self.choice: Any = None  # engine OutputChoice of the last probe
        self._probe: Any = None
        self._probe_timer = QTimer(self)
        self._probe_timer.setSingleShot(True)
        self._probe_timer.setInterval(400)
        self._probe_timer.timeout.connect(self._auto_probe)
        self._filled: dict[str, Any] = {}
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
        form.addRow("Output (class scores)", _row(self.output, self.check_outputs))
        form.addRow("", self.outputs_label)
        form.addRow("Score kind", self.scores)
        form.addRow("", self.assumed_label)
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
        for sig in (self.height.valueChanged, self.width.valueChanged, self.mean.textEdited, self.std.textEdited,
                    self.channels.currentTextChanged, self.grayscale.toggled):
            sig.connect(lambda *_a: self._update_assumed())
        self.classes.editingFinished.connect(lambda: self._probe_timer.start() if self.choice is not None else None)
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
        self._prefill_spec = spec
        self._filled = self._field_values()
        self._set_outputs(None)
        self._update_assumed()
        if self._runs_no_unagreed_code(fmt, spec):
            self._probe_timer.start()

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
        self._given_output = spec.output_index if spec.output_index != 0 else None
        self.scores.setCurrentIndex(max(0, self.scores.findData(spec.scores)))

    # ------------------------------------------------------------------ assumed values and outputs

    def _field_values(self) -> dict[str, Any]:
        return {"input_size": (self.height.value(), self.width.value()), "mean": self.mean.text().strip(),
                "std": self.std.text().strip(), "channels": self.channels.currentText(),
                "grayscale": self.grayscale.isChecked()}

    def stated(self) -> dict[str, Any]:
        """What the user stated, by spec key (as the command line's options): the fields edited
        since they were prefilled, and the output index when one is chosen."""
        now = self._field_values()
        out = {k: v for k, v in now.items() if self._filled and v != self._filled.get(k)}
        if out.get("grayscale") is False:
            out.pop("grayscale")
        index = self.output.currentData()
        if index is not None:
            out["output_index"] = index
        if self.scores.currentData() != "auto":
            out["scores"] = self.scores.currentData()
        return out

    def _update_assumed(self) -> None:
        from engine.cli_common import assumed_values

        from .session import ASSUMED_FIELDS, _said

        spec = getattr(self, "_prefill_spec", None)
        if spec is None or not self._filled:
            self.assumed_label.setText("")
            return
        assumed = {k: v for k, v in assumed_values(spec).items() if k not in self.stated()}
        if assumed:
            fields = ", ".join(ASSUMED_FIELDS[k].capitalize() for k in assumed)
            self.assumed_label.setText(f"Assumed: {_said(assumed)} — neither the file nor a model config says. "
                                       f"If the model was trained otherwise, change {fields}.")
        else:
            self.assumed_label.setText("")

    @staticmethod
    def _runs_no_unagreed_code(fmt: str, spec: ModelSpec) -> bool:
        """Whether opening the model to probe it runs only what ConvLens checks: no Python class
        file (that runs only on OK) and no pickled code."""
        from engine.models.config import is_code_arch

        if fmt == "pickled_module" or spec.allow_pickle:
            return False
        return not (fmt in NEEDS_ARCH and (not spec.arch or is_code_arch(spec.arch)))

    def _auto_probe(self) -> None:
        try:
            spec = self.build()
        except Exception:  # noqa: BLE001 - the fields are not complete yet: nothing to probe
            return
        from engine.models import detect_format

        try:
            fmt = detect_format(spec.path)
        except Exception:  # noqa: BLE001 - shown by prefill already
            return
        if self._runs_no_unagreed_code(fmt, spec):
            self.probe_outputs()

    def probe_outputs(self) -> Any:
        """Open the model as the fields say on the worker, run one probe image, and list its
        outputs in the Output field, the rule's choice as "auto". Returns the job handle."""
        try:
            spec = self.build()
        except Exception as e:  # noqa: BLE001 - shown in the dialog
            self.outputs_label.setText(str(e))
            return None
        n_classes = len(spec.classes) if spec.classes else None
        given = self.output.currentData()

        def job() -> Any:
            from engine.backends import open_backend
            from engine.models import load_model
            from engine.predict import choose_output, probe_batch
            from engine.types import Progress

            yield Progress(None, f"probing {spec.path}")
            backend = open_backend(load_model(spec))
            try:
                outputs = backend.forward(probe_batch(spec)).outputs
            finally:
                backend.close()
            return choose_output(outputs, n_classes), given

        self.outputs_label.setText("checking the outputs on a probe image…")
        handle = self.session.runner.submit("Check the model's outputs", job, key="probe-outputs")
        handle.finished.connect(lambda r: self._set_outputs(*r))
        handle.failed.connect(lambda e: self.outputs_label.setText(f"Could not check the outputs: {e}"))
        self._probe = handle
        return handle

    def _set_outputs(self, choice: Any, keep: int | None = None) -> None:
        """Fill the Output field from a probe's ``OutputChoice`` (None: not probed yet)."""
        self.choice = choice
        self.output.blockSignals(True)
        self.output.clear()
        given = keep if keep is not None else getattr(self, "_given_output", None)
        if choice is None:
            self.output.addItem("auto: the rule chooses", None)
            self.outputs_label.setText("")
            if given is not None:
                self.output.addItem(f"output {given}", given)
                self.output.setCurrentIndex(1)
        else:
            auto = (f"auto: output {choice.index} — {choice.chosen.describe().split(': ', 1)[1]}"
                    if choice.index is not None else "auto: none is class scores")
            self.output.addItem(auto, None)
            for o in choice.outputs:
                self.output.addItem(o.describe(), o.index)
            if given is not None and 0 <= given < len(choice.outputs):
                self.output.setCurrentIndex(given + 1)
            if choice.index is None:
                text = f"{choice.reason}: no predictions or accuracy; layers, heatmaps and dissection still work."
            elif len(choice.outputs) > 1:
                text = f"{len(choice.outputs)} outputs; the rule uses output {choice.index} ({choice.reason})."
            else:
                text = ""
            self.outputs_label.setText(text)
            chosen = choice.chosen
            self.scores.setItemText(0, f"auto: {'probabilities' if chosen and chosen.score_kind == 'probs' else 'logits'}"
                                    if chosen else "auto")
        self.output.blockSignals(False)
        self._update_assumed()

    # ------------------------------------------------------------------ loading

    def build(self) -> ModelSpec:
        from engine.models import build_spec

        return build_spec(
            self.path.text().strip(), arch=self.arch.currentText().strip() or None,
            input_size=f"{self.height.value()}x{self.width.value()}", mean=self.mean.text(), std=self.std.text(),
            channels=self.channels.currentText(), resize=self.resize_policy.currentText(),
            grayscale=self.grayscale.isChecked(), classes=self.classes.text().strip() or None,
            backend=self.backend.currentText(), device=self.device.currentText(), strict=self.strict.isChecked(),
            allow_pickle=self.allow_pickle.isChecked(), output_index=self.output.currentData(),
            scores=self.scores.currentData(),
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
        self._probe_timer.stop()
        self._handle = self.session.load_model(spec, stated=self.stated())
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
    for i, x in enumerate(widgets):
        lay.addWidget(x, 1 if i == 0 and isinstance(x, (QLineEdit, QComboBox)) else 0)  # the field takes the width
    return w
