"""The model description: defaults per architecture, TOML files, command-line overrides.

Precedence, lowest first: what ConvLens knows of the architecture or file (RNet, torchvision,
an ONNX input shape) < the TOML model config < explicit options (flags or dialog fields).
The TOML file is the ``[model]`` table of the same keys as :meth:`ModelSpec.to_dict`; a
checkpoint ``x.pt`` picks up ``x.pt.toml`` or ``x.toml`` beside it when no file is named.
``path``, ``classes`` (when a file) and the file of ``arch = "net.py:Net"`` are relative to the
TOML file. Every key's type and range are checked, and an error names the file, the key and what
was expected.

A TOML file that ConvLens *finds* beside a checkpoint never runs code on its own: when it names
Python code as the architecture (``file.py:Class`` or ``package.module:Class``), loading stops
with :class:`CodeOptInRequired` until the user asks for it (``--arch`` or ``--model-config`` on
the command line; a confirmation in the app, which passes ``allow_code=True``).
"""

from __future__ import annotations

import math
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

MAX_INPUT_SIDE = 8192
_PREPROCESS_KEYS = {f.name for f in fields(Preprocess)}
_SPEC_KEYS = {f.name for f in fields(ModelSpec)} - {"preprocess", "allow_pickle"}


class ConfigError(ConvLensError):
    """A model description that cannot be used; the message names the file or option."""


class CodeOptInRequired(ConfigError):
    """A model config found beside the checkpoint names Python code; it runs only if asked."""

    def __init__(self, source: Path, arch: str) -> None:
        self.source, self.arch = source, arch
        super().__init__(
            f"{source}: names Python code as the architecture (arch = \"{arch}\"), found beside the model. "
            "ConvLens runs such code only when you ask: pass --arch (or --model-config "
            f"{source}) to run it (nothing was run)"
        )


def is_code_arch(arch: str | None) -> bool:
    """``file.py:Class`` or ``package.module:Class``: an architecture that imports Python code."""
    return bool(arch) and ":" in str(arch)


# key -> (accepted Python types, what to say when the type is wrong); bool is never an int here
_NUM = (int, float)
_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "path": ((str,), "a file name"),
    "arch": ((str,), "an architecture name such as \"resnet18\" or \"net.py:Net\""),
    "classes": ((str, list), "a list of class names or the name of a file with one name per line"),
    "layers": ((str, list), "a list of layer names"),
    "backend": ((str,), "\"auto\", \"torch\" or \"onnx\""),
    "device": ((str,), "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
    "output_index": ((int,), "a whole number (0 for the first output)"),
    "scores": ((str,), "\"auto\", \"logits\" or \"probs\""),
    "strict": ((bool,), "true or false"),
    "num_classes": ((int,), "a whole number"),
    "input_size": ((int, str, list), "N, \"HxW\" or [H, W]"),
    "mean": ((*_NUM, str, list), "three numbers in [0, 1], e.g. [0.485, 0.456, 0.406]"),
    "std": ((*_NUM, str, list), "three positive numbers, e.g. [0.229, 0.224, 0.225]"),
    "channels": ((str,), "\"rgb\" or \"bgr\""),
    "grayscale": ((bool,), "true or false"),
    "resize": ((str,), "\"stretch\" or \"shorter_side_crop\""),
    "crop_fraction": (_NUM, "a number in (0, 1], e.g. 0.875"),
}
_ITEM_TYPES = {"classes": (str,), "layers": (str,), "input_size": (int,), "mean": _NUM, "std": _NUM}


