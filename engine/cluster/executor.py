"""The Ray executor: connecting to (or starting) a cluster and running one pool of actors.

:class:`RayExecutor` holds where to run (``address``: ``"local"`` starts a Ray instance on this
machine, anything else is given to ``ray.init(address=...)``: ``"auto"``, ``"host:6379"``,
``"ray://host:10001"``), how many actors (``workers``) and what each takes
(``gpus_per_worker``: None means one GPU per actor when the cluster has GPUs, else none;
``cpus_per_worker``). :meth:`RayExecutor.map_blocks` runs a callable class over blocks of
image indices with Ray Data's ``map_batches`` and a fixed-size actor pool, and yields the
output blocks as they come back; closing that generator (a cancelled job) stops the
execution, which ends the actors and their queued tasks.

Ray Data's actor-pool argument changed between releases: ``compute=ActorPoolStrategy(size=n)``
in early 2.x and again in current releases (which deprecate ``concurrency``), ``concurrency=n``
in the releases between (where ``compute`` for actors was discouraged). :func:`pool_arguments`
reads which one the installed Ray documents as current; the pinned range
(``ray[data]>=2.40,<2.61``) is tested with Ray 2.60, which takes
``compute=ActorPoolStrategy(size=n)``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import re
from collections.abc import Generator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from engine.types import ConvLensError

log = logging.getLogger("convlens.cluster")

INSTALL_HINT = "pip install convlens[cluster]"
RAY_RANGE = ">=2.40,<2.61"


def ray_available() -> bool:
    """Whether Ray (with Ray Data) can be imported here."""
    try:
        require_ray()
    except ConvLensError:
        return False
    return True


def require_ray() -> ModuleType:
    """The ``ray`` module with ``ray.data`` imported, or a ConvLensError saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ConvLensError(f"running on a Ray cluster needs Ray Data, which is not installed here "
                            f"({e.name or 'ray'} missing): {INSTALL_HINT} (ray[data]{RAY_RANGE})") from None
    return ray


def pool_arguments(workers: int) -> dict[str, Any]:
    """The ``map_batches`` keyword for a fixed pool of ``workers`` actors in the installed Ray
    (see the module docstring)."""
    import ray.data

    params = inspect.signature(ray.data.Dataset.map_batches).parameters
    strategy = getattr(ray.data, "ActorPoolStrategy", None)
    doc = inspect.getdoc(ray.data.Dataset.map_batches) or ""
    concurrency_deprecated = "concurrency: This argument is deprecated" in " ".join(doc.split())
    if "compute" in params and strategy is not None and (concurrency_deprecated or "concurrency" not in params):
        return {"compute": strategy(size=workers)}
    return {"concurrency": workers}


