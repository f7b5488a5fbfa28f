"""Project files: a human-readable JSON record of a session, versioned, saved atomically.

Schema (version 1)::

    {"convlens_project": 1,
     "model": {ModelSpec.to_dict()} | null,   # paths relative to the project file when below it
     "images": "path" | null,
     "selection": {"layer": ..., "unit": ..., "class": ..., "current_image": ...},
     "views": {"<view object_name>": {...view parameters...}},
     "layout": "<base64 QMainWindow state>"}

Reopening restores the session; analyses reuse the engine's on-disk caches (keyed by model hash,
image set and parameters), so nothing is recomputed. A model or image folder that moved is
asked for through ``locate`` instead of failing. ``model`` is the spec in use, so the output the
output rule chose (``output_index``) is kept and used as given when reopened.

Results are kept by reference, not by copy: a view's saved parameters are the cache key's
inputs, so running it again with them on the same model and images is answered by the engine's
cache. A view that had a result records it (the dissection view's ``"show_result": true``) and
reruns once the model is loaded; the window restores view states *before* the model has loaded,
so the view keeps restored layer names until its layer list arrives
(``tests/test_gui_project.py``: a reopened project shows the dissection ``from_cache`` with the
same rows, by itself).

A project never grants an opt-in: ``allow_pickle`` is neither written nor read (a project file
that holds it is read without it), and a model whose architecture is Python code
(``file.py:Class``) raises :class:`engine.models.config.CodeOptInRequired` naming the project
until the caller confirms with ``allow_code=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.cache import atomic_write_text
from engine.types import ConvLensError, ModelSpec

SCHEMA = 1


class ProjectError(ConvLensError):
    pass


def make(*, model: ModelSpec | None, images: str | None, selection: dict[str, Any],
         views: dict[str, Any], layout: str = "") -> dict[str, Any]:
    return {"convlens_project": SCHEMA, "model": model, "images": images, "selection": selection,
            "views": views, "layout": layout}


def _rel(path: str, base: Path) -> str:
    p = Path(path).resolve()
    try:
        return os.path.relpath(p, base) if p.is_relative_to(base) else str(p)
    except ValueError:
        return str(p)


def save(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    base = Path(path).resolve().parent
    out = dict(state)
    spec: ModelSpec | None = state.get("model")
    if spec is not None:
        d = spec.to_dict()
        d.pop("allow_pickle", None)  # never persisted: the user opts in each time
        d["path"] = _rel(spec.path, base)
        out["model"] = d
    if state.get("images"):
        out["images"] = _rel(state["images"], base)
    return atomic_write_text(path, json.dumps(out, indent=2) + "\n")


#: the model keys a project may set: what describes the model, never an opt-in
PROJECT_MODEL_KEYS = frozenset(ModelSpec.__dataclass_fields__) - {"preprocess", "allow_pickle"} | {
    "input_size", "mean", "std", "channels", "grayscale", "resize", "crop_fraction"}


def load(path: str | os.PathLike[str],
         locate: Callable[[str, str], str | None] | None = None, *, allow_code: bool = False) -> dict[str, Any]:
    """Read a project; ``model`` comes back as a ModelSpec, paths absolute.

    ``locate(what, old_path)`` is asked for a new path when the model ("model") or the image
    folder ("images") is missing; returning None drops that part. ``allow_code`` is the user's
    confirmation that the model's architecture code (``file.py:Class``) may run.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProjectError(f"{p}: project file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProjectError(f"{p}: not a ConvLens project ({e})") from e
    version = data.get("convlens_project") if isinstance(data, dict) else None
    if version is None:
        raise ProjectError(f"{p}: not a ConvLens project (no 'convlens_project' version)")
    if version > SCHEMA:
        raise ProjectError(f"{p}: written by a newer ConvLens (schema {version}; this version reads {SCHEMA})")
    base = p.resolve().parent

    def resolve(rel: str, what: str) -> str | None:
        full = Path(rel) if Path(rel).is_absolute() else base / rel
        if full.exists():
            return str(full)
        return locate(what, str(full)) if locate else None

    out = dict(data)
    if data.get("model"):
        from engine.models.config import CodeOptInRequired, build_spec, is_code_arch

        if not isinstance(data["model"], dict) or not isinstance(data["model"].get("path"), str):
            raise ProjectError(f"{p}: 'model' must be a table with a 'path'")
        m = {k: v for k, v in data["model"].items() if k in PROJECT_MODEL_KEYS}  # allow_pickle never
        if is_code_arch(m.get("arch")) and not allow_code:
            raise CodeOptInRequired(p, str(m["arch"]))
        new = resolve(m.pop("path"), "model")
        try:
            out["model"] = build_spec(new, config=None, allow_code=allow_code, **m) if new else None
        except CodeOptInRequired:
            raise
        except ConvLensError as e:
            raise ProjectError(f"{p}: its model description cannot be used: {e}") from e
    if data.get("images"):
        out["images"] = resolve(data["images"], "images")
    return out
