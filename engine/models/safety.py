"""What a model file may do when ConvLens opens it: checks made *before* anything in it runs.

Opening a model must never run code the user did not ask for. Three formats carry more than
tensors, and each is inspected here before torch reads it:

- **TorchScript** archives hold code (``code/**/*.py``, TorchScript source). ``torch.jit.load``
  already runs some of it (a class's ``__setstate__``), so the source is parsed and every
  operator it names is checked before loading; after loading, the compiled graphs of every
  method of every submodule are checked again (:func:`check_script_module`).
- **torch.export** archives (``.pt2``) can hold pickles (weights or constants saved with
  pickle, sample inputs, custom objects), symbolic-shape expressions that torch evaluates with
  ``sympy.sympify`` (an ``eval``), guard code that torch ``exec``-s, and graph nodes whose
  target is any ``torch.*`` callable. :func:`check_export_archive` reads the archive's JSON and
  members itself: each pickle must be readable by torch's restricted ``weights_only`` unpickler,
  each expression must be plain arithmetic over shape symbols, guards must be empty, and every
  node target must be an allowed operator.
- **ONNX** models may name external-data files anywhere on disk and custom-operator domains
  (:func:`check_onnx_model`).

The operator rule, for TorchScript and torch.export alike: operators of the namespaces in
:data:`ALLOWED_NAMESPACES` (tensor maths), except :data:`DENIED_OPS` (operators that read or
write files or map memory, talk to other processes or machines). Anything else, a custom
operator in particular, is refused with a message naming it. The user may opt in per file with
``allow_pickle`` (``--allow-pickle``; GUI: "Allow pickled code"), which skips these checks.
"""

from __future__ import annotations

import ast
import io
import json
import os
import re
import stat
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..types import ConvLensError

#: operator namespaces that hold tensor maths only
ALLOWED_NAMESPACES = frozenset({"aten", "prim", "prims", "quantized", "_quantized", "higher_order", "profiler"})

#: operators of those namespaces that reach outside the process's tensors
DENIED_OPS = frozenset({
    "aten::from_file", "aten::save", "aten::_from_file",
    "prim::rpc_async", "prim::rpc_sync", "prim::rpc_remote",
    "prim::PythonOp", "debugprims::load_tensor",
})

OPT_IN = "If you trust where the file came from, open it with --allow-pickle (GUI: 'Allow pickled code')."


class ModelLoadError(ConvLensError):
    """A checkpoint could not be loaded. The message names the file and the cause."""


class UnsafeModelError(ModelLoadError):
    """A model file that would run code (or reach files) when opened; nothing of it was run."""


# ----------------------------------------------------------------------------- files


#: a model file larger than this is refused before reading (a stray disk image, /dev/zero...)
MAX_MODEL_BYTES = 64 << 30