_REMOTE_ERROR = re.compile(r"^engine\.[\w.]+\.(\w+): (.+)$", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _convlens_cause(e: BaseException) -> ConvLensError | None:
    """The ConvLensError a worker raised, found in the chain of Ray's wrappers (RayTaskError,
    Ray Data's UserCodeException), or None. Ray Data passes a failed block's exception on as
    text (its remote traceback): the last ``engine.<module>.<Error>: message`` line is taken."""
    found = _chain_cause(e)
    if found is not None:
        return found
    lines = _REMOTE_ERROR.findall(_ANSI.sub("", str(e)))
    if lines:
        return ConvLensError(lines[-1][1])
    return None


def _chain_cause(e: BaseException) -> ConvLensError | None:
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        cause = getattr(x, "cause", None)
        if isinstance(cause, ConvLensError):
            return cause
        if isinstance(x, ConvLensError) and type(x).__module__.startswith("engine"):
            return x
        todo += [x.__cause__, x.__context__, cause if isinstance(cause, BaseException) else None]
    return None


class RayExecutor:
    """Where and how a job runs on Ray (see the module docstring).

    Use as a context manager, or call :meth:`connect` / :meth:`shutdown`: a local instance this
    executor started is shut down again; a cluster it joined, or a Ray already initialised in
    this process (a test's fixture, the app), is left running. ``seen_pids`` collects the
    process ids of the actors that returned blocks (what ran where; a test kills one).
    ``block_images`` sets how many images each actor task takes (default: chosen per job so
    that each actor gets several blocks).
    """

    def __init__(self, address: str = "local", workers: int = 2, gpus_per_worker: float | None = None,
                 cpus_per_worker: float = 1.0, block_images: int | None = None,
                 local_cpus: int | None = None) -> None:
        if workers < 1:
            raise ConvLensError(f"workers must be >= 1, got {workers}")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise ConvLensError(f"gpus per worker must be >= 0, got {gpus_per_worker}")
        if cpus_per_worker <= 0:
            raise ConvLensError(f"cpus per worker must be > 0, got {cpus_per_worker}")
        if not str(address).strip():
            raise ConvLensError("the Ray address is empty: give 'local' or the cluster's address")
        self.address = str(address).strip()
        self.workers = int(workers)
        self.gpus_per_worker = gpus_per_worker
        self.cpus_per_worker = float(cpus_per_worker)
        self.block_images = block_images
        self.local_cpus = local_cpus
        self.seen_pids: set[int] = set()
        self._started = False

    def __repr__(self) -> str:
        return f"RayExecutor({self.describe()})"

    def describe(self) -> str:
        gpus = "auto" if self.gpus_per_worker is None else f"{self.gpus_per_worker:g}"
        return f"Ray {self.address}, {self.workers} worker{'s' if self.workers != 1 else ''}, {gpus} GPU each"

    # ------------------------------------------------------------------------- connection

    def connect(self) -> ModuleType:
        """Join the cluster (or start the local one); returns the ``ray`` module."""
        ray = require_ray()
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "logging_level": logging.WARNING}
            if self.address == "local":
                need = math.ceil(self.workers * self.cpus_per_worker)
                kwargs["num_cpus"] = self.local_cpus or max(need, 1)
            else:
                kwargs["address"] = self.address
                del kwargs["include_dashboard"]
            try:
                ray.init(**kwargs)
            except ConnectionError as e:
                raise ConvLensError(f"cannot reach the Ray cluster at {self.address}: {e}") from None
            except (RuntimeError, ValueError) as e:
                raise ConvLensError(f"cannot start or join Ray ({self.address}): {e}") from None
            self._started = True
        self._quiet_ray_data()
        return ray

    def shutdown(self) -> None:
        """Stop the local Ray instance if this executor started it."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def __enter__(self) -> RayExecutor:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @staticmethod
    def _quiet_ray_data() -> None:
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        for name in ("print_on_execution_start", "enable_auto_log_stats"):
            if hasattr(ctx, name):
                setattr(ctx, name, False)
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # not "progress bars disabled"

    def gpus(self) -> float:
        """GPUs per actor: as given, else 1 when the cluster has GPUs, else 0."""
        if self.gpus_per_worker is not None:
            return float(self.gpus_per_worker)
        import ray

        return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0

    def device(self) -> str:
        """The device a worker's model runs on."""
        return "cuda" if self.gpus() > 0 else "cpu"

    def threads(self) -> int:
        """Threads per actor (torch intra-op threads and image decoding)."""
        return max(1, int(self.cpus_per_worker))

    def put(self, obj: Any) -> Any:
        """``ray.put(obj)``: an object-store reference the caller keeps while the job runs."""
        import ray

        return ray.put(obj)

    def block_size(self, n: int, batch_size: int) -> int:
        """Images per actor task: a multiple of ``batch_size`` (so the forward batches are those
        of a local run), about ``n / (4 * workers)`` unless ``block_images`` says."""
        want = self.block_images or math.ceil(n / (4 * self.workers))
        return max(batch_size, math.ceil(want / batch_size) * batch_size)

    # ------------------------------------------------------------------------- running

    def map_blocks(self, worker: type, constructor_kwargs: dict[str, Any],
                   blocks: Sequence[np.ndarray]) -> Generator[dict[str, np.ndarray], None, None]:
        """Run ``worker`` (a callable class: ``worker(**constructor_kwargs)`` once per actor,
        then ``actor({"data": block})`` per block) over ``blocks`` of image indices on a pool
        of ``workers`` actors; yields each output block (a dict of numpy columns) as it comes
        back, in no particular order. A ConvLensError a worker raised is raised here with its
        own message. Closing the generator stops the execution (actors and queued tasks)."""
        ray = self.connect()
        gpus = self.gpus()
        # Ray Data's actor pool already restarts a dead actor and retries its tasks
        # (max_restarts=-1, max_task_retries=-1 by default): a killed worker costs its blocks
        remote: dict[str, Any] = {"num_cpus": self.cpus_per_worker}
        if gpus > 0:
            remote["num_gpus"] = gpus
        # one Ray block per image block, built here (from_items starts no tasks); the actor is
        # given the block list once and each row names a block
        items = [{"block": j} for j in range(len(blocks))]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            _BlockCaller, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"worker": worker, "kwargs": constructor_kwargs,
                                   "blocks": [np.asarray(b, np.int64) for b in blocks]},
            **pool_arguments(self.workers), **remote)
        it = iter(ds.iter_batches(batch_format="numpy", batch_size=None, prefetch_batches=1))
        try:
            while True:
                try:
                    out = next(it)
                except StopIteration:
                    return
                except ConvLensError:
                    raise
                except Exception as e:
                    cause = _convlens_cause(e)
                    if cause is not None:
                        raise ConvLensError(str(cause.args[0]) if cause.args else str(cause)) from None
                    raise
                if "pid" in out:
                    self.seen_pids.update(int(p) for p in np.unique(out["pid"]))
                yield out
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    close()
            del it, ds


class _BlockCaller:
    """The actor Ray Data runs: builds ``worker(**kwargs)`` once, then per row (one block
    number) calls it on that block's image indices."""

    def __init__(self, worker: type, kwargs: dict[str, Any], blocks: list[np.ndarray]) -> None:
        self.blocks = blocks
        self.error: ConvLensError | None = None
        try:
            self.worker = worker(**kwargs)
        except ConvLensError as e:  # raised from the first call: a task error carries it to the driver
            self.error = e          # (an actor that fails to start reaches it as text only)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.error is not None:
            raise self.error
        (j,) = np.asarray(batch["block"]).reshape(-1).tolist()
        out: dict[str, np.ndarray] = self.worker({"data": self.blocks[int(j)]})
        return out


def worker_threads(n: int) -> None:
    """In an actor: use ``n`` threads for torch (an actor is given ``cpus_per_worker`` cores)."""
    with contextlib.suppress(Exception):
        import torch

        torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
