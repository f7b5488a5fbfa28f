"""The engine objects of the open model and image set, shared by all views.

The session loads models and image sets, runs predictions and extractions, all as jobs on the
runner's worker thread (torch and ONNX Runtime never run on the GUI thread, and the backend is
only ever used by the one inference worker). Results arrive as signals carrying plain engine
data. The selection holds *what* is selected (model spec, image set, image, layer, unit); the
session holds the heavy objects behind them.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, Signal

from engine.types import LayerInfo, ModelSpec, Progress

from .jobs import JobHandle, JobRunner
from .selection import Selection


class LoadedModelInfo:
    """What the GUI may know of a loaded model (no torch objects leak out of the worker).

    ``choice`` is the engine's :class:`~engine.predict.OutputChoice` (which output is used as
    class scores, by the rule of :mod:`engine.predict`; ``choice.index`` None: none is, so there
    are no predictions), ``assumed`` the preprocessing values nothing stated (as
    :func:`engine.cli_common.assumed_values` names them), ``messages`` what the user is told
    about both (the same sentences the command line prints), and ``notes`` the loader's notes
    followed by those messages.
    """

    def __init__(self, spec: ModelSpec, fmt: str, sha256: str, backend: str, device: str,
                 layers: list[LayerInfo], notes: list[str], gradients: bool, *, choice: Any = None,
                 assumed: Mapping[str, str] | None = None, messages: Sequence[str] = ()) -> None:
        self.spec, self.format, self.sha256 = spec, fmt, sha256
        self.backend, self.device, self.layers = backend, device, layers
        self.gradients = gradients
        self.choice = choice
        self.assumed: dict[str, str] = dict(assumed or {})
        self.messages: list[str] = list(messages)
        self.notes = [*notes, *self.messages]

    @property
    def class_scores(self) -> bool:
        """Whether an output is used as class scores (False: a map or a single number)."""
        return self.choice is None or self.choice.index is not None

    @property
    def output_summary(self) -> str:
        """One phrase for the status bar and model info: the output used, of how many."""
        c = self.choice
        if c is None:
            return ""
        if c.index is None:
            return "no class-score output"
        chosen = c.chosen
        what = f"{chosen.n_classes} classes" + (", probabilities" if chosen.score_kind == "probs" else "")
        if len(c.outputs) == 1:
            return what
        return f"output {c.index} of {len(c.outputs)} ({what})"

    def describe(self) -> str:
        """The model info: format, backend, the outputs and the one used, assumed values."""
        lines = [f"{self.name}: {self.format} on {self.backend}/{self.device}, {len(self.layers)} layers"]
        if self.choice is not None:
            lines.append(f"outputs: {self.choice.describe()}")
            lines.append(f"class scores: {self.output_summary} ({self.choice.reason})" if self.choice.index is not None
                         else f"class scores: none ({self.choice.reason}); no predictions or accuracy")
        if self.assumed:
            lines.append("assumed (nothing stated them): " + _said(self.assumed))
        return "\n".join(lines)


    @property
    def name(self) -> str:
        return Path(self.spec.path).name

    def layer(self, name: str) -> LayerInfo | None:
        return next((li for li in self.layers if li.name == name), None)

    @property
    def default_layers(self) -> list[str]:
        from engine.models.layers import default_layers

        return list(self.spec.layers) or default_layers(self.layers)


#: what the app calls the preprocessing values :func:`engine.cli_common.assumed_values` tracks
#: (the open-model dialog's field names)
ASSUMED_FIELDS = {"input_size": "input size", "mean": "mean", "std": "std", "channels": "channel order"}


def _said(assumed: Mapping[str, str]) -> str:
    return ", ".join(f"{ASSUMED_FIELDS.get(k, k)} {v}" for k, v in assumed.items())


def assumed_message(name: str, assumed: Mapping[str, str]) -> str:
    """The app's form of the command line's "assumed" line: the dialog's fields, not options."""
    fields = ", ".join(ASSUMED_FIELDS.get(k, k).capitalize() for k in assumed)
    return (f"{name}: assumed {_said(assumed)} (neither the model file, a model config nor you said); if the "
            f"model was trained otherwise, give {fields} in Open model")


