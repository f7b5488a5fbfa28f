"""Diagonal-covariance Gaussian mixtures fitted by EM in torch, streamed in mini-batches.

The data never has to be in memory at once: a :class:`ColumnSource` hands out batches of
``(n, D)`` rows, as many passes as EM needs. One EM iteration is one pass: the E-step of every
batch gives :class:`SuffStats` (soft counts, first and second moments, summed log-likelihood),
which *merge* by addition across batches and across shards (other processes or machines), and
the M-step turns the merged statistics into the next mixture.

Numerics: responsibilities in log space (``log w_k + log N(x | k)`` normalised with
``logsumexp``), statistics accumulated in float64 whatever the compute dtype (``float32`` or
``float64``), a variance floor ``max(reg, var_floor * var_d)`` per dimension ``d`` (``var_d``
the data's own variance, so the floor scales with the layer), an empty component kept where it
was instead of dividing by zero. Initialisation is k-means++ seeding (D^2 sampling) on a uniform
sample of the rows, the sample assigned to its nearest seed to give the starting weights and
variances. EM stops when the mean log-likelihood per row improves by less than ``tol``
(scikit-learn's rule) or after ``max_iter`` iterations; the log-likelihood of every iteration is
kept (that of the mixture the iteration *started* from, as scikit-learn reports it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from engine.jobs import Job
from engine.types import ConvLensError, Progress

_LOG_2PI = math.log(2.0 * math.pi)


class ColumnSource(Protocol):
    """Re-iterable batches of rows: ``len(source)`` rows of ``dim`` values in all."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(first_row, rows)`` pairs covering the rows in order; ``rows`` is (n, dim)."""
        ...


@dataclass
class ArraySource:
    """An in-memory (or memory-mapped) ``(N, D)`` array, ``batch`` rows at a time."""

    array: np.ndarray
    batch: int = 65536

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def batches(self) -> Iterator[tuple[int, np.ndarray]]:
        for lo in range(0, len(self), self.batch):
            yield lo, np.asarray(self.array[lo:lo + self.batch])


