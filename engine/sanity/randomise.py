"""Weight randomisation on a copy of the model (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018).

The layers randomised are the modules that own a weight of two or more dimensions (convolutions,
linear layers; not normalisation layers or PReLU slopes), in execution order, keeping only those
the classifier output depends on (a layer whose randomisation leaves the selected output bit for
bit unchanged, such as RNet's box regressor ``dense5_2``, is left out).

* **cascade**: step k randomises the top k layers (from the output down);
* **independent**: step k randomises layer k alone (from the top down, like the cascade).

Each layer's random weights depend on the seed and the layer's name only, so a layer gets the
same weights in both modes. ``init="normal"`` draws every parameter of the layer (weight and
bias) from N(0, sigma) with sigma the standard deviation of the trained tensor (its scale kept,
its structure destroyed; a constant tensor such as an all-zero bias gets sigma of the weight);
``init="permute"`` shuffles each tensor's trained values.

The model is never changed in place: randomisation works on :func:`copy_module` copies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator, Sequence
from typing import Any

import numpy as np
import torch

from ..backends.torch_backend import TorchBackend, copy_module, flatten_outputs
from ..types import ConvLensError

INITS = ("normal", "permute")
MODES = ("cascade", "independent")


def weight_layers(backend: Any) -> list[str]:
    """Modules owning a weight of 2+ dimensions, in execution order (``backend.layers()``)."""
    if not isinstance(backend, TorchBackend) or backend.module is None or backend.is_script:
        raise ConvLensError(f"{backend.spec.path}: the sanity check randomises weights, which needs an eager PyTorch "
                            "model (a state dict with --arch, or a torch.export .pt2 archive); this one runs on "
                            f"{'TorchScript' if getattr(backend, 'is_script', False) else backend.name}")
    modules = dict(backend.module.named_modules())
    order = [info.name for info in backend.layers()]
    return [n for n in order if n in modules and _has_weight(modules[n])]


def _has_weight(m: torch.nn.Module) -> bool:
    w = m._parameters.get("weight")
    return w is not None and w.dim() >= 2


def _seed(seed: int, layer: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{layer}".encode(), usedforsecurity=False).digest()[:8], "little") >> 1


def randomise_layer(module: torch.nn.Module, layer: str, seed: int = 0, init: str = "normal") -> None:
    """Replace the own parameters of submodule ``layer`` of ``module`` (a copy) with random ones."""
    if init not in INITS:
        raise ConvLensError(f"randomisation init {init!r}: choose one of {', '.join(INITS)}")
    sub = module.get_submodule(layer)
    gen = torch.Generator().manual_seed(_seed(seed, layer))
    params = [p for p in sub._parameters.values() if p is not None]
    weight = sub._parameters.get("weight")
    base_std = float(weight.detach().float().std()) if weight is not None and weight.numel() > 1 else 1.0
    with torch.no_grad():
        for p in params:
            flat = p.detach().float().cpu().reshape(-1)
            if init == "permute":
                new = flat[torch.randperm(flat.numel(), generator=gen)]
            else:
                std = float(flat.std()) if flat.numel() > 1 else 0.0
                if not np.isfinite(std) or std == 0.0:
                    std = base_std
                new = torch.randn(flat.shape, generator=gen) * std
            p.copy_(new.reshape(p.shape).to(p))


def selected_output(module: torch.nn.Module, x: torch.Tensor, output_index: int) -> torch.Tensor:
    with torch.no_grad():
        out = flatten_outputs(module(x))[output_index]
    return out.reshape(out.shape[0], -1)


def effective_layers(backend: TorchBackend, layers: Sequence[str], probe: np.ndarray, seed: int = 0,
                     init: str = "normal") -> tuple[list[str], list[str]]:
    """(layers whose randomisation changes the selected output on ``probe``, those that do not)."""
    x = backend.to_tensor(probe)
    ref = selected_output(backend.module, x, backend.spec.output_index)
    keep: list[str] = []
    dropped: list[str] = []
    for name in layers:
        copy = copy_module(backend.module, backend.torch_device)
        randomise_layer(copy, name, seed, init)
        out = selected_output(copy, x, backend.spec.output_index)
        (keep if not torch.equal(out, ref) else dropped).append(name)
        del copy
    return keep, dropped


def steps(layers: Sequence[str], mode: str) -> list[list[str]]:
    """The layers randomised at each step, top (output) first: cascade accumulates, independent
    takes one at a time."""
    if mode not in MODES:
        raise ConvLensError(f"randomisation mode {mode!r}: choose one of {', '.join(MODES)}")
    top_down = list(reversed(layers))
    if mode == "cascade":
        return [top_down[:k + 1] for k in range(len(top_down))]
    return [[n] for n in top_down]


def randomised_backends(backend: TorchBackend, layers: Sequence[str], mode: str, seed: int = 0,
                        init: str = "normal") -> Generator[tuple[list[str], TorchBackend], None, None]:
    """For each step: (layers randomised, a backend on a randomised copy). The cascade reuses one
    copy, randomising one more layer per step; the independent mode copies afresh per step. Each
    backend is closed when the next is made (and at the end, or when the iterator is closed)."""
    plan = steps(layers, mode)
    copy: torch.nn.Module | None = None
    current: TorchBackend | None = None
    try:
        for k, names in enumerate(plan):
            if mode == "independent" or copy is None:
                copy = copy_module(backend.module, backend.torch_device)
                todo = names
            else:
                todo = [names[-1]] if k else names
            for n in todo:
                randomise_layer(copy, n, seed, init)
            if current is not None:
                current.close()
            current = TorchBackend(copy, backend.spec, backend.device)
            current._layers = backend._layers  # same architecture, same layers: no dry run
            yield names, current
    finally:
        if current is not None:
            current.close()
