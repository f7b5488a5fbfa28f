"""engine.analysis: the cached-job helper in both modes, damaged and stale entries, cancel."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from engine import analysis
from engine.analysis import Method, Params, cached_job, lookup
from engine.cache import Cache, DamagedEntry, check_array, check_meta, load_array, write_meta
from engine.jobs import run_sync
from engine.types import Progress


@dataclass(frozen=True)
class Squares:
    """A tiny 'method' result: the squares of 0..n-1."""

    values: np.ndarray
    from_cache: bool = False


def _save(r: Squares, folder: Path) -> None:
    np.save(folder / "values.npy", r.values)
    write_meta(folder, {"version": 1})


def _load(folder: Path) -> Squares:
    check_meta(folder, 1, ())
    n = check_array(folder, "values", np.int64, (None,))[0]
    assert n >= 0
    return Squares(load_array(folder, "values", mmap=False))


def _compute(n: int, calls: list[str]):
    calls.append("compute")
    out = []
    for i in range(n):
        out.append(i * i)
        yield Progress(i / n, f"{i}/{n}")
    return Squares(np.asarray(out, dtype=np.int64))


def _stream(n: int, calls: list[str]):
    def write(folder: Path):
        calls.append("write")
        mm = np.lib.format.open_memmap(folder / "values.npy", "w+", np.int64, (n,))
        for i in range(n):
            mm[i] = i * i
            yield Progress(i / n, f"{i}/{n}")
        del mm
        write_meta(folder, {"version": 1})
    return write


@pytest.fixture
def log_text():
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    handler = Collect(logging.WARNING)
    logging.getLogger("convlens").addHandler(handler)
    try:
        yield lines
    finally:
        logging.getLogger("convlens").removeHandler(handler)


@pytest.mark.parametrize("mode", ["compute", "write"])
def test_cached_job_computes_once_then_reads_and_recomputes_damaged_or_stale(tmp_path: Path, mode: str,
                                                                             log_text) -> None:
    cache = Cache(tmp_path / "c")
    calls: list[str] = []

    def job(accept=None):
        how = ({"compute": lambda: _compute(5, calls), "save": _save} if mode == "compute"
               else {"write": _stream(5, calls)})
        return cached_job(cache, "squares", "k1", _load, accept=accept, **how)

    first = run_sync(job())
    assert first.values.tolist() == [0, 1, 4, 9, 16] and not first.from_cache and calls == [mode]
    second = run_sync(job())
    assert second.from_cache and second.values.tolist() == first.values.tolist() and calls == [mode]
    entry = cache.get("squares", "k1")
    assert entry is not None
    (entry / "values.npy").write_bytes((entry / "values.npy").read_bytes()[:-8])  # truncated
    third = run_sync(job())
    assert not third.from_cache and calls == [mode, mode] and third.values.tolist() == first.values.tolist()
    assert any("damaged cache entry" in m and str(entry) in m for m in log_text)
    stale = run_sync(job(accept=lambda r: False))  # e.g. input files changed
    assert not stale.from_cache and calls == [mode] * 3
    assert run_sync(job()).from_cache


@pytest.mark.parametrize("mode", ["compute", "write"])
def test_a_cancelled_cached_job_leaves_no_entry(tmp_path: Path, mode: str) -> None:
    cache = Cache(tmp_path / "c")
    calls: list[str] = []
    how = ({"compute": lambda: _compute(50, calls), "save": _save} if mode == "compute"
           else {"write": _stream(50, calls)})
    gen = cached_job(cache, "squares", "k1", _load, **how)
    next(gen), next(gen), next(gen)
    gen.close()
    assert cache.get("squares", "k1") is None
    assert not (tmp_path / "c" / "squares").exists() or list((tmp_path / "c" / "squares").iterdir()) == []


def test_lookup_and_argument_checks(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    assert lookup(cache, "squares", "none", _load) is None
    with cache.write("squares", "bad") as tmp:
        write_meta(tmp, {"version": 2})
    with pytest.raises(DamagedEntry):
        _load(cache.path("squares", "bad"))
    assert lookup(cache, "squares", "bad", _load) is None and cache.get("squares", "bad") is None
    with pytest.raises(TypeError, match="either compute and save, or write"):
        run_sync(cached_job(cache, "squares", "k", _load, compute=lambda: _compute(1, [])))


def test_the_dissection_package_has_the_method_shape() -> None:
    from engine.dissection import run as dissection

    method: Method = dissection  # a module satisfies the protocol
    assert method.CACHE_KIND == "dissection" and isinstance(method.FORMAT_VERSION, int)
    assert method.run is dissection.dissect and method.load_result is dissection.load_result
    params = dissection.DissectionParams()
    assert isinstance(params, Params)
    assert "batch_size" not in params.result_key() and params.result_key()["quantile"] == 0.005
    assert analysis.mark_from_cache(Squares(np.zeros(1)), True).from_cache


def test_the_key_covers_every_model_setting_that_changes_a_result() -> None:
    import torch

    from engine.analysis import method_key
    from engine.backends.torch_backend import TorchBackend
    from engine.types import ModelSpec, Preprocess

    base = ModelSpec(path="m.pt", preprocess=Preprocess(input_size=(4, 4)))
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 2))

    def key(spec: ModelSpec) -> str:
        return method_key("k", 1, TorchBackend(net, spec, "cpu"), "sha", "data")

    ref = key(base)
    changed = {"scores": "probs", "output_index": 1, "classes": ("a", "b"), "num_classes": 2, "arch": "x.py:Net",
               "preprocess": Preprocess(input_size=(4, 4), mean=(0.5, 0.5, 0.5))}
    for name, value in changed.items():
        assert key(base.with_(**{name: value})) != ref, name
    assert key(base.with_(device="cpu")) == ref == key(base.with_(path="elsewhere.pt"))  # the content hash names the model