def output_index_given(spec: ModelSpec, stated: Mapping[str, Any] | None) -> bool:
    """Whether the user, the model config or the spec itself names the classifier output (then
    it is used as it is, rule 2 of :mod:`engine.predict`), as the command line decides it."""
    from engine.models.config import find_config_beside, read_config

    if stated and stated.get("output_index") is not None:
        return True
    if spec.output_index != 0:
        return True
    cfg = find_config_beside(spec.path)
    return cfg is not None and "output_index" in read_config(cfg)


class Session(QObject):
    model_loaded = Signal(object)  # LoadedModelInfo
    model_failed = Signal(str)  # message (file + cause)
    images_failed = Signal(str)
    predictions_changed = Signal(object)  # engine Predictions or None
    status = Signal(str)  # short messages for the status bar
    notice = Signal(str, str)  # (title, text): what the user should know about the model just loaded, once

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
        self.show_notices = True  # show :attr:`notice` in a box on the visible window (False: only emit it)
        self.notice_box: Any = None
        self._told: set[tuple[Any, ...]] = set()
        selection.images_changed.connect(lambda _s: self._refresh_predictions())

    # ------------------------------------------------------------------ model

    def load_model(self, spec: ModelSpec, stated: Mapping[str, Any] | None = None) -> JobHandle:
        """Load ``spec`` on the worker; on success it becomes the session's model.

        The same steps as the command line's :func:`engine.cli_common.open_model`: load, name the
        preprocessing values nothing stated (``stated``: the values the user gave, by spec key,
        e.g. ``{"input_size": "48x48", "output_index": 2}``; None: only what the model file, a
        model config beside it or the architecture says), run one probe image (a shape mismatch
        says which field to change), and choose the class-score output by
        :func:`engine.predict.choose_output`, reopening with that ``output_index``. The info's
        ``spec`` is the spec in use.
        """
        handle = self.runner.submit(f"Load {Path(spec.path).name}", lambda: self._open_job(spec, stated),
                                    key="load-model")
        handle.finished.connect(self._model_ready)
        handle.failed.connect(lambda e: self.model_failed.emit(_message(e)))
        return handle

    def _open_job(self, spec: ModelSpec, stated: Mapping[str, Any] | None
                  ) -> Generator[Progress, None, tuple[Any, Any, LoadedModelInfo]]:
        import dataclasses

        from engine.backends import open_backend
        from engine.cli_common import assumed_values
        from engine.models import load_model
        from engine.predict import choose_output, probe_batch
        from engine.types import ConvLensError

        name = Path(spec.path).name
        yield Progress(None, f"loading {name}")
        loaded = load_model(spec)
        assumed = assumed_values(spec, dict(stated) if stated is not None else None)
        yield Progress(0.5, "opening backend")
        backend = open_backend(loaded)
        yield Progress(0.7, "checking the outputs on a probe image")
        try:
            result = backend.forward(probe_batch(spec))
        except ConvLensError as e:
            backend.close()
            size = "x".join(map(str, spec.preprocess.input_size))
            why = (f"the input size {size} was assumed: give the size the model was trained at in Input size"
                   if "input_size" in assumed else
                   f"check Input size (now {size}), Channel order and the grey-channel option")
            raise ConvLensError(f"{e} ({why})") from None
        given = spec.output_index if output_index_given(spec, stated) else None
        try:
            choice = choose_output(result.outputs, len(spec.classes) if spec.classes else None, given)
        except ConvLensError:
            backend.close()
            raise
        if choice.index is not None and choice.index != spec.output_index:
            backend.close()
            spec = spec.with_(output_index=choice.index)
            loaded = dataclasses.replace(loaded, spec=spec)
            backend = open_backend(loaded)
        messages = [m for m in (choice.message(name),) if m]
        if messages and choice.index is not None:
            messages[0] = messages[0].replace("--output-index N chooses another", "Open model > Output chooses another")
        if assumed:
            messages.append(assumed_message(name, assumed))
        layers = backend.layers()
        info = LoadedModelInfo(spec, loaded.format, loaded.sha256, backend.name, backend.device, layers,
                               loaded.notes, backend.supports_gradients, choice=choice, assumed=assumed,
                               messages=messages)
        return loaded, backend, info

    def _model_ready(self, result: tuple[Any, Any, LoadedModelInfo]) -> None:
        old = self._backend
        self._loaded, self._backend, self.model = result
        if old is not None:
            self.runner.submit("Release previous model", lambda: _close(old), kind="inference")
        self.predictions = None
        self.predictions_changed.emit(None)
        self.selection.model = self.model
        self.model_loaded.emit(self.model)
        info = self.model
        several = info.choice is not None and len(info.choice.outputs) > 1
        extra = f"; class scores: {info.output_summary}" if several or not info.class_scores else ""
        extra += f"; assumed {_said(info.assumed)}" if info.assumed else ""
        self.status.emit(f"Loaded {info.name} ({info.format}) on {info.backend}/{info.device}{extra}")
        self._tell_once(info)
        self._refresh_predictions()

    def _tell_once(self, info: LoadedModelInfo) -> None:
        """Emit :attr:`notice` for what the user should know about a model (the output used,
        the values assumed), once per model and settings in this session; with a visible
        window to show it on, show it there as a non-modal box (object name
        ``model_notice``)."""
        if not info.messages:
            return
        key = (info.spec.path, info.sha256, info.spec.output_index, tuple(sorted(info.assumed.items())))
        if key in self._told:
            return
        self._told.add(key)
        text = "\n\n".join(info.messages)
        self.notice.emit(f"About {info.name}", text)
        from PySide6.QtWidgets import QApplication, QMessageBox

        window = QApplication.activeWindow() or next(
            (w for w in QApplication.topLevelWidgets() if w.isVisible() and w.isWindow() and w.inherits("QMainWindow")),
            None)
        if window is None or not self.show_notices:
            return
        box = QMessageBox(QMessageBox.Icon.Information, f"About {info.name}", text, QMessageBox.StandardButton.Ok,
                          window)
        box.setObjectName("model_notice")
        box.setDetailedText(info.describe())
        box.setModal(False)
        box.show()
        self.notice_box = box

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
            from .cluster import extract  # where the "Run on" setting says (in process by default)

            return (yield from extract(backend, loaded.cache_id, images, list(layers)))

        return self.run(title or f"Extract {', '.join(layers) or 'predictions'}", fn, key=key, on_done=on_done)

    def _refresh_predictions(self) -> None:
        images = self.selection.images
        if self._backend is None or images is None or self.model is None:
            return
        if not self.model.class_scores:  # a map or a single number: nothing to predict (said when loaded)
            self.status.emit(f"{self.model.name}: its output is not class scores: no predictions or accuracy; "
                             "layers, heatmaps and dissection still work")
            return
        spec = self.model.spec
        several = self.model.choice is not None and len(self.model.choice.outputs) > 1
        which = f" (from output {spec.output_index})" if several else ""

        def fn(backend: Any, loaded: Any) -> Generator[Progress, None, tuple[Any, Any]]:
            from engine.predict import predictions_from

            from .cluster import extract  # where the "Run on" setting says (in process by default)

            acts = yield from extract(backend, loaded.cache_id, images, [])
            return acts.from_cache, predictions_from(acts, spec)  # softmax over (N, K) here, not on the GUI

        def done(result: tuple[bool, Any]) -> None:
            self.predictions_from_cache, self.predictions = result
            self.predictions_changed.emit(self.predictions)
            acc = self.predictions.accuracy
            unmatched = self.predictions.unmatched_labels()
            tail = ""
            if unmatched:
                names = ", ".join(unmatched[:5]) + (f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
                tail = f"; folder labels that match no class name: {names}"
            self.status.emit(f"Predictions ready{which}" + ("" if acc is None else f": accuracy {acc:.1%}") + tail)

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
