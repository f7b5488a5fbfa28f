"""Exact receptive fields of spatial layers, from the conv/pool geometry of eager torch modules,
unflattened ``torch.export`` programs and ONNX graphs.

**Convention.** Input pixel ``(y, x)`` has its centre at ``(y, x)`` (it covers
``[y - 0.5, y + 0.5]``). A :class:`ReceptiveField` describes every output position of one layer:
position ``(i, j)`` is centred at ``offset + (i, j) * stride`` input pixels and sees the
``size[0] x size[1]`` input pixels around that centre. ``box(i, j)`` gives them as half-open
integer bounds ``(top, left, bottom, right)`` (``img[top:bottom, left:right]``); it may reach
into the padding beyond the image, and ``clipped_box`` clips it to the image. That clipped box is
exactly the bounding box of the pixels that influence the unit (tested against gradients),
except at a border where some window on the way lies wholly in padding (padding >= kernel span)
or a dilated kernel's taps step over the border: fewer pixels count there, and the box is a
superset.

**Composition** (per axis; Araujo et al., "Computing receptive fields of CNNs", Distill 2019):
``jump' = jump * s``, ``size' = size + (k - 1) * d * jump``,
``start' = start + ((k - 1) * d / 2 - p) * jump``, where ``start`` is the centre of position 0 and
``p`` the padding *before* the first row/column. Padding after the last one (asymmetric
``'same'``, ``ceil_mode``) only adds positions; it does not move them.

**Graph rules.** Convolutions, pools and pads compose as above (``padding='same'/'valid'``,
tuples, ONNX ``pads``/``auto_pad``, dilation). Pointwise ops (BatchNorm, activations, Dropout,
casts) keep the field. Element-wise ops and channel concatenation take the union of their
branches, which must share the stride (misaligned centres are noted). A global pool
(AdaptiveAvgPool to 1x1, GlobalAveragePool, a mean over H and W) makes the field the whole input,
flagged ``is_global``. A spatially constant operand (a squeeze-excitation gate,
``x * sigmoid(fc(pool(x)))``) is ignored with a note: strictly every position then depends on
every pixel. Normalisations over the map (GroupNorm, InstanceNorm) count as pointwise, noted.
Channels-last blocks (permute, LayerNorm/Linear over channels, permute back, as in ConvNeXt)
keep the field. Flatten, Linear over W, upsampling and unknown ops have none: asking for a layer
that depends on one raises :class:`ReceptiveFieldError` naming the op.

Eager models are traced with torch.fx (the module's output is that of its last call, as the
backends capture it); a model fx cannot trace falls back to hooks on its leaf modules, which
works when the layer is reached through a chain of modules. ONNX layers are named as
:class:`~engine.backends.onnx_backend.OnnxBackend` names them (:func:`onnx_layer_tensors`), or
by tensor name. :func:`layer_receptive_field` takes either backend.

Use::

    rf = receptive_field(module, "layer3", input_size=(224, 224))     # or receptive_fields(module)
    rf = receptive_field_onnx("model.onnx", "layer3", (224, 224))      # or receptive_fields_onnx
    rf = layer_receptive_field(backend, "layer3")                      # TorchBackend or OnnxBackend
    top, left, bottom, right = rf.clipped_box(i, j, (224, 224))       # pixels of unit (i, j)

Each call traces the whole model once: ask for all layers at once (``receptive_fields*``) when
several are needed.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..types import ConvLensError

Pair = tuple[int, int]


class ReceptiveFieldError(ConvLensError):
    """A layer has no receptive field geometry (non-spatial, upsampling, unknown op, ...)."""


def _pair(v: Any) -> Pair:
    t = (int(v),) if isinstance(v, int | float) else tuple(int(x) for x in v)
    return (t[0], t[0]) if len(t) == 1 else (t[0], t[1])


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
        """:meth:`box` clipped to an image of ``(height, width)`` (empty if bottom <= top)."""
        top, left, bottom, right = self.box(i, j)
        return (max(top, 0), max(left, 0), min(bottom, image_size[0]), min(right, image_size[1]))

    def then(self, kernel: Any = 1, stride: Any = 1, padding: Any = 0, dilation: Any = 1) -> ReceptiveField:
        """The field after a conv/pool of this geometry; ``padding`` is the padding before the
        first row and column (an int or ``(top, left)``)."""
        k, s, p, d = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
        j = self.stride
        return replace(self, size=(self.size[0] + (k[0] - 1) * d[0] * j[0], self.size[1] + (k[1] - 1) * d[1] * j[1]),
                       stride=(j[0] * s[0], j[1] * s[1]),
                       offset=(self.offset[0] + ((k[0] - 1) * d[0] / 2 - p[0]) * j[0],
                               self.offset[1] + ((k[1] - 1) * d[1] / 2 - p[1]) * j[1]))

    def union(self, other: ReceptiveField, where: str = "") -> ReceptiveField:
        """The smallest field holding both (branches that are added, multiplied or concatenated)."""
        if self.stride != other.stride:
            raise ReceptiveFieldError(f"{where}: branches with different strides {self.stride} and "
                                      f"{other.stride} meet; their positions do not correspond")
        lo = [min(f.offset[a] - (f.size[a] - 1) / 2 for f in (self, other)) for a in (0, 1)]
        hi = [max(f.offset[a] + (f.size[a] - 1) / 2 for f in (self, other)) for a in (0, 1)]
        out = ReceptiveField((round(hi[0] - lo[0]) + 1, round(hi[1] - lo[1]) + 1), self.stride,
                             ((lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2), self.is_global or other.is_global,
                             self.notes).noted(*other.notes)
        if self.offset != other.offset:
            out = out.noted(f"{where}: branches are misaligned (centres {self.offset} and {other.offset}); "
                            "the field is their union")
        return out

    def noted(self, *notes: str) -> ReceptiveField:
        return replace(self, notes=self.notes + tuple(n for n in notes if n not in self.notes))

    def globalised(self, kernel: Pair, where: str) -> ReceptiveField:
        """After pooling ``kernel`` positions into one: the union of all of them."""
        return replace(self.then(kernel, kernel), is_global=True).noted(
            f"{where}: a global pool; each position sees the whole input")


@dataclass(frozen=True)
class _Bad:
    """Why a tensor has no field; raised only if the asked layer depends on it."""

    msg: str


Value = ReceptiveField | _Bad | None  # None: the tensor does not depend on the input image


def _spatial(shape: Any) -> Pair | None:
    if isinstance(shape, list):  # a tuple of tensors (chunk, split): the first
        shape = shape[0] if shape else None
    return (int(shape[-2]), int(shape[-1])) if shape is not None and len(shape) >= 3 else None


def _merge(srcs: list[tuple[Value, Any]], out_shape: Any, where: str) -> Value:
    """Union of the operands that depend on the input; spatially constant ones are gates."""
    out_sp, fields = _spatial(out_shape), []
    gate = False
    for v, shape in srcs:
        sp = _spatial(shape)
        if v is not None and out_sp is not None and math.prod(out_sp) > 1 and (sp is None or math.prod(sp) == 1):
            gate = True
        elif isinstance(v, _Bad):
            return v
        elif v is not None:
            fields.append(v)
    if not fields:
        return None
    rf = fields[0]
    for f in fields[1:]:
        rf = rf.union(f, where)
    return rf.noted(f"{where}: a spatially constant operand (e.g. a squeeze-excitation gate) is ignored; "
                    "strictly it depends on the whole input") if gate else rf


def _apply(kind: str, arg: Any, srcs: list[tuple[Value, Any]], v: Value, hw: Pair | None,
           in_shape: Any, out_shape: Any, where: str) -> tuple[Value, Pair | None]:
    """One op's rule, shared by torch and ONNX. ``hw``: the axes of H and W in the input when a
    permutation moved them (None: the last two). Returns the output's value and its ``hw``."""
    nd = next((len(t) for t in (in_shape, out_shape) if isinstance(t, tuple)), 4)
    if kind == "permute" and isinstance(v, ReceptiveField):
        h, w = hw or (nd - 2, nd - 1)
        perm = [p % nd for p in arg]
        new = (perm.index(h), perm.index(w))
        return v, (None if new == (nd - 2, nd - 1) else new)
    if hw is not None:  # channels last: only ops over the other axes
        touched = {"point": set(), "linear": {nd - 1}, "layernorm": set(range(nd - (arg or 1), nd))}.get(kind)
        if touched is None or touched & set(hw):
            return _Bad(f"{where}: H and W are permuted to axes {hw}, and this op is not pointwise over "
                        "them: the output is not spatial"), None
        return (_merge(srcs, None, where) if kind == "point" else v), hw
    if kind == "none":
        return None, None
    if kind == "point":
        return _merge(srcs, out_shape, where), None
    if kind == "cat":
        return (_merge(srcs, out_shape, where) if arg % nd < nd - 2 else
                _Bad(f"{where}: concatenation along a spatial axis")), None
    if not isinstance(v, ReceptiveField):
        return v, None
    in_sp, out_sp = _spatial(in_shape), _spatial(out_shape)
    if kind == "window":
        return v.then(*arg), None
    if kind in ("adaptive", "global", "reduce"):
        if in_sp is None:
            raise ReceptiveFieldError("pooling over a map of unknown size (pass input_size)")
        if kind == "reduce":  # arg: the reduced axes (None: all)
            axes = set(range(nd)) if arg is None else {a % nd for a in ([arg] if isinstance(arg, int) else arg)}
            k = (in_sp[0] if nd - 2 in axes else 1, in_sp[1] if nd - 1 in axes else 1)
            return (v.globalised(k, where) if k != (1, 1) else v), None
        if kind == "global" or out_sp == (1, 1):
            return v.globalised(in_sp, where), None
        if out_sp is None or in_sp[0] % out_sp[0] or in_sp[1] % out_sp[1]:
            raise ReceptiveFieldError(f"adaptive pooling {in_sp} -> {out_sp} has bins of unequal size")
        k = (in_sp[0] // out_sp[0], in_sp[1] // out_sp[1])
        return v.then(k, k), None
    if kind in ("layout", "item"):
        if kind == "item" or (in_sp is not None and in_sp == out_sp):
            return v, None
        return _Bad(f"{where}: the output is not spatial (H and W flattened, reshaped or sliced)"), None
    if kind in ("norm", "layernorm"):  # channels first, a LayerNorm's last axes include W
        return v.noted(f"{where}: normalises over the map; its statistics are ignored"), None
    if kind in ("linear", "flat"):
        return _Bad(f"{where}: not spatial; layers after it have no receptive field"), None
    if kind == "bad":
        return _Bad(f"{where}: {arg}"), None
    return _Bad(f"{where}: ConvLens does not know the spatial geometry of {arg}"), None


# ---------------------------------------------------------------------------- eager torch

_POINT = frozenset((
    "relu", "relu6", "leaky_relu", "rrelu", "elu", "selu", "celu", "gelu", "silu", "mish", "hardswish",
    "hardsigmoid", "hardtanh", "sigmoid", "tanh", "softplus", "softsign", "prelu", "threshold",
    "dropout", "dropout2d", "feature_dropout", "alpha_dropout", "batch_norm", "native_batch_norm",
    "_native_batch_norm_legit_no_training", "local_response_norm", "clamp", "clip", "clamp_min",
    "clamp_max", "abs", "neg", "exp", "log", "sqrt", "rsqrt", "square", "reciprocal", "sign", "erf",
    "pow", "float", "double", "half", "to", "type_as", "clone", "detach", "contiguous", "_to_copy",
    "alias", "masked_fill", "stochastic_depth", "drop_path", "add", "sub", "rsub", "mul", "div",
    "truediv", "iadd", "isub", "imul", "itruediv", "maximum", "minimum", "where", "lift_fresh_copy",
))
_LAYOUT = frozenset((
    "flatten", "reshape", "view", "_unsafe_view", "squeeze", "unsqueeze", "chunk", "split",
    "split_with_sizes", "unbind", "expand", "expand_as", "view_as", "reshape_as", "unflatten", "slice",
    "select", "narrow", "getitem",
))
_POOLS = {"max_pool2d": ("kernel_size", "stride", "padding", "dilation"),
          "max_pool2d_with_indices": ("kernel_size", "stride", "padding", "dilation"),
          "avg_pool2d": ("kernel_size", "stride", "padding")}


def _op_name(target: Any) -> str:
    if isinstance(target, str):
        name = target
    elif hasattr(target, "_schema"):  # an aten op (torch.export programs)
        name = target._schema.name.split("::")[-1]
    else:
        name = getattr(target, "__name__", str(target))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _pad_begin(pad: Any) -> Pair:
    """(top, left) of torch's pad order (left, right[, top, bottom])."""
    p = [pad] * 4 if isinstance(pad, int) else list(pad)
    return (p[2] if len(p) >= 4 else 0, p[0])


def _conv_padding(padding: Any, k: Pair, d: Pair) -> Pair:
    if padding == "valid":
        return (0, 0)
    if padding == "same":  # torch pads total // 2 before, the rest after
        return ((k[0] - 1) * d[0] // 2, (k[1] - 1) * d[1] // 2)
    return _pair(padding)


def _module_op(m: Any) -> tuple[str, Any]:
    from torch import nn

    if isinstance(m, nn.Conv2d):
        k, d = _pair(m.kernel_size), _pair(m.dilation)
        return "window", (k, m.stride, _conv_padding(m.padding, k, d), d)
    if isinstance(m, nn.MaxPool2d | nn.AvgPool2d | nn.LPPool2d):
        return "window", (m.kernel_size, m.stride or m.kernel_size, getattr(m, "padding", 0), getattr(m, "dilation", 1))
    if isinstance(m, nn.AdaptiveAvgPool2d | nn.AdaptiveMaxPool2d):
        return "adaptive", None
    if isinstance(m, nn.ZeroPad2d | nn.ConstantPad2d | nn.ReflectionPad2d | nn.ReplicationPad2d):
        return "window", (1, 1, _pad_begin(m.padding), 1)
    if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.modules.dropout._DropoutNd | nn.Identity
                  | nn.LocalResponseNorm | nn.CrossMapLRN2d | nn.Softmax2d) or (
            type(m).__module__ == nn.modules.activation.__name__
            and not isinstance(m, nn.MultiheadAttention | nn.Softmax | nn.LogSoftmax | nn.Softmin | nn.GLU)):
        return "point", None
    if isinstance(m, nn.GroupNorm | nn.modules.instancenorm._InstanceNorm):
        return "norm", None
    if isinstance(m, nn.LayerNorm):
        return "layernorm", len(m.normalized_shape)
    if isinstance(m, nn.Linear):
        return "linear", None
    if isinstance(m, nn.Flatten | nn.Unflatten):
        return "layout", None
    return "unknown", type(m).__name__


def _function_op(node: Any, shape: Callable[[Any], Any]) -> tuple[str, Any]:
    name, args, kw = _op_name(node.target), node.args, node.kwargs

    def arg(i: int, key: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kw.get(key, default)

    if name == "getitem" and isinstance(shape(args[0]), list):
        return "item", None
    if name in _POINT:
        return "point", None
    if name in ("cat", "concat", "concatenate"):
        return "cat", arg(1, "dim", 0)
    if name in ("conv2d", "convolution"):
        if arg(6, "transposed", False):
            return "bad", "a transposed convolution upsamples; no receptive field geometry"
        k, d = _pair(shape(arg(1, "weight"))[2:]), _pair(arg(5, "dilation", 1))
        return "window", (k, arg(3, "stride", 1), _conv_padding(arg(4, "padding", 0), k, d), d)
    if name in _POOLS:
        a = {key: arg(i + 1, key) for i, key in enumerate(_POOLS[name])}
        return "window", (a["kernel_size"], a["stride"] or a["kernel_size"], a["padding"] or 0, a.get("dilation") or 1)
    if name in ("pad", "constant_pad_nd", "reflection_pad2d", "replication_pad2d"):
        return "window", (1, 1, _pad_begin(arg(1, "pad")), 1)
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_avg_pool2d"):
        return "adaptive", None
    if name in ("mean", "sum", "amax", "amin"):
        return "reduce", arg(1, "dim")
    if name in ("permute", "transpose", "t"):
        if name == "permute":
            rest = list(args[1:]) or list(kw.get("dims", ()))
            return "permute", list(rest[0]) if len(rest) == 1 and not isinstance(rest[0], int) else rest
        nd = len(shape(args[0]))
        a, b = (arg(1, "dim0", 0) % nd, arg(2, "dim1", 1) % nd)
        perm = list(range(nd))
        perm[a], perm[b] = b, a
        return "permute", perm
    if name in _LAYOUT:
        return "layout", None
    if name == "layer_norm":
        return "layernorm", len(arg(1, "normalized_shape"))
    if name in ("group_norm", "instance_norm"):
        return "norm", None
    if name == "linear":
        return "linear", None
    if name in ("mm", "addmm", "bmm", "matmul"):
        return "flat", None
    return "unknown", f"'{name}'"


def _shapes_of(out: Any) -> Any:
    """A tensor's shape, a list of shapes for a tuple/list of tensors, else None."""
    if hasattr(out, "shape") and hasattr(out, "dim"):
        return tuple(out.shape)
    return [_shapes_of(o) for o in out] if isinstance(out, list | tuple) else None


def _fx_values(module: Any, x: Any) -> dict[str, Value]:
    import torch
    from torch import fx
    from torch.export.unflatten import UnflattenedModule

    class ExportRoot(torch.nn.Module):  # runs an unflattened torch.export program's top graph
        def __init__(self, unflat: Any) -> None:
            super().__init__()
            self.m = unflat

        def forward(self, x: Any) -> Any:
            return fx.Interpreter(self.m, graph=self.m.graph).run(x, enable_io_processing=False)

    root, prefix = (ExportRoot(module), "m.") if isinstance(module, UnflattenedModule) else (module, "")
    module_out: dict[str, Any] = {}

    class Tracer(fx.Tracer):
        def call_module(self, m: Any, forward: Any, args: Any, kwargs: Any) -> Any:
            out = super().call_module(m, forward, args, kwargs)
            try:
                name = self.path_of_module(m)
            except NameError:
                return out
            outs = out if isinstance(out, list | tuple) else [out]
            first = next((o for o in outs if isinstance(o, fx.Proxy)), None)
            if name.startswith(prefix) and first is not None:
                module_out[name[len(prefix):]] = first.node
            return out

    tracer = Tracer()
    graph = tracer.trace(root)
    gm = fx.GraphModule(tracer.root, graph)
    failed: dict[Any, str] = {}

    class Shapes(fx.Interpreter):
        """Each node's output shape; a node that fails (layers after the asked one may not take
        this input size) and all after it are marked, not fatal."""

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
        return n.meta.get("convlens_shape") if isinstance(n, fx.Node) else None

    values: dict[Any, Value] = {}
    moved: dict[Any, Pair | None] = {}
    first_input = next(n for n in gm.graph.nodes if n.op == "placeholder")
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            values[n] = ReceptiveField() if n is first_input else None
        elif n in failed:
            values[n] = _Bad(failed[n])
        elif n.op in ("call_module", "call_function", "call_method") and shape(n) is not None:
            srcs = [(values.get(a), shape(a)) for a in n.all_input_nodes]
            x0 = n.args[0] if n.args else next(iter(n.kwargs.values()), None)
            where = n.name if n.op == "call_module" else f"{n.name} ({_op_name(n.target)})"
            try:
                kind, arg = _module_op(gm.get_submodule(n.target)) if n.op == "call_module" else _function_op(n, shape)
                hw = next((moved[a] for a in n.all_input_nodes if moved.get(a)), None)
                values[n], moved[n] = _apply(kind, arg, srcs, values.get(x0) if isinstance(x0, fx.Node) else None,
                                             hw, shape(x0), shape(n), where)
            except (ReceptiveFieldError, ArithmeticError, TypeError, ValueError, IndexError) as e:
                values[n] = _Bad(f"{where}: {e}")
    return {name: values.get(node) for name, node in module_out.items()}


def _hook_values(module: Any, x: Any, reason: str) -> dict[str, Value]:
    """Fallback for models fx cannot trace: follow the chain of leaf modules by tensor identity
    (an input that no module produced, or that was changed in place, has no known field)."""
    import torch

    known: dict[int, tuple[Value, int]] = {id(x): (ReceptiveField(), x._version)}
    values: dict[str, Value] = {}
    pending: dict[str, Value] = {}
    keep, last = [x], ["the input"]
    leaves = {n for n, m in module.named_modules() if n and not list(m.children())}

    def lookup(t: Any) -> Value | None:
        entry = known.get(id(t)) if isinstance(t, torch.Tensor) else None
        return entry[0] if entry is not None and entry[1] == t._version else None

    def pre(name: str) -> Callable[..., None]:
        def hook(m: Any, args: Any) -> None:
            v = lookup(args[0]) if args else None
            pending[name] = v if v is not None else _Bad(
                f"{name}: its input comes from an operation outside modules (after {last[0]}), "
                f"and fx could not trace the model ({reason})")
        return hook

    def post(name: str) -> Callable[..., None]:
        def hook(m: Any, args: Any, out: Any) -> None:
            o = out if isinstance(out, torch.Tensor) else None
            if name in leaves:
                kind, arg = _module_op(m)
                try:
                    values[name] = _apply(kind, arg, [(pending[name], tuple(args[0].shape))], pending.pop(name), None,
                                          tuple(args[0].shape), _shapes_of(o), name)[0]
                except ReceptiveFieldError as e:
                    values[name] = _Bad(f"{name}: {e}")
                last[0] = f"'{name}'"
            else:
                v = lookup(o)
                values[name] = v if v is not None else _Bad(
                    f"{name}: its output is not that of one of its modules, and fx could not trace "
                    f"the model ({reason})")
            if o is not None:
                known[id(o)] = (values[name], o._version)
                keep.append(o)
        return hook

    handles = []
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


def _torch_values(module: Any, input_size: Any, in_channels: int | None) -> dict[str, Value]:
    import copy

    import torch

    if isinstance(module, torch.jit.ScriptModule):
        raise ReceptiveFieldError("a TorchScript model cannot be traced for its geometry; export it "
                                  "to ONNX, or load its state dict with an architecture")
    from torch.export.unflatten import UnflattenedModule

    if not isinstance(module, UnflattenedModule) and any(m.training for m in module.modules()):
        module = copy.deepcopy(module).eval()  # never touch the model's BatchNorm statistics
    p = next(iter(module.parameters()), None)
    if in_channels is None:
        conv = next((m for m in module.modules() if isinstance(m, torch.nn.Conv2d)), None)
        in_channels = conv.in_channels if conv is not None else 3
    x = torch.zeros(1, in_channels, *_pair(input_size), dtype=p.dtype if p is not None else torch.float32,
                    device=p.device if p is not None else "cpu")
    try:
        return _fx_values(module, x)
    except (TypeError, ValueError, RuntimeError, NameError, AttributeError) as e:
        return _hook_values(module, x, " ".join(str(e).split())[:200])


def _pick(values: Mapping[str, Value], layer: str, what: str) -> ReceptiveField:
    if layer not in values:
        raise ReceptiveFieldError(f"{what}: no layer '{layer}' on the path of the forward pass "
                                  f"(layers: {', '.join(list(values)[:12])}, ...)")
    v = values[layer]
    if isinstance(v, _Bad):
        raise ReceptiveFieldError(f"{what}: layer '{layer}' has no receptive field: {v.msg}")
    if v is None:
        raise ReceptiveFieldError(f"{what}: layer '{layer}' does not depend on the input image")
    return v


def receptive_fields(module: Any, input_size: Any = (224, 224),
                     in_channels: int | None = None) -> dict[str, ReceptiveField]:
    """Field of every named module of an eager model whose output has one, by module name."""
    return {k: v for k, v in _torch_values(module, input_size, in_channels).items() if isinstance(v, ReceptiveField)}


def receptive_field(module: Any, layer: str, input_size: Any = (224, 224),
                    in_channels: int | None = None) -> ReceptiveField:
    """Field of the output of module ``layer`` for an ``(H, W)`` input (``in_channels``: default
    that of the first Conv2d)."""
    return _pick(_torch_values(module, input_size, in_channels), layer, type(module).__name__)


# ---------------------------------------------------------------------------- ONNX

def onnx_layer_tensors(model: Any) -> dict[str, str]:
    """Layer name -> tensor name, as :class:`OnnxBackend` names layers (PyTorch scopes: a
    module's output is its last node's; else every node output)."""
    import json

    from ..backends.onnx_backend import _normalise_repeats, _scope_path

    graph, out = model.graph, dict[str, str]()
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


_ONNX_POINT = frozenset((
    "Relu", "PRelu", "LeakyRelu", "Elu", "Selu", "Celu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish",
    "Tanh", "Softplus", "Softsign", "Gelu", "Mish", "Erf", "Exp", "Log", "Abs", "Neg", "Sqrt",
    "Reciprocal", "Pow", "Floor", "Ceil", "Round", "Sign", "Cast", "Identity", "Dropout",
    "BatchNormalization", "LRN", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where",
    "Equal", "Greater", "Less", "And", "Or", "Not", "ThresholdedRelu",
))
_ONNX_KINDS = {**dict.fromkeys(("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Expand", "Split"), "layout"),
               **dict.fromkeys(("GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"), "global"),
               **dict.fromkeys(("InstanceNormalization", "GroupNormalization", "MeanVarianceNormalization"), "norm"),
               **dict.fromkeys(("Shape", "Size", "Constant", "ConstantOfShape", "Range"), "none"), "Gemm": "flat"}


def _onnx_op(node: Any, attrs: dict[str, Any], consts: dict[str, Any], shapes: dict[str, Any],
             where: str) -> tuple[str, Any]:
    in_shape = shapes.get(node.input[0]) if node.input else None
    op = node.op_type
    if op in _ONNX_POINT or (op in ("Softmax", "LogSoftmax") and attrs.get("axis", -1) == 1):
        return "point", None
    if op in ("Conv", "MaxPool", "AveragePool", "LpPool"):
        k = _pair(attrs.get("kernel_shape") or shapes[node.input[1]][2:])
        s, d = _pair(attrs.get("strides", 1)), _pair(attrs.get("dilations", 1))
        auto = attrs.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto.startswith("SAME"):
            in_sp = _spatial(in_shape)
            if s == (1, 1):
                tot = [(k[a] - 1) * d[a] for a in (0, 1)]
            elif in_sp is None:
                raise ReceptiveFieldError("auto_pad SAME on a map of unknown size (pass input_size)")
            else:
                tot = [max((math.ceil(in_sp[a] / s[a]) - 1) * s[a] + (k[a] - 1) * d[a] + 1 - in_sp[a], 0)
                       for a in (0, 1)]
            p = tuple(t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in tot)
        else:
            p = (0, 0) if auto == "VALID" else _pair(attrs.get("pads", [0, 0])[:2])
        return "window", (k, s, p, d)
    if op == "Pad":
        pads = list(attrs["pads"]) if "pads" in attrs else consts[node.input[1]].tolist()
        return "window", (1, 1, (pads[len(pads) // 2 - 2], pads[len(pads) // 2 - 1]), 1)
    if op == "Concat":
        return "cat", attrs["axis"]
    if op.startswith("Reduce"):
        axes = attrs.get("axes")
        return "reduce", axes if axes is not None or len(node.input) < 2 else consts[node.input[1]].tolist()
    if op == "Transpose":
        return "permute", list(attrs["perm"])
    if op == "LayerNormalization":
        nd = len(in_shape) if in_shape is not None else 4
        return "layernorm", nd - attrs.get("axis", -1) % nd
    if op == "MatMul":
        return ("linear" if len(shapes.get(node.input[1]) or ()) == 2 else "flat"), None
    if op in _ONNX_KINDS:
        return _ONNX_KINDS[op], None
    return "unknown", op


def _onnx_values(model: Any, input_size: Any) -> dict[str, Value]:
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    graph = model.graph
    # weights only by their shape: no copy of them, for shape inference either
    init_dims = {i.name: tuple(i.dims) for i in graph.initializer}
    small = [i for i in graph.initializer if math.prod(i.dims) <= 4096]
    consts = {i.name: numpy_helper.to_array(i) for i in small}
    image = next(i for i in graph.input if i.name not in init_dims)
    declared = {i.name for i in graph.input}
    large = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in graph.initializer
             if i.name not in consts and i.name not in declared]
    light = helper.make_model(helper.make_graph(list(graph.node), graph.name, [*graph.input, *large], list(graph.output),
                                                small, value_info=list(graph.value_info)),
                              opset_imports=list(model.opset_import), ir_version=model.ir_version)
    light.functions.extend(model.functions)
    if input_size is not None:
        dims = next(i for i in light.graph.input if i.name == image.name).type.tensor_type.shape.dim
        for d, size in zip(dims[2:], _pair(input_size), strict=False):
            d.ClearField("dim_param")
            d.dim_value = size
    with contextlib.suppress(Exception):  # without shapes, the rules that need one say so
        light = onnx.shape_inference.infer_shapes(light, data_prop=True)
    shapes: dict[str, Any] = {}
    for vi in [*light.graph.value_info, *light.graph.input, *light.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims[1:]):
            shapes[vi.name] = (1, *(d.dim_value for d in dims[1:]))
    shapes.update(init_dims)
    values: dict[str, Value] = {image.name: ReceptiveField()}
    moved: dict[str, Pair | None] = {}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Constant" and "value" in attrs:
            consts[node.output[0]] = numpy_helper.to_array(attrs["value"])
        elif node.input and all(i in consts for i in node.input if i) and \
                sum(consts[i].size for i in node.input if i) < 4096:  # fold small constant subgraphs (pads)
            try:
                folded: Any = ReferenceEvaluator(node).run(None, {i: consts[i] for i in node.input if i})
                consts.update(zip(node.output, folded, strict=False))
            except Exception:  # noqa: BLE001, S110 - an op the reference runtime lacks: left unfolded
                pass
        where = f"{node.op_type} node '{node.name or node.output[0]}'"
        srcs = [(values.get(i), shapes.get(i)) for i in node.input if i]
        x0 = node.input[0] if node.input else ""
        try:
            if all(v is None for v, _ in srcs):
                v, hw = None, None
            else:
                kind, arg = _onnx_op(node, attrs, consts, shapes, where)
                hw = next((moved[i] for i in node.input if moved.get(i)), None)
                v, hw = _apply(kind, arg, srcs, values.get(x0), hw, shapes.get(x0), shapes.get(node.output[0]), where)
        except (ReceptiveFieldError, ArithmeticError, TypeError, ValueError, IndexError, KeyError) as e:
            v, hw = _Bad(f"{where}: {e}"), None
        for o in node.output:
            values[o], moved[o] = v, hw
    return values


def _onnx_proto(model: Any) -> tuple[Any, str]:
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model, "the ONNX model"
    try:
        return onnx.load(str(model), load_external_data=False), str(model)
    except Exception as e:  # any reader error: one clear message
        raise ReceptiveFieldError(f"{model}: cannot read the ONNX model ({' '.join(str(e).split())[:200]})") from e


def receptive_fields_onnx(model: Any, input_size: Any = None,
                          tensor_of: Mapping[str, str] | None = None) -> dict[str, ReceptiveField]:
    """Field of every layer of an ONNX model that has one, by layer name (``tensor_of``, default
    :func:`onnx_layer_tensors`)."""
    proto, _ = _onnx_proto(model)
    values = _onnx_values(proto, input_size)
    names = tensor_of if tensor_of is not None else onnx_layer_tensors(proto)
    return {k: v for k, t in names.items() if isinstance(v := values.get(t), ReceptiveField)}


def receptive_field_onnx(model: Any, layer: str, input_size: Any = None,
                         tensor_of: Mapping[str, str] | Callable[[str], str] | None = None) -> ReceptiveField:
    """Field of an ONNX layer: a backend layer name (``tensor_of``: a mapping, or a function such
    as ``OnnxBackend.tensor_name``; default :func:`onnx_layer_tensors`) or a tensor name.
    ``model``: a path or a ``ModelProto``; ``input_size`` ``(H, W)`` fixes dynamic sizes."""
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
    """Field of a backend's layer (torch or ONNX Runtime) at its model description's input size."""
    pre = backend.spec.preprocess
    if hasattr(backend, "tensor_name"):  # ONNX Runtime
        return receptive_field_onnx(getattr(backend, "_model", None) or backend.path, layer, pre.input_size,
                                    backend.tensor_name)
    return receptive_field(backend.module, layer, pre.input_size, pre.n_channels)
