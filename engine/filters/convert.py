"""Conversion of a loaded torch model into an interpretable CNN (Zhang, Wu, Zhu, CVPR 2018).

At a chosen top conv layer ``L`` (best: its ReLU output) the module at ``L`` is replaced by an
:class:`InterpretableBlock`::

    L.original -> L.mask_top -> L.conv (new 3x3, same channels, padding 1) -> L.relu -> L.mask

``mask_top`` and ``mask`` are :class:`~engine.filters.layer.InterpretableMask` layers (the
paper makes the top conv layer's filters interpretable and adds one new interpretable 3x3 conv
layer on top). The output keeps ``L``'s shape, so the rest of the model is unchanged. The new
conv starts as the identity (Dirac kernel, zero bias) plus a little noise, so with the masks
disabled the converted model computes what the original did (exactly, for a non-negative
``L``). The conversion always works on a copy: :func:`convert_copy` takes
``backend.trainable_copy()``; the loaded module never changes.

:class:`ConversionSpec` is plain data; :func:`rebuild` makes the same model again from it (the
class file written beside a trained checkpoint calls it).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from engine.types import ConvLensError

from .layer import InterpretableMask
from .templates import FilterParams


@dataclass(frozen=True)
class ConversionSpec:
    """Where and how to convert. ``interpretable=False`` keeps the same module tree with both
    masks disabled (the ordinary baseline: same architecture, new conv included).
    ``mask_top``: also mask the original layer's filters. ``init_noise``: std of the noise added
    to the identity init of the new conv. ``seed``: for that noise."""

    layer: str
    interpretable: bool = True
    new_conv: bool = True
    mask_top: bool = True
    filter_params: FilterParams = field(default_factory=FilterParams)
    init_noise: float = 0.01
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["filter_params"] = self.filter_params.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConversionSpec:
        d = dict(d)
        d["filter_params"] = FilterParams(**d.get("filter_params", {}))
        return cls(**d)

    def result_key(self) -> dict[str, Any]:
        return self.to_dict()

    @property
    def measured_layer(self) -> str:
        """The layer whose filters are the interpretable ones (the block's last output)."""
        return f"{self.layer}.mask"


class InterpretableBlock(nn.Module):
    """The original layer followed by masks and the new 3x3 conv (see the module docstring)."""

    def __init__(self, original: nn.Module, channels: int, spec: ConversionSpec) -> None:
        super().__init__()
        p = spec.filter_params
        self.original = original
        self.mask_top = InterpretableMask(p, enabled=spec.interpretable and spec.mask_top)
        if spec.new_conv:
            self.conv: nn.Module = nn.Conv2d(channels, channels, 3, padding=1)
            with torch.no_grad():
                g = torch.Generator().manual_seed(spec.seed)
                w = torch.zeros_like(self.conv.weight)
                nn.init.dirac_(w)
                w += spec.init_noise * torch.randn(w.shape, generator=g)
                self.conv.weight.copy_(w)
                if self.conv.bias is not None:
                    self.conv.bias.zero_()
            self.relu: nn.Module = nn.ReLU()
        else:
            self.conv, self.relu = nn.Identity(), nn.Identity()
        self.mask = InterpretableMask(p, enabled=spec.interpretable)

    def masks(self) -> list[InterpretableMask]:
        return [self.mask_top, self.mask]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask(self.relu(self.conv(self.mask_top(self.original(x)))))


def _parent(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    *head, last = path.split(".")
    parent = module
    for part in head:
        parent = getattr(parent, part)
    return parent, last


def layer_channels(module: nn.Module, layer: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(C, h, w) of ``layer``'s output for one input of ``input_shape`` (C, H, W)."""
    sub = dict(module.named_modules()).get(layer)
    if sub is None or not layer:
        raise ConvLensError(f"no layer '{layer}' in the model (a module path such as 'layer4' or 'conv3')")
    got: list[torch.Tensor] = []
    h = sub.register_forward_hook(lambda _m, _i, out: got.append(out))
    was = module.training
    try:
        module.eval()
        dev = next((p.device for p in module.parameters()), torch.device("cpu"))
        with torch.no_grad():
            module(torch.zeros((1, *input_shape), device=dev))
    finally:
        h.remove()
        module.train(was)
    if not got or not isinstance(got[-1], torch.Tensor) or got[-1].dim() != 4:
        shape = tuple(got[-1].shape) if got and isinstance(got[-1], torch.Tensor) else ()
        raise ConvLensError(f"layer '{layer}' has no spatial (C, h, w) output (shape {list(shape[1:])}); "
                            "choose a convolutional layer")
    _, c, hh, ww = got[-1].shape
    return int(c), int(hh), int(ww)


def convert(module: nn.Module, spec: ConversionSpec, input_shape: tuple[int, ...]) -> nn.Module:
    """Convert ``module`` **in place** (give it a copy) and return it."""
    spec.filter_params.check()
    if isinstance(module, torch.jit.ScriptModule):
        raise ConvLensError("a TorchScript model cannot be converted (its graph is compiled); load the model "
                            "as a state dict with --arch")
    c, _, _ = layer_channels(module, spec.layer, input_shape)
    parent, name = _parent(module, spec.layer)
    original = getattr(parent, name)
    if isinstance(original, InterpretableBlock):
        raise ConvLensError(f"layer '{spec.layer}' is already converted")
    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    block = InterpretableBlock(original, c, spec).to(dev)
    block.train(module.training)
    setattr(parent, name, block)
    return module


def convert_copy(backend: Any, spec: ConversionSpec) -> nn.Module:
    """A converted, trainable copy of a TorchBackend's model (the loaded module never changes)."""
    model = backend.trainable_copy()
    pre = backend.spec.preprocess
    return convert(model, spec, (pre.n_channels, *pre.input_size))


def masks_of(module: nn.Module) -> list[InterpretableMask]:
    """Every enabled mask of a converted model, in module order."""
    return [m for m in module.modules() if isinstance(m, InterpretableMask) and m.enabled]


def geometry_twin(module: nn.Module) -> nn.Module:
    """A copy with every mask replaced by ``nn.Identity``: the same receptive fields, in a form
    :mod:`engine.models.receptive` can trace (a mask is spatially pointwise)."""
    if not any(isinstance(m, InterpretableMask) for m in module.modules()):
        return module
    twin = copy.deepcopy(module)
    for name, m in list(twin.named_modules()):
        if isinstance(m, InterpretableMask):
            parent, last = _parent(twin, name)
            setattr(parent, last, nn.Identity())
    return twin


def rebuild(settings: dict[str, Any]) -> nn.Module:
    """The converted architecture from ``settings`` (``arch``, ``num_classes``, ``input_shape``,
    ``conversion``), untrained: what a trained checkpoint's class file builds."""
    from engine.models.loading import resolve_arch

    model = resolve_arch(settings["arch"], settings.get("num_classes"))
    model.eval()
    return convert(model, ConversionSpec.from_dict(settings["conversion"]), tuple(settings["input_shape"]))
