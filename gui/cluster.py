"""Run on: this machine, or a Ray cluster. A job setting, its dialog, and the job functions
that follow it.

* :class:`RunOn` is the setting (plain data), kept in the app's ``QSettings`` under
  ``cluster/*`` (:func:`load_run_on` / :func:`save_run_on`): where the model passes of
  ``predict``, ``activations`` and ``dissect`` run, with the cluster's address (``local``
  starts a Ray instance on this machine), the number of workers and the GPUs per worker
  ("auto": one where the cluster has GPUs).
* :class:`RunOnDialog` edits it. Without Ray installed the cluster choice is disabled and the
  dialog says ``pip install convlens[cluster]``.
* :func:`install_run_on` adds "Run on…" to a menu of the main window.
* :func:`extract` and :func:`dissect` take the engine jobs' arguments and run them where the
  setting says (read when the job starts, on the worker thread): in this process, or through
  :func:`engine.cluster.extract_on_ray` / :func:`engine.cluster.dissect_on_ray`. Their
  progress is the cluster's (one report per block), a cancel stops the Ray tasks, and the
  result is read from the same cache entries, so every view shows it like a local one.

A local Ray instance the app starts stays up between jobs (starting one takes seconds) and ends
with the app.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QSettings
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QRadioButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from engine.jobs import Job

_KEY = "cluster"


@dataclass(frozen=True)
class RunOn:
    """Where jobs run: ``ray`` False is this machine; else the Ray ``address`` with ``workers``
    actors of ``gpus_per_worker`` GPUs each (None: one where the cluster has GPUs)."""

    ray: bool = False
    address: str = "local"
    workers: int = 2
    gpus_per_worker: float | None = None

    def describe(self) -> str:
        if not self.ray:
            return "this machine"
        gpus = "auto" if self.gpus_per_worker is None else f"{self.gpus_per_worker:g}"
        return f"Ray {self.address} ({self.workers} workers, {gpus} GPU each)"

    def executor(self) -> Any:
        """None for this machine, else an :class:`engine.cluster.RayExecutor` (a ConvLensError
        saying how to install Ray where it is missing)."""
        if not self.ray:
            return None
        from engine.cluster import RayExecutor, require_ray

        require_ray()
        return RayExecutor(self.address, workers=self.workers, gpus_per_worker=self.gpus_per_worker)


def load_run_on(settings: QSettings | None = None) -> RunOn:
    s = settings or QSettings()
    try:
        gpus = float(s.value(f"{_KEY}/gpus_per_worker", -1.0))
        workers = int(s.value(f"{_KEY}/workers", 2))
    except (TypeError, ValueError):
        gpus, workers = -1.0, 2
    return RunOn(ray=str(s.value(f"{_KEY}/mode", "this machine")) == "ray",
                 address=str(s.value(f"{_KEY}/address", "local")) or "local",
                 workers=max(1, workers), gpus_per_worker=None if gpus < 0 else gpus)


def save_run_on(run_on: RunOn, settings: QSettings | None = None) -> None:
    s = settings or QSettings()
    s.setValue(f"{_KEY}/mode", "ray" if run_on.ray else "this machine")
    s.setValue(f"{_KEY}/address", run_on.address)
    s.setValue(f"{_KEY}/workers", run_on.workers)
    s.setValue(f"{_KEY}/gpus_per_worker", -1.0 if run_on.gpus_per_worker is None else run_on.gpus_per_worker)
    s.sync()


class RunOnWidget(QWidget):
    """The "Run on" fields: this machine, or a Ray cluster address with workers and GPUs."""

    def __init__(self, run_on: RunOn | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from engine.cluster import INSTALL_HINT, ray_available

        run_on = run_on or RunOn()
        self.here = QRadioButton("This machine")
        self.cluster = QRadioButton("Ray cluster")
        group = QButtonGroup(self)
        group.addButton(self.here)
        group.addButton(self.cluster)
        self.address = QLineEdit(run_on.address)
        self.address.setPlaceholderText("local, auto, host:6379 or ray://host:10001")
        self.address.setToolTip("'local' starts a Ray instance on this machine; otherwise an existing cluster's address")
        self.workers = QSpinBox()
        self.workers.setRange(1, 1024)
        self.workers.setValue(run_on.workers)
        self.auto_gpus = QCheckBox("auto (one per worker where the cluster has GPUs)")
        self.gpus = QDoubleSpinBox()
        self.gpus.setRange(0.0, 64.0)
        self.gpus.setSingleStep(0.5)
        self.auto_gpus.setChecked(run_on.gpus_per_worker is None)
        self.gpus.setValue(run_on.gpus_per_worker or 0.0)
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.available = ray_available()
        if not self.available:
            self.note.setText(f"Ray is not installed here: {INSTALL_HINT}")
        (self.cluster if run_on.ray and self.available else self.here).setChecked(True)
        self.cluster.setEnabled(self.available)

        gpus = QHBoxLayout()
        gpus.addWidget(self.gpus)
        gpus.addWidget(self.auto_gpus)
        form = QFormLayout()
        form.addRow("Address", self.address)
        form.addRow("Workers", self.workers)
        form.addRow("GPUs per worker", gpus)
        lay = QVBoxLayout(self)
        lay.addWidget(self.here)
        lay.addWidget(self.cluster)
        lay.addLayout(form)
        lay.addWidget(self.note)
        for w in (self.here, self.cluster, self.auto_gpus):
            w.toggled.connect(self._enable)
        self._enable()

    def _enable(self) -> None:
        on = self.cluster.isChecked()
        for w in (self.address, self.workers, self.auto_gpus):
            w.setEnabled(on)
        self.gpus.setEnabled(on and not self.auto_gpus.isChecked())

    def value(self) -> RunOn:
        return RunOn(ray=self.cluster.isChecked(), address=self.address.text().strip() or "local",
                     workers=self.workers.value(),
                     gpus_per_worker=None if self.auto_gpus.isChecked() else self.gpus.value())


class RunOnDialog(QDialog):
    """Edit the "Run on" setting; OK saves it into ``settings``."""

    def __init__(self, settings: QSettings | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Run on")
        self.settings = settings or QSettings()
        self.fields = RunOnWidget(load_run_on(self.settings), self)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("Where predictions, activations and Network Dissection run:"))
        lay.addWidget(self.fields)
        lay.addWidget(buttons)

    def accept(self) -> None:
        save_run_on(self.fields.value(), self.settings)
        super().accept()


def install_run_on(window: Any, menu: Any) -> Any:
    """Add "Run on…" to ``menu`` of the main ``window`` (which has ``settings`` and a status
    bar); returns the action."""
    from PySide6.QtGui import QAction

    act = QAction("&Run on…", window)
    act.setStatusTip("Run jobs on this machine or on a Ray cluster")

    def edit() -> None:
        dialog = RunOnDialog(getattr(window, "settings", None), window)
        if dialog.exec():
            window.statusBar().showMessage(f"Jobs run on {load_run_on(dialog.settings).describe()}", 5000)

    act.triggered.connect(edit)
    menu.addAction(act)
    return act


# ----------------------------------------------------------------------------- jobs that follow the setting


def extract(backend: Any, model_sha: str, image_set: Any, layers: Any, *, settings: QSettings | None = None,
            **kwargs: Any) -> Job[Any]:
    """:func:`engine.activations.extract`, run where the "Run on" setting says."""
    executor = load_run_on(settings).executor()
    if executor is None:
        from engine.activations import extract as local

        return (yield from local(backend, model_sha, image_set, layers, **kwargs))
    from engine.cluster import extract_on_ray

    return (yield from extract_on_ray(backend, model_sha, image_set, layers, executor=executor, **kwargs))


def dissect(backend: Any, model_sha: str, concepts: Any, layers: Any, params: Any = None, *,
            settings: QSettings | None = None, **kwargs: Any) -> Job[Any]:
    """:func:`engine.dissection.dissect`, run where the "Run on" setting says."""
    executor = load_run_on(settings).executor()
    if executor is None:
        from engine.dissection import dissect as local

        args = () if params is None else (params,)
        return (yield from local(backend, model_sha, concepts, layers, *args, **kwargs))
    from engine.cluster import dissect_on_ray

    return (yield from dissect_on_ray(backend, model_sha, concepts, layers, params, executor=executor, **kwargs))
