"""PyTorch backend: CUDA when available, else CPU; forward hooks for capture.

Eager modules (state dicts, unflattened ``torch.export`` programs, opted-in pickles) capture
through forward hooks. TorchScript modules do not accept hooks, so capture inlines the scripted
forward graph, finds for each requested submodule the last node that ran inside it (from the
graph's module hierarchy), and returns those values as extra outputs of a derived function.

The loaded module may be shared (by a :class:`~engine.models.loading.LoadedModel`, other
backends, the GUI): a backend never moves it between devices in place or changes it. A backend
on another device than the module's works on its own copy; gradients go to the captured
activation only (``torch.autograd.grad``), never to a parameter's ``.grad``; training happens on
:meth:`TorchBackend.trainable_copy`.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..types import LayerInfo, ModelSpec
from .base import Backend, BackendError, ForwardResult, LayerSummaries, forward_error
from .split import GraphSplitter, Split, run_chunked


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


def _normal_device(dev: torch.device) -> torch.device:
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def module_device(module: Any) -> torch.device | None:
    """The device of a module's first parameter or buffer (None: it holds no tensors)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return None


def _fake_memo(module: Any) -> dict[int, Any]:
    """A deepcopy memo that keeps the fake tensors and symbolic sizes in fx graph metadata (an
    unflattened torch.export module holds them; they cannot be copied) as they are."""
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils import _pytree as pytree

    memo: dict[int, Any] = {}
    for sub in module.modules():
        graph = sub.__dict__.get("graph")
        if isinstance(graph, torch.fx.Graph):
            for node in graph.nodes:
                for leaf in pytree.tree_leaves(dict(node.meta)):
                    if (isinstance(leaf, torch.Tensor) and is_fake(leaf)) or isinstance(
                            leaf, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                        memo[id(leaf)] = leaf
    return memo


def copy_module(module: Any, device: torch.device | str) -> Any:
    """A deep copy of ``module`` on ``device``; the original is left as it is.

    Parameters and buffers are copied straight onto the device (no second host copy of the
    weights); parameters keep their ``requires_grad`` and get no ``.grad``.
    """
    device = torch.device(device)
    if isinstance(module, torch.jit.ScriptModule):
        with torch.no_grad():  # else the copied parameters are clones in the autograd graph, not leaves
            out = copy.deepcopy(module).to(device)
        for p, q in zip(module.parameters(), out.parameters(), strict=True):
            q.requires_grad_(p.requires_grad)
        return out
    memo = _fake_memo(module)
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to(device, copy=True), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach().to(device, copy=True)
    return copy.deepcopy(module, memo).to(device)


def on_device(module: Any, device: torch.device) -> Any:
    """``module`` itself when it is already on ``device`` (or holds no tensors), else a copy there."""
    cur = module_device(module)
    if cur is None or _normal_device(cur) == _normal_device(device):
        return module
    return copy_module(module, device)


def static_batch(module: Any) -> int | None:
    """The batch size a ``torch.export`` program was exported for, when its batch dimension is
    static (None: dynamic, or not an exported program)."""
    from torch.export.unflatten import UnflattenedModule

    if not isinstance(module, UnflattenedModule):
        return None
    for node in module.graph.nodes:
        if node.op == "placeholder":
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 1:
                return val.shape[0] if isinstance(val.shape[0], int) else None
    return None


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
        graph = module.forward.graph.copy()  # type: ignore[attr-defined]
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
    """Runs a torch module: eager, TorchScript or an unflattened ``torch.export`` program.

    ``module`` is used as it is when it already lives on ``device``; otherwise the backend runs
    a copy there (the caller's module is never moved). A ``torch.export`` program exported with
    a static batch size (``fixed_batch``) runs any batch, chunk by chunk, the last chunk padded.
    """

    name = "torch"
    supports_split = True

    def __init__(self, module: Any, spec: ModelSpec, device: str = "auto") -> None:
        from torch.export.unflatten import UnflattenedModule

        self.spec = spec
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        module = on_device(module, self.torch_device)
        if module.training:
            module.eval()
        self.module = module
        self.is_script = isinstance(module, torch.jit.ScriptModule)
        self.is_export = isinstance(module, UnflattenedModule)
        self.supports_gradients = not self.is_script
        self.supports_split = not self.is_script
        #: the batch size a torch.export program was exported for, when static (None: any)
        self.fixed_batch: int | None = static_batch(module)
        self._script = _ScriptCapture(module) if self.is_script else None
        self._modules: dict[str, torch.nn.Module] = {} if self.is_script else {
            n: m for n, m in module.named_modules() if n
        }
        self._names = self._script.names() if self._script is not None else list(self._modules)
        self._splitter: GraphSplitter | None = None

    # ------------------------------------------------------------------ layers

    def layer_names(self) -> list[str]:
        return list(self._names)

    def _kind(self, name: str) -> str:
        if self._script is not None:
            sub: Any = self.module
            for part in name.split("."):
                sub = getattr(sub, part)
            return getattr(sub, "original_name", type(sub).__name__)
        mod = self._modules[name]
        ty = getattr(mod, "_ty", None)  # an unflattened torch.export module: the type it was exported from
        return ty.rsplit(".", 1)[-1] if self.is_export and isinstance(ty, str) and ty else type(mod).__name__

    def _discover_layers(self) -> list[LayerInfo]:
        names = self.layer_names()
        res = self.forward(self.dummy_batch(1), capture=names, _check=False)
        order = names
        if self._script is None:  # hooks fire in execution order; keep that order
            order = list(res.activations) + [n for n in names if n not in res.activations]
        return [
            LayerInfo(n, self._kind(n), tuple(res.activations[n].shape[1:]) if n in res.activations else ())
            for n in order
        ]

    # ------------------------------------------------------------------ forward

    def _live(self) -> None:
        if self.module is None:
            raise BackendError(f"{self.spec.path}: this backend was closed")

    def to_tensor(self, batch: np.ndarray) -> torch.Tensor:
        self._live()
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

    def _forward_once(self, x: torch.Tensor, capture: Sequence[str]) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
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

    def forward_tensors(self, x: torch.Tensor, capture: Sequence[str] = ()) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """Like :meth:`forward` but on device tensors (no copy to host)."""
        self._live()
        with torch.inference_mode():
            return run_chunked(lambda c: self._forward_once(c, capture), x, self.fixed_batch)

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

        def once(chunk: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
            store: dict[str, Any] = {}
            with self.hooks(capture, store, reduce):
                outs = flatten_outputs(self.module(chunk))
            return outs, store

        try:
            with torch.inference_mode():
                outs, store = run_chunked(once, x, self.fixed_batch)
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

        ``target`` is one class index for the whole batch or one per image. Torch eager and
        torch.export modules only (``supports_gradients``); ONNX Runtime and TorchScript give no
        layer gradients here. The gradient is taken with ``torch.autograd.grad`` with respect to
        the captured activation alone: no parameter's ``.grad`` or ``requires_grad`` changes.
        """
        if not self.supports_gradients:
            raise BackendError(f"{self.spec.path}: layer gradients need an eager PyTorch model (not {self.name} "
                               "TorchScript or ONNX)")
        self.check_capture([layer])
        with torch.inference_mode(False):  # also inside a caller's inference mode: tensors autograd can use
            return self._layer_gradients(batch, layer, target)

    def _layer_gradients(self, batch: np.ndarray, layer: str, target: int | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        x = self.to_tensor(batch)
        idx = torch.as_tensor(np.broadcast_to(np.asarray(target), (len(x),)).copy(), device=x.device)
        k = self.fixed_batch
        try:
            if k is None or len(x) == k:
                act, grad = self._gradients_once(x, layer, idx)
            else:
                parts = []
                for i in range(0, len(x), k):
                    n = len(x[i:i + k])
                    pad = k - n
                    chunk = torch.cat([x[i:i + k], x.new_zeros((pad, *x.shape[1:]))]) if pad else x[i:i + k]
                    tgt = torch.cat([idx[i:i + k], idx.new_zeros(pad)]) if pad else idx[i:i + k]
                    a, g = self._gradients_once(chunk, layer, tgt)
                    parts.append((a[:n], g[:n]))
                act, grad = torch.cat([a for a, _ in parts]), torch.cat([g for _, g in parts])
        except RuntimeError as e:
            raise forward_error(self.spec.path, batch.shape, e) from None
        return act.cpu().numpy(), grad.cpu().numpy()

    def _gradients_once(self, x: torch.Tensor, layer: str, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}

        def keep(_m: torch.nn.Module, _i: Any, out: Any) -> Any:
            if not isinstance(out, torch.Tensor):
                raise BackendError(f"{self.spec.path}: layer '{layer}' returns {type(out).__name__}, not a tensor")
            # the activation becomes a leaf of its own (nothing before it is differentiated), and
            # the network goes on with a copy of it: a later in-place op (ReLU(inplace=True))
            # alters neither the value kept nor its gradient
            kept = out.detach().clone().requires_grad_(True)
            store[layer] = kept
            return kept.clone()

        handle = self._modules[layer].register_forward_hook(keep)
        try:
            with torch.enable_grad():
                out = flatten_outputs(self.module(x))[self.spec.output_index]
                out = out.reshape(out.shape[0], -1)
                score = out.gather(1, idx[:, None]).sum()
                act = store.get(layer)
                grad = None
                if act is not None and score.requires_grad:
                    (grad,) = torch.autograd.grad(score, [act], allow_unused=True)
        finally:
            handle.remove()
        if act is None:
            raise BackendError(f"{self.spec.path}: layer '{layer}' did not run in the forward pass")
        if grad is None:
            raise BackendError(f"{self.spec.path}: layer '{layer}' does not influence output {self.spec.output_index}")
        return act.detach(), grad.detach()

    # ------------------------------------------------------------------ split, training copy

    def _split_graph(self) -> GraphSplitter:
        self._live()
        if self.is_script:
            raise BackendError(
                f"{self.spec.path}: a TorchScript model cannot be split at a layer (its compiled graph cannot be "
                "cut into a feature function and a head here); load the model as a state dict with --arch, or "
                "as a torch.export (.pt2) archive")
        if self._splitter is None:
            pre = self.spec.preprocess
            gen = torch.Generator().manual_seed(0)
            n = self.fixed_batch or 1
            example = torch.randn((n, pre.n_channels, *pre.input_size), generator=gen).to(self.torch_device)
            self._splitter = GraphSplitter(self.module, self.spec.path, self.spec.output_index, example,
                                           self.fixed_batch)
        return self._splitter

    def split(self, layer: str) -> Split:
        """The model cut at ``layer``: ``split.head(split.psi(x))`` is the selected output.

        ``psi`` maps an image batch (N, C, H, W) on this backend's device to the activation of
        ``layer``; ``head`` maps that activation to output ``spec.output_index`` flattened to
        (N, -1), without re-running the network from the input (so ``torch.func.jacrev(head)``
        or autograd give the head's Jacobian at psi(x)). Both share the model's parameters.

        Works for eager modules and torch.export programs that torch.fx can trace; raises
        :class:`BackendError` for TorchScript models, for models fx cannot trace (forward
        branching on tensor values), and at layers with no clean cut (a skip connection around
        the layer, a module run more than once), naming the cause and the nearest layers where
        a split works. See :mod:`engine.backends.split`.
        """
        self.check_capture([layer])
        return self._split_graph().split(layer, self._names)

    def split_candidates(self, spatial_only: bool = False) -> list[str]:
        """The layers where :meth:`split` works, in execution order (``spatial_only``: those
        whose output is (C, H, W))."""
        sp = self._split_graph()
        names = sp.candidates(self._names)
        if spatial_only:
            names = [n for n in names if len(sp.calls[n][0].meta["tensor_meta"].shape) == 4]  # type: ignore[union-attr]
        return names

    def trainable_copy(self) -> torch.nn.Module:
        """A deep copy of the model on this backend's device, in train mode (BatchNorm statistics
        update, Dropout drops), every parameter with ``requires_grad``; train it under
        ``torch.enable_grad()``. The loaded module stays as it is, in eval mode.

        A torch.export program cannot be trained this way (its graph is fixed in the eval mode
        it was exported in): that raises :class:`BackendError`.
        """
        self._live()
        if self.is_export:
            raise BackendError(
                f"{self.spec.path}: a torch.export program is fixed in the mode it was exported in (eval), so "
                "BatchNorm and Dropout cannot train; load the model as a state dict with --arch to fine-tune it")
        model = copy_module(self.module, self.torch_device)
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def close(self) -> None:
        """Drop this backend's references to the model (the module itself is not moved: it may
        be shared) and release cached device memory."""
        self.module = None
        self._modules = {}
        self._script = None
        self._splitter = None
        if self.torch_device.type == "cuda":
            torch.cuda.empty_cache()