def check_regular_file(path: str | os.PathLike[str], what: str = "model file") -> os.stat_result:
    """``path`` must be an existing regular file (not a FIFO, a device or a socket) of sane size.

    Opening a FIFO blocks forever and reading ``/dev/zero`` never ends, so the type is checked
    with ``stat`` before any ``open``.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConvLensError(f"{p}: no such file") from None
    except OSError as e:
        raise ConvLensError(f"{p}: cannot read this {what} ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConvLensError(f"{p}: is a folder, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a named pipe (FIFO)" if stat.S_ISFIFO(st.st_mode) else
                "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else
                "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise ConvLensError(f"{p}: is {kind}, not a {what}")
    if st.st_size > MAX_MODEL_BYTES:
        raise ConvLensError(f"{p}: {st.st_size / 2**30:.1f} GiB is larger than any {what} ConvLens "
                            f"opens ({MAX_MODEL_BYTES >> 30} GiB)")
    return st


# ----------------------------------------------------------------------------- operators


def op_problem(qualified: str) -> str | None:
    """Why operator ``ns::name`` may not run, or None if it may."""
    ns, _, name = qualified.partition("::")
    base = f"{ns}::{name.split('.', 1)[0]}"
    if base in DENIED_OPS:
        return f"operator {base} reaches outside the model (files, memory maps or other processes)"
    if ns not in ALLOWED_NAMESPACES:
        return f"operator {qualified} is a custom operator (namespace '{ns}'), not a tensor operator ConvLens knows"
    return None


def _refuse(path: Path, where: str, problem: str) -> UnsafeModelError:
    return UnsafeModelError(f"{path}: refused to open: {where}{problem}. Nothing in the file was run. {OPT_IN}")


# ----------------------------------------------------------------------------- TorchScript

#: submodules of ``torch`` whose functions TorchScript serialises as ``torch.<sub>.<fn>``, each
#: the aten operator ``<prefix><fn>``
_TORCH_SUBMODULES = {"linalg": "linalg_", "fft": "fft_", "special": "special_", "nn": "", "functional": "",
                     "_C": "", "_nn": "", "_VF": "", "jit": "", "_ops": "", "_utils": ""}
#: names under ``torch.`` in TorchScript source that are types or values, not operators
_TORCH_VALUES = {"device", "dtype", "Tensor", "Size", "Generator", "Storage", "layout", "memory_format",
                 "float", "float32", "float64", "float16", "bfloat16", "half", "double", "int", "int8", "int16",
                 "int32", "int64", "uint8", "bool", "long", "complex64", "complex128", "strided",
                 "contiguous_format", "channels_last", "preserve_format", "torch"}


def _dotted(node: ast.AST) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _source_ops(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """(qualified operator, line) for every ``torch.X`` / ``ops.ns.X`` named in TorchScript source."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        parts = _dotted(node)
        if not parts:
            continue
        line = getattr(node, "lineno", 0)
        if parts[0] == "ops" and len(parts) >= 3:
            yield f"{parts[1]}::{parts[2]}", line
        elif parts[:2] == ["torch", "ops"] and len(parts) >= 4:
            yield f"{parts[2]}::{parts[3]}", line
        elif parts[0] == "torch" and len(parts) >= 2:
            rest = [p for p in parts[1:] if p not in _TORCH_SUBMODULES]
            prefix = "".join(_TORCH_SUBMODULES.get(p, "") for p in parts[1:-1])
            if rest and rest[-1] not in _TORCH_VALUES and not rest[-1][:1].isupper():
                yield f"aten::{prefix}{rest[-1]}", line
        elif parts[0] == "__torch__" and parts[1:3] == ["torch", "classes"] and len(parts) >= 4:
            yield f"{parts[3]}::{'.'.join(parts[4:]) or 'class'}", line


def check_torchscript_archive(path: Path) -> None:
    """Refuse a TorchScript archive whose code names an operator outside the allowed set.

    Run before ``torch.jit.load``, which executes ``__setstate__`` methods from the archive.
    """
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            rel = info.filename.split("/", 1)[-1]
            if not (rel.startswith("code/") and rel.endswith(".py")):
                continue
            try:
                text = z.read(info).decode("utf-8")
                tree = ast.parse(text)
            except (UnicodeDecodeError, SyntaxError, ValueError) as e:
                raise _refuse(path, f"{info.filename}: ", f"its code could not be checked ({e})") from None
            for op, line in _source_ops(tree):
                if problem := op_problem(op):
                    raise _refuse(path, f"{info.filename} line {line}: ", problem)
            for m in re.finditer(r"(?<![\w.])(?:torch\.)?ops\.(\w+)\.(\w+)", text):  # odd forms too
                if problem := op_problem(f"{m.group(1)}::{m.group(2)}"):
                    raise _refuse(path, f"{info.filename}: ", problem)


def _graph_kinds(graph: Any) -> Iterator[str]:
    for node in graph.nodes():
        yield node.kind()
        for block in node.blocks():
            yield from _graph_kinds(block)