def _type_name(v: Any) -> str:
    return {bool: "a boolean", int: "a whole number", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


def check_value(key: str, value: Any, where: str) -> None:
    """Raise ConfigError naming ``where`` (a file or an option) if ``value`` has the wrong type."""
    types, expected = _TYPES.get(key, ((object,), "a value"))
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if ok and isinstance(value, list):
        items = _ITEM_TYPES.get(key, (str,))
        ok = bool(value) and all(isinstance(v, items) and not isinstance(v, bool) for v in value)
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {expected}, not {_type_name(value)} ({value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: '{key}' must be a finite number, not {value!r}")
    if key == "output_index" and value < 0:
        raise ConfigError(f"{where}: 'output_index' must be 0 or more, not {value}")
    if key == "num_classes" and value < 1:
        raise ConfigError(f"{where}: 'num_classes' must be 1 or more, not {value}")
    if key == "crop_fraction" and not 0 < value <= 1:
        raise ConfigError(f"{where}: 'crop_fraction' must be in (0, 1], not {value}")


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
        from .safety import check_regular_file

        check_regular_file(p, "model config")
        if p.stat().st_size > 1 << 20:
            raise ConfigError(f"{p}: {p.stat().st_size} bytes is too large for a model config")
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except ConfigError:
        raise
    except ConvLensError as e:
        if "no such file" in str(e):
            raise ConfigError(f"{p}: model config not found") from None
        raise ConfigError(str(e)) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML ({e})") from e
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the model config ({e.strerror or e})") from e
    table = data.get("model", data)
    if not isinstance(table, dict):
        raise ConfigError(f"{p}: 'model' must be a table ([model] followed by its keys), not {_type_name(table)}")
    unknown = set(table) - _SPEC_KEYS - _PREPROCESS_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown keys {sorted(unknown)} (known: {sorted(_SPEC_KEYS | _PREPROCESS_KEYS)})")
    for key, value in table.items():
        check_value(key, value, str(p))
        try:
            _parse_value(key, value)
        except ConfigError as e:
            msg = str(e).replace(f"--{key.replace('_', '-')} ", f"{key} = ")
            raise ConfigError(f"{p}: {msg}") from None
    out = dict(table)
    for key in ("path",):
        if key in out and not Path(out[key]).expanduser().is_absolute():
            out[key] = str((p.parent / out[key]).resolve())
    arch = out.get("arch")
    if arch and ":" in arch:
        target, _, cls = arch.rpartition(":")
        if target.endswith(".py") and not Path(target).expanduser().is_absolute():
            out["arch"] = f"{(p.parent / target).resolve()}:{cls}"
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
            if len(value) not in (1, 2):
                raise ValueError
            h, w = (int(value[0]), int(value[-1]))
        elif "x" in str(value).lower():
            h, w = (int(v) for v in str(value).lower().split("x"))
        else:
            h = w = int(value)
    except (ValueError, IndexError, TypeError):
        raise ConfigError(f"--input-size '{value}': expected N or HxW, e.g. 224 or 48x192") from None
    if h < 1 or w < 1:
        raise ConfigError(f"--input-size '{value}': must be positive")
    if max(h, w) > MAX_INPUT_SIDE:
        raise ConfigError(f"--input-size '{value}': at most {MAX_INPUT_SIDE} pixels a side")
    return (h, w)


def parse_triple(value: str | list[float] | tuple[float, ...], name: str) -> tuple[float, float, float]:
    try:
        if isinstance(value, (int, float)):
            vals = [float(value)]
        else:
            vals = [float(v) for v in (value.split(",") if isinstance(value, str) else value)]
    except (ValueError, TypeError):
        raise ConfigError(f"--{name} '{value}': expected three numbers, e.g. 0.485,0.456,0.406") from None
    if not all(math.isfinite(v) for v in vals):
        raise ConfigError(f"--{name} '{value}': must be finite numbers")
    if len(vals) == 1:
        vals *= 3
    if len(vals) != 3:
        raise ConfigError(f"--{name} '{value}': expected three comma-separated numbers")
    if name == "std" and any(v <= 0 for v in vals):
        raise ConfigError(f"--std '{value}': must be positive")
    if any(v > 2 for v in vals):
        raise ConfigError(f"--{name} '{value}': give it in [0, 1] pixel units (e.g. 0.5, not 127.5)")
    return (vals[0], vals[1], vals[2])


_CHOICES = {"channels": ("rgb", "bgr"), "resize": ("stretch", "shorter_side_crop"),
            "backend": ("auto", "torch", "onnx"), "scores": ("auto", "logits", "probs")}


def _parse_value(key: str, val: Any) -> Any:
    """A preprocessing or choice value in its final form; ConfigError if it cannot be used."""
    if key == "input_size":
        return parse_size(val)
    if key in ("mean", "std"):
        return parse_triple(val, key)
    if key in _CHOICES and val not in _CHOICES[key]:
        raise ConfigError(f"--{key} '{val}': expected {' or '.join(_CHOICES[key])}")
    return val


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


def build_spec(model_path: str | None = None, *, config: str | None = None, allow_code: bool = False,
               **options: Any) -> ModelSpec:
    """Merge defaults, the TOML config and explicit options (``None`` = not given) into a spec.

    A config found beside the model (not named by ``config``) that names Python code as the
    architecture raises :class:`CodeOptInRequired` unless ``allow_code`` or an explicit ``arch``.
    """
    merged: dict[str, Any] = {}
    cfg_path = Path(config) if config else (find_config_beside(model_path) if model_path else None)
    from_file = read_config(cfg_path) if cfg_path else {}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - _SPEC_KEYS - _PREPROCESS_KEYS - {"allow_pickle"}
    if unknown:
        raise ConfigError(f"unknown model options {sorted(unknown)}")
    if cfg_path and not config and not allow_code and "arch" not in given and is_code_arch(from_file.get("arch")):
        raise CodeOptInRequired(cfg_path, str(from_file["arch"]))
    for key in ("output_index", "num_classes"):
        if key in given:
            check_value(key, given[key], f"--{key.replace('_', '-')}")
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
        pre_kwargs[key] = _parse_value(key, merged.pop(key))
    if "classes" in merged:
        merged["classes"] = parse_classes(merged["classes"])
    if "layers" in merged:
        layers = merged["layers"]
        merged["layers"] = tuple(layers.split(",") if isinstance(layers, str) else layers)
    for key in ("backend", "scores"):
        if key in merged:
            _parse_value(key, merged[key])
    return ModelSpec(preprocess=Preprocess(**pre_kwargs), **merged)
