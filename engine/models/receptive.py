"""Exact receptive fields of spatial layers, from the conv/pool geometry of eager torch modules
and ONNX graphs.

**Convention.** Input pixel ``(y, x)`` has its centre at ``(y, x)`` (it covers
``[y - 0.5, y + 0.5]``). A :class:`ReceptiveField` describes every output position of one layer:
position ``(i, j)`` is centred at ``offset + (i, j) * stride`` in input pixels and sees the
``size[0] x size[1]`` input pixels around that centre. ``box(i, j)`` gives them as half-open
integer bounds ``(top, left, bottom, right)`` (``img[top:bottom, left:right]``); it may reach
beyond the image into the padding, ``clipped_box`` clips it to the image.

**Composition** (per axis; Araujo et al., "Computing receptive fields of CNNs", Distill 2019):
``jump' = jump * s``, ``size' = size + (k - 1) * d * jump``,
``start' = start + ((k - 1) * d / 2 - p) * jump``, where ``start`` is the centre of position 0 and
``p`` the padding *before* the first row/column. Padding after the last one (asymmetric
``'same'``, ``ceil_mode``) only adds positions; it does not move them.

**Graph rules.** Conv and pooling compose as above (``padding='same'/'valid'``, tuples, explicit
pad modules/ops, dilation). Pointwise ops (BatchNorm, activations, Dropout, casts) keep the
field. Element-wise ops and channel concatenation take the union of their branches (they must
share the stride; misaligned branches are noted). A global pool (AdaptiveAvgPool to 1x1,
GlobalAveragePool, a mean over H and W) makes the field the whole input, flagged ``is_global``.
An operand that is spatially constant (a squeeze-excitation gate: x * sigmoid(fc(pool(x)))) is
ignored, with a note: strictly every position then depends on every pixel. Normalisations over
the map (GroupNorm, InstanceNorm) are treated as pointwise, with a note. Flatten/Linear/
permutations of H and W, upsampling and unknown ops have no field: asking for a layer that
depends on one raises :class:`ReceptiveFieldError` naming the op.

Eager models are traced with torch.fx; a model fx cannot trace falls back to hooks on its leaf
modules, which works when the layer is reached through a plain chain of modules. ONNX layers
are named like :class:`~engine.backends.onnx_backend.OnnxBackend` names them
(:func:`onnx_layer_tensors`), or by tensor name.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..types import ConvLensError

Pair = tuple[int, int]


class ReceptiveFieldError(ConvLensError):
    """A layer has no receptive field geometry (non-spatial, upsampling, unknown op, ...)."""


def _pair(v: Any) -> Pair:
    if isinstance(v, int | float):
        return (int(v), int(v))
    v = tuple(int(x) for x in v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


@dataclass(frozen=True)
class ReceptiveField:
    """Geometry of one layer's output positions in input pixels (see the module docstring)."""

    size: Pair = (1, 1)
    stride: Pair = (1, 1)
    offset: tuple[float, float] = (0.0, 0.0)
    is_global: bool = False  #: a global pool on the way: each position sees the whole input
    notes: tuple[str, ...] = field(default=(), compare=False)

    def centre(self, i: int, j: int) -> tuple[float, float]:
        return (self.offset[0] + i * self.stride[0], self.offset[1] + j * self.stride[1])

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        """Half-open ``(top, left, bottom, right)`` in input pixels, possibly beyond the image."""
        cy, cx = self.centre(i, j)
        top, left = round(cy - (self.size[0] - 1) / 2), round(cx - (self.size[1] - 1) / 2)
        return (top, left, top + self.size[0], left + self.size[1])

    def clipped_box(self, i: int, j: int, image_size: Pair) -> tuple[int, int, int, int]:
        """:meth:`box` clipped to an image of ``(height, width)``."""
        t, l, b, r = self.box(i, j)
        h, w = image_size
        return (max(t, 0), max(l, 0), min(b, h), min(r, w))

    def then(self, kernel: Any = 1, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> ReceptiveField:
        """The field after a conv/pool with this geometry; ``padding`` is the padding before the
        first row and column (an int or ``(top, left)``)."""
        k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
        size = tuple(self.size[a] + (k[a] - 1) * d[a] * self.stride[a] for a in (0, 1))
        off = tuple(self.offset[a] + ((k[a] - 1) * d[a] / 2 - p[a]) * self.stride[a] for a in (0, 1))
        stride_ = tuple(self.stride[a] * s[a] for a in (0, 1))
        return replace(self, size=size, stride=stride_, offset=off)  # type: ignore[arg-type]

    def union(self, other: ReceptiveField, where: str = "") -> ReceptiveField:
        """The smallest field holding both (branches that are added, multiplied or concatenated)."""
        if self.stride != other.stride:
            raise ReceptiveFieldError(f"{where}: branches with different strides {self.stride} and "
                                      f"{other.stride} meet; their positions do not correspond")
        first = [min(f.offset[a] - (f.size[a] - 1) / 2 for f in (self, other)) for a in (0, 1)]
        last = [max(f.offset[a] + (f.size[a] - 1) / 2 for f in (self, other)) for a in (0, 1)]
        notes = self.notes + tuple(n for n in other.notes if n not in self.notes)
        if self.offset != other.offset:
            notes += (f"{where}: branches are misaligned (centres {self.offset} and {other.offset}); "
                      "the field is their union",)
        return ReceptiveField(tuple(round(last[a] - first[a]) + 1 for a in (0, 1)), self.stride,  # type: ignore[arg-type]
                              ((first[0] + last[0]) / 2, (first[1] + last[1]) / 2),
                              self.is_global or other.is_global, notes)

    def noted(self, *notes: str) -> ReceptiveField:
        return replace(self, notes=self.notes + tuple(n for n in notes if n not in self.notes))

    def globalised(self, kernel: Pair, where: str) -> ReceptiveField:
        """After a pool over the whole map of ``kernel`` positions: the union of all of them."""
        return replace(self.then(kernel, kernel), is_global=True).noted(
            f"{where}: a global pool; each position sees the whole input")


@dataclass(frozen=True)
class _Bad:
    """Why a tensor has no field; raised only if the asked layer depends on it."""

    msg: str


Value = ReceptiveField | _Bad | None  # None: does not depend on the input image


def _spatial(shape: Any) -> Pair | None:
    return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 3 else None


def _merge(ins: list[tuple[Value, Any]], out_shape: Any, where: str) -> Value:
    """Union of the operands that depend on the input; spatially constant ones are gates."""
    out_sp, fields, notes = _spatial(out_shape), [], []
    for v, shape in ins:
        if v is None:
            continue
        sp = _spatial(shape)
        if out_sp is not None and math.prod(out_sp) > 1 and (sp is None or math.prod(sp) == 1):
            notes.append(f"{where}: a spatially constant operand (e.g. a squeeze-excitation gate) "
                         "is ignored; strictly it depends on the whole input")
            continue
        if isinstance(v, _Bad):
            return v
        fields.append(v)
    if not fields:
        return None
    rf = fields[0]
    for f in fields[1:]:
        rf = rf.union(f, where)
    return rf.noted(*notes)


def _adaptive(v: ReceptiveField, in_sp: Pair | None, out_sp: Pair | None, where: str) -> ReceptiveField:
    if in_sp is None or out_sp is None:
        raise ReceptiveFieldError(f"{where}: adaptive pooling on a map of unknown size (pass input_size)")
    if out_sp == (1, 1):
        return v.globalised(in_sp, where)
    if in_sp[0] % out_sp[0] or in_sp[1] % out_sp[1]:
        raise ReceptiveFieldError(f"{where}: adaptive pooling {in_sp} -> {out_sp} has bins of unequal "
                                  "size; no single stride describes it")
    k = (in_sp[0] // out_sp[0], in_sp[1] // out_sp[1])
    return v.then(k, k)


def _same_begin(k: Pair, s: Pair, d: Pair, in_sp: Pair | None, upper: bool, where: str) -> Pair:
    """Padding before the first row/column for ONNX SAME_UPPER / SAME_LOWER."""
    if s == (1, 1):
        tot = [(k[a] - 1) * d[a] for a in (0, 1)]
    elif in_sp is None:
        raise ReceptiveFieldError(f"{where}: auto_pad SAME on a map of unknown size (pass input_size)")
    else:
        tot = [max((math.ceil(in_sp[a] / s[a]) - 1) * s[a] + (k[a] - 1) * d[a] + 1 - in_sp[a], 0) for a in (0, 1)]
    return (tot[0] // 2, tot[1] // 2) if upper else (tot[0] - tot[0] // 2, tot[1] - tot[1] // 2)


def _layout(v: Value, in_shape: Any, out_shape: Any, where: str, keeps_hw: bool = True) -> Value:
    """A reshape/permute/slice passes the field on only if H and W stay the last two axes."""
    if v is None or isinstance(v, _Bad):
        return v
    if isinstance(out_shape, list) and out_shape:  # chunk / split: a tuple of tensors
        out_shape = out_shape[0]
    if keeps_hw and _spatial(in_shape) is not None and _spatial(in_shape) == _spatial(out_shape):
        return v
    return _Bad(f"{where}: the output is not spatial (flattened, reshaped or permuted H and W)")


# ---------------------------------------------------------------------------- eager torch

def _torch_tables() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from torch import nn

    acts = tuple(c for c in vars(nn.modules.activation).values() if isinstance(c, type)
                 and c.__module__ == nn.modules.activation.__name__ and c not in (nn.MultiheadAttention, nn.GLU, nn.Softmax, nn.LogSoftmax, nn.Softmin))
    names = ("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish",
             "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus", "prelu", "dropout", "dropout2d",
             "alpha_dropout", "batch_norm", "local_response_norm", "clamp", "clip", "abs", "neg", "exp",
             "log", "sqrt", "rsqrt", "square", "reciprocal", "sign", "erf")
    point_fn = {getattr(m, n) for m in (F, torch) for n in names if hasattr(m, n)} | {
        getattr(m, n + "_") for m in (F, torch) for n in names if hasattr(m, n + "_")}
    binary = {operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
              operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
              torch.maximum, torch.minimum, torch.where}
    return {
        "point_mod": (*acts, nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.Identity,
                      nn.LocalResponseNorm, nn.CrossMapLRN2d, nn.Softmax2d),
        "norm_mod": (nn.GroupNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm),
        "point_fn": point_fn, "binary": binary, "cat": {torch.cat, torch.concat},
        "pool_fn": {F.max_pool2d: ("kernel_size", "stride", "padding", "dilation"),
                    torch.max_pool2d: ("kernel_size", "stride", "padding", "dilation"),
                    F.max_pool2d_with_indices: ("kernel_size", "stride", "padding", "dilation"),
                    F.avg_pool2d: ("kernel_size", "stride", "padding")},
        "adaptive_fn": {F.adaptive_avg_pool2d, F.adaptive_max_pool2d},
        "layout_fn": {torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.permute,
                      torch.transpose, torch.chunk, torch.split},
        "reduce_fn": {torch.mean, torch.sum, torch.amax}, "conv_fn": F.conv2d, "pad_fn": F.pad,
    }


_POINT_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "clamp", "clamp_", "clip", "abs",
                  "neg", "exp", "float", "double", "half", "to", "type_as", "clone", "detach",
                  "contiguous", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
                  "masked_fill", "pow", "sqrt", "rsqrt"}
_LAYOUT_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "permute", "transpose",
                   "chunk", "split", "expand", "expand_as", "view_as", "reshape_as"}


def _conv_padding(padding: Any, k: Pair, d: Pair) -> Pair:
    if padding == "valid":
        return (0, 0)
    if padding == "same":  # torch pads total // 2 before, the rest after
        return ((k[0] - 1) * d[0] // 2, (k[1] - 1) * d[1] // 2)
    return _pair(padding)


def _module_rule(m: Any, v: Value, in_shape: Any, out_shape: Any, where: str, t: dict[str, Any]) -> Value:
    from torch import nn

    if v is None or isinstance(v, _Bad):
        return v
    in_sp, out_sp = _spatial(in_shape), _spatial(out_shape)
    if isinstance(m, nn.Conv2d):
        k, d = _pair(m.kernel_size), _pair(m.dilation)
        return v.then(k, m.stride, _conv_padding(m.padding, k, d), d)
    if isinstance(m, nn.MaxPool2d):
        return v.then(m.kernel_size, m.stride or m.kernel_size, m.padding, m.dilation)
    if isinstance(m, nn.AvgPool2d | nn.LPPool2d):
        return v.then(m.kernel_size, m.stride or m.kernel_size, getattr(m, "padding", 0))
    if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return _adaptive(v, in_sp, out_sp, where)
    if isinstance(m, nn.modules.padding._ReflectionPadNd | nn.modules.padding._ReplicationPadNd
                  | nn.ZeroPad2d | nn.ConstantPad2d):
        left, _, top, _ = _pair4(m.padding)
        return v.then(1, 1, (top, left))
    if isinstance(m, t["point_mod"]):
        return v
    if isinstance(m, t["norm_mod"]):
        return v.noted(f"{where}: {type(m).__name__} normalises over the map; its statistics are ignored")
    kind = type(m).__name__
    if isinstance(m, nn.Linear | nn.Flatten | nn.Unflatten):
        return _Bad(f"{where}: {kind} is not spatial; layers after it have no receptive field")
    return _Bad(f"{where}: {kind} has no known receptive field geometry")


def _pair4(p: Any) -> tuple[int, int, int, int]:
    """torch pad order (left, right, top, bottom) from an int, a 2-tuple (last axis) or a 4-tuple."""
    p = (p,) * 4 if isinstance(p, int) else tuple(p)
    return (p[0], p[1], 0, 0) if len(p) == 2 else (p[0], p[1], p[2], p[3])


def _bind(node: Any, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    got = dict(defaults, **dict(zip(names, node.args[1:], strict=False)))
    got.update({k: val for k, val in node.kwargs.items() if k in names})
    return got


_UNHANDLED = _Bad("")


def _hw_axes_rule(node: Any, x: Any, v: ReceptiveField, srcs: list[tuple[Value, Any]], shape: Callable[[Any], Any],
                  gm: Any, t: dict[str, Any], moved: dict[Any, Pair], where: str) -> Value:
    """Permutations, and tensors whose H and W are not the last two axes (channels-last blocks
    as in ConvNeXt: permute, LayerNorm / Linear over channels, permute back)."""
    from torch import nn

    nd = len(shape(x)) if shape(x) is not None else 4
    hw = moved.get(x, (nd - 2, nd - 1))
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in ("permute", "transpose"):
        rest = [*node.args[1:], *node.kwargs.values()]
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], list | tuple) else list(rest)
        if name == "transpose":
            a, b = (d % nd for d in dims)
            dims = list(range(nd))
            dims[a], dims[b] = b, a
        dims = [d % nd for d in dims]
        new = (dims.index(hw[0]), dims.index(hw[1]))
        if new != (nd - 2, nd - 1):
            moved[node] = new
        return v
    if x not in moved:
        return _UNHANDLED
    m = gm.get_submodule(node.target) if node.op == "call_module" else None
    axes = set(hw)
    if isinstance(m, nn.Linear) or name == "linear":
        ok = nd - 1 not in axes
    elif isinstance(m, nn.LayerNorm) or name == "layer_norm":
        norm = m.normalized_shape if m is not None else node.args[1]
        ok = not axes & set(range(nd - len(norm), nd))
    else:
        ok = (isinstance(m, t["point_mod"]) or node.target in t["point_fn"] or node.target in t["binary"]
              or name in _POINT_METHODS or name in ("stochastic_depth", "drop_path"))
    if not ok:
        return _Bad(f"{where}: H and W are permuted to axes {hw}, and "
                    f"{type(m).__name__ if m is not None else name} is not pointwise over them: "
                    "the output is not spatial")
    moved[node] = hw
    return _merge(srcs, None, where)


def _fx_rule(node: Any, val: Callable[[Any], Value], shape: Callable[[Any], Any], gm: Any,
             t: dict[str, Any], moved: dict[Any, Pair]) -> Value:
    op, tgt, where = node.op, node.target, node.name
    if op not in ("call_module", "call_function", "call_method"):
        return None
    srcs = [(val(a), shape(a)) for a in node.all_input_nodes]
    if all(s[0] is None for s in srcs):
        return None
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    v, in_shape = (val(x), shape(x)) if hasattr(x, "op") else (None, None)
    name = tgt if isinstance(tgt, str) else getattr(tgt, "__name__", str(tgt))
    where = f"{where} ({name})"
    if isinstance(v, ReceptiveField) and (x in moved or name in ("permute", "transpose")):
        r = _hw_axes_rule(node, x, v, srcs, shape, gm, t, moved, where)
        if r is not _UNHANDLED:
            return r
    if op == "call_module":
        return _module_rule(gm.get_submodule(tgt), v, in_shape, shape(node), node.name, t)
    if tgt is operator.getitem:
        src_shape = shape(x)
        if isinstance(src_shape, list | tuple) and src_shape and not isinstance(src_shape[0], int):
            return v  # an item of a tuple output (chunk/split of channels)
        return _layout(v, in_shape, shape(node), where)
    if tgt in t["binary"] or tgt in t["cat"] or (op == "call_method" and tgt in _POINT_METHODS):
        if tgt in t["cat"]:
            parts = node.args[0] if node.args else node.kwargs["tensors"]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            nd = len(shape(node))
            if dim % nd >= nd - 2:
                return _Bad(f"{where}: concatenation along a spatial axis")
            srcs = [(val(a), shape(a)) for a in parts]
        return _merge(srcs, shape(node), where)
    if tgt in t["point_fn"] or name in ("stochastic_depth", "drop_path"):
        return _merge(srcs, shape(node), where)
    if isinstance(v, _Bad) or v is None:
        return v
    if tgt in t["pool_fn"]:
        keys = t["pool_fn"][tgt]
        a = _bind(node, keys, {"stride": None, "padding": 0, "dilation": 1})
        return v.then(a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"], a["dilation"])
    if tgt in t["adaptive_fn"]:
        return _adaptive(v, _spatial(in_shape), _spatial(shape(node)), where)
    if tgt is t["conv_fn"]:
        a = _bind(node, ("weight", "bias", "stride", "padding", "dilation"), {"stride": 1, "padding": 0, "dilation": 1})
        k, d = _pair(shape(a["weight"])[2:]), _pair(a["dilation"])
        return v.then(k, a["stride"], _conv_padding(a["padding"], k, d), d)
    if tgt is t["pad_fn"]:
        left, _, top, _ = _pair4(_bind(node, ("pad",), {})["pad"])
        return v.then(1, 1, (top, left))
    if tgt in t["reduce_fn"] or (op == "call_method" and tgt in ("mean", "sum", "amax")):
        dims = _bind(node, ("dim",), {"dim": None})["dim"]
        nd = len(in_shape)
        dims = set(range(nd)) if dims is None else {d % nd for d in ((dims,) if isinstance(dims, int) else dims)}
        k = (in_shape[-2] if nd - 2 in dims else 1, in_shape[-1] if nd - 1 in dims else 1)
        return v.globalised(k, where) if k != (1, 1) else v
    if tgt in t["layout_fn"] or (op == "call_method" and tgt in _LAYOUT_METHODS):
        return _layout(v, in_shape, shape(node), where)
    return _Bad(f"{where}: ConvLens does not know the spatial geometry of '{name}'")


def _first_proxy(out: Any) -> Any:
    import torch.fx as fx

    if isinstance(out, fx.Proxy):
        return out.node
    if isinstance(out, list | tuple):
        for o in out:
            n = _first_proxy(o)
            if n is not None:
                return n
    if isinstance(out, dict):
        return _first_proxy(list(out.values()))
    return None


def _example(module: Any, input_size: Pair, in_channels: int | None) -> Any:
    import torch
    from torch import nn

    p = next(iter(module.parameters()), None)
    if in_channels is None:
        conv = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
        in_channels = conv.in_channels if conv is not None else 3
    return torch.zeros(1, in_channels, *input_size, dtype=p.dtype if p is not None else torch.float32,
                       device=p.device if p is not None else "cpu")


def _shapes_of(out: Any) -> Any:
    """A tensor's shape, a list of shapes for a tuple/list of tensors, else None."""
    if hasattr(out, "shape") and hasattr(out, "dim"):
        return tuple(out.shape)
    if isinstance(out, list | tuple):
        return [_shapes_of(o) for o in out]
    return None


def _fx_values(module: Any, x: Any) -> dict[str, Value]:
    import torch
    import torch.fx as fx

    module_out: dict[str, Any] = {}

    class Tracer(fx.Tracer):
        def call_module(self, m: Any, forward: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_module(m, forward, args, kwargs)
            try:
                name = self.path_of_module(m)
            except NameError:
                return out
            node = _first_proxy(out)
            if name and node is not None:
                module_out[name] = node
            return out

    tracer = Tracer()
    graph = tracer.trace(module)
    gm = fx.GraphModule(tracer.root, graph)
    failed: dict[Any, str] = {}

    class Shapes(fx.Interpreter):
        """Records each node's output shape; a node that fails (the layers after the asked one
        may not accept this input size) and everything after it is marked, not fatal."""

        def run_node(self, n: Any) -> Any:
            bad = next((failed[a] for a in n.all_input_nodes if a in failed), None)
            if bad is None:
                try:
                    out = super().run_node(n)
                    n.meta["convlens_shape"] = _shapes_of(out)
                    return out
                except Exception as e:  # noqa: BLE001 - reported only if the asked layer needs it
                    bad = f"{n.name} fails on a {tuple(x.shape[2:])} input ({' '.join(str(e).split())[:150]})"
            failed[n] = bad
            return None

    with torch.no_grad():
        Shapes(gm).run(x)

    def shape(n: Any) -> Any:
        return n.meta.get("convlens_shape") if hasattr(n, "meta") else None

    tables, values, moved = _torch_tables(), {}, {}
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]

    def val(n: Any) -> Value:
        return values.get(n) if hasattr(n, "op") else None

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            values[n] = ReceptiveField() if n is inputs[0] else None
        elif n in failed:
            values[n] = _Bad(failed[n])
        elif n.op != "output":
            try:
                values[n] = _fx_rule(n, val, shape, gm, tables, moved)
            except (ReceptiveFieldError, ArithmeticError, TypeError, ValueError, IndexError) as e:
                values[n] = _Bad(f"{n.name}: {e}")
    return {name: values[node] for name, node in module_out.items()}


def _hook_values(module: Any, x: Any, reason: str) -> dict[str, Value]:
    """Fallback for models fx cannot trace: follow the chain of leaf modules by tensor identity."""
    import torch

    t, known, keep, last = _torch_tables(), {id(x): (ReceptiveField(), x._version)}, [x], ["the input"]
    values: dict[str, Value] = {}
    pending: dict[str, Value] = {}
    leaves = {n: m for n, m in module.named_modules() if n and not list(m.children())}
    handles = []

    def pre(name: str) -> Callable[..., None]:
        def hook(m: Any, args: Any) -> None:
            a = args[0] if args else None
            entry = known.get(id(a)) if isinstance(a, torch.Tensor) else None
            if entry is None or entry[1] != a._version:
                pending[name] = _Bad(f"{name}: its input comes from an operation outside modules (after "
                                    f"{last[0]}), and fx could not trace the model ({reason})")
            else:
                pending[name] = entry[0]
            keep.append(a)
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(m: Any, args: Any, out: Any) -> None:
            o = out if isinstance(out, torch.Tensor) else None
            if name in leaves:
                try:
                    values[name] = _module_rule(m, pending.pop(name), tuple(args[0].shape), tuple(o.shape) if o is not None else None, name, t)
                except ReceptiveFieldError as e:
                    values[name] = _Bad(str(e))
                last[0] = f"'{name}'"
            elif o is None or id(o) not in known or known[id(o)][1] != o._version:
                values[name] = _Bad(f"{name}: its output is not the output of one of its modules "
                                    f"and fx could not trace the model ({reason})")
            else:
                values[name] = known[id(o)][0]
            if o is not None:
                known[id(o)] = (values[name], o._version)
                keep.append(o)
        return hook

    try:
        for name, m in module.named_modules():
            if name:
                if name in leaves:
                    handles.append(m.register_forward_pre_hook(pre(name)))
                handles.append(m.register_forward_hook(post(name)))
        with torch.no_grad():
            module(x)
    except Exception as e:  # noqa: BLE001 - the layers that ran before it keep their fields
        msg = f"the forward pass fails on a {tuple(x.shape[2:])} input ({' '.join(str(e).split())[:150]})"
        values.update({n: _Bad(msg) for n, _ in module.named_modules() if n and n not in values})
    finally:
        for h in handles:
            h.remove()
    return values


def _torch_values(module: Any, input_size: Pair, in_channels: int | None) -> dict[str, Value]:
    import torch

    if isinstance(module, torch.jit.ScriptModule):
        raise ReceptiveFieldError("a TorchScript model cannot be traced for its geometry; "
                                  "export it to ONNX or load its state dict with --arch")
    if any(m.training for m in module.modules()):  # never touch the model's BatchNorm statistics
        import copy

        module = copy.deepcopy(module).eval()
    x = _example(module, _pair(input_size), in_channels)
    try:
        return _fx_values(module, x)
    except (TypeError, ValueError, RuntimeError, NameError, AttributeError) as e:
        return _hook_values(module, x, " ".join(str(e).split())[:200])


def _pick(values: Mapping[str, Value], layer: str, what: str) -> ReceptiveField:
    if layer not in values:
        near = ", ".join(list(values)[:12])
        raise ReceptiveFieldError(f"{what}: no layer '{layer}' on the path of the forward pass (layers: {near}, ...)")
    v = values[layer]
    if isinstance(v, _Bad):
        raise ReceptiveFieldError(f"{what}: layer '{layer}' has no receptive field: {v.msg}")
    if v is None:
        raise ReceptiveFieldError(f"{what}: layer '{layer}' does not depend on the input image")
    return v


def receptive_fields(module: Any, input_size: Any = (224, 224), in_channels: int | None = None) -> dict[str, ReceptiveField]:
    """Field of every named module of an eager model whose output has one (execution order)."""
    return {k: v for k, v in _torch_values(module, input_size, in_channels).items() if isinstance(v, ReceptiveField)}


def receptive_field(module: Any, layer: str, input_size: Any = (224, 224), in_channels: int | None = None) -> ReceptiveField:
    """Field of the output of module ``layer`` (its last call) for an ``(H, W)`` input."""
    return _pick(_torch_values(module, input_size, in_channels), layer, type(module).__name__)


# ---------------------------------------------------------------------------- ONNX

def onnx_layer_tensors(model: Any) -> dict[str, str]:
    """Layer name -> tensor name, as :class:`OnnxBackend` names layers (PyTorch scopes, else
    node outputs)."""
    import json

    from ..backends.onnx_backend import _normalise_repeats, _scope_path

    graph, out = model.graph, {}
    meta = {p.key: p.value for p in model.metadata_props}
    scopes = {n.name: _scope_path(n.name) for n in graph.node}
    known = set(json.loads(meta["convlens.modules"])) if "convlens.modules" in meta else set()
    known = known or {".".join(s.split(".")[: j + 1]) for s in scopes.values() if s for j in range(s.count(".") + 1)}
    for node in graph.node:
        scope = _normalise_repeats(scopes[node.name], known) if node.op_type != "Constant" and node.output else ""
        parts = scope.split(".") if scope else []
        for j in range(1, len(parts) + 1):
            out.pop(".".join(parts[:j]), None)
            out[".".join(parts[:j])] = node.output[0]
    if not out:
        outs = {o.name for o in graph.output}
        out = {n.output[0]: n.output[0] for n in graph.node
               if n.op_type != "Constant" and n.output and n.output[0] not in outs}
    return out


_ONNX_POINT = {"Relu", "PRelu", "LeakyRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid",
               "HardSwish", "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Abs",
               "Neg", "Sqrt", "Reciprocal", "Pow", "Floor", "Ceil", "Round", "Sign", "Cast", "Identity",
               "Dropout", "BatchNormalization", "LRN", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum",
               "Mean", "Where", "Equal", "Greater", "Less", "And", "Or", "Not", "ThresholdedRelu"}
_ONNX_NORM = {"InstanceNormalization", "GroupNormalization", "LayerNormalization", "MeanVarianceNormalization"}
_ONNX_LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Expand", "Split", "Transpose"}
_ONNX_NONE = {"Shape", "Size", "Constant", "ConstantOfShape", "Range"}


def _onnx_values(model: Any, input_size: Any) -> dict[str, Value]:
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consts = dict(init)
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    image = [i for i in graph.input if i.name not in init][0]
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if input_size is not None:
        dims = [i for i in m.graph.input if i.name == image.name][0].type.tensor_type.shape.dim
        for d, size in zip(dims[2:], _pair(input_size), strict=False):
            d.ClearField("dim_param")
            d.dim_value = size
    shapes: dict[str, Any] = {}
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # noqa: BLE001 - rules that need a shape then say so
        pass
    for vi in [*m.graph.value_info, *m.graph.input, *m.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[vi.name] = (1, *(d.dim_value for d in dims[1:]))
    shapes.update({k: a.shape for k, a in consts.items()})
    values: dict[str, Value] = {image.name: ReceptiveField()}
    for node in graph.node:
        if node.op_type != "Constant" and node.input and all(i in consts or not i for i in node.input) \
                and sum(consts[i].size for i in node.input if i) < 4096:  # fold small constant subgraphs
            try:
                from onnx.reference import ReferenceEvaluator

                outs = ReferenceEvaluator(node).run(None, {i: consts[i] for i in node.input if i})
                consts.update(zip(node.output, outs, strict=False))
            except Exception:  # noqa: BLE001 - an op the reference runtime lacks: left unfolded
                pass
        where = f"{node.op_type} node '{node.name or node.output[0]}'"
        try:
            v = _onnx_rule(node, values, shapes, consts, where, helper)
        except (ReceptiveFieldError, ArithmeticError, TypeError, ValueError, IndexError, KeyError) as e:
            v = _Bad(f"{where}: {e}")
        for o in node.output:
            values[o] = v
    return values


def _onnx_rule(node: Any, values: dict[str, Value], shapes: dict[str, Any], consts: dict[str, Any],
               where: str, helper: Any) -> Value:
    op, attrs = node.op_type, {a.name: helper.get_attribute_value(a) for a in node.attribute}
    srcs = [(values.get(i), shapes.get(i)) for i in node.input if i]
    if op in _ONNX_NONE or all(s[0] is None for s in srcs):
        return None
    x = node.input[0]
    v, in_shape, out_shape = values.get(x), shapes.get(x), shapes.get(node.output[0])
    if op in _ONNX_POINT:
        return _merge(srcs, out_shape, where)
    if op == "Concat":
        nd = len(out_shape) if out_shape is not None else 4
        if attrs["axis"] % nd >= nd - 2:
            return _Bad(f"{where}: concatenation along a spatial axis")
        return _merge(srcs, out_shape, where)
    if op in ("Softmax", "LogSoftmax") and attrs.get("axis", -1) % 4 == 1:
        return _merge(srcs, out_shape, where)
    if isinstance(v, _Bad) or v is None:
        return v
    in_sp = _spatial(in_shape)
    if op in ("Conv", "MaxPool", "AveragePool", "LpPool"):
        k = _pair(attrs.get("kernel_shape") or consts[node.input[1]].shape[2:])
        s, d = _pair(attrs.get("strides", 1)), _pair(attrs.get("dilations", 1))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            p = _same_begin(k, s, d, in_sp, auto == "SAME_UPPER", where)
        else:
            p = (0, 0) if auto == "VALID" else _pair(attrs.get("pads", [0, 0])[:2])
        return v.then(k, s, p, d)
    if op in ("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"):
        if in_sp is None:
            raise ReceptiveFieldError("the map size is unknown (pass input_size)")
        return v.globalised(in_sp, where)
    if op.startswith("Reduce"):
        axes = attrs.get("axes")
        if axes is None and len(node.input) > 1:
            axes = consts[node.input[1]].tolist()
        nd = len(in_shape)
        axes = set(range(nd)) if axes is None else {a % nd for a in axes}
        k = (in_shape[-2] if nd - 2 in axes else 1, in_shape[-1] if nd - 1 in axes else 1)
        return v.globalised(k, where) if k != (1, 1) else v
    if op == "Pad":
        pads = list(attrs["pads"]) if "pads" in attrs else consts[node.input[1]].tolist()
        nd = len(pads) // 2
        return v.then(1, 1, (pads[nd - 2], pads[nd - 1]))
    if op in _ONNX_NORM:
        return v.noted(f"{where}: normalises over the map; its statistics are ignored")
    if op in _ONNX_LAYOUT:
        perm = attrs.get("perm")
        keeps = perm is None or list(perm[-2:]) == [len(perm) - 2, len(perm) - 1]
        return _layout(v, in_shape, out_shape, where, keeps)
    if op in ("Gemm", "MatMul"):
        return _Bad(f"{where}: not spatial; layers after it have no receptive field")
    return _Bad(f"{where}: ConvLens does not know the spatial geometry of {op}")


def _onnx_proto(model: Any) -> tuple[Any, str]:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, "the ONNX model"
    try:
        return onnx.load(str(model), load_external_data=False), str(model)
    except Exception as e:  # noqa: BLE001
        raise ReceptiveFieldError(f"{model}: cannot read the ONNX model ({' '.join(str(e).split())[:200]})") from e


def receptive_fields_onnx(model: Any, input_size: Any = None,
                          tensor_of: Mapping[str, str] | None = None) -> dict[str, ReceptiveField]:
    """Field of every layer of an ONNX model that has one, by layer name (``tensor_of``,
    default :func:`onnx_layer_tensors`)."""
    proto, _ = _onnx_proto(model)
    values = _onnx_values(proto, input_size)
    names = tensor_of if tensor_of is not None else onnx_layer_tensors(proto)
    return {k: v for k, t in names.items() if isinstance(v := values.get(t), ReceptiveField)}


def receptive_field_onnx(model: Any, layer: str, input_size: Any = None,
                         tensor_of: Mapping[str, str] | Callable[[str], str] | None = None) -> ReceptiveField:
    """Field of an ONNX layer: a backend layer name (``tensor_of``: a mapping or a function such
    as ``OnnxBackend.tensor_name``; default :func:`onnx_layer_tensors`) or a tensor name.
    ``model`` is a path or a ``ModelProto``; ``input_size`` ``(H, W)`` fixes dynamic sizes."""
    proto, what = _onnx_proto(model)
    values = _onnx_values(proto, input_size)
    try:
        tensor = tensor_of(layer) if callable(tensor_of) else (tensor_of or onnx_layer_tensors(proto))[layer]
    except KeyError:
        if layer not in values:
            raise ReceptiveFieldError(f"{what}: no layer or tensor '{layer}'") from None
        tensor = layer
    return _pick(values, tensor, what)


def layer_receptive_field(backend: Any, layer: str) -> ReceptiveField:
    """Field of a backend's layer, at the input size of its model description."""
    size = backend.spec.preprocess.input_size
    if hasattr(backend, "tensor_name"):  # ONNX Runtime
        return receptive_field_onnx(getattr(backend, "_model", None) or backend.path, layer, size,
                                    backend.tensor_name)
    return receptive_field(backend.module, layer, size, backend.spec.preprocess.n_channels)
