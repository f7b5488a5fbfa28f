"""The engine objects of the open model and image set, shared by all views.

The session loads models and image sets, runs predictions and extractions, all as jobs on the
runner's worker thread (torch and ONNX Runtime never run on the GUI thread, and the backend is
only ever used by the one inference worker). Results arrive as signals carrying plain engine
data. The selection holds *what* is selected (model spec, image set, image, layer, unit); the
session holds the heavy objects behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from engine.types import LayerInfo, ModelSpec, Progress

from .jobs import JobHandle, JobRunner
from .selection import Selection


class LoadedModelInfo:
    """What the GUI may know of a loaded model (no torch objects leak out of the worker)."""

    def __init__(self, spec: ModelSpec, fmt: str, sha256: str, backend: str, device: str,
                 layers: list[LayerInfo], notes: list[str], gradients: bool) -> None:
        self.spec, self.format, self.sha256 = spec, fmt, sha256
        self.backend, self.device, self.layers, self.notes = backend, device, layers, notes
        self.gradients = gradients

    @property
    def name(self) -> str:
        return Path(self.spec.path).name

    def layer(self, name: str) -> LayerInfo | None:
        return next((li for li in self.layers if li.name == name), None)

    @property
    def default_layers(self) -> list[str]:
        from engine.models.layers import default_layers

        return list(self.spec.layers) or default_layers(self.layers)


class Session(QObject):
    model_loaded = Signal(object)  # LoadedModelInfo
    model_failed = Signal(str)  # message (file + cause)
    images_failed = Signal(str)
    predictions_changed = Signal(object)  # engine Predictions or None
    status = Signal(str)  # short messages for the status bar

    def __init__(self, selection: Selection, runner: JobRunner, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.selection = selection
        self.runner = runner
        self.model: LoadedModelInfo | None = None
        self.predictions: Any = None
        self.predictions_from_cache = False
        self._loaded: Any = None  # engine LoadedModel, touched by worker jobs only
        self._backend: Any = None  # engine Backend, touched by worker jobs only
        self.images_path: str | None = None
        selection.images_changed.connect(lambda _s: self._refresh_predictions())

    # ------------------------------------------------------------------ model

    def load_model(self, spec: ModelSpec) -> JobHandle:
        """Load ``spec`` on the worker; on success it becomes the session's model."""

        def job() -> Generator[Progress, None, tuple[Any, Any, LoadedModelInfo]]:
            from engine.backends import open_backend
            from engine.models import load_model

            yield Progress(None, f"loading {Path(spec.path).name}")
            loaded = load_model(spec)
            yield Progress(0.5, "opening backend")
            backend = open_backend(loaded)
            layers = backend.layers()
            info = LoadedModelInfo(spec, loaded.format, loaded.sha256, backend.name, backend.device, layers,
                                   loaded.notes, backend.supports_gradients)
            return loaded, backend, info

        handle = self.runner.submit(f"Load {Path(spec.path).name}", job, key="load-model")
        handle.finished.connect(self._model_ready)
        handle.failed.connect(lambda e: self.model_failed.emit(_message(e)))
        return handle

    def _model_ready(self, result: tuple[Any, Any, LoadedModelInfo]) -> None:
        old = self._backend
        self._loaded, self._backend, self.model = result
        if old is not None:
            self.runner.submit("Release previous model", lambda: _close(old), kind="inference")
        self.predictions = None
        self.predictions_changed.emit(None)
        self.selection.model = self.model
        self.model_loaded.emit(self.model)
        self.status.emit(f"Loaded {self.model.name} ({self.model.format}) on {self.model.backend}/{self.model.device}")
        self._refresh_predictions()

    # ------------------------------------------------------------------ images

    def open_images(self, path: str) -> JobHandle:
        def job() -> Generator[Progress, None, Any]:
            from engine.data.images import open_image_set

            yield Progress(None, f"scanning {path}")
            return open_image_set(path)

        handle = self.runner.submit(f"Open {Path(path).name}", job, kind="light", key="open-images")

        def done(image_set: Any) -> None:
            self.images_path = str(path)
            self.predictions = None
            self.predictions_changed.emit(None)
            self.selection.images = image_set
            if len(image_set):
                self.selection.current_image = 0  # every view has something to show at once
            self.status.emit(f"{len(image_set)} images from {path}")

        handle.finished.connect(done)
        handle.failed.connect(lambda e: self.images_failed.emit(_message(e)))
        return handle

    # ------------------------------------------------------------------ analysis on the worker

    def run(self, title: str, fn: Callable[[Any, Any], Generator[Progress, None, Any]], *,
            key: str | None = None, on_done: Callable[[Any], None] | None = None) -> JobHandle | None:
        """Run ``fn(backend, loaded_model)`` (a job generator) on the inference worker.

        Views use this for every computation that needs the model. Returns None when no model
        is loaded.
        """
        if self._backend is None:
            return None
        backend, loaded = self._backend, self._loaded
        handle = self.runner.submit(title, lambda: fn(backend, loaded), key=key)
        if on_done is not None:
            handle.finished.connect(on_done)
        return handle

    def extract(self, layers: Sequence[str], *, key: str, on_done: Callable[[Any], None],
                title: str | None = None) -> JobHandle | None:
        """Activations of ``layers`` over the current image set (cached on disk by the engine)."""
        images = self.selection.images
        if images is None:
            return None

        def fn(backend: Any, loaded: Any) -> Generator[Progress, None, Any]:
            from engine.activations import extract

            return (yield from extract(backend, loaded.cache_id, images, list(layers)))

        return self.run(title or f"Extract {', '.join(layers) or 'predictions'}", fn, key=key, on_done=on_done)

    def _refresh_predictions(self) -> None:
        images = self.selection.images
        if self._backend is None or images is None or self.model is None:
            return
        spec = self.model.spec

        def fn(backend: Any, loaded: Any) -> Generator[Progress, None, tuple[Any, Any]]:
            from engine.activations import extract
            from engine.predict import predictions_from

            acts = yield from extract(backend, loaded.cache_id, images, [])
            return acts.from_cache, predictions_from(acts, spec)  # softmax over (N, K) here, not on the GUI

        def done(result: tuple[bool, Any]) -> None:
            self.predictions_from_cache, self.predictions = result
            self.predictions_changed.emit(self.predictions)
            acc = self.predictions.accuracy
            self.status.emit("Predictions ready" + ("" if acc is None else f": accuracy {acc:.1%}"))

        handle = self.run("Predict", fn, key="predictions", on_done=done)
        if handle is not None:
            handle.failed.connect(lambda e: self.status.emit(_message(e)))

    def shutdown(self) -> None:
        """Release the model; call after the runner has stopped."""
        if self._backend is not None:
            self._backend.close()
            self._backend = self._loaded = None


def _close(backend: Any) -> Generator[Progress, None, None]:
    backend.close()
    yield Progress(1.0, "released")


def _message(e: BaseException) -> str:
    from engine.types import ConvLensError

    if isinstance(e, ConvLensError):
        return str(e)
    return f"{type(e).__name__}: {e}"
