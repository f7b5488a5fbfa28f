"""Backends run a loaded model: PyTorch (CUDA or CPU) or ONNX Runtime."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..types import ModelSpec
from .base import Backend, BackendError, ForwardResult

if TYPE_CHECKING:
    from ..models.loading import LoadedModel

__all__ = ["Backend", "BackendError", "ForwardResult", "export_onnx", "open_backend"]


def export_onnx(loaded: LoadedModel, out_path: str | Path, opset: int = 17) -> Path:
    """Export a torch model to ONNX with a dynamic batch axis and PyTorch scope names kept.

    Uses the TorchScript-based exporter, whose node names carry module scopes, so the ONNX
    backend names layers like the torch one. The loaded module is left as it is (device, mode):
    the export runs on a CPU copy.
    """
    import os
    import uuid
    import warnings

    import torch

    if not loaded.is_torch:
        raise BackendError(f"{loaded.spec.path}: already an ONNX model")
    pre = loaded.spec.preprocess
    x = torch.zeros(1, pre.n_channels, *pre.input_size)
    out_path = Path(out_path)
    # never move or change the loaded module (others may share it): export a CPU copy
    module = _unfused_copy(loaded.module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            n_out = len(_flat(module(x)))
        names = [f"output_{i}" for i in range(n_out)]
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            torch.onnx.export(
                module, (x,), str(tmp), dynamo=False, opset_version=opset,
                input_names=["input"], output_names=names,
                dynamic_axes={"input": {0: "batch"}, **{n: {0: "batch"} for n in names}},
            )
            _tag_modules(tmp, [n for n, _ in loaded.module.named_modules() if n])
            os.replace(tmp, out_path)
        except Exception as e:
            raise BackendError(f"{loaded.spec.path}: ONNX export failed ({' '.join(str(e).split())[:300]})") from e
        finally:
            tmp.unlink(missing_ok=True)
    return out_path


def _unfused_copy(module: Any) -> Any:
    """A CPU copy whose eval BatchNorms are explicit per-channel affine ops (TorchScript: the
    module itself when on the CPU, else a CPU copy).

    The exporter folds BatchNorm into the preceding convolution, which would make the ONNX
    'conv1' carry the values of the torch 'bn1'. Exporting BatchNorm as y = x * scale + shift
    keeps each module's output a separate tensor under its own scope.
    """
    import torch

    class _AffineBN(torch.nn.Module):
        def __init__(self, bn: Any) -> None:
            super().__init__()
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                1 / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
            self.register_buffer("scale", scale)
            self.register_buffer("shift", shift)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            scale, shift = self.get_buffer("scale"), self.get_buffer("shift")
            return x * scale.reshape(shape) + shift.reshape(shape)

    from .torch_backend import copy_module, on_device

    if isinstance(module, torch.jit.ScriptModule):
        return on_device(module, torch.device("cpu"))

    module = copy_module(module, "cpu").eval()
    for _name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.track_running_stats:
                setattr(child, cname, _AffineBN(sub))
    return module


def _tag_modules(path: Path, names: list[str]) -> None:
    """Record the torch module names in the ONNX metadata, for exact layer naming."""
    import json

    import onnx

    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key = "convlens.modules"
    entry.value = json.dumps(names)
    onnx.save(model, str(path))


def _flat(out: object) -> list[Any]:
    from .torch_backend import flatten_outputs

    return flatten_outputs(out)


def open_backend(loaded: LoadedModel, backend: str | None = None, device: str | None = None,
                 onnx_dir: str | Path | None = None) -> Backend:
    """A backend for ``loaded``: ``auto`` runs torch formats on PyTorch and ONNX on ONNX Runtime.

    ``backend="onnx"`` with a torch model exports it to ONNX first (into ``onnx_dir`` or the
    cache, keyed by the model hash and input size).
    """
    spec: ModelSpec = loaded.spec
    backend = backend or spec.backend
    device = device or spec.device
    if backend not in ("auto", "torch", "onnx"):
        raise BackendError(f"backend '{backend}': expected auto, torch or onnx")
    if loaded.format == "onnx":
        if backend == "torch":
            raise BackendError(f"{spec.path}: an ONNX model runs on ONNX Runtime only (use --backend onnx or auto)")
        from .onnx_backend import OnnxBackend

        return OnnxBackend(str(loaded.onnx_path), spec, device)
    if backend == "onnx":
        from ..cache import Cache, make_key
        from .onnx_backend import OnnxBackend

        folder = Path(onnx_dir) if onnx_dir else Cache().root / "onnx"
        target = folder / f"{make_key(loaded.cache_id, spec.preprocess.input_size, spec.preprocess.n_channels)}.onnx"
        if not target.is_file():
            export_onnx(loaded, target)
        return OnnxBackend(str(target), spec, device)
    from .torch_backend import TorchBackend

    return TorchBackend(loaded.module, spec, device)
