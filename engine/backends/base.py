"""The backend protocol: run a batch, capture named layers, list layers."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np

from ..types import ConvLensError, LayerInfo, ModelSpec


class BackendError(ConvLensError):
    """A model that cannot run as asked (unknown layer, wrong input shape, ...)."""


def forward_error(path: str, shape: tuple[int, ...], e: BaseException) -> BackendError:
    """The one message for a model that fails on a batch: the file, the batch shape, the cause."""
    return BackendError(f"{path}: the model failed on a batch of shape {tuple(shape)}: {' '.join(str(e).split())[:300]}")


@dataclass
class ForwardResult:
    """Every model output (a tuple output is flattened) and the captured activations."""

    outputs: list[np.ndarray]
    activations: dict[str, np.ndarray]


@dataclass
class LayerSummaries:
    """One layer over one batch: float16 maps (or None) and per-unit max and mean, float32 (B, C)."""

    maps: np.ndarray | None
    max: np.ndarray
    mean: np.ndarray


class Backend(ABC):
    """Runs one loaded model. Subclasses: :class:`TorchBackend`, :class:`OnnxBackend`.

    ``forward`` takes a float32 (N, C, H, W) batch already preprocessed and returns numpy
    arrays. Gradients, splits at a layer and training copies are torch-only capabilities:
    ``supports_gradients`` says whether :meth:`TorchBackend.layer_gradients` is available,
    ``supports_split`` whether :meth:`split` is; the ONNX backend raises :class:`BackendError`
    for them, saying what to load instead.
    """

    name: str
    device: str
    spec: ModelSpec
    supports_gradients: bool = False
    supports_split: bool = False

    @abstractmethod
    def forward(self, batch: np.ndarray, capture: Sequence[str] = ()) -> ForwardResult: ...

    def forward_summaries(self, batch: np.ndarray, capture: Sequence[str], maps: bool = True) -> tuple[np.ndarray, dict[str, LayerSummaries]]:
        """Classifier output and, per captured layer, float16 maps and per-unit max / mean.

        What extraction needs, computed the cheapest way each backend can (the torch backend
        reduces on the device inside its hooks, without a float32 copy).
        """
        res = self.forward(batch, capture)
        out = {}
        for name in capture:
            a = res.activations[name]
            flat = a.reshape(a.shape[0], a.shape[1], -1) if a.ndim > 2 else a[:, :, None]
            out[name] = LayerSummaries(a.astype(np.float16) if maps else None, flat.max(axis=2), flat.mean(axis=2))
        return self.classifier_output(res), out

    @abstractmethod
    def layer_names(self) -> list[str]:
        """Capturable layer names in execution order (cheap: no forward pass)."""

    def layers(self) -> list[LayerInfo]:
        """Every capturable layer with its kind and output shape, from one dry run."""
        if self._layers is None:
            self._layers = self._discover_layers()
        return self._layers

    _layers: list[LayerInfo] | None = None

    @abstractmethod
    def _discover_layers(self) -> list[LayerInfo]: ...

    def _torch_only(self, what: str) -> BackendError:
        return BackendError(
            f"{self.spec.path}: {what} needs a PyTorch model, and this one runs on {self.name}; load the PyTorch "
            "checkpoint instead (a state dict with --arch, or a torch.export .pt2 archive) with --backend torch")

    def split(self, layer: str) -> Any:
        """The model cut at ``layer`` into a feature function and a head (torch only; see
        :meth:`TorchBackend.split`)."""
        raise self._torch_only(f"splitting the model at layer '{layer}'")

    def split_candidates(self, spatial_only: bool = False) -> list[str]:
        """The layers where :meth:`split` works (torch only)."""
        raise self._torch_only("splitting the model at a layer")

    def trainable_copy(self) -> Any:
        """A deep copy of the model in train mode, for fine-tuning (torch only)."""
        raise self._torch_only("training a copy of the model")

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory or sessions."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------- shared helpers

    def dummy_batch(self, n: int = 1) -> np.ndarray:
        pre = self.spec.preprocess
        return np.zeros((n, pre.n_channels, *pre.input_size), dtype=np.float32)

    def check_capture(self, capture: Sequence[str]) -> None:
        known = set(self.layer_names())
        unknown = [c for c in capture if c not in known]
        if unknown:
            sample = ", ".join(self.layer_names()[:12])
            raise BackendError(
                f"{self.spec.path}: no layer named {', '.join(map(repr, unknown))} "
                f"(layers include: {sample}; `convlens info` lists all)"
            )

    def check_batch(self, batch: np.ndarray) -> None:
        pre = self.spec.preprocess
        if batch.ndim != 4 or batch.shape[1] != pre.n_channels:
            raise BackendError(
                f"{self.spec.path}: expected a batch of shape (N, {pre.n_channels}, H, W), got {batch.shape}"
            )

    def classifier_output(self, result: ForwardResult) -> np.ndarray:
        """The (N, classes) output named by ``spec.output_index``."""
        idx = self.spec.output_index
        if not -len(result.outputs) <= idx < len(result.outputs):
            raise BackendError(
                f"{self.spec.path}: output_index {idx} but the model returns {len(result.outputs)} outputs"
            )
        out = result.outputs[idx]
        return out.reshape(out.shape[0], -1)