@dataclass
class Mixture:
    """A diagonal Gaussian mixture: ``weights`` (K,), ``means`` (K, D), ``variances`` (K, D)."""

    weights: np.ndarray
    means: np.ndarray
    variances: np.ndarray

    @property
    def k(self) -> int:
        return int(self.weights.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def tensors(self, dtype: torch.dtype, device: torch.device) -> _Terms:
        return _Terms.of(self, dtype, device)

    def log_joint(self, x: np.ndarray) -> np.ndarray:
        """``log w_k + log N(x | k)`` for rows ``x`` (n, D), float64: (n, K)."""
        t = self.tensors(torch.float64, torch.device("cpu"))
        return t.log_joint(_tensor(np.asarray(x, dtype=np.float64))).numpy()

    def log_likelihood(self, x: np.ndarray) -> float:
        """Mean log-likelihood per row of ``x``."""
        lj = torch.as_tensor(self.log_joint(x))
        return float(torch.logsumexp(lj, 1).mean())


@dataclass
class _Terms:
    """A mixture as the tensors the E-step multiplies with."""

    prec: torch.Tensor  # (D, K) 1 / var
    mu_prec: torch.Tensor  # (D, K) mu / var
    const: torch.Tensor  # (K,) log w - 0.5 (D log 2pi + sum log var + sum mu^2 / var)

    @classmethod
    def of(cls, m: Mixture, dtype: torch.dtype, device: torch.device) -> _Terms:
        w = torch.as_tensor(m.weights, dtype=torch.float64)
        mu = torch.as_tensor(m.means, dtype=torch.float64)
        var = torch.as_tensor(m.variances, dtype=torch.float64)
        prec = 1.0 / var
        const = (torch.log(w.clamp_min(1e-300)) - 0.5 * (mu.shape[1] * _LOG_2PI + torch.log(var).sum(1)
                                                       + (mu * mu * prec).sum(1)))
        # stored transposed (D, K) and contiguous: the E-step's products are (n, D) @ (D, K)
        return cls(prec.T.contiguous().to(device, dtype), (mu * prec).T.contiguous().to(device, dtype),
                   const.to(device, dtype))

    def log_joint(self, x: torch.Tensor) -> torch.Tensor:
        # -0.5 * sum_d (x - mu)^2 / var, expanded into two matrix products (no (n, K, D) tensor)
        quad = (x * x) @ self.prec - 2.0 * (x @ self.mu_prec)
        return self.const - 0.5 * quad


@dataclass
class SuffStats:
    """E-step sufficient statistics of some rows (float64): they merge by addition.

    ``n`` rows; ``nk[k] = sum_i r_ik``; ``sx[k] = sum_i r_ik x_i``; ``sxx[k] = sum_i r_ik x_i^2``;
    ``ll = sum_i log p(x_i)`` under the mixture the E-step used.
    """

    n: int
    nk: np.ndarray
    sx: np.ndarray
    sxx: np.ndarray
    ll: float

    @classmethod
    def zeros(cls, k: int, d: int) -> SuffStats:
        return cls(0, np.zeros(k), np.zeros((k, d)), np.zeros((k, d)), 0.0)

    def merge(self, other: SuffStats) -> SuffStats:
        return SuffStats(self.n + other.n, self.nk + other.nk, self.sx + other.sx,
                         self.sxx + other.sxx, self.ll + other.ll)

    __add__ = merge

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (to send a shard's statistics elsewhere); :meth:`from_arrays` reverses."""
        return {"n": np.array(self.n, dtype=np.int64), "nk": self.nk, "sx": self.sx, "sxx": self.sxx,
                "ll": np.array(self.ll)}

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> SuffStats:
        return cls(int(a["n"]), np.asarray(a["nk"], np.float64), np.asarray(a["sx"], np.float64),
                   np.asarray(a["sxx"], np.float64), float(a["ll"]))


def _torch_dtype(name: str) -> torch.dtype:
    if name not in ("float32", "float64"):
        raise ConvLensError(f"dtype must be float32 or float64, got {name!r}")
    return torch.float32 if name == "float32" else torch.float64


def _tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    return torch.from_numpy(np.require(x, requirements="W"))  # read-only memory maps: a copy


def e_step(x: np.ndarray | torch.Tensor, mixture: Mixture | _Terms, *, dtype: str = "float64",
           device: str | torch.device = "cpu") -> SuffStats:
    """Sufficient statistics of rows ``x`` (n, D) under ``mixture``."""
    dev, dt = torch.device(device), _torch_dtype(dtype)
    terms = mixture.tensors(dt, dev) if isinstance(mixture, Mixture) else mixture
    xt = _tensor(x).to(dev, dt)
    lj = terms.log_joint(xt)
    top = lj.max(1, keepdim=True).values  # log-space normalisation: one exp per entry
    r = torch.exp(lj - top)
    tot = r.sum(1, keepdim=True)
    r = r / tot
    lse = top[:, 0] + torch.log(tot[:, 0])
    nk = r.sum(0)
    sx = r.T @ xt
    sxx = r.T @ (xt * xt)
    return SuffStats(int(xt.shape[0]), nk.double().cpu().numpy(), sx.double().cpu().numpy(),
                     sxx.double().cpu().numpy(), float(lse.double().sum()))


def m_step(stats: SuffStats, floor: np.ndarray | float, previous: Mixture | None = None) -> Mixture:
    """The mixture that maximises the expected log-likelihood of ``stats``.

    Variances are floored at ``floor`` (per dimension or a scalar). A component with no mass
    (``nk`` below 1e-10 of the rows) keeps its ``previous`` mean and variance, weight ~0.
    """
    if stats.n <= 0:
        raise ConvLensError("no rows to fit a mixture to")
    nk = stats.nk
    safe = np.maximum(nk, 10 * np.finfo(np.float64).eps)
    means = stats.sx / safe[:, None]
    var = stats.sxx / safe[:, None] - means * means
    empty = nk < 1e-10 * stats.n
    if previous is not None and empty.any():
        means[empty] = previous.means[empty]
        var[empty] = previous.variances[empty]
    var = np.maximum(var, floor)
    w = nk / nk.sum()
    return Mixture(w, means, var)


@dataclass
class FitResult:
    """A fitted mixture and its history: ``loglik[i]`` is the mean log-likelihood per row at
    iteration ``i`` (under the mixture that iteration started from); ``final_loglik`` that of
    the returned mixture."""

    mixture: Mixture
    loglik: list[float]
    final_loglik: float
    n_iter: int
    converged: bool
    n: int
    floor: np.ndarray
    init: Mixture = field(repr=False)


@dataclass(frozen=True)
class EMSettings:
    k: int
    max_iter: int = 100
    tol: float = 1e-3
    var_floor: float = 1e-3
    reg: float = 1e-6
    init_sample: int = 20000
    dtype: str = "float32"
    seed: int = 0
    device: str = "cpu"


def _sample_rows(source: ColumnSource, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A uniform sample of ``m`` rows (sorted positions), and the data's per-dimension mean and
    variance (float64, one pass)."""
    n = len(source)
    pick = np.sort(rng.choice(n, size=min(m, n), replace=False))
    out = []
    s1 = np.zeros(source.dim)
    s2 = np.zeros(source.dim)
    for lo, rows in source.batches():
        r = np.asarray(rows, dtype=np.float64)
        s1 += r.sum(0)
        s2 += (r * r).sum(0)
        a, b = np.searchsorted(pick, [lo, lo + len(r)])
        out.append(r[pick[a:b] - lo])
    mean = s1 / n
    var = np.maximum(s2 / n - mean * mean, 0.0)
    return np.concatenate(out) if out else np.zeros((0, source.dim)), mean, var


def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeds (Arthur & Vassilvitskii 2007): indices of ``k`` rows of ``x``."""
    n = len(x)
    xt = torch.as_tensor(x, dtype=torch.float64)
    first = int(rng.integers(n))
    chosen = [first]
    d2 = ((xt - xt[first]) ** 2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct rows than components: repeat a seed
            nxt = int(rng.integers(n))
        else:
            nxt = int(np.searchsorted(np.cumsum(d2.numpy()), rng.random() * total))
            nxt = min(nxt, n - 1)
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((xt - xt[nxt]) ** 2).sum(1))
    return np.array(chosen)


def initial_mixture(sample: np.ndarray, k: int, floor: np.ndarray, rng: np.random.Generator) -> Mixture:
    """k-means++ seeds; the sample assigned to its nearest seed gives weights and variances."""
    seeds = sample[kmeans_pp(sample, k, rng)]
    xt, st = torch.as_tensor(sample), torch.as_tensor(seeds)
    nearest = torch.cdist(xt, st).argmin(1).numpy()
    w = np.bincount(nearest, minlength=k).astype(np.float64)
    var = np.empty_like(seeds)
    glob = sample.var(0) if len(sample) > 1 else np.ones(sample.shape[1])
    for j in range(k):
        rows = sample[nearest == j]
        var[j] = rows.var(0) if len(rows) > 1 else glob
    w = np.maximum(w, 1.0)
    return Mixture(w / w.sum(), seeds.copy(), np.maximum(var, floor))


def fit_gmm(source: ColumnSource, settings: EMSettings, init: Mixture | None = None,
            what: str = "") -> Job[FitResult]:
    """Fit a K-component diagonal mixture to ``source`` by EM (a job: one Progress per batch).

    ``init`` replaces the k-means++ initialisation (e.g. to compare with another implementation
    from the same start).
    """
    s = settings
    n = len(source)
    if n == 0:
        raise ConvLensError(f"{what or 'data'}: no columns to fit")
    if s.k < 1 or s.max_iter < 1:
        raise ConvLensError(f"{what or 'data'}: K and max_iter must be >= 1, got {s.k} and {s.max_iter}")
    if n < s.k:
        raise ConvLensError(f"{what or 'data'}: {n} columns cannot fit {s.k} components (K > columns)")
    rng = np.random.default_rng(s.seed)
    dev, dt = torch.device(s.device), _torch_dtype(s.dtype)
    tag = f"{what}: " if what else ""
    yield Progress(0.0, f"{tag}initialising {s.k} components")
    sample, _mean, var = _sample_rows(source, s.init_sample, rng)
    floor = np.maximum(s.reg, s.var_floor * var)
    mix = init if init is not None else initial_mixture(sample, s.k, floor, rng)
    start = mix
    history: list[float] = []
    converged = False
    n_batches = max(1, -(-n // max(1, _batch_rows(source))))
    it = 0
    for it in range(1, s.max_iter + 1):
        stats = yield from _pass(source, mix, dt, dev, it, s.max_iter, n_batches, tag)
        history.append(stats.ll / stats.n)
        mix = m_step(stats, floor, mix)
        if len(history) > 1 and abs(history[-1] - history[-2]) < s.tol:
            converged = True
            break
    final = yield from _pass(source, mix, dt, dev, it + 1, s.max_iter + 1, n_batches, tag + "final ")
    return FitResult(mix, history, final.ll / final.n, it, converged, n, floor, start)


def _batch_rows(source: ColumnSource) -> int:
    return int(getattr(source, "batch", 0) or getattr(source, "batch_rows", 0) or 65536)


def _pass(source: ColumnSource, mix: Mixture, dt: torch.dtype, dev: torch.device, it: int, total: int,
          n_batches: int, tag: str) -> Job[SuffStats]:
    terms = mix.tensors(dt, dev)
    stats = SuffStats.zeros(mix.k, mix.dim)
    for b, (_lo, rows) in enumerate(source.batches()):
        stats = stats.merge(e_step(rows, terms, dtype="float32" if dt == torch.float32 else "float64", device=dev))
        frac = min(1.0, ((it - 1) + (b + 1) / n_batches) / total)
        ll = f", log-likelihood {stats.ll / stats.n:.4f}" if stats.n else ""
        yield Progress(frac, f"{tag}EM iteration {it}{ll}")
    return stats


@dataclass
class Assignment:
    """Hard words of every row and the best rows of each word.

    ``words`` (N,) int32: ``argmax_k P(k | x)``. ``top_rows`` (K, M) int64: rows assigned to
    word k with the highest ``log w_k N(x | k)``, best first (-1 pads); ``top_scores`` (K, M)
    those values (-inf pads). ``counts`` (K,) rows per word.
    """

    words: np.ndarray
    top_rows: np.ndarray
    top_scores: np.ndarray
    counts: np.ndarray


def assign(source: ColumnSource, mix: Mixture, top: int, *, dtype: str = "float32",
           device: str = "cpu", what: str = "") -> Job[Assignment]:
    """Hard-assign every row of ``source`` to its word (a job: one Progress per batch)."""
    dev, dt = torch.device(device), _torch_dtype(dtype)
    terms = mix.tensors(dt, dev)
    n, k = len(source), mix.k
    words = np.empty(n, dtype=np.int32)
    best_s = torch.full((k, top), -math.inf, dtype=torch.float64, device=dev)
    best_i = torch.full((k, top), -1, dtype=torch.int64, device=dev)
    done = 0
    for lo, rows in source.batches():
        lj = terms.log_joint(_tensor(rows).to(dev, dt))
        score, w = lj.max(1)
        words[lo:lo + len(rows)] = w.cpu().numpy()
        masked = torch.full((k, len(rows)), -math.inf, dtype=torch.float64, device=dev)
        masked[w, torch.arange(len(rows), device=dev)] = score.double()
        m = min(top, len(rows))
        vals, idx = masked.topk(m, dim=1)
        cand_s = torch.cat([best_s, vals], 1)
        cand_i = torch.cat([best_i, torch.where(torch.isfinite(vals), idx + lo, -1)], 1)
        best_s, order = cand_s.topk(top, dim=1)
        best_i = cand_i.gather(1, order)
        done += len(rows)
        yield Progress(done / max(n, 1), f"{what + ': ' if what else ''}visual words {done}/{n}")
    counts = np.bincount(words, minlength=k).astype(np.int64)
    return Assignment(words, best_i.cpu().numpy(), best_s.cpu().numpy(), counts)
