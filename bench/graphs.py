"""Inference-graph EM throughput: columns per second of the streamed diagonal-GMM EM
(engine.graphs.gmm) for a realistic layer, and the cost of merging E-step statistics.

Data: ReLU'd draws from a random 20-component mixture in D = 64 (a mid-network layer's columns:
non-negative, clustered), N = 200,000 columns (the issue's case), float32 and float64; then a
larger case streamed from a float16 ``.npy`` memory map (as the activation cache stores maps),
read batch by batch so it never sits in memory as float32 at once. Merge: adding two shards'
:class:`SuffStats` (K x D moments) and their round trip through plain arrays, against one
batch's E-step. scikit-learn's ``GaussianMixture(covariance_type="diag")`` from the same start
and iteration count runs too when it is importable (a benchmark-only reference).

    .venv/bin/python bench/graphs.py [--n 200000] [--d 64] [--k 20] [--iters 10] [--big 2000000]
                                     [--device cpu|cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _data(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mu = rng.gamma(1.0, 1.0, (k, d)) * (rng.random((k, d)) < 0.4)
    sd = 0.2 + rng.random((k, d)) * 0.5
    z = rng.integers(0, k, n)
    out = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n, 100_000):
        zz = z[lo:lo + 100_000]
        out[lo:lo + len(zz)] = np.maximum(mu[zz] + sd[zz] * rng.standard_normal((len(zz), d)), 0.0)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--big", type=int, default=2_000_000, help="columns of the memory-mapped case (0: skip)")
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = p.parse_args()

    import torch

    from engine.graphs.gmm import ArraySource, EMSettings, SuffStats, e_step, fit_gmm
    from engine.jobs import run_sync

    if a.threads:
        torch.set_num_threads(a.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {a.device}, "
          f"{os.cpu_count()} CPUs, load average {load:.1f}")
    x = _data(a.n, a.d, a.k)
    print(f"\nEM, N={a.n:,} D={a.d} K={a.k}, {a.iters} iterations (tol 0), batches of {a.batch:,} columns")
    print(f"{'dtype':<8} {'s total':>8} {'s/iter':>8} {'columns/s':>12} {'mean loglik':>12}")
    init = None
    for dtype in ("float32", "float64"):
        s = EMSettings(k=a.k, max_iter=a.iters, tol=0.0, dtype=dtype, device=a.device)
        t = time.perf_counter()
        fit = run_sync(fit_gmm(ArraySource(x, a.batch), s, init))
        dt = time.perf_counter() - t
        init = init or fit.init
        passes = fit.n_iter + 1  # + the final pass that scores the returned mixture
        print(f"{dtype:<8} {dt:8.2f} {dt / passes:8.3f} {a.n * passes / dt:12,.0f} {fit.final_loglik:12.4f}")

    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        print("scikit-learn not installed: no reference run")
    else:
        t = time.perf_counter()
        ref = GaussianMixture(a.k, covariance_type="diag", max_iter=a.iters, tol=0, reg_covar=1e-6,
                              weights_init=init.weights, means_init=init.means,
                              precisions_init=1 / init.variances).fit(x)
        dt = time.perf_counter() - t
        print(f"{'sklearn':<8} {dt:8.2f} {dt / a.iters:8.3f} {a.n * a.iters / dt:12,.0f} {ref.score(x):12.4f}")

    mix = fit.mixture
    xb = x[: a.batch]
    t = time.perf_counter()
    reps = 5
    for _ in range(reps):
        st = e_step(xb, mix, dtype="float32", device=a.device)
    t_e = (time.perf_counter() - t) / reps
    other = st
    t = time.perf_counter()
    reps = 2000
    for _ in range(reps):
        merged = st.merge(other)
    t_m = (time.perf_counter() - t) / reps
    t = time.perf_counter()
    for _ in range(200):
        SuffStats.from_arrays(merged.to_arrays())
    t_r = (time.perf_counter() - t) / 200
    print(f"\nmerge of two K={a.k} x D={a.d} statistics: {t_m * 1e6:.1f} us; array round trip {t_r * 1e6:.1f} us; "
          f"one batch's E-step ({a.batch:,} columns, float32): {t_e * 1e3:.1f} ms "
          f"(merge = {t_m / t_e:.2e} of it)")

    if a.big:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "big.npy"
            mm = np.lib.format.open_memmap(path, "w+", np.float16, (a.big, a.d))
            for lo in range(0, a.big, a.n):
                hi = min(a.big, lo + a.n)
                mm[lo:hi] = _data(hi - lo, a.d, a.k, seed=lo)
            mm.flush()
            del mm
            src = ArraySource(np.load(path, mmap_mode="r"), a.batch)
            s = EMSettings(k=a.k, max_iter=3, tol=0.0, dtype="float32", device=a.device)
            t = time.perf_counter()
            fit = run_sync(fit_gmm(src, s))
            dt = time.perf_counter() - t
            passes = fit.n_iter + 2  # + the initialisation pass (sample, variance) and the final pass
            print(f"\nstreamed from a float16 memory map: N={a.big:,} ({a.big * a.d * 2 / 2**20:.0f} MiB on disk, "
                  f"{a.big * a.d * 4 / 2**20:.0f} MiB as float32), {fit.n_iter} iterations: {dt:.1f} s, "
                  f"{a.big * passes / dt:,.0f} columns/s, mean loglik {fit.final_loglik:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
