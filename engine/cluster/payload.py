"""The model file, on its way to the Ray workers, and opened there by ConvLens's own loaders.

:class:`ModelPayload` carries the model's :class:`~engine.types.ModelSpec` (as the driver
resolved it: preprocessing, output index, classes), the identity the driver's cache keys use
(``cache_id``) and the file itself: its bytes put once in Ray's object store
(``transfer="object_store"``, the default: workers need no shared file system) or its path
(``transfer="path"``: a file system every node mounts at the same place; needed for an ONNX
model with external data files or a ``file.py:Class`` architecture, which live beside it).

On the worker, :meth:`ModelPayload.open` writes the bytes into a private temporary folder
under the file's own name and opens them with :func:`engine.models.loading.load_model` and
:func:`engine.backends.open_backend`: the same checks as on the driver (no unpickling, no
TorchScript operator that reaches files or processes, no ``torch.export`` guard code, ONNX
domains), with the same opt-ins the user gave (``allow_pickle``). A file refused there is an
error naming the user's path. A worker whose file does not hash to the driver's model (the file
was replaced after the driver opened it) refuses to run: results must be those of the model the
cache key names.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from engine.types import ConvLensError, ModelSpec

Transfer = Literal["object_store", "path"]


@dataclass(frozen=True)
class ModelPayload:
    """What a worker needs to open the model (see the module docstring)."""

    spec: ModelSpec
    cache_id: str
    transfer: Transfer
    data: Any = None  # object-store reference to the file's bytes (object_store)

    @classmethod
    def of(cls, spec: ModelSpec, cache_id: str, executor: Any, transfer: Transfer = "object_store") -> ModelPayload:
        """The payload of the model file ``spec.path``, whose cache identity is ``cache_id``
        (``LoadedModel.cache_id`` on the driver); ``executor`` puts the bytes in the object store."""
        if transfer not in ("object_store", "path"):
            raise ConvLensError(f"model transfer must be 'object_store' or 'path', got {transfer!r}")
        if transfer == "path":
            return cls(spec, cache_id, "path")
        try:
            data = Path(spec.path).read_bytes()
        except OSError as e:
            raise ConvLensError(f"{spec.path}: cannot read the model to send it to the Ray workers "
                                f"({e.strerror or e})") from None
        return cls(spec, cache_id, "object_store", executor.put(data))

    def open(self, device: str) -> tuple[Any, _Opened]:
        """On a worker: ``(backend, opened)`` for the model on ``device``; keep ``opened`` alive
        while the backend is used (it holds the temporary copy) and close it after."""
        from engine.backends import open_backend
        from engine.models.loading import load_model

        opened = _Opened()
        try:
            spec = self.spec.with_(device=device)
            if self.transfer == "object_store":
                import ray

                data = ray.get(self.data)
                local = opened.place(Path(self.spec.path).name, data)
                spec = spec.with_(path=str(local))
            try:
                loaded = load_model(spec)
            except ConvLensError as e:
                raise ConvLensError(f"on a Ray worker: {opened.user_path(str(e), self.spec.path)}") from None
            if loaded.cache_id != self.cache_id:
                raise ConvLensError(f"{self.spec.path}: the model file on the Ray worker is not the one the driver "
                                    "opened (it changed since); open it again")
            import dataclasses

            loaded = dataclasses.replace(loaded, spec=loaded.spec.with_(path=self.spec.path))  # messages name the user's file
            backend = open_backend(loaded)
        except BaseException:
            opened.close()
            raise
        return backend, opened


class _Opened:
    """The worker's temporary copy of the model file (removed by :meth:`close`)."""

    def __init__(self) -> None:
        self.folder: Path | None = None

    def place(self, name: str, data: bytes) -> Path:
        self.folder = Path(tempfile.mkdtemp(prefix="convlens-model-"))
        path = self.folder / (name or "model")
        path.write_bytes(data)
        return path

    def user_path(self, message: str, user: str) -> str:
        """``message`` naming the user's file instead of the temporary copy."""
        if self.folder is None:
            return message
        return message.replace(str(self.folder / Path(user).name), user)

    def close(self) -> None:
        if self.folder is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.folder)
            self.folder = None
