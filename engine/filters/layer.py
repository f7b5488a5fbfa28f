"""The interpretable filter layer and its loss, in PyTorch (Zhang, Wu, Zhu, CVPR 2018).

:class:`InterpretableMask` is the forward step of an interpretable conv layer: for every filter
and image, ``mu_hat = argmax_ij x_ij`` and ``x_masked = max(x . T_mu_hat, 0)`` (the negative
template is not used in the forward pass). It remembers its last input so that a training loop
can add :func:`filter_loss` (``-MI(X; T)`` over the batch, see :mod:`engine.filters.templates`)
of each masked layer. ``enabled=False`` makes it the identity (the ordinary baseline keeps the
same module tree and state dict keys).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .templates import FilterParams, templates


class InterpretableMask(nn.Module):
    """Masks each filter's map with the positive template at its argmax, then ReLU.

    No parameters and no state dict entries: templates depend on the map size only and are
    built on first use. ``keep_input``: store the last input (``self.last_input``) for the loss.
    """

    def __init__(self, params: FilterParams | None = None, enabled: bool = True,
                 keep_input: bool = False) -> None:
        super().__init__()
        params = params or FilterParams()
        params.check()
        self.params = params
        self.enabled = enabled
        self.keep_input = keep_input
        self.last_input: torch.Tensor | None = None
        self._templates: dict[tuple[int, int, str, torch.dtype], torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"enabled={self.enabled}, mask={self.params.mask!r}"

    def positive_templates(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        """(h*w, h, w) positive templates on ``like``'s device and dtype."""
        key = (h, w, str(like.device), like.dtype)
        if key not in self._templates:
            t = templates(h, w, self.params)[:-1]
            if self.params.mask == "unit":
                t = t / self.params.resolved(h, w)[0]
            self._templates[key] = torch.as_tensor(t, dtype=like.dtype, device=like.device)
        return self._templates[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keep_input:
            self.last_input = x
        if not self.enabled:
            return x
        n, c, h, w = x.shape
        t = self.positive_templates(h, w, x)
        mu = x.detach().reshape(n, c, h * w).argmax(dim=2)  # (N, C)
        return torch.relu(x * t[mu])

    def __deepcopy__(self, memo: dict[int, object]) -> InterpretableMask:
        new = InterpretableMask(self.params, self.enabled, self.keep_input)
        new.train(self.training)
        memo[id(self)] = new
        return new


@dataclass
class LossTerms:
    """Per filter (F,) tensors: ``loss = -MI = -h_t + inter + spatial``."""

    loss: torch.Tensor
    h_t: torch.Tensor
    inter: torch.Tensor
    spatial: torch.Tensor


def _xlogy(p: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    return torch.where(p > 0, p * torch.where(p > 0, logp, torch.zeros_like(logp)), torch.zeros_like(p))


def filter_loss(x: torch.Tensor, in_category: torch.Tensor | None = None,
                params: FilterParams | None = None) -> LossTerms:
    """``-MI(X; T)`` of every filter over the batch ``x`` (N, F, h, w), differentiable.

    ``in_category``: bool (N, F), image ``n`` is of filter ``f``'s category (None: every image).
    Computed in float32 or float64 as ``x`` is, in the log domain (``Z_T`` over the batch); the
    same values as :func:`engine.filters.templates.mi_terms`.
    """
    params = params or FilterParams()
    n_img, n_f, h, w = x.shape
    p_count = h * w
    t = torch.as_tensor(templates(h, w, params), dtype=x.dtype, device=x.device)
    _, _, alpha = params.resolved(h, w)
    s = torch.einsum("nfhw,thw->ftn", x, t)  # (F, P+1, N)
    if in_category is None:
        allowed = torch.ones((n_f, n_img), dtype=torch.bool, device=x.device)
    else:
        allowed = in_category.to(x.device, torch.bool).T
    mask = torch.cat([allowed[:, None, :].expand(n_f, p_count, n_img),
                      torch.ones((n_f, 1, n_img), dtype=torch.bool, device=x.device)], dim=1)
    neg_inf = torch.tensor(-np.inf, dtype=x.dtype, device=x.device)
    s_m = torch.where(mask, s, neg_inf)
    log_z = torch.logsumexp(s_m, dim=2, keepdim=True)
    log_z = torch.where(torch.isfinite(log_z), log_z, torch.zeros_like(log_z))
    log_px_t = torch.where(mask, s_m - log_z, neg_inf)
    has_pos = allowed.any(dim=1)
    pos_prior = torch.full((p_count,), float(np.log(alpha / p_count)), dtype=x.dtype, device=x.device)
    neg_prior = torch.full((1,), float(np.log1p(-alpha)), dtype=x.dtype, device=x.device)
    only_neg = torch.cat([torch.full((p_count,), -np.inf, dtype=x.dtype, device=x.device),
                          torch.zeros(1, dtype=x.dtype, device=x.device)])
    log_prior = torch.where(has_pos[:, None], torch.cat([pos_prior, neg_prior])[None, :], only_neg[None, :])
    log_joint = log_prior[:, :, None] + log_px_t  # (F, P+1, N)
    log_px = torch.logsumexp(log_joint, dim=1)  # (F, N)
    log_post = log_joint - log_px[:, None, :]
    joint, post, prior = log_joint.exp(), log_post.exp(), log_prior.exp()
    h_t = -_xlogy(prior, log_prior).sum(1)
    mi = _xlogy(joint, log_post).sum((1, 2)) + h_t
    px = log_px.exp()
    p_pos = post[:, :p_count].sum(1)
    p_neg = post[:, p_count]
    log_pos = torch.logsumexp(log_post[:, :p_count], dim=1)
    h2 = -(_xlogy(p_pos, log_pos) + _xlogy(p_neg, log_post[:, p_count]))
    inter = (px * h2).sum(1)
    finite_pos = torch.where(torch.isfinite(log_pos), log_pos, torch.zeros_like(log_pos))
    cond = log_post[:, :p_count] - finite_pos[:, None, :]
    h_mu = -_xlogy(cond.exp(), cond).sum(1)
    spatial = torch.where(p_pos > 0, px * p_pos * h_mu, torch.zeros_like(px)).sum(1)
    return LossTerms(-mi, h_t, inter, spatial)
