"""Splitting a torch model at a layer: a feature function psi and a head G with G(psi(x)) = f(x).

The model's forward is traced with ``torch.fx`` (an eager module directly; a ``torch.export``
program through its unflattened module, whose submodules fx traces op by op). Every module call
is recorded with the graph node that is its output. Cutting the graph at layer L's output node c:

* ``psi`` is the graph of c's ancestors, from the image input to c;
* ``head`` (G) is a graph whose one placeholder stands for c and which holds the nodes that
  depend on c and that the selected classifier output needs, plus the constants (parameters,
  buffers, values computed from them alone) those nodes use. G never re-runs the network from
  the input, so G and its Jacobian (``torch.func.jacrev``, autograd) can be evaluated at psi(x).

A model cannot be split at L when:

* a node after the cut also uses a tensor computed from the input before the cut other than
  L's output: a skip connection around L (L inside a residual block, whose ``add`` also takes the
  block's input; DenseNet's concatenations). Splitting at the block's output works;
* L runs more than once in one forward pass (a reused module has no single output), returns
  something other than one tensor, is not called by the traced forward (e.g. a child of a module
  torch.fx keeps as one op), or the selected output does not depend on it;
* torch.fx cannot trace the forward: Python control flow on tensor values (``if x.sum() > 0``),
  loops over tensor sizes, calls into non-torch code on tensors. Such a model cannot be split at
  any layer. (Optional forward arguments after the image are traced at their defaults, as the
  backend calls the model: ``forward(x, return_features=False)`` is fine);
* the model is TorchScript (its graph cannot be cut into two runnable functions here) or runs on
  ONNX Runtime (splits are a PyTorch capability).

Every split is checked once against the model: G(psi(x)) must reproduce the selected output on
a random batch (this catches in-place mutations the graph does not show).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .base import BackendError


@dataclass(frozen=True)
class Split:
    """A model cut at ``layer``: ``head(psi(x))`` equals the model's selected output.

    ``psi``: (N, C, H, W) image batch -> (N, *activation_shape) activation of ``layer``.
    ``head``: that activation -> the output ``output_index`` of the model, flattened to (N, -1)
    as :meth:`Backend.classifier_output` gives it. Both are ``torch.nn.Module`` callables on
    tensors on the backend's device; they share the loaded model's parameters (no copy) and its
    eval mode, and ``head`` never modifies its input.
    """

    layer: str
    psi: torch.nn.Module
    head: torch.nn.Module
    activation_shape: tuple[int, ...]
    output_index: int


class _Tracer(fx.Tracer):
    """An fx tracer that records, for every module call, the node that is its output."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.calls: dict[str, list[Any]] = {}

    def call_module(self, m: torch.nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        out = super().call_module(m, forward, args, kwargs)
        try:
            name = self.path_of_module(m)
        except NameError:
            return out
        if name.startswith(self.prefix):
            self.calls.setdefault(name[len(self.prefix):], []).append(out)
        return out


class _ExportRoot(torch.nn.Module):
    """Runs an unflattened ``torch.export`` module's top graph, so that fx can trace it."""

    def __init__(self, unflat: torch.nn.Module) -> None:
        super().__init__()
        self.m = unflat

    def forward(self, x: torch.Tensor) -> Any:
        graph: fx.Graph = self.m.graph  # type: ignore[assignment]
        return fx.Interpreter(self.m, graph=graph).run(x, enable_io_processing=False)


class _Chunked(torch.nn.Module):
    """Runs ``fn`` on chunks of ``k`` (the last one zero-padded): a program exported for one
    batch size, split."""

    def __init__(self, fn: torch.nn.Module, k: int) -> None:
        super().__init__()
        self.fn = fn
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_chunked(self.fn, x, self.k)


def run_chunked(fn: Callable[[Any], Any], x: torch.Tensor, k: int | None) -> Any:
    """``fn(x)`` for a function that takes batches of exactly ``k`` only (None: any): chunk by
    chunk, the last chunk padded with zeros, each output's rows concatenated (a pytree of
    tensors with the batch first)."""
    if k is None or len(x) == k:
        return fn(x)
    parts = []
    for i in range(0, len(x), k):
        chunk = x[i:i + k]
        n = len(chunk)
        if n < k:
            chunk = torch.cat([chunk, chunk.new_zeros((k - n, *chunk.shape[1:]))])
        out = fn(chunk)
        parts.append(pytree.tree_map(
            lambda t, n=n: t[:n] if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == k else t, out))
    return pytree.tree_map(
        lambda *ts: torch.cat(ts) if isinstance(ts[0], torch.Tensor) and ts[0].dim() else ts[0], parts[0], *parts[1:])


def _is_tensor_node(node: Any) -> bool:
    from torch.fx.passes.shape_prop import TensorMetadata

    return isinstance(node, fx.Node) and isinstance(node.meta.get("tensor_meta"), TensorMetadata)


def _descendants(start: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.users)
    return seen


def _ancestors(start: Iterable[fx.Node]) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    todo = list(start)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


class GraphSplitter:
    """One fx trace of a model; cuts it at any layer where a clean split exists.

    ``module``: an eager ``nn.Module`` or an unflattened ``torch.export`` module, on its device,
    in eval mode. ``example``: an input batch (random values) used to record shapes and to check
    the trace and every split against the model itself.
    """

    def __init__(self, module: torch.nn.Module, path: str, output_index: int, example: torch.Tensor,
                 fixed_batch: int | None = None) -> None:
        from torch.export.unflatten import UnflattenedModule
        from torch.fx.passes.shape_prop import ShapeProp

        from .torch_backend import flatten_outputs

        self.path = path
        self.output_index = output_index
        self.fixed_batch = fixed_batch
        self.example = example
        exported = isinstance(module, UnflattenedModule)
        root, prefix = (_ExportRoot(module), "m.") if exported else (module, "")
        tracer = _Tracer(prefix)
        try:
            graph = tracer.trace(root, concrete_args=_defaults(root))
            self.gm = fx.GraphModule(tracer.root, graph)
        except Exception as e:  # noqa: BLE001 - any tracing failure: the model cannot be split
            raise BackendError(
                f"{path}: this model cannot be split at a layer: torch.fx cannot trace its forward "
                f"({type(e).__name__}: {' '.join(str(e).split())[:200]}). Models whose forward branches or loops "
                "on tensor values, or calls non-torch code on tensors, cannot be split (a branch written "
                "with torch.where can be)") from None
        self.prefix = prefix
        with torch.no_grad():
            try:
                traced = ShapeProp(self.gm).propagate(example)
                real = module(example)
            except Exception as e:  # noqa: BLE001
                raise BackendError(f"{path}: the traced model failed on a batch of shape {tuple(example.shape)} "
                                   f"({' '.join(str(e).split())[:200]}); it cannot be split") from None
        traced_flat, real_flat = flatten_outputs(traced), flatten_outputs(real)
        out_node = next(n for n in self.gm.graph.nodes if n.op == "output")
        leaves = [n for n in pytree.tree_leaves(out_node.args[0]) if _is_tensor_node(n)]
        if len(leaves) != len(real_flat) or len(traced_flat) != len(real_flat) or not all(
                a.shape == b.shape and _close(a, b) for a, b in zip(traced_flat, real_flat, strict=True)):
            raise BackendError(f"{path}: this model cannot be split at a layer: its torch.fx trace does not "
                               "reproduce the model's outputs (the forward depends on Python state fx does not see)")
        if not -len(leaves) <= output_index < len(leaves):
            raise BackendError(f"{path}: output_index {output_index} but the model returns {len(leaves)} outputs")
        self.selected: fx.Node = leaves[output_index]
        self.reference = real_flat[output_index]
        self.calls: dict[str, list[fx.Node | None]] = {
            name: [o.node if isinstance(o, fx.Proxy) else None for o in outs]
            for name, outs in tracer.calls.items()
        }
        self.order = {n: i for i, n in enumerate(self.gm.graph.nodes)}
        inputs = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        self.from_input = _descendants(inputs)
        self.needed = _ancestors([self.selected])
        self._candidates: dict[tuple[str, ...], list[str]] = {}
        # each node that is the output of a module called once: its (outermost) layer name
        self.layer_of: dict[fx.Node, str] = {}
        for name, nodes in self.calls.items():
            if len(nodes) == 1 and nodes[0] is not None and name:
                old = self.layer_of.get(nodes[0])
                if old is None or name.count(".") < old.count("."):
                    self.layer_of[nodes[0]] = name

    # ------------------------------------------------------------------ checks

    def _cut(self, layer: str) -> tuple[fx.Node | None, str]:
        """(L's output node, '') when the model can be split at ``layer``, else (node|None, why)."""
        nodes = self.calls.get(layer)
        if not nodes:
            return None, (f"'{layer}' is not called as a module of its own in the traced forward (a part of a "
                          "module torch.fx keeps as one op, or a module the forward does not use)")
        if len(nodes) > 1:
            return nodes[-1], (f"'{layer}' runs {len(nodes)} times in one forward pass: a reused module has no single "
                          "output to split at")
        node = nodes[0]
        if node is None or not _is_tensor_node(node):
            return None, f"'{layer}' does not return one tensor"
        if node not in self.needed:
            return node, f"output {self.output_index} does not depend on '{layer}'"
        after = _descendants([node]) & self.needed
        after.discard(node)
        skips = sorted(((n, m) for n in after for m in n.all_input_nodes
                        if m not in after and m is not node and m in self.from_input),
                       key=lambda nm: (self.order[nm[0]], self.order[nm[1]]))
        if skips:
            shown = "; ".join(f"{self._describe(n)} also takes {self._describe(m)}" for n, m in skips[:4])
            more = f" (and {len(skips) - 4} more)" if len(skips) > 4 else ""
            return node, (f"the network after '{layer}' also uses tensors computed before it: {shown}{more}. "
                          f"That is a skip connection around '{layer}' (as inside a residual block or a DenseNet "
                          "concatenation), so no head can start from this layer's output alone")
        return node, ""

    def _describe(self, node: fx.Node) -> str:
        if node.op == "placeholder":
            return "the model input"
        if node in self.layer_of:
            return f"the output of '{self.layer_of[node]}'"
        stack = node.meta.get("nn_module_stack") or {}
        scope = ""
        if stack:
            scope = list(stack)[-1].split("@")[0]
            scope = scope.removeprefix(self.prefix)
        return f"'{node.name}'" + (f" (in '{scope}')" if scope else "")

    def candidates(self, names: Iterable[str]) -> list[str]:
        """Those of ``names`` where a clean split exists, in execution order."""
        names = tuple(names)
        if names not in self._candidates:
            self._candidates[names] = self._find_candidates(names)
        return list(self._candidates[names])

    def _find_candidates(self, names: tuple[str, ...]) -> list[str]:
        ok = []
        for n in names:
            node, why = self._cut(n)
            if node is not None and not why:
                ok.append((self.order[node], -n.count("."), n))  # a block after its last child
        return [n for *_, n in sorted(ok)]

    # ------------------------------------------------------------------ building

    def split(self, layer: str, names: Iterable[str]) -> Split:
        node, why = self._cut(layer)
        if why:
            raise BackendError(f"{self.path}: cannot split at '{layer}': {why}.{self._suggest(node, names)}")
        assert node is not None
        psi: torch.nn.Module = self._psi(node)
        head: torch.nn.Module = self._head(node)
        if self.fixed_batch is not None:
            psi, head = _Chunked(psi, self.fixed_batch), _Chunked(head, self.fixed_batch)
        with torch.no_grad():
            got = head(psi(self.example))
        ref = self.reference.reshape(self.reference.shape[0], -1)
        if got.shape != ref.shape or not _close(got, ref):
            raise BackendError(f"{self.path}: cannot split at '{layer}': the split does not reproduce the model's "
                               "output (the model changes a tensor in place where the traced graph does not show "
                               f"it).{self._suggest(node, names)}")
        shape = tuple(int(s) for s in node.meta["tensor_meta"].shape[1:])
        return Split(layer, psi, head, shape, self.output_index)

    def _suggest(self, node: fx.Node | None, names: Iterable[str]) -> str:
        good = self.candidates(names)
        if not good:
            return " This model has no layer where it can be split."
        if node is None or node not in self.order:
            return f" Layers where it can be split: {', '.join(good[:8])}" + (" ..." if len(good) > 8 else "")
        pos = self.order[node]
        before = [g for g in good if self.order[self.calls[g][0]] < pos]
        after = [g for g in good if self.order[self.calls[g][0]] > pos]
        near = before[-2:] + after[:2]
        return f" The nearest layers where it can be split: {', '.join(near or good[:4])}"

    def _psi(self, cut: fx.Node) -> fx.GraphModule:
        keep = _ancestors([cut])
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in self.gm.graph.nodes:
            if n in keep:
                env[n] = g.node_copy(n, lambda m: env[m])
        g.output(env[cut])
        return fx.GraphModule(self.gm, g, class_name="SplitFeatures")

    def _head(self, cut: fx.Node) -> fx.GraphModule:
        after = _descendants([cut]) & self.needed
        after.discard(cut)
        # constants the head uses: parameters, buffers and what is computed from them alone
        consts = _ancestors([m for n in after for m in n.all_input_nodes if m not in after and m is not cut])
        g = fx.Graph()
        a = g.placeholder("activation")
        # the head must not modify its input: a later in-place op (ReLU(inplace=True)) works on a copy
        env: dict[fx.Node, fx.Node] = {cut: g.call_method("clone", (a,))}
        for n in self.gm.graph.nodes:
            if n in after or n in consts:
                env[n] = g.node_copy(n, lambda m: env[m])
        out = env[self.selected]
        if len(self.selected.meta["tensor_meta"].shape) > 2:
            out = g.call_function(torch.flatten, (out, 1))
        g.output(out)
        return fx.GraphModule(self.gm, g, class_name="SplitHead")


def _defaults(root: torch.nn.Module) -> dict[str, Any] | None:
    """forward's optional arguments after the image, at their defaults (``forward(x,
    return_features=False)`` traces as the plain classifier it is when called with ``x`` alone)."""
    import inspect

    try:
        params = list(inspect.signature(root.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    found = {p.name: p.default for p in params
             if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return found or None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach().float(), b.detach().float()
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale, equal_nan=True))