def check_script_module(module: Any, path: Path) -> None:
    """Check the compiled graphs of every method of every submodule of a loaded ScriptModule."""
    for name, sub in module.named_modules():
        c = getattr(sub, "_c", None)
        if c is None:
            continue
        for method in c._method_names():
            graph = c._get_method(method).graph
            for kind in _graph_kinds(graph):
                if problem := op_problem(kind):
                    where = f"method {(name + '.') if name else ''}{method}: "
                    raise _refuse(path, where, problem)


# ----------------------------------------------------------------------------- torch.export

#: functions the deserialiser resolves outside ``torch.ops`` that are plain arithmetic
_EXPORT_PLAIN_TARGETS = re.compile(r"^(_operator\.\w+|math\.\w+|torch\.sym_\w+|torch\._sym_\w+)$")
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Max", "Min", "StrictLessThan",
    "LessThan", "StrictGreaterThan", "GreaterThan", "Equality", "Unequality", "BooleanTrue", "BooleanFalse",
    "One", "Zero", "NegativeOne", "Half", "Infinity", "NegativeInfinity", "Abs", "floor", "ceiling", "Mod", "Eq", "Ne",
    "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "oo", "zoo", "nan", "True", "False", "Piecewise",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt",
    "TruncToInt", "IntTrueDiv", "FloatTrueDiv", "ToFloat", "PowByNatural", "FloatPow", "RoundToInt",
    "RoundDecimal", "Identity", "BitwiseFn_bitwise_and", "BitwiseFn_bitwise_or", "LShift", "RShift",
    "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log", "TruncToFloat",
    "positive", "negative", "integer", "real", "nonnegative", "nonpositive", "finite", "infinite",
    "zero", "nonzero", "even", "odd", "prime", "rational", "complex", "commutative",
}
_SYMBOL = re.compile(r"^[a-z]+\d+$")


def _plain_expression(expr: str) -> bool:
    """True if ``expr`` is arithmetic over shape symbols that sympify can read without harm."""
    if len(expr) > 10_000 or "__" in expr or not re.fullmatch(r"[\w\s+\-*/%()<>=!,.'&|~^]*", expr):
        return False
    bare = re.sub(r"'[A-Za-z0-9_]*'", "0", expr)  # Symbol('s77', ...): the name is a literal
    if "'" in bare or re.search(r"[A-Za-z_)]\s*\.|\.\s*[A-Za-z_]", bare):  # no attribute access
        return False
    try:
        tree = ast.parse(bare, mode="eval")
    except SyntaxError:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id not in _SYMPY_NAMES and not _SYMBOL.match(node.id):
            return False
        if isinstance(node, (ast.Attribute, ast.Subscript, ast.Lambda, ast.Starred, ast.NamedExpr)):
            return False
        if isinstance(node, ast.Call) and not isinstance(node.func, ast.Name):
            return False
    return True


