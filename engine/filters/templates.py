"""Templates and the mutual-information filter loss of Interpretable CNNs, in numpy.

Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018. A filter's feature map
``x`` (``h x w`` after ReLU; the paper's ``n x n``) is explained by one of ``h*w`` positive
templates ``T_mu`` (one per position ``mu``) or the negative template ``T-``:

    t_ij(T_mu) = tau * max(1 - beta * ||[i, j] - mu||_1 / n, -1),      t_ij(T-) = -tau,
    tau = 0.5 / n^2, beta = 4, p(T_mu) = alpha / n^2, p(T-) = 1 - alpha, alpha = n^2 / (1 + n^2).

For a non-square map ``n^2`` becomes ``h * w`` and the L1 distance is divided by
``n = max(h, w)``. Over a set ``X`` of feature maps of one filter (a batch, or every image),
``p(x | T) = exp(tr(x . T)) / Z_T`` with ``Z_T = sum_{x in X} exp(tr(x . T))``, and the filter loss

    Loss_f = -MI(X; T) = -H(T) + H(T' = {T-, T+} | X) + sum_x p(T+, x) H(T+ | X = x)

(the second term is the *inter-category entropy*, the third the *spatial entropy*).

**Categories.** With ``category_mode="labels"`` (the default whenever image labels are known)
each filter has a category ``c`` (the class whose images activate it most on average) and the
positive templates explain only images of ``c``: ``p(x | T_mu) = 0`` for images of other classes
(``Z_{T_mu}`` sums over images of ``c``), while ``T-`` explains every image. ``"none"`` uses every
image for every template (the single-category case). Both are exactly the formula above with
that ``p(x | T)``, so the decomposition holds in both.

:func:`mi_terms` evaluates everything directly (log domain, float64); the differentiable torch
version used for training is :func:`engine.filters.layer.filter_loss`, tested against this one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from engine.types import ConvLensError

CategoryMode = Literal["labels", "none"]
MaskKind = Literal["template", "unit"]


@dataclass(frozen=True)
class FilterParams:
    """Template settings (the paper's defaults when left as None).

    ``tau``: template scale (None: ``0.5 / n^2``). ``beta``: 4. ``alpha``: prior of the positive
    templates (None: ``n^2 / (1 + n^2)``). ``category_mode``: see the module docstring.
    ``mask``: what the forward pass multiplies by at the argmax position: ``"template"`` the
    template ``T_mu`` itself (the paper: ``max(x . T_mu, 0)``, values scaled by ``tau``) or
    ``"unit"`` the template divided by ``tau`` (peak 1, as the official code's mask).
    """

    tau: float | None = None
    beta: float = 4.0
    alpha: float | None = None
    category_mode: CategoryMode = "labels"
    mask: MaskKind = "template"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result_key(self) -> dict[str, Any]:
        return self.to_dict()

    def check(self) -> None:
        if self.tau is not None and not (np.isfinite(self.tau) and self.tau > 0):
            raise ConvLensError(f"tau must be a positive number, got {self.tau}.")
        if not (np.isfinite(self.beta) and self.beta > 0):
            raise ConvLensError(f"beta must be a positive number, got {self.beta}.")
        if self.alpha is not None and not 0.0 < self.alpha < 1.0:
            raise ConvLensError(f"alpha must be in (0, 1), got {self.alpha}.")
        if self.category_mode not in ("labels", "none"):
            raise ConvLensError(f'category_mode must be "labels" or "none", got {self.category_mode!r}.')
        if self.mask not in ("template", "unit"):
            raise ConvLensError(f'mask must be "template" or "unit", got {self.mask!r}.')

    def resolved(self, h: int, w: int) -> tuple[float, float, float]:
        """``(tau, beta, alpha)`` for an ``h x w`` map."""
        n2 = h * w
        tau = 0.5 / n2 if self.tau is None else float(self.tau)
        alpha = n2 / (1.0 + n2) if self.alpha is None else float(self.alpha)
        return tau, float(self.beta), alpha


def templates(h: int, w: int, params: FilterParams = FilterParams()) -> np.ndarray:
    """float64 ``(h*w + 1, h, w)``: the positive templates, row-major by ``mu = (i, j)``, then
    the negative template last."""
    tau, beta, _ = params.resolved(h, w)
    n = max(h, w)
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    mu_i, mu_j = ii.reshape(-1), jj.reshape(-1)
    dist = np.abs(ii[None] - mu_i[:, None, None]) + np.abs(jj[None] - mu_j[:, None, None])
    pos = tau * np.maximum(1.0 - beta * dist / n, -1.0)
    neg = np.full((1, h, w), -tau)
    return np.concatenate([pos, neg], axis=0)


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


def _xlogx_sum(p: np.ndarray, logp: np.ndarray, axis: int) -> np.ndarray:
    """``sum p log p`` with 0 log 0 = 0."""
    return np.sum(np.where(p > 0, p * np.where(p > 0, logp, 0.0), 0.0), axis=axis)


@dataclass(frozen=True)
class MITerms:
    """Per filter (arrays of shape ``(F,)``): ``loss = -MI``, ``h_t = H(T)``, ``inter`` the
    inter-category entropy, ``spatial`` the spatial entropy; ``loss == -h_t + inter + spatial``.
    ``p_pos``: ``(F, N)`` posterior ``p(T+ | x)`` of every image."""

    loss: np.ndarray
    h_t: np.ndarray
    inter: np.ndarray
    spatial: np.ndarray
    p_pos: np.ndarray


def mi_terms(maps: np.ndarray, in_category: np.ndarray | None = None,
             params: FilterParams = FilterParams()) -> MITerms:
    """Direct evaluation of the filter loss and its terms.

    ``maps``: ``(N, F, h, w)`` feature maps of ``F`` filters on ``N`` images. ``in_category``:
    bool ``(N, F)``, image ``n`` belongs to filter ``f``'s category (None: every image, the
    ``"none"`` mode). A filter none of whose images is in its category has only the negative
    template: its terms are 0 (``-MI = 0``) and ``p_pos`` is 0.
    """
    x = np.asarray(maps, dtype=np.float64)
    if x.ndim != 4:
        raise ConvLensError(f"feature maps must be (N, F, h, w), got shape {x.shape}.")
    n_img, n_f, h, w = x.shape
    t = templates(h, w, params)
    _, _, alpha = params.resolved(h, w)
    p_count = h * w
    s = np.einsum("nfhw,thw->ftn", x, t)  # (F, P+1, N) tr(x . T)
    allowed = np.ones((n_f, n_img), dtype=bool) if in_category is None else np.asarray(in_category, bool).T
    if allowed.shape != (n_f, n_img):
        raise ConvLensError(f"in_category must be (N, F) = ({n_img}, {n_f}), got {allowed.T.shape}.")
    mask = np.concatenate([np.repeat(allowed[:, None, :], p_count, 1), np.ones((n_f, 1, n_img), bool)], 1)
    s_masked = np.where(mask, s, -np.inf)
    log_z = _logsumexp(s_masked, axis=2)  # (F, P+1)
    log_z = np.where(np.isfinite(log_z), log_z, 0.0)  # a template that explains no image
    log_px_t = np.where(mask, s_masked - log_z[:, :, None], -np.inf)  # log p(x | T), -inf outside
    log_prior = np.concatenate([np.full(p_count, np.log(alpha / p_count)), [np.log1p(-alpha)]])
    has_pos = np.asarray(allowed.any(axis=1))  # (F,)
    # a filter without images of its category: only T- (prior 1)
    log_prior_f = np.where(has_pos[:, None], log_prior[None, :],
                           np.concatenate([np.full(p_count, -np.inf), [0.0]])[None, :])
    log_joint = log_prior_f[:, :, None] + log_px_t  # log p(T, x)  (F, P+1, N)
    log_px = _logsumexp(log_joint, axis=1)  # (F, N)
    px = np.exp(log_px)
    log_post = log_joint - log_px[:, None, :]  # log p(T | x)
    post = np.exp(log_post)
    joint = np.exp(log_joint)
    mi = _xlogx_sum(joint, log_post, axis=1).sum(1) - _xlogx_sum(
        np.exp(log_prior_f), log_prior_f, axis=1)  # sum p(T,x) log p(T|x) + H(T) = MI
    h_t = -_xlogx_sum(np.exp(log_prior_f), log_prior_f, axis=1)
    p_pos = post[:, :p_count, :].sum(1)  # (F, N)
    p_neg = post[:, p_count, :]
    with np.errstate(divide="ignore"):
        h2 = -(_xlogx_sum(p_pos[:, None], np.log(p_pos)[:, None], 1)
               + _xlogx_sum(p_neg[:, None], np.log(p_neg)[:, None], 1))
    inter = np.sum(px * h2, axis=1)
    log_pos = _logsumexp(log_post[:, :p_count, :], axis=1)  # log p(T+ | x)
    cond = log_post[:, :p_count, :] - np.where(np.isfinite(log_pos), log_pos, 0.0)[:, None, :]
    h_mu = -_xlogx_sum(np.exp(cond), cond, axis=1)  # (F, N)
    spatial = np.sum(np.where(p_pos > 0, px * p_pos * np.nan_to_num(h_mu), 0.0), axis=1)
    return MITerms(-mi, h_t, inter, spatial, p_pos)
