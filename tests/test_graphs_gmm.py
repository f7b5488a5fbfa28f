"""Streamed diagonal-GMM EM (engine.graphs.gmm) on data drawn from known mixtures."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from engine.graphs.gmm import (
    ArraySource,
    EMSettings,
    Mixture,
    SuffStats,
    assign,
    e_step,
    fit_gmm,
    initial_mixture,
    kmeans_pp,
    m_step,
)
from engine.jobs import run_sync
from engine.types import ConvLensError, Progress

MU = np.array([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0], [0.0, -5.0, 5.0, 2.0]])
SD = np.array([[1.0, 1.0, 1.0, 1.0], [0.5, 2.0, 1.0, 1.0], [1.0, 1.0, 0.3, 1.0]])
W = np.array([0.5, 0.3, 0.2])


def _draw(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.choice(len(W), n, p=W)
    return MU[z] + SD[z] * rng.standard_normal((n, MU.shape[1]))


def _match(means: np.ndarray) -> np.ndarray:
    """Fitted component index for each true component (nearest mean)."""
    return np.array([int(np.argmin(((means - m) ** 2).sum(1))) for m in MU])


@pytest.fixture(scope="module")
def memmapped(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    path = tmp_path_factory.mktemp("gmm") / "x.npy"
    np.save(path, _draw(30000).astype(np.float32))
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_em_streamed_from_a_memory_map_recovers_the_mixture(memmapped: np.ndarray, dtype: str) -> None:
    src = ArraySource(memmapped, batch=4096)  # 8 batches per pass: never all rows at once
    steps: list[Progress] = []
    fit = run_sync(fit_gmm(src, EMSettings(k=3, dtype=dtype, tol=1e-6, max_iter=200)), steps.append)
    assert fit.converged and fit.n == 30000
    assert len([p for p in steps if "EM iteration" in p.message]) >= 8 * fit.n_iter  # one per batch
    idx = _match(fit.mixture.means)
    assert sorted(idx) == [0, 1, 2]
    np.testing.assert_allclose(fit.mixture.weights[idx], W, atol=0.01)
    np.testing.assert_allclose(fit.mixture.means[idx], MU, atol=0.06)
    np.testing.assert_allclose(np.sqrt(fit.mixture.variances[idx]), SD, rtol=0.05)
    # EM never decreases the likelihood; the final value is that of the returned mixture
    assert np.all(np.diff(fit.loglik) > -1e-6)
    x = np.asarray(memmapped, dtype=np.float64)
    assert fit.final_loglik == pytest.approx(fit.mixture.log_likelihood(x), rel=1e-5)
    # the true mixture is about as likely as the fitted one (sampling noise only)
    true = Mixture(W, MU, SD**2)
    assert fit.final_loglik >= true.log_likelihood(x) - 1e-9
    assert fit.final_loglik - true.log_likelihood(x) < 0.01


def test_e_step_statistics_merge_across_batches_and_shards() -> None:
    x = _draw(5000, seed=3)
    mix = Mixture(np.array([0.2, 0.3, 0.5]), MU + 0.3, SD**2 * 1.5)
    whole = e_step(x, mix, dtype="float64")
    # two shards, each streamed in batches, merged (as two processes would send them)
    shard = [SuffStats.zeros(3, 4), SuffStats.zeros(3, 4)]
    for lo in range(0, 5000, 700):
        part = e_step(x[lo:lo + 700], mix, dtype="float64")
        s = 0 if lo < 2800 else 1
        shard[s] = shard[s] + part
    sent = [SuffStats.from_arrays(s.to_arrays()) for s in shard]
    merged = sent[1].merge(sent[0])
    assert merged.n == whole.n == 5000
    for name in ("nk", "sx", "sxx"):
        np.testing.assert_allclose(getattr(merged, name), getattr(whole, name), rtol=1e-12, atol=1e-9)
    assert merged.ll == pytest.approx(whole.ll, rel=1e-13)
    # merging is order-free, and the M-step of merged statistics is the one-shot M-step
    assert np.array_equal(sent[0].merge(sent[1]).sx, merged.sx)
    a, b = m_step(merged, 1e-6), m_step(whole, 1e-6)
    np.testing.assert_allclose(a.means, b.means, rtol=1e-12)
    np.testing.assert_allclose(a.variances, b.variances, rtol=1e-11)
    np.testing.assert_allclose(a.weights, b.weights, rtol=1e-12)
    # sufficient statistics against their definition (responsibilities by brute force)
    lj = mix.log_joint(x)
    r = np.exp(lj - lj.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    np.testing.assert_allclose(whole.nk, r.sum(0), rtol=1e-12)
    np.testing.assert_allclose(whole.sxx, r.T @ (x * x), rtol=1e-12)
    # log N(x | k) by its formula
    k = 1
    direct = (np.log(mix.weights[k]) - 0.5 * np.sum(np.log(2 * np.pi * mix.variances[k]))
              - 0.5 * np.sum((x - mix.means[k]) ** 2 / mix.variances[k], 1))
    np.testing.assert_allclose(lj[:, k], direct, rtol=1e-12)


def test_batch_size_changes_only_rounding() -> None:
    x = _draw(6000, seed=4)
    fits = [run_sync(fit_gmm(ArraySource(x, batch=b), EMSettings(k=3, dtype="float64", max_iter=15, tol=0)))
            for b in (6000, 1000, 777)]
    for f in fits[1:]:
        assert f.n_iter == fits[0].n_iter == 15
        np.testing.assert_allclose(f.mixture.means, fits[0].mixture.means, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(f.loglik, fits[0].loglik, rtol=1e-11)


def test_variance_floor_and_constant_dimensions() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal((2000, 2)), np.full((2000, 1), 3.0)], 1)  # a dead channel
    fit = run_sync(fit_gmm(ArraySource(x, 512), EMSettings(k=4, dtype="float64", var_floor=1e-3, reg=1e-6)))
    assert np.isfinite(fit.mixture.variances).all() and np.isfinite(fit.loglik).all()
    np.testing.assert_array_equal(fit.mixture.variances[:, 2], 1e-6)  # its variance is 0: the absolute floor
    assert (fit.mixture.variances[:, :2] >= 1e-3 * x[:, :2].var(0) * (1 - 1e-9)).all()


def test_kmeans_pp_seeds_one_per_separated_cluster() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    x = np.concatenate([c + rng.standard_normal((300, 2)) for c in centres])
    for seed in range(5):
        seeds = kmeans_pp(x, 4, np.random.default_rng(seed))
        assert sorted(set(seeds // 300)) == [0, 1, 2, 3]
    init = initial_mixture(x, 4, np.full(2, 1e-6), np.random.default_rng(0))
    np.testing.assert_allclose(np.sort(init.weights), 0.25, atol=1e-12)
    np.testing.assert_allclose(init.variances, 1.0, rtol=0.25)


def test_words_and_top_rows_are_exact() -> None:
    x = _draw(3000, seed=5)
    mix = Mixture(W, MU, SD**2)
    got = run_sync(assign(ArraySource(x, 400), mix, 5, dtype="float64"))
    lj = mix.log_joint(x)
    np.testing.assert_array_equal(got.words, lj.argmax(1))
    np.testing.assert_array_equal(got.counts, np.bincount(lj.argmax(1), minlength=3))
    for k in range(3):
        rows = np.flatnonzero(lj.argmax(1) == k)
        best = rows[np.argsort(-lj[rows, k], kind="stable")[:5]]
        np.testing.assert_array_equal(got.top_rows[k], best)
        np.testing.assert_allclose(got.top_scores[k], lj[best, k], rtol=1e-12)


def test_too_few_columns_and_bad_settings_are_errors() -> None:
    with pytest.raises(ConvLensError, match="cannot fit 5 components"):
        run_sync(fit_gmm(ArraySource(np.zeros((3, 2))), EMSettings(k=5)))
    with pytest.raises(ConvLensError, match="float32 or float64"):
        run_sync(fit_gmm(ArraySource(np.zeros((30, 2))), EMSettings(k=2, dtype="float16")))


def test_against_scikit_learn_from_the_same_start() -> None:
    """A benchmark reference only: skipped where scikit-learn is not installed."""
    mixture = pytest.importorskip("sklearn.mixture")
    x = _draw(20000, seed=6)
    ours = run_sync(fit_gmm(ArraySource(x, 4096), EMSettings(k=3, dtype="float64", max_iter=10, tol=0)))
    init = ours.init
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol 0: all 10 iterations, as asked
        ref = mixture.GaussianMixture(3, covariance_type="diag", max_iter=10, tol=0, reg_covar=1e-6,
                                      weights_init=init.weights, means_init=init.means,
                                      precisions_init=1 / init.variances).fit(x)
    np.testing.assert_allclose(ours.mixture.means, ref.means_, rtol=1e-6, atol=1e-6)
    assert ours.final_loglik == pytest.approx(ref.score(x), rel=1e-6)


def test_a_saved_mixture_scores_like_the_fit(tmp_path: Path, memmapped: np.ndarray) -> None:
    fit = run_sync(fit_gmm(ArraySource(memmapped, 8192), EMSettings(k=3, max_iter=5, tol=0)))
    np.savez(tmp_path / "m.npz", w=fit.mixture.weights, m=fit.mixture.means, v=fit.mixture.variances)
    z = np.load(tmp_path / "m.npz")
    back = Mixture(z["w"], z["m"], z["v"])
    assert back.log_likelihood(np.asarray(memmapped[:5000])) == pytest.approx(
        fit.mixture.log_likelihood(np.asarray(memmapped[:5000])), rel=1e-12)
