"""Running ConvLens jobs on a Ray cluster (optional: ``pip install convlens[cluster]``).

An *executor* says where a job's model passes run: ``None`` is this process (the default, what
every job does without this package), a :class:`RayExecutor` a Ray cluster (``"local"`` starts
one on this machine). The Ray jobs take the same arguments as the in-process ones plus the
executor and give the same results, written into the same cache entries, so the app and every
command open a cluster run like a local one:

* :func:`extract_on_ray` for :func:`engine.activations.extract` (``predict`` and
  ``activations``);
* :func:`dissect_on_ray` for :func:`engine.dissection.dissect`.

How: Ray Data's ``map_batches`` with a fixed pool of actors (one GPU each where there are
GPUs). Each actor loads the model once, through ConvLens's own safe loaders (the file's bytes
travel through the object store; see :mod:`engine.cluster.payload`), decodes its blocks of
images itself (bad files are skipped and named as in a local run) and returns per-image rows
or partial, mergeable statistics; the driver reduces them. Ray's actor restarts and task
retries (``max_restarts``/``max_task_retries``, on by default) recover a killed worker;
closing the job (cancel) stops the Ray tasks and writes nothing.

Importing this package never imports Ray (nor torch): :func:`require_ray` says how to install
it when it is missing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_WHERE = {
    "RayExecutor": "executor",
    "require_ray": "executor",
    "ray_available": "executor",
    "INSTALL_HINT": "executor",
    "extract_on_ray": "extract",
    "dissect_on_ray": "dissect",
    "ModelPayload": "payload",
}

__all__ = ["INSTALL_HINT", "ModelPayload", "RayExecutor", "dissect_on_ray", "extract_on_ray", "ray_available", "require_ray"]

if TYPE_CHECKING:
    from engine.cluster.dissect import dissect_on_ray as dissect_on_ray
    from engine.cluster.executor import INSTALL_HINT as INSTALL_HINT
    from engine.cluster.executor import RayExecutor as RayExecutor
    from engine.cluster.executor import ray_available as ray_available
    from engine.cluster.executor import require_ray as require_ray
    from engine.cluster.extract import extract_on_ray as extract_on_ray
    from engine.cluster.payload import ModelPayload as ModelPayload


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