def _walk_json(obj: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k, v
            yield from _walk_json(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk_json(v)


def _restricted_readable(data: bytes) -> str | None:
    """None if torch's ``weights_only`` unpickler reads ``data``; else why not."""
    import pickle

    import torch

    if not data:
        return None
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        m = re.search(r"GLOBAL ([\w.]+)", str(e))
        return f"a pickle that refers to {m.group(1)}" if m else "a pickle of objects other than tensors"
    except Exception as e:  # noqa: BLE001 - unreadable is refused too
        return f"a pickle that could not be read safely ({type(e).__name__})"
    return None


def check_export_archive(path: Path) -> None:
    """Refuse a ``.pt2`` archive that would run code when ``torch.export.load`` reads it."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        prefix = names[0].split("/", 1)[0] + "/" if names and "/" in names[0] else ""
        rel = {n[len(prefix):]: n for n in names if n.startswith(prefix)}

        def member(r: str) -> bytes:
            return z.read(rel[r]) if r in rel else b""

        models = [r for r in rel if r.startswith("models/") and r.endswith(".json")]
        for r in rel:  # legacy weight/constant files and AOTI payloads are read with pickle or loaded as code
            if (r.startswith(("data/weights/", "data/constants/")) and r.endswith(".pt")) or r.startswith("data/aotinductor/"):
                if r.startswith("data/aotinductor/"):
                    raise _refuse(path, f"{r}: ", "a compiled (AOTInductor) library, which runs native code")
                if why := _restricted_readable(member(r)):
                    raise _refuse(path, f"{r}: ", why)
        for mr in models:
            name = mr[len("models/"):-len(".json")]
            try:
                program = json.loads(member(mr))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelLoadError(f"{path}: {mr} is damaged ({e})") from None
            if why := _restricted_readable(member(f"data/sample_inputs/{name}.pt")):
                raise _refuse(path, "its sample inputs: ", why)
            for cfg_name, folder in ((f"data/weights/{name}_model_weights_config.json", "data/weights/"),
                                     ("data/weights/model_weights_config.json", "data/weights/"),
                                     (f"data/constants/{name}_model_constants_config.json", "data/constants/"),
                                     ("data/constants/model_constants_config.json", "data/constants/")):
                if cfg_name not in rel:
                    continue
                try:
                    cfg = json.loads(member(cfg_name)).get("config", {})
                except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
                    raise ModelLoadError(f"{path}: {cfg_name} is damaged ({e})") from None
                for fqn, meta in cfg.items():
                    pname = str(meta.get("path_name", ""))
                    if pname.startswith(("custom_obj_", "opaque_obj_")):
                        raise _refuse(path, f"constant {fqn}: ", "a pickled Python object")
                    if meta.get("use_pickle") and (why := _restricted_readable(member(folder + pname))):
                        raise _refuse(path, f"{'weight' if 'weights' in folder else 'constant'} {fqn}: ", why)
            if program.get("guards_code"):
                raise _refuse(path, f"{mr}: ", "it carries guard code, which torch runs with exec")
            for key, value in _walk_json(program):
                if key == "expr_str" and isinstance(value, str) and not _plain_expression(value):
                    raise _refuse(path, f"{mr}: ", f"a shape expression that is not plain arithmetic ({value[:80]!r})")
                if key == "target" and isinstance(value, str):
                    _check_export_target(path, mr, value)


def _check_export_target(path: Path, where: str, target: str) -> None:
    if target.startswith("torch.ops."):
        parts = target.split(".")
        if len(parts) >= 4 and (problem := op_problem(f"{parts[2]}::{parts[3]}")):
            raise _refuse(path, f"{where}: ", problem)
        return
    if _EXPORT_PLAIN_TARGETS.match(target):
        return
    raise _refuse(path, f"{where}: ", f"a graph node calls {target}, which is not a tensor operator")


# ----------------------------------------------------------------------------- ONNX

#: operator domains ONNX Runtime implements itself; any other is a custom-op library
ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"})


def _onnx_graphs(graph: Any) -> Iterator[Any]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.g.node:
                yield from _onnx_graphs(attr.g)
            for g in attr.graphs:
                yield from _onnx_graphs(g)


def _onnx_tensors(model: Any) -> Iterator[Any]:
    for g in _onnx_graphs(model.graph):
        yield from g.initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.t.data_location:
                    yield attr.t
                yield from attr.tensors


def check_onnx_model(model: Any, path: Path) -> None:
    """Refuse custom-operator domains and external data outside the model's folder."""
    import onnx

    for g in _onnx_graphs(model.graph):
        for node in g.node:
            if node.domain not in ONNX_DOMAINS:
                raise UnsafeModelError(
                    f"{path}: node '{node.name or node.op_type}' uses operator {node.op_type} of the custom domain "
                    f"'{node.domain}', which needs a native library ConvLens does not load"
                )
    folder = path.resolve().parent
    for t in _onnx_tensors(model):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (folder / loc).resolve()
        if not loc or Path(loc).is_absolute() or not target.is_relative_to(folder):
            raise UnsafeModelError(
                f"{path}: tensor '{t.name}' keeps its data in '{loc}', outside the model's folder {folder}; "
                "ConvLens reads external data only from beside the model"
            )
        if target.exists():
            check_regular_file(target, "ONNX external data file")
