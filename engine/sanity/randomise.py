"""Weight randomisation on a copy of the model (Adebayo et al., "Sanity Checks for Saliency Maps",
NeurIPS 2018).

The layers randomised are the modules that own a weight of two or more dimensions (convolutions,
linear layers; not normalisation layers or PReLU slopes), in execution order, keeping only those
the classifier output depends on (a layer whose randomisation leaves the selected output bit for
bit unchanged, such as RNet's box regressor ``dense5_2``, is left out). A weight kept through a
parametrization (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``: the tensors
``parametrizations.weight.original*``; the older ``weight_norm`` / ``spectral_norm`` hooks:
``weight_g`` / ``weight_v``, ``weight_orig``) counts as the module's own, and those tensors are
what is randomised.

A layer named by the user may be a container (torchvision ResNet's ``layer4`` or ``layer4.1``):
it stands for its weight-owning descendants (:func:`expand_layers`), all randomised in the same
step. A name owning no weight, itself or below (``layer4.1.relu``), is refused.

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
from collections.abc import Generator, Mapping, Sequence
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


def _own_tensors(m: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters ``m`` holds itself: its own ``_parameters`` and, for a parametrized
    module, the originals its parametrized tensors are computed from."""
    out = [p for p in m._parameters.values() if p is not None]
    plist = getattr(m, "parametrizations", None)
    if isinstance(plist, torch.nn.ModuleDict):
        for sub in plist.values():
            out += [p for p in sub._parameters.values() if p is not None]
    return out


def _has_weight(m: torch.nn.Module) -> bool:
    """``m`` owns a weight of 2+ dimensions: a plain parameter, or one computed from its own
    tensors (a parametrization, or the older weight_norm / spectral_norm hooks)."""
    w = m._parameters.get("weight")
    if w is not None:
        return w.dim() >= 2
    if not _own_tensors(m):
        return False
    w = getattr(m, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2


def expand_layers(backend: Any, names: Sequence[str]) -> dict[str, list[str]]:
    """For each name the user gave: the weight layers it stands for (itself when it owns a
    weight, else its weight-owning descendants, in execution order). A name that is no module
    of the model or owns no weight, itself or below, raises :class:`ConvLensError` listing the
    weight layers."""
    wl = weight_layers(backend)
    modules = dict(backend.module.named_modules())
    out: dict[str, list[str]] = {}
    for name in names:
        if name not in modules or not name:
            members: list[str] = []
        elif name in wl:
            members = [name]
        else:
            members = [n for n in wl if n.startswith(name + ".")]
        if not members:
            what = "is no module of the model" if name not in modules or not name else "owns no weight (itself or below)"
            raise ConvLensError(f"{backend.spec.path}: layer {name!r} to randomise {what}; the layers with "
                                f"weights are: {', '.join(wl)}")
        out[name] = members
    return out


def _seed(seed: int, layer: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}:{layer}".encode(), usedforsecurity=False).digest()[:8], "little") >> 1


def randomise_layer(module: torch.nn.Module, layer: str, seed: int = 0, init: str = "normal") -> None:
    """Replace the own parameters of submodule ``layer`` of ``module`` (a copy) with random ones
    (for a parametrized weight: the tensors it is computed from)."""
    if init not in INITS:
        raise ConvLensError(f"randomisation init {init!r}: choose one of {', '.join(INITS)}")
    sub = module.get_submodule(layer)
    gen = torch.Generator().manual_seed(_seed(seed, layer))
    params = _own_tensors(sub)
    with torch.no_grad():
        weight = getattr(sub, "weight", None)
        base_std = float(weight.detach().float().std()) if isinstance(weight, torch.Tensor) and weight.numel() > 1 else 1.0
        if not np.isfinite(base_std) or base_std == 0.0:
            base_std = 1.0
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


def randomise_group(module: torch.nn.Module, names: Sequence[str], seed: int = 0, init: str = "normal") -> None:
    for n in names:
        randomise_layer(module, n, seed, init)


def selected_output(module: torch.nn.Module, x: torch.Tensor, output_index: int) -> torch.Tensor:
    with torch.no_grad():
        out = flatten_outputs(module(x))[output_index]
    return out.reshape(out.shape[0], -1)


def effective_layers(backend: TorchBackend, layers: Sequence[str], probe: np.ndarray, seed: int = 0,
                     init: str = "normal", members: Mapping[str, Sequence[str]] | None = None) -> tuple[list[str], list[str]]:
    """(layers whose randomisation changes the selected output on ``probe``, those that do not).
    ``members``: the weight layers a name stands for (:func:`expand_layers`; default: itself)."""
    x = backend.to_tensor(probe)
    ref = selected_output(backend.module, x, backend.spec.output_index)
    keep: list[str] = []
    dropped: list[str] = []
    for name in layers:
        copy = copy_module(backend.module, backend.torch_device)
        randomise_group(copy, (members or {}).get(name, [name]), seed, init)
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
                        init: str = "normal", members: Mapping[str, Sequence[str]] | None = None,
                        ) -> Generator[tuple[list[str], TorchBackend], None, None]:
    """For each step: (layers randomised, a backend on a randomised copy). The cascade reuses one
    copy, randomising one more layer per step; the independent mode copies afresh per step. Each
    backend is closed when the next is made (and at the end, or when the iterator is closed).
    ``members``: the weight layers a name stands for (:func:`expand_layers`; default: itself)."""
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
                randomise_group(copy, (members or {}).get(n, [n]), seed, init)
            if current is not None:
                current.close()
            current = TorchBackend(copy, backend.spec, backend.device)
            current._layers = backend._layers  # same architecture, same layers: no dry run
            yield names, current
    finally:
        if current is not None:
            current.close()
