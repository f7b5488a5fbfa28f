"""Plain data shared by the engine, the CLI and the GUI.

Everything here is a frozen dataclass or a numpy array: results can be cached on disk, sent
across threads and compared in tests. Nothing here imports torch, onnxruntime or Qt.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

ResizePolicy = Literal["stretch", "shorter_side_crop"]
ChannelOrder = Literal["rgb", "bgr"]
ScoreKind = Literal["auto", "logits", "probs"]


class ConvLensError(Exception):
    """An error a user can act on. The message names the file and the cause; no traceback needed."""


@dataclass(frozen=True)
class Preprocess:
    """How an image file becomes a model input.

    ``mean`` and ``std`` are in [0, 1] pixel units, per channel in the model's channel order:
    ``x = (pixel / 255 - mean) / std``. With ``grayscale`` the model takes one channel (the
    luminance, ITU-R 601-2) and only the first mean/std entry is used.
    """

    input_size: tuple[int, int] = (224, 224)  # (height, width)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    channels: ChannelOrder = "rgb"
    grayscale: bool = False
    resize: ResizePolicy = "stretch"
    crop_fraction: float = 0.875  # only for shorter_side_crop: the crop is this fraction of the resize

    @property
    def n_channels(self) -> int:
        return 1 if self.grayscale else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load a model and feed it images.

    The same structure is written to ``--model-config`` TOML files and to GUI project files.
    ``path`` is the checkpoint; ``arch`` is a torchvision model name or ``file.py:Class`` /
    ``package.module:Class`` (needed for state dicts and safetensors only).
    """

    path: str
    arch: str | None = None
    preprocess: Preprocess = field(default_factory=Preprocess)
    classes: tuple[str, ...] | None = None
    layers: tuple[str, ...] = ()  # layers of interest (empty: the engine proposes conv layers)
    backend: Literal["auto", "torch", "onnx"] = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    output_index: int = 0  # which output is the classifier when the model returns several
    scores: ScoreKind = "auto"  # whether that output is logits or probabilities
    strict: bool = True  # state dicts: refuse missing/unexpected keys
    allow_pickle: bool = False  # explicit opt-in to unpickle full modules (runs code!)
    num_classes: int | None = None  # for torchvision architectures built from a state dict

    def with_(self, **changes: Any) -> ModelSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "preprocess":
                d.update(v.to_dict())
            elif isinstance(v, tuple):
                d[f.name] = list(v)
            elif v is not None:
                d[f.name] = v
        return d


@dataclass(frozen=True)
class LayerInfo:
    """One capturable layer: a torch module path or an ONNX tensor, with its output shape."""

    name: str
    kind: str  # Conv2d, ReLU, Sequential, ... for torch; Conv, Relu, ... for ONNX
    shape: tuple[int, ...]  # output shape without the batch dimension; () when unknown

    @property
    def is_spatial(self) -> bool:
        return len(self.shape) == 3

    @property
    def units(self) -> int:
        return self.shape[0] if self.shape else 0


@dataclass(frozen=True)
class ImageRecord:
    """One image of an image set. ``label`` is a class name or None when unlabelled."""

    path: str
    label: str | None = None


@dataclass(frozen=True)
class Progress:
    """What a running job reports: ``fraction`` in [0, 1] (None when unknown) and a message."""

    fraction: float | None
    message: str = ""
