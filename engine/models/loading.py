"""Loading a user's local checkpoint, safely, whatever its format.

Formats (detected from the file's bytes, not trusted from its name):

- ``torchscript``: a ``torch.jit.save`` archive (zip with ``code/``).
- ``export``: a ``torch.export.save`` archive (``.pt2``; zip with ``archive_format``).
- ``state_dict``: a ``torch.save`` of tensors (also the common ``{"state_dict": ...}`` and
  ``{"model": ...}`` wrappers and DataParallel ``module.`` prefixes); needs an architecture.
- ``safetensors``: needs an architecture.
- ``onnx``: runs on ONNX Runtime.

Nothing in a checkpoint runs unless the user opts in (``ModelSpec.allow_pickle``, per file):
``torch.load`` always uses ``weights_only=True`` and a pickled module is refused; TorchScript code,
torch.export archives and ONNX graphs are inspected before they are read (see
:mod:`engine.models.safety`). An architecture given as ``file.py:Class`` imports the user's own
Python file, which the user named explicitly (a TOML file found beside a checkpoint cannot name
one on its own, see :mod:`engine.models.config`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..types import ConvLensError, ModelSpec
from . import safety
from .safety import ModelLoadError

TORCH_FORMATS = ("torchscript", "export", "state_dict", "safetensors", "pickled_module")
FORMATS = (*TORCH_FORMATS, "onnx")


@dataclass
class LoadedModel:
    """A model ready for a backend: a torch module (eval mode, CPU) or an ONNX file."""

    spec: ModelSpec
    format: str
    sha256: str
    module: Any = None  # torch.nn.Module / ScriptModule for torch formats
    onnx_path: str | None = None
    notes: list[str] = field(default_factory=list)  # non-fatal remarks (e.g. keys skipped)

    @property
    def name(self) -> str:
        return Path(self.spec.path).name

    @property
    def cache_id(self) -> str:
        """What identifies this model's computations in caches: the weights' hash, and for a
        state dict the architecture (with the contents of a user's own ``file.py``) and the
        options that change what gets built."""
        if self.format not in ("state_dict", "safetensors"):
            return self.sha256
        from ..cache import make_key

        arch = self.spec.arch or ""
        return make_key(self.sha256, arch, arch_code_hash(arch), self.spec.num_classes, self.spec.strict)

    @property
    def is_torch(self) -> bool:
        return self.format in TORCH_FORMATS


# ----------------------------------------------------------------------------- detection


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Content hash of a file; identifies the model in caches."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def detect_format(path: str | os.PathLike[str]) -> str:
    """Work out a checkpoint's format from its content (and, for ONNX, its name)."""
    p = Path(path)
    try:
        safety.check_regular_file(p)
    except ConvLensError as e:
        raise ModelLoadError(str(e)) from None
    with open(p, "rb") as f:
        head = f.read(16)
    if not head:
        raise ModelLoadError(f"{p}: the file is empty")
    if zipfile.is_zipfile(p):
        try:
            names = zipfile.ZipFile(p).namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelLoadError(f"{p}: the archive is damaged ({e})") from e
        except ValueError as e:  # e.g. a member name that is not valid UTF-8
            raise ModelLoadError(f"{p}: the archive is damaged ({e})") from e
        rel = {n.split("/", 1)[1] for n in names if "/" in n}
        if "archive_format" in rel or any(n.endswith("serialized_exported_program.json") for n in rel):
            return "export"
        if any(n.startswith("code/") for n in rel) or "constants.pkl" in rel:
            return "torchscript"
        if "data.pkl" in rel:
            return "state_dict"  # refined to pickled_module when weights_only refuses it
        raise ModelLoadError(f"{p}: a zip archive, but not a PyTorch checkpoint ({len(names)} entries)")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < p.stat().st_size:
        return "safetensors"
    if p.suffix.lower() == ".onnx":
        return "onnx"
    if head[:1] == b"\x80":  # a pickle protocol marker: legacy (non-zip) torch.save
        return "state_dict"
    # ONNX files are protobuf with no magic number; try it for unknown suffixes.
    if _looks_like_onnx(p):
        return "onnx"
    raise ModelLoadError(
        f"{p}: not a recognised model file (expected TorchScript, torch.export .pt2, a state dict "
        ".pt/.pth/.bin, safetensors or ONNX)"
    )


def _looks_like_onnx(p: Path) -> bool:
    try:
        import onnx

        m = onnx.load(str(p), load_external_data=False)
        return len(m.graph.node) > 0
    except Exception:  # noqa: BLE001 - any parse failure means "not ONNX"
        return False


# ----------------------------------------------------------------------------- loading


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load ``spec.path`` into a :class:`LoadedModel`, or raise :class:`ModelLoadError`."""
    path = Path(spec.path)
    fmt = detect_format(path)
    sha = file_sha256(path)
    if fmt == "onnx":
        _check_onnx(path)
        return LoadedModel(spec, "onnx", sha, onnx_path=str(path))
    import torch

    notes: list[str] = []
    if fmt == "torchscript":
        if not spec.allow_pickle:
            _guard(path, "TorchScript archive", lambda: safety.check_torchscript_archive(path))
        module = _guard(path, "TorchScript archive", lambda: _jit_load(path))
        if not spec.allow_pickle:
            safety.check_script_module(module, path)
    elif fmt == "export":
        if not spec.allow_pickle:
            _guard(path, "torch.export archive", lambda: safety.check_export_archive(path))
        module = _guard(path, "torch.export archive", lambda: _export_load(path))
    elif fmt == "safetensors":
        from safetensors.torch import load_file

        sd = _guard(path, "safetensors file", lambda: load_file(str(path), device="cpu"))
        module = build_from_state_dict(spec, sd, path, notes)
    else:
        obj = _torch_load_safely(path, spec.allow_pickle)
        if isinstance(obj, torch.nn.Module):
            fmt = "pickled_module"
            module = obj
        else:
            sd = _extract_state_dict(obj, path, notes)
            module = build_from_state_dict(spec, sd, path, notes)
    module.eval()
    return LoadedModel(spec, fmt, sha, module=module, notes=notes)


def _guard(path: Path, what: str, fn: Any) -> Any:
    try:
        return fn()
    except ConvLensError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{path}: could not read this {what}: it is damaged or truncated ({_short(e)})") from e


def _short(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return (text[:limit] + "...") if len(text) > limit else text or type(e).__name__


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Keep torch's own warnings and log lines about a file off the user's terminal: what went
    wrong reaches the user as one ModelLoadError instead."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch._export", "torch.export", "torch._export.serde")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=False):
                lg.setLevel(level)


def _jit_load(path: Path) -> Any:
    import torch

    with _quiet_torch():
        return torch.jit.load(str(path), map_location="cpu")


def _export_load(path: Path) -> Any:
    import torch

    with _quiet_torch():
        ep = torch.export.load(str(path))  # opt-in or inspected first: see safety.check_export_archive
        # unflatten restores the module hierarchy, so forward hooks work on named submodules.
        return torch.export.unflatten(ep)


PICKLE_REFUSAL = (
    "{path}: this checkpoint contains pickled Python objects ({detail}), not only tensors. "
    "Unpickling it runs code stored in the file, which can do anything your user account can. "
    "ConvLens refuses by default. If you trust where the file came from, load it with "
    "--allow-pickle (GUI: 'Allow pickled code'); better, re-save it as a state dict with "
    "torch.save(model.state_dict(), path) or as TorchScript / torch.export."
)


def _torch_load_safely(path: Path, allow_pickle: bool) -> Any:
    import pickle

    import torch

    try:
        with _quiet_torch():
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not allow_pickle:
            detail = _pickle_detail(str(e))
            raise ModelLoadError(PICKLE_REFUSAL.format(path=path, detail=detail)) from None
    except Exception as e:
        raise ModelLoadError(
            f"{path}: could not read this PyTorch checkpoint: it is damaged or truncated ({_short(e)})"
        ) from e
    try:  # explicit opt-in only
        with _quiet_torch():
            return torch.load(str(path), map_location="cpu", weights_only=False)  # the explicit opt-in (--allow-pickle)
    except Exception as e:
        raise ModelLoadError(f"{path}: unpickling failed ({_short(e)})") from e


def _pickle_detail(msg: str) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"global ['\"]?([\w.]+)", msg)
    return f"it refers to {m.group(1)}" if m else "objects other than tensors"


_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights", "params")


def _tensors_of(obj: Any) -> tuple[dict[str, Any], list[str]]:
    """The tensor entries of a mapping and the names of its other entries."""
    import torch

    if not isinstance(obj, Mapping):
        return {}, []
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors, [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]


def _extract_state_dict(obj: Any, path: Path, notes: list[str] | None = None) -> dict[str, Any]:
    """The weights in a checkpoint: a state dict, or one inside a wrapper (``{"state_dict": ...,
    "epoch": 7}``). Entries that are not tensors (a step count, a version, ...) are left out with
    a note, whether they sit beside the wrapper or inside the state dict."""
    if not isinstance(obj, Mapping):
        raise ModelLoadError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    candidates = [(None, obj)] + [(k, obj[k]) for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)]
    best_key: str | None = None
    sd: dict[str, Any] = {}
    others: list[str] = []
    for key, inner in candidates:
        tensors, rest = _tensors_of(inner)
        if len(tensors) > len(sd):
            best_key, sd, others = key, tensors, rest
    if not sd:
        keys = ", ".join(map(str, list(obj)[:8]))
        nested = [str(k) for k, v in obj.items() if isinstance(v, Mapping)]
        hint = (f"; none of its dictionaries ({', '.join(nested[:5])}) holds tensors either" if nested else "")
        raise ModelLoadError(f"{path}: a dictionary without model weights (its keys: {keys}){hint}")
    if others and notes is not None:
        where = f"inside '{best_key}'" if best_key else "beside the weights"
        notes.append(f"ignored {len(others)} entries that are not tensors {where}: {', '.join(others[:6])}")
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


# ----------------------------------------------------------------------------- architectures


def resolve_arch(arch: str, num_classes: int | None = None) -> Any:
    """Instantiate an architecture by name: builtin, torchvision, or ``file.py:Class``."""
    from .zoo import BUILTIN_ARCHS

    if arch in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[arch]()
    if ":" in arch:
        return _user_class(arch)()
    import torchvision

    names = set(torchvision.models.list_models())
    if arch not in names:
        close = [n for n in sorted(names) if n.startswith(arch[:4])][:6]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ModelLoadError(
            f"unknown architecture '{arch}'{hint}: give a torchvision model name, 'rnet', "
            "or your own class as path/to/file.py:ClassName or package.module:ClassName"
        )
    kwargs: dict[str, Any] = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    try:
        return torchvision.models.get_model(arch, **kwargs)
    except TypeError:  # a few models take no num_classes
        return torchvision.models.get_model(arch, weights=None)


def arch_code_hash(arch: str) -> str:
    """A hash of the Python source behind ``file.py:Class`` (``~`` expanded) or
    ``package.module:Class`` (the module's own file), so an edited class never reuses results;
    empty for built-in and torchvision names."""
    target = arch.rpartition(":")[0]
    if not target:
        return ""
    if target.endswith(".py"):
        file = Path(target).expanduser()
        return file_sha256(file) if file.is_file() else ""
    module = sys.modules.get(target)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            found = importlib.util.find_spec(target)
        except (ImportError, ValueError):
            found = None
        origin = found.origin if found is not None else None
    return file_sha256(origin) if origin and Path(origin).is_file() else ""


def _user_class(arch: str) -> Any:
    target, _, cls_name = arch.rpartition(":")
    try:
        if target.endswith(".py"):
            file = Path(target).expanduser().resolve()
            if not file.exists():
                raise ModelLoadError(f"{file}: architecture file not found")
            mod_name = f"convlens_user_{hashlib.sha1(str(file).encode(), usedforsecurity=False).hexdigest()[:10]}"
            spec = importlib.util.spec_from_file_location(mod_name, file)
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules[mod_name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConvLensError:
        raise
    except Exception as e:
        raise ModelLoadError(f"{target}: could not import the architecture ({_short(e)})") from e
    cls = getattr(module, cls_name, None)
    if cls is None:
        raise ModelLoadError(f"{target}: has no class named '{cls_name}'")
    return cls


def _infer_num_classes(model: Any, sd: Mapping[str, Any]) -> int | None:
    """The class count a state dict implies when its final layer is larger/smaller than the default."""
    own = model.state_dict()
    last_weight = None
    for k, v in own.items():
        if k.endswith(".weight") and v.ndim == 2:
            last_weight = k
    if last_weight and last_weight in sd and sd[last_weight].shape != own[last_weight].shape:
        return int(sd[last_weight].shape[0])
    return None


def build_from_state_dict(spec: ModelSpec, sd: Mapping[str, Any], path: Path, notes: list[str]) -> Any:
    """Build ``spec.arch`` and load ``sd`` into it, reporting mismatches precisely."""
    if not spec.arch:
        raise ModelLoadError(
            f"{path}: this file holds weights only ({len(sd)} tensors); name its architecture with "
            "--arch (a torchvision name such as resnet18, 'rnet', or path/to/file.py:ClassName)"
        )
    model = resolve_arch(spec.arch, spec.num_classes)
    if spec.num_classes is None and ":" not in spec.arch:
        n = _infer_num_classes(model, sd)
        if n is not None:
            model = resolve_arch(spec.arch, n)
            notes.append(f"built {spec.arch} with {n} classes, as the checkpoint's final layer says")
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = "; ".join(items[:8]) + (f"; ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{title} keys: {shown}")
    load = {k: v for k, v in sd.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if not load:  # said first: --no-strict would not help
        raise ModelLoadError(
            f"{path}: none of its {len(sd)} weights fit architecture '{spec.arch}' (names or shapes differ "
            f"everywhere): is it the right architecture? " + " | ".join(problems)
        )
    if problems and spec.strict:
        share = f"{len(load)} of the architecture's {len(own)} weights fit"
        raise ModelLoadError(
            f"{path}: the weights do not fit architecture '{spec.arch}' ({share}). " + " | ".join(problems)
            + ". Use --no-strict to load the matching keys only."
        )
    model.load_state_dict(load, strict=False)
    if problems:
        notes.append(f"loaded non-strictly: {len(load)} of {len(own)} weights; " + " | ".join(problems))
    return model


# ----------------------------------------------------------------------------- ONNX

#: the oldest ONNX opset ONNX Runtime guarantees to run
MIN_ONNX_OPSET = 7


def _check_onnx(path: Path) -> None:
    """Read the graph (not its external data), refuse what is unsafe, and validate it the way
    ONNX Runtime will, so a broken model fails when it is opened rather than on first use."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_short(e)})") from e
    if not model.graph.node:
        raise ModelLoadError(f"{path}: not a valid ONNX model (the graph has no nodes)")
    safety.check_onnx_model(model, path)
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    latest = onnx.defs.onnx_opset_version()
    core = opsets.get("ai.onnx")
    if core is None:
        raise ModelLoadError(f"{path}: not a valid ONNX model (it declares no ai.onnx opset)")
    if core < MIN_ONNX_OPSET:
        raise ModelLoadError(f"{path}: declares ONNX opset {core}; ONNX Runtime supports opset {MIN_ONNX_OPSET} and "
                             "newer: re-export the model with a newer opset")
    if core > latest:
        raise ModelLoadError(f"{path}: declares ONNX opset {core}, newer than this ConvLens knows ({latest}): "
                             "re-export it with an older opset, or update onnx and onnxruntime")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a valid ONNX model ({_short(e)})") from e
