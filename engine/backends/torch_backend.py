"""PyTorch backend: CUDA when available, else CPU; forward hooks for capture.

Eager modules (state dicts, unflattened ``torch.export`` programs, opted-in pickles) capture
through forward hooks. TorchScript modules do not accept hooks, so capture inlines the scripted
forward graph, finds for each requested submodule the last node that ran inside it (from the
graph's module hierarchy), and returns those values as extra outputs of a derived function.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..types import LayerInfo, ModelSpec
from .base import Backend, BackendError, ForwardResult, LayerSummaries, forward_error


def resolve_device(device: str) -> torch.device:
    if device in ("auto", ""):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise BackendError(f"device '{device}': {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError(f"device '{device}': CUDA is not available on this machine (use cpu or auto)")
    return dev


def flatten_outputs(out: Any) -> list[torch.Tensor]:
    """A model's outputs as a flat list of tensors (tuples, lists and dicts are unrolled)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten_outputs(o)]
    return []


def _first_tensor(out: Any) -> torch.Tensor | None:
    flat = flatten_outputs(out)
    return flat[0] if flat else None


def _module_path(hierarchy: str) -> str:
    """'SELF(ResNet).layer1(Sequential).0(BasicBlock).conv1(Conv2d).SELF(Conv2d)' -> 'layer1.0.conv1'."""
    parts = []
    for seg in hierarchy.split(")."):
        name = seg.split("(", 1)[0]
        if name in ("SELF", "UNKNOWN_INSTANCE", ""):
            continue
        parts.append(name)
    return ".".join(parts)


