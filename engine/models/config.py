"""The model description: defaults per architecture, TOML files, command-line overrides.

Precedence, lowest first: what ConvLens knows of the architecture or file (RNet, torchvision,
an ONNX input shape) < the TOML model config < explicit options (flags or dialog fields).
The TOML file is the ``[model]`` table of the same keys as :meth:`ModelSpec.to_dict`; a
checkpoint ``x.pt`` picks up ``x.pt.toml`` or ``x.toml`` beside it when no file is named.
``path`` and ``classes`` (when a file) are relative to the TOML file.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..types import ConvLensError, ModelSpec, Preprocess

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RNET_PREPROCESS = Preprocess(input_size=(24, 24), mean=(0.5, 0.5, 0.5), std=(128 / 255,) * 3)
RNET_CLASSES = ("non-face", "face")

_PREPROCESS_KEYS = {f.name for f in fields(Preprocess)}
_SPEC_KEYS = {f.name for f in fields(ModelSpec)} - {"preprocess", "allow_pickle"}


class ConfigError(ConvLensError):
    """A model description that cannot be used; the message names the file or option."""


def find_config_beside(model_path: str | os.PathLike[str]) -> Path | None:
    p = Path(model_path)
    for cand in (p.with_name(p.name + ".toml"), p.with_suffix(".toml")):
        if cand.is_file() and cand != p:
            return cand
    return None


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a model TOML file; relative paths inside it are resolved against its folder."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: model config not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from e
    table = data.get("model", data)
    unknown = set(table) - _SPEC_KEYS - _PREPROCESS_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)} (known: {sorted(_SPEC_KEYS | _PREPROCESS_KEYS)})")
    out = dict(table)
    for key in ("path",):
        if key in out and not Path(out[key]).is_absolute():
            out[key] = str((p.parent / out[key]).resolve())
    if isinstance(out.get("classes"), str):
        cpath = Path(out["classes"])
        if not cpath.is_absolute():
            cpath = p.parent / cpath
        out["classes"] = str(cpath)
    return out


def write_config(spec: ModelSpec, path: str | os.PathLike[str]) -> Path:
    """Write ``spec`` as a ``[model]`` TOML table (atomically)."""
    import tomli_w

    from ..cache import atomic_write_bytes

    p = Path(path)
    d = spec.to_dict()
    d.pop("allow_pickle", None)
    return atomic_write_bytes(p, tomli_w.dumps({"model": d}).encode())


def parse_classes(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...] | None:
    """Class names from a list, a comma-separated string, or a file (one name per line)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    p = Path(value)
    if p.is_file():
        names = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines()]
        names = [n for n in names if n and not n.startswith("#")]
        if not names:
            raise ConfigError(f"{p}: the class file is empty")
        return tuple(names)
    if "," not in value and (value.endswith(".txt") or os.sep in value):
        raise ConfigError(f"{value}: class file not found")
    return tuple(v.strip() for v in value.split(",") if v.strip())


def parse_size(value: str | int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """``224``, ``"224"``, ``"48x192"`` (height x width) or ``[48, 192]``."""
    try:
        if isinstance(value, int):
            return (value, value)
        if isinstance(value, (list, tuple)):
            h, w = (int(value[0]), int(value[-1]))
        elif "x" in str(value).lower():
            h, w = (int(v) for v in str(value).lower().split("x"))
        else:
            h = w = int(value)
    except (ValueError, IndexError):
        raise ConfigError(f"input size '{value}': expected N or HxW, e.g. 224 or 48x192") from None
    if h < 1 or w < 1:
        raise ConfigError(f"input size '{value}': must be positive")
    return (h, w)


def parse_triple(value: str | list[float] | tuple[float, ...], name: str) -> tuple[float, float, float]:
    try:
        vals = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except ValueError:
        raise ConfigError(f"--{name} '{value}': expected three numbers, e.g. 0.485,0.456,0.406") from None
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3:
        raise ConfigError(f"--{name} '{value}': expected three comma-separated numbers")
    if name == "std" and any(v <= 0 for v in vals):
        raise ConfigError(f"--std '{value}': must be positive")
    if any(v > 2 for v in vals):
        raise ConfigError(f"--{name} '{value}': give it in [0, 1] pixel units (e.g. 0.5, not 127.5)")
    return (vals[0], vals[1], vals[2])


def arch_defaults(arch: str | None, model_path: str) -> dict[str, Any]:
    """What ConvLens knows without asking: per architecture, or from an ONNX input shape."""
    if arch == "rnet":
        return {**RNET_PREPROCESS.to_dict(), "classes": list(RNET_CLASSES)}
    if arch and ":" not in arch:
        return {"input_size": [224, 224], "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                "resize": "shorter_side_crop"}
    if model_path.lower().endswith(".onnx"):
        size = onnx_input_size(model_path)
        if size:
            return {"input_size": list(size)}
    return {}


def onnx_input_size(path: str) -> tuple[int, int] | None:
    """(H, W) of an ONNX model's first input when both are fixed numbers, else None."""
    try:
        import onnx

        m = onnx.load(path, load_external_data=False)
        init = {i.name for i in m.graph.initializer}
        inp = next(i for i in m.graph.input if i.name not in init)
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 4 and dims[2].dim_value > 0 and dims[3].dim_value > 0:
            return (dims[2].dim_value, dims[3].dim_value)
    except Exception:  # noqa: BLE001 - unknown size is a normal answer
        return None
    return None


def build_spec(model_path: str | None = None, *, config: str | None = None, **options: Any) -> ModelSpec:
    """Merge defaults, the TOML config and explicit options (``None`` = not given) into a spec."""
    merged: dict[str, Any] = {}
    cfg_path = Path(config) if config else (find_config_beside(model_path) if model_path else None)
    from_file = read_config(cfg_path) if cfg_path else {}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - _SPEC_KEYS - _PREPROCESS_KEYS - {"allow_pickle"}
    if unknown:
        raise ConfigError(f"unknown model options {sorted(unknown)}")
    path = given.get("path") or model_path or from_file.get("path")
    if not path:
        raise ConfigError("no model file given (--model PATH, or 'path' in the model config)")
    arch = given.get("arch", from_file.get("arch"))
    merged.update(arch_defaults(arch, str(path)))
    merged.update(from_file)
    merged.update(given)
    merged["path"] = str(Path(path).expanduser())
    pre_kwargs: dict[str, Any] = {}
    for key in _PREPROCESS_KEYS & set(merged):
        val = merged.pop(key)
        if key == "input_size":
            val = parse_size(val)
        elif key in ("mean", "std"):
            val = parse_triple(val, key)
        elif key == "channels" and val not in ("rgb", "bgr"):
            raise ConfigError(f"channels '{val}': expected rgb or bgr")
        elif key == "resize" and val not in ("stretch", "shorter_side_crop"):
            raise ConfigError(f"resize '{val}': expected stretch or shorter_side_crop")
        pre_kwargs[key] = val
    if "classes" in merged:
        merged["classes"] = parse_classes(merged["classes"])
    if "layers" in merged:
        layers = merged["layers"]
        merged["layers"] = tuple(layers.split(",") if isinstance(layers, str) else layers)
    if merged.get("backend", "auto") not in ("auto", "torch", "onnx"):
        raise ConfigError(f"backend '{merged['backend']}': expected auto, torch or onnx")
    if merged.get("scores", "auto") not in ("auto", "logits", "probs"):
        raise ConfigError(f"scores '{merged['scores']}': expected auto, logits or probs")
    return ModelSpec(preprocess=Preprocess(**pre_kwargs), **merged)
