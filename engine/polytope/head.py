"""The head G of a split model as a piecewise-linear program: checks, activation patterns, local
affine maps and their linear boundaries.

:func:`head_program` walks the head's ``torch.fx`` graph (see :mod:`engine.backends.split`) and
sorts every op that depends on the head's input psi:

* **affine** ops: Linear, convolutions, eval-mode BatchNorm, average pooling, flatten / reshape /
  permute, dropout (eval), padding, additions (residual adds), products and quotients by
  constants, sums and means;
* **piecewise-linear nonlinearities** ConvLens evaluates with a frozen activation pattern: ReLU,
  LeakyReLU, PReLU, ReLU6 / Hardtanh / clamp (each unit has one boundary per threshold) and
  max-pooling (1-, 2-, 3-d, adaptive 2-d; the pattern is the arg-max, its comparisons are part of
  the region but are not sampled as candidate boundaries);
* anything else (Sigmoid, Tanh, GELU, SiLU, softmax, LayerNorm, a product of two tensors that both
  depend on psi, an op ConvLens does not know) makes :class:`HeadProgram` raise
  :class:`NotPiecewiseLinearError`, naming the op and the module it belongs to.

:class:`HeadProgram` runs the head (in float64, on a copy of its weights) in two modes: ``record``
at psi, which keeps the activation pattern (per unit the slope ``g`` and offset ``o`` of the
active linear piece: ``y = g * z + o``; for max-pooling the arg-max indices) and the
pre-activations ``z``; and ``frozen`` with a recorded pattern, where every nonlinearity applies its
recorded piece. The frozen head is affine in its input: ``frozen(0)`` gives the constant ``c`` of
the local map ``logits = A psi + c`` and every hidden unit's ``b_i``; ``A psi`` and ``W_i`` come from
autograd on the real head (``torch.func.jvp`` / ``vjp``), a separate route, so the certificate
``max |A psi + c - G(psi)|`` checks that the head really is affine on the region.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from engine.types import ConvLensError


class NotPiecewiseLinearError(ConvLensError):
    """A head with an op that is not piecewise linear (or that ConvLens cannot freeze)."""


_AFFINE_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
    nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReplicationPad1d, nn.ReplicationPad2d, nn.PixelShuffle,
    nn.PixelUnshuffle, nn.ChannelShuffle,
)
_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_PL_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh)
_MAXPOOL_MODULES = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)

# functions and tensor methods by name (fx records the python callable; names are stable)
_AFFINE_NAMES = {
    "getitem", "flatten", "reshape", "view", "permute", "transpose", "squeeze", "unsqueeze", "cat", "concat",
    "stack", "linear", "conv1d", "conv2d", "conv3d", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "dropout", "dropout1d", "dropout2d",
    "dropout3d", "alpha_dropout", "pad", "mean", "sum", "neg", "pos", "t", "narrow", "chunk", "split", "clone",
    "contiguous", "expand", "expand_as", "add", "sub", "iadd", "isub", "flip", "roll", "movedim", "unflatten",
    "size", "dim", "getattr", "identity", "view_as", "reshape_as", "repeat", "tile", "pixel_shuffle",
    "batch_norm",
}
#: affine when at most one operand depends on psi (for quotients: the numerator)
_BILINEAR_NAMES = {"mul", "imul", "matmul", "mm", "bmm", "truediv", "div", "itruediv", "einsum"}
_ELEMENTWISE_PL_NAMES = {"relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "hardtanh", "hardtanh_",
                         "prelu", "clamp", "clip", "clamp_min", "clamp_max"}
_MAXPOOL_NAMES = {"max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
                  "max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
                  "adaptive_max_pool1d", "adaptive_max_pool2d", "_adaptive_max_pool1d", "_adaptive_max_pool2d",
                  "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices"}


def _target_name(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return str(t)
    name = getattr(t, "__name__", str(t))
    return name.strip("_") if name.startswith("__") else name


@dataclass
class NonLinearity:
    """One piecewise-linear nonlinearity of the head: ``kind`` is ``"elementwise"`` or
    ``"maxpool"``; ``thresholds``: where an elementwise unit changes piece (0 for the ReLU family;
    the clamp bounds for ReLU6 / Hardtanh / clamp); ``first``: no other nonlinearity lies between
    psi and it, so its units' pre-activations are one affine function of psi for every image."""

    node: str
    module: str
    op: str
    kind: str
    thresholds: tuple[float, ...]
    first: bool
    shape: tuple[int, ...] = ()  # pre-activation shape without the batch

    @property
    def units(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class HeadReport:
    """What the walk over the head found (plain data)."""

    ops: list[str]
    nonlinear: list[NonLinearity]
    problems: list[str] = field(default_factory=list)

    @property
    def affine(self) -> bool:
        return not self.nonlinear and not self.problems


def _scope(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        last = list(stack.values())[-1]
        path = last[0] if isinstance(last, tuple) else str(last)
        return str(path).removeprefix("L['self'].").removeprefix("m.")
    return ""


def _describe(gm: fx.GraphModule, node: fx.Node) -> str:
    scope = _scope(gm, node)
    if node.op == "call_module":
        return f"'{node.target}' ({type(gm.get_submodule(str(node.target))).__name__})"
    what = f"{_target_name(node)}"
    return f"'{what}' ({node.op.replace('call_', '')}" + (f" in '{scope}')" if scope else ")")


def _clamp_bounds(node: fx.Node, mod: nn.Module | None) -> tuple[float, ...]:
    name = _target_name(node)
    if mod is not None:
        if isinstance(mod, nn.ReLU6):
            return (0.0, 6.0)
        if isinstance(mod, nn.Hardtanh):
            return (float(mod.min_val), float(mod.max_val))
        return (0.0,)
    if name in ("relu6",):
        return (0.0, 6.0)
    if name.startswith("hardtanh"):
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min_val", -1.0)
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max_val", 1.0)
        return (float(lo), float(hi))  # type: ignore[arg-type]
    if name in ("clamp", "clip", "clamp_min", "clamp_max"):
        args = list(node.args[1:])
        lo = args[0] if args else node.kwargs.get("min")
        hi = args[1] if len(args) > 1 else node.kwargs.get("max")
        if name == "clamp_max":
            lo, hi = None, lo
        bounds = []
        for b in (lo, hi):
            if isinstance(b, fx.Node):
                raise NotPiecewiseLinearError("clamp bounds computed from a tensor")
            if b is not None:
                bounds.append(float(b))  # type: ignore[arg-type]
        return tuple(bounds)
    return (0.0,)


def _clamp_upper_only(node: fx.Node) -> bool:
    """``clamp(x, max=...)`` / ``clamp(x, None, hi)``: only an upper bound."""
    args = list(node.args[1:])
    lo = args[0] if args else node.kwargs.get("min")
    return lo is None


def analyse_head(gm: fx.GraphModule) -> HeadReport:
    """Sort the ops of ``gm`` (a split's head) that depend on its input (see the module doc)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dep: set[fx.Node] = set(placeholders)
    after_nl: set[fx.Node] = set()  # nodes downstream of a nonlinearity
    ops: list[str] = []
    nonlinear: list[NonLinearity] = []
    problems: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        inputs = [m for m in node.all_input_nodes if m in dep]
        if not inputs:
            continue
        dep.add(node)
        past_nl = any(m in after_nl for m in inputs)
        name = _target_name(node)
        mod = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        desc = _describe(gm, node)
        is_nl = False
        if mod is not None:
            ops.append(type(mod).__name__)
            if isinstance(mod, _AFFINE_MODULES):
                pass
            elif isinstance(mod, _BATCHNORM):
                if mod.training or mod.running_mean is None:
                    problems.append(f"{desc} normalises with the batch's own statistics (training mode or no "
                                    "running statistics), which is not a fixed affine map")
            elif isinstance(mod, _ELEMENTWISE_PL_MODULES):
                is_nl = True
                nonlinear.append(NonLinearity(node.name, str(node.target), type(mod).__name__, "elementwise",
                                              _clamp_bounds(node, mod), not past_nl))
            elif isinstance(mod, _MAXPOOL_MODULES):
                is_nl = True
                nonlinear.append(NonLinearity(node.name, str(node.target), type(mod).__name__, "maxpool", (),
                                              not past_nl))
            else:
                problems.append(f"{desc} is not piecewise linear" if _known_smooth(type(mod).__name__)
                                else f"{desc} is not an op ConvLens knows to be piecewise linear")
        else:
            ops.append(name)
            if name in _AFFINE_NAMES:
                pass
            elif name in _BILINEAR_NAMES:
                numer_only = name in ("truediv", "div", "itruediv")
                dep_args = [a for a in node.args if isinstance(a, fx.Node) and a in dep]
                if len(dep_args) > 1 or (numer_only and node.args and node.args[0] not in dep):
                    problems.append(f"{desc} multiplies or divides two tensors that both depend on the layer's "
                                    "output (as in a squeeze-and-excitation gate), which is not piecewise linear")
            elif name in _ELEMENTWISE_PL_NAMES:
                is_nl = True
                try:
                    bounds = _clamp_bounds(node, None)
                except NotPiecewiseLinearError as e:
                    problems.append(f"{desc}: {e}")
                    bounds = ()
                op = name
                if name in ("clamp", "clip") and len(bounds) == 1 and _clamp_upper_only(node):
                    op = "clamp_max"
                nonlinear.append(NonLinearity(node.name, _scope(gm, node), op, "elementwise", bounds, not past_nl))
            elif name in _MAXPOOL_NAMES:
                is_nl = True
                nonlinear.append(NonLinearity(node.name, _scope(gm, node), name, "maxpool", (), not past_nl))
            else:
                problems.append(f"{desc} is not piecewise linear" if _known_smooth(name)
                                else f"{desc} is not an op ConvLens knows to be piecewise linear")
        if is_nl or past_nl:
            after_nl.add(node)
    return HeadReport(ops, nonlinear, problems)


_SMOOTH = ("sigmoid", "tanh", "gelu", "silu", "swish", "mish", "elu", "celu", "selu", "softplus", "softmax",
           "log_softmax", "logsoftmax", "softmin", "hardswish", "hardsigmoid", "layernorm", "layer_norm",
           "groupnorm", "group_norm", "instancenorm", "instance_norm", "localresponsenorm", "exp", "log", "sqrt",
           "rsqrt", "pow", "normalize", "multiheadattention", "scaled_dot_product_attention", "logsigmoid",
           "tanhshrink", "softsign")


def _known_smooth(name: str) -> bool:
    low = name.lower().replace("2d", "").replace("1d", "")
    return any(low == s or low.startswith(s) for s in _SMOOTH)


# --------------------------------------------------------------------------------------------
# running the head with a recorded / frozen activation pattern
# --------------------------------------------------------------------------------------------


@dataclass
class Record:
    """A batch's pass through the head at psi: the output, and per nonlinearity (by node name)
    the pre-activation ``z`` and the pattern: ``(g, o)`` for elementwise ops, the arg-max
    indices for max-pooling."""

    output: torch.Tensor
    z: dict[str, torch.Tensor]
    pattern: dict[str, Any]


class HeadProgram:
    """The head as a float64 program with recordable / freezable nonlinearities.

    ``head``: a split's head (an fx ``GraphModule``); it is copied (its weights too) and the
    copy converted to float64, so the model itself is untouched. Raises
    :class:`NotPiecewiseLinearError` naming the op(s) that prevent it.
    """

    def __init__(self, head: nn.Module, dtype: torch.dtype = torch.float64) -> None:
        gm: Any = head
        while not isinstance(gm, fx.GraphModule) and hasattr(gm, "fn"):
            gm = gm.fn  # a chunked split of a static-batch program
        if not isinstance(gm, fx.GraphModule):
            raise NotPiecewiseLinearError(f"the head is a {type(head).__name__}, not a traced graph")
        self.report = analyse_head(gm)
        if self.report.problems:
            shown = "; ".join(self.report.problems[:3])
            more = f" (and {len(self.report.problems) - 3} more)" if len(self.report.problems) > 3 else ""
            raise NotPiecewiseLinearError(f"the head is not piecewise linear: {shown}{more}")
        self.dtype = dtype
        self.gm = copy.deepcopy(gm).to(dtype)
        self.gm.eval()
        for p in self.gm.parameters():
            p.requires_grad_(False)
        self.nl = {n.node: n for n in self.report.nonlinear}
        self._nodes = {n.name: n for n in self.gm.graph.nodes}

    # the nonlinearity's op as a function of its first input
    def _op(self, node: fx.Node, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[torch.Tensor], Any]:
        rest = args[1:]
        if node.op == "call_module":
            mod = self.gm.get_submodule(str(node.target))
            return lambda z: mod(z, *rest, **kwargs)
        if node.op == "call_method":
            return lambda z: getattr(z, str(node.target))(*rest, **kwargs)
        fn = node.target
        return lambda z: fn(z, *rest, **kwargs)  # type: ignore[operator]

    def _maxpool_with_indices(self, node: fx.Node, z: torch.Tensor, args: tuple[Any, ...],
                              kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        f: Any
        if node.op == "call_module":
            mod: Any = self.gm.get_submodule(str(node.target))
            if isinstance(mod, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)):
                f = F.adaptive_max_pool1d if isinstance(mod, nn.AdaptiveMaxPool1d) else F.adaptive_max_pool2d
                return f(z, mod.output_size, return_indices=True)
            f = {nn.MaxPool1d: F.max_pool1d, nn.MaxPool2d: F.max_pool2d, nn.MaxPool3d: F.max_pool3d}[type(mod)]
            return f(z, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                     ceil_mode=mod.ceil_mode, return_indices=True)
        name = _target_name(node).strip("_").replace("_with_indices", "")
        f = getattr(F, name)
        kw = {k: v for k, v in kwargs.items() if k != "return_indices"}
        return f(z, *args[1:], **kw, return_indices=True)

    def run(self, x: torch.Tensor, pattern: dict[str, Any] | None = None) -> Record:
        """``pattern`` None: record at ``x``; else evaluate with that pattern frozen (affine in x)."""
        env: dict[fx.Node, Any] = {}
        z_out: dict[str, torch.Tensor] = {}
        pat_out: dict[str, Any] = {}
        out: Any = None
        interp = fx.Interpreter(self.gm)
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                env[node] = x
                continue
            if node.op == "output":
                out = fx.node.map_arg(node.args[0], lambda n: env[n])
                break
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            info = self.nl.get(node.name)
            if info is None:
                env[node] = getattr(interp, node.op)(node.target, args, kwargs)
                continue
            z = args[0]
            if info.kind == "maxpool":
                if pattern is None:
                    y, idx = self._maxpool_with_indices(node, z, args, kwargs)
                    pat_out[node.name] = idx
                else:
                    idx = pattern[node.name]
                    y = z.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
            elif pattern is None:
                fn = self._op(node, args, kwargs)
                y = fn(z.clone())  # an in-place op (ReLU(inplace=True)) must leave z as it was
                g = _slope(fn, z, y, info)
                o = y - g * z
                pat_out[node.name] = (g, o)
            else:
                g, o = pattern[node.name]
                y = g * z + o
            z_out[node.name] = z
            env[node] = y
        return Record(out, z_out, pat_out)

    def pattern_signature(self, rec: Record) -> list[bytes]:
        """Per image, bytes that identify its activation pattern (the linear region)."""
        n = rec.output.shape[0]
        parts: list[list[bytes]] = [[] for _ in range(n)]
        for name, p in rec.pattern.items():
            if isinstance(p, tuple):  # elementwise: which side of each threshold every unit is on
                z = rec.z[name]
                info = self.nl[name]
                key = torch.stack([z > t for t in info.thresholds], dim=1).reshape(n, -1).cpu().numpy()
                for i in range(n):
                    parts[i].append(np.packbits(key[i]).tobytes())
            else:  # max-pooling: the arg-max of every window
                arr = p.reshape(n, -1).to(torch.int32).cpu().numpy()
                for i in range(n):
                    parts[i].append(arr[i].tobytes())
        return [b"".join(pp) for pp in parts]


def _slope(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, y: torch.Tensor,
           info: NonLinearity) -> torch.Tensor:
    """The slope of the active piece of an elementwise piecewise-linear op at ``z``."""
    if info.op in ("ReLU", "relu", "relu_"):
        return (z > 0).to(z.dtype)
    if len(info.thresholds) == 2 or info.op in ("clamp", "clip", "clamp_min", "clamp_max", "ReLU6", "Hardtanh",
                                                 "relu6", "hardtanh", "hardtanh_"):
        lo = info.thresholds[0] if info.thresholds else float("-inf")
        hi = info.thresholds[-1] if len(info.thresholds) > 1 else float("inf")
        if info.op == "clamp_max":
            lo, hi = float("-inf"), info.thresholds[0]
        return ((z > lo) & (z < hi)).to(z.dtype)
    # LeakyReLU, PReLU: the derivative (one forward-mode product), exact for a linear piece
    _, g = torch.func.jvp(lambda t: fn(t.clone()), (z,), (torch.ones_like(z),))  # type: ignore[misc]
    return g.detach()


def hidden_units(prog: HeadProgram, example: torch.Tensor) -> list[NonLinearity]:
    """The elementwise nonlinearities with their pre-activation shapes filled in (one record
    at ``example``); max-pools are returned too, with their shapes."""
    with torch.no_grad():
        rec = prog.run(example.to(prog.dtype))
    for info in prog.report.nonlinear:
        info.shape = tuple(rec.z[info.node].shape[1:])
    return prog.report.nonlinear


def linear_parts(prog: HeadProgram, psi: torch.Tensor, record: Record) -> tuple[torch.Tensor, Record]:
    """``(A psi, frozen(0))`` for a batch: the linear part of each image's local map applied to
    its own psi (forward-mode autograd on the head) and the frozen head at 0 (``c`` and every
    hidden unit's ``b`` before subtracting its threshold)."""
    def f(p: torch.Tensor) -> torch.Tensor:
        return prog.run(p).output

    _, a_psi = torch.func.jvp(f, (psi,), (psi,))  # type: ignore[misc]
    with torch.no_grad():
        zero = prog.run(torch.zeros_like(psi), record.pattern)
    return a_psi.detach(), zero


def boundary_rows(prog: HeadProgram, psi: torch.Tensor, select: Sequence[Sequence[tuple[str, int, int]]],
                  ) -> torch.Tensor:
    """Gradient rows for a batch: ``select[b]`` lists, for image ``b``, ``(what, i, j)`` items:
    ``("unit", node_index, flat_unit)`` -> dz/dpsi of that unit; ``("decision", a, k)`` ->
    d(logit_a - logit_k)/dpsi. Returns (B, K, D) with K the longest list (zero rows pad)."""
    names = [n.node for n in prog.report.nonlinear]
    b = psi.shape[0]
    k = max((len(s) for s in select), default=0)

    def f(p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rec = prog.run(p)
        return (rec.output, *[rec.z[n].reshape(b, -1) for n in names])

    outs, vjp_fn = torch.func.vjp(f, psi)  # type: ignore[misc]
    cot = [torch.zeros((k, *o.shape), dtype=o.dtype, device=o.device) for o in outs]
    for bi, items in enumerate(select):
        for r, (what, i, j) in enumerate(items):
            if what == "unit":
                cot[1 + i][r, bi, j] = 1.0
            else:
                cot[0][r, bi, i] += 1.0
                cot[0][r, bi, j] -= 1.0
    if k == 0:
        return psi.new_zeros((b, 0, psi[0].numel()))
    (rows,) = torch.vmap(vjp_fn)(tuple(cot))
    return rows.reshape(k, b, -1).transpose(0, 1).detach()


def default_layer(backend: Any) -> str:
    """The layer to split at when none is named: the output of the last convolution (moving on
    over activations and normalisations that follow it elementwise), or the first clean split
    point after it when it sits inside a block (e.g. ResNet's ``layer4``)."""
    from engine.types import LayerInfo

    cands = backend.split_candidates(spatial_only=True)
    if not cands:
        raise ConvLensError(f"{backend.spec.path}: there is no spatial layer where this model can be split")
    layers: list[LayerInfo] = backend.layers()
    order = {li.name: i for i, li in enumerate(layers)}
    kind = {li.name: li.kind for li in layers}
    convs = [li.name for li in layers if "conv" in li.kind.lower() and li.is_spatial]
    if not convs:
        return str(cands[-1])
    last = convs[-1]
    pos = order.get(last, -1)
    after = [c for c in cands if order.get(c, -1) >= pos]
    if not after:
        return str(cands[-1])
    chosen = after[0]
    elementwise = ("relu", "prelu", "leakyrelu", "relu6", "batchnorm2d", "hardtanh", "elu")
    for c in after[1:]:
        if chosen.startswith(c + ".") or kind.get(c, "").lower() in elementwise:
            chosen = c
        else:
            break
    return chosen


@dataclass
class LocalMap:
    """One image's linear region of the head: ``logits = A psi + c`` there, and each hidden
    unit's boundary ``<W_i, psi> + b_i = 0`` (``units[i]``: nonlinearity node, flat unit index,
    threshold). ``pattern``: per nonlinearity, how many units are on their identity piece
    (slope 1). ``certificate``: ``max |A psi + c - G(psi)|`` (float64 head, float64 psi)."""

    a: torch.Tensor
    c: torch.Tensor
    w: torch.Tensor
    b: torch.Tensor
    units: list[tuple[str, int, float]]
    pattern: dict[str, int]
    certificate: float


def local_affine_map(prog: HeadProgram, psi: torch.Tensor, max_elements: int = 2**26) -> LocalMap:
    """The local affine map of one image (``psi``: (1, ...)) with full Jacobians (``jacrev``).

    ``max_elements`` bounds the size of ``W`` (hidden units x psi size); a head with more is
    refused (ConvLensError): sample boundaries instead (the gallery job does)."""
    psi = psi.to(prog.dtype)
    d = psi[0].numel()
    with torch.no_grad():
        rec = prog.run(psi)
    elem = [n for n in prog.report.nonlinear if n.kind == "elementwise"]
    units = [(n.node, i, t) for n in elem for i in range(rec.z[n.node][0].numel()) for t in n.thresholds]
    if (len(units) + rec.output.shape[1]) * d > max_elements:
        raise ConvLensError(f"the full local map has {len(units)} hidden boundaries of dimension {d}: more than "
                            f"{max_elements} numbers; use the sampled boundaries of the gallery instead")

    def out(p: torch.Tensor) -> torch.Tensor:
        r = prog.run(p.reshape(psi.shape))
        return torch.cat([r.output[0], *[r.z[n.node][0].reshape(-1) for n in elem]])

    jac = torch.func.jacrev(out)(psi.reshape(-1)).detach()
    with torch.no_grad():
        zero = prog.run(torch.zeros_like(psi), rec.pattern)
    n_out = rec.output.shape[1]
    a, w_z = jac[:n_out], jac[n_out:]
    c = zero.output[0]
    z0 = torch.cat([zero.z[n.node][0].reshape(-1) for n in elem]) if elem else psi.new_zeros(0)
    # one row per (unit, threshold): z_i - t
    rows, bias = [], []
    offset = 0
    for n in elem:
        k = rec.z[n.node][0].numel()
        for t in n.thresholds:
            rows.append(w_z[offset:offset + k])
            bias.append(z0[offset:offset + k] - t)
        offset += k
    w = torch.cat(rows) if rows else psi.new_zeros((0, d))
    b = torch.cat(bias) if bias else psi.new_zeros(0)
    units = [(n.node, i, t) for n in elem for t in n.thresholds for i in range(rec.z[n.node][0].numel())]
    pattern = {n.node: int((rec.pattern[n.node][0] == 1).sum()) for n in elem}
    cert = float((a @ psi.reshape(-1) + c - rec.output[0]).abs().max())
    return LocalMap(a, c, w, b, units, pattern, cert)