class _ScriptCapture:
    """Extra outputs for a TorchScript module, derived from its inlined forward graph."""

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        self.module = module
        self._fns: dict[tuple[str, ...], Any] = {}
        graph = module.forward.graph.copy()
        torch._C._jit_pass_inline(graph)
        self._graph = graph
        # last tensor-producing node inside each module path (and its ancestors)
        last: dict[str, int] = {}
        nodes = list(graph.nodes())
        for i, node in enumerate(nodes):
            try:
                path = _module_path(node.getModuleHierarchy())
            except RuntimeError:
                continue
            if not path or not any(o.type().kind() == "TensorType" for o in node.outputs()):
                continue
            parts = path.split(".")
            for j in range(1, len(parts) + 1):
                last[".".join(parts[:j])] = i
        self.order = sorted(last, key=lambda p: (last[p], p.count(".")))
        self._last = last

    def names(self) -> list[str]:
        return self.order

    def function(self, names: tuple[str, ...]) -> Any:
        if names not in self._fns:
            graph = self._graph.copy()
            nodes = list(graph.nodes())
            ret = graph.return_node()
            none = graph.create("prim::Constant")
            none.insertBefore(ret)
            none.output().setType(torch._C.NoneType.get())
            values = []
            for n in names:
                node = nodes[self._last[n]]
                v = next(o for o in node.outputs() if o.type().kind() == "TensorType")
                # copy at the point of capture: later in-place ops (relu_) must not alter it
                clone = graph.create("aten::clone", [v, none.output()])
                clone.insertAfter(node)
                clone.output().setType(v.type())
                values.append(clone.output())
            none.moveBefore(nodes[0])
            orig = ret.input()
            tup = graph.create("prim::TupleConstruct", [orig, *values])
            tup.insertBefore(ret)
            tup.output().setType(torch._C.TupleType([orig.type()] + [v.type() for v in values]))
            ret.replaceInput(0, tup.output())
            self._fns[names] = torch._C._create_function_from_graph("convlens_capture", graph)
        return self._fns[names]

    def __call__(self, x: torch.Tensor, names: tuple[str, ...]) -> tuple[Any, list[torch.Tensor]]:
        out = self.function(names)(self.module._c, x)
        return out[0], list(out[1:])


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, module: Any, spec: ModelSpec, device: str = "auto") -> None:
        self.spec = spec
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        self.module = module.to(self.torch_device).eval()
        self.is_script = isinstance(module, torch.jit.ScriptModule)
        self.supports_gradients = not self.is_script
        self._script = _ScriptCapture(module) if self.is_script else None
        self._modules: dict[str, torch.nn.Module] = {} if self.is_script else {
            n: m for n, m in module.named_modules() if n
        }

    # ------------------------------------------------------------------ layers

    def layer_names(self) -> list[str]:
        if self._script is not None:
            return self._script.names()
        return list(self._modules)

    def _kind(self, name: str) -> str:
        if self._script is not None:
            sub: Any = self.module
            for part in name.split("."):
                sub = getattr(sub, part)
            return getattr(sub, "original_name", type(sub).__name__)
        return type(self._modules[name]).__name__

    def _discover_layers(self) -> list[LayerInfo]:
        names = self.layer_names()
        res = self.forward(self.dummy_batch(1), capture=names, _check=False)
        order = names
        if self._script is None:  # hooks fire in execution order; keep that order
            order = [n for n in res.activations] + [n for n in names if n not in res.activations]
        return [
            LayerInfo(n, self._kind(n), tuple(res.activations[n].shape[1:]) if n in res.activations else ())
            for n in order
        ]

    # ------------------------------------------------------------------ forward

    def to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        self.check_batch(batch)
        return torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.torch_device)

    @contextlib.contextmanager
    def hooks(self, capture: Sequence[str], store: dict[str, Any],
              transform: Callable[[torch.Tensor], Any] | None = None) -> Iterator[None]:
        """Forward hooks that put each captured module's output in ``store``; removed on exit."""
        handles = []

        def make(name: str) -> Callable[..., None]:
            def hook(_m: torch.nn.Module, _i: Any, out: Any) -> None:
                t = _first_tensor(out)
                if t is not None:
                    # a copy: a later in-place op (ReLU(inplace=True)) would otherwise alter it
                    store[name] = transform(t) if transform else t.clone()

            return hook

        try:
            for n in capture:
                handles.append(self._modules[n].register_forward_hook(make(n)))
            yield
        finally:
            for h in handles:
                h.remove()

    def forward_tensors(self, x: torch.Tensor, capture: Sequence[str] = ()) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Like :meth:`forward` but on device tensors (no copy to host)."""
        with torch.inference_mode():
            if self._script is not None:
                if capture:
                    out, acts = self._script(x, tuple(capture))
                    return flatten_outputs(out), dict(zip(capture, acts, strict=True))
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    return flatten_outputs(self.module(x)), {}
            store: dict[str, torch.Tensor] = {}
            with self.hooks(capture, store):
                out = self.module(x)
            return flatten_outputs(out), store

    def forward(self, batch: np.ndarray, capture: Sequence[str] = (), _check: bool = True) -> ForwardResult:
        if _check:
            self.check_capture(capture)
        x = self.to_tensor(batch)
        try:
            outs, acts = self.forward_tensors(x, capture)
        except RuntimeError as e:
            raise forward_error(self.spec.path, batch.shape, e) from None
        return ForwardResult(
            [o.detach().float().cpu().numpy() for o in outs],
            {k: v.detach().float().cpu().numpy() for k, v in acts.items()},
        )

    def forward_summaries(self, batch: np.ndarray, capture: Sequence[str], maps: bool = True) -> tuple[np.ndarray, dict[str, LayerSummaries]]:
        if self._script is not None:
            return super().forward_summaries(batch, capture, maps)
        self.check_capture(capture)
        x = self.to_tensor(batch)

        def reduce(t: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
            # at capture time: a later in-place op cannot alter what is kept
            flat = t.detach().float().reshape(t.shape[0], t.shape[1], -1) if t.dim() > 2 else t.detach().float()[:, :, None]
            return (t.detach().half() if maps else None), flat.amax(dim=2), flat.mean(dim=2)

        store: dict[str, Any] = {}
        try:
            with torch.inference_mode(), self.hooks(capture, store, reduce):
                outs = flatten_outputs(self.module(x))
        except RuntimeError as e:
            raise forward_error(self.spec.path, batch.shape, e) from None
        out = outs[self.spec.output_index] if -len(outs) <= self.spec.output_index < len(outs) else None
        if out is None:
            raise BackendError(f"{self.spec.path}: output_index {self.spec.output_index} but the model returns "
                               f"{len(outs)} outputs")
        summaries = {
            n: LayerSummaries(None if m is None else m.cpu().numpy(), mx.cpu().numpy(), mean.cpu().numpy())
            for n, (m, mx, mean) in store.items()
        }
        return out.float().reshape(out.shape[0], -1).cpu().numpy(), summaries

    # ------------------------------------------------------------------ gradients (torch only)

    def layer_gradients(self, batch: np.ndarray, layer: str, target: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Activation of ``layer`` and the gradient of the target class score with respect to it.

        ``target`` is one class index for the whole batch or one per image. Torch eager modules
        only (``supports_gradients``); ONNX Runtime and TorchScript give no layer gradients here.
        """
        if not self.supports_gradients:
            raise BackendError(f"{self.spec.path}: layer gradients need an eager PyTorch model (not {self.name} "
                               "TorchScript or ONNX)")
        self.check_capture([layer])
        x = self.to_tensor(batch)
        store: dict[str, torch.Tensor] = {}

        def keep(_m: torch.nn.Module, _i: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                raise BackendError(f"{self.spec.path}: layer '{layer}' returns {type(out).__name__}, not a tensor")
            # keep a copy and let the network go on with a copy of that copy: a later in-place
            # op (ReLU(inplace=True)) alters neither the value kept nor its gradient
            kept = out.clone()
            kept.retain_grad()
            store[layer] = kept
            return kept.clone()

        handle = self._modules[layer].register_forward_hook(keep)
        try:
            with torch.enable_grad():
                out = flatten_outputs(self.module(x))[self.spec.output_index]
                out = out.reshape(out.shape[0], -1)
                idx = torch.as_tensor(np.broadcast_to(np.asarray(target), (out.shape[0],)).copy(), device=out.device)
                out.gather(1, idx[:, None]).sum().backward()
        finally:
            handle.remove()
        act = store[layer]
        if act.grad is None:
            raise BackendError(f"{self.spec.path}: layer '{layer}' does not influence output {self.spec.output_index}")
        return act.detach().cpu().numpy(), act.grad.detach().cpu().numpy()

    def close(self) -> None:
        self.module.to("cpu")
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
