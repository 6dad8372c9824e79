"""Dynamic logit fusion: a large model steered at inference by small task experts (weak to strong).

Fan, Lu, Wei, Tian, Qu, Chen and Cheng, "On Giant's Shoulders: Effortless Weak to Strong by Dynamic
Logits Fusion" (NeurIPS 2024). A large model ``L``, a small base model ``S`` and small experts
``E_1 .. E_K`` (``S`` fine-tuned on task ``k``) share a vocabulary; at each decoding step the large
model's logits move by the experts' shifts,

    z~ = z_L + sum_k alpha_k (z_{E_k} - z_S),        p~ = softmax(z~),

with ``alpha`` chosen per step (per token) so that the large model's shift mirrors the small models':
fine-tuning should move ``L`` as far as it moved ``S``, and leave the large-small gap as it was,

    alpha* = argmin_alpha sum_k [KL(p~ || p_L) - KL(p_{E_k} || p_S)]^2
                              + [KL(p~ || p_{E_k}) - KL(p_L || p_S)]^2.

A static ``alpha`` (the same for every step; 1 with one expert is proxy-tuning's rule) is the
baseline the paper improves on. The official code was not released ("coming soon") and the paper's
method section could not be read here: this objective is reconstructed from its description (weights
"learned through KL-divergence constrained optimization problems" at each decoding step) and the
solver is ours: a search over a grid of ``alpha`` values, exact for one expert and coordinate descent
over the experts (``sweeps`` passes, each expert's weight set to the grid value that minimises the
objective with the others fixed, starting from ``alpha = 0``) for several.

The fusion is a router of the mixture core: :class:`DynamicFusion` weighs the teachers
``(L, S, E_1 .. E_K)`` per instance by ``(1, -sum_k alpha_k, alpha_1 .. alpha_K)``, so the fused logits
are the weighted sum of the teachers' logits; :class:`Fused` runs the models and applies it, a
sequence model (``[B, T]`` ids to ``[B, T, V]`` logits) like any of its parts, usable for perplexity,
generation, or as a teacher.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.net import Batch, Output
from mmkd.router import Router


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def fuse(large: Tensor, base: Tensor, experts: Tensor, alpha: Tensor) -> Tensor:
    """``z_L + sum_k alpha_k (z_{E_k} - z_S)``: ``large``, ``base`` ``[N, V]``, ``experts`` ``[N, K, V]``,
    ``alpha`` ``[N, K]`` (or ``[..., N, K]`` for several candidates at once)."""
    return large + torch.einsum("...nk,nkv->...nv", alpha.to(experts.dtype), experts - base[:, None])


def objective(large: Tensor, base: Tensor, experts: Tensor, alpha: Tensor) -> Tensor:
    """The fusion objective of the module docstring per row ``[N]`` (``[..., N]`` for candidate
    ``alpha`` ``[..., N, K]``). The KLs from the fused ``p~`` are ``sum p~ log p~ - sum p~ log q``, the
    second sum a product with ``log q`` (no ``[..., N, K, V]`` intermediate)."""
    log_l, log_s, log_e = (F.log_softmax(z.float(), -1) for z in (large, base, experts))
    log_f = F.log_softmax(fuse(large.float(), base.float(), experts.float(), alpha).float(), -1)
    p_f = log_f.exp()
    self_term = (p_f * log_f).sum(-1)  # [..., N]
    shift = kl(log_e, log_s[:, None])  # [N, K]: KL(p_Ek || p_S)
    gap = kl(log_l, log_s)  # [N]: KL(p_L || p_S)
    moved = (self_term - (p_f * log_l).sum(-1))[..., None]  # [..., N, 1]: KL(p~ || p_L)
    apart = self_term[..., None] - torch.einsum("...nv,nkv->...nk", p_f, log_e)  # [..., N, K]: KL(p~ || p_Ek)
    return ((moved - shift) ** 2 + (apart - gap[:, None]) ** 2).sum(-1)


def solve(large: Tensor, base: Tensor, experts: Tensor, grid: Tensor, sweeps: int = 2, chunk: int = 256) -> Tensor:
    """``alpha`` ``[N, K]`` minimising :func:`objective` per row over ``grid`` (values of each
    ``alpha_k``): exact for ``K = 1``, coordinate descent from 0 over ``sweeps`` passes otherwise;
    ``chunk`` rows at a time (the search holds ``len(grid) x chunk x V`` values)."""
    if len(large) > chunk:
        return torch.cat([solve(*(x[i:i + chunk] for x in (large, base, experts)), grid, sweeps, chunk)
                          for i in range(0, len(large), chunk)])
    n, k = experts.shape[:2]
    alpha = large.new_zeros(n, k, dtype=torch.float32)
    for _ in range(1 if k == 1 else sweeps):
        for j in range(k):
            cand = alpha.expand(len(grid), n, k).clone()
            cand[..., j] = grid[:, None]
            alpha[:, j] = grid[objective(large, base, experts, cand).argmin(0)]
    return alpha


class DynamicFusion(Router):
    """Weights ``(1, -sum_k alpha_k, alpha_1 .. alpha_K)`` over the teachers ``(L, S, E_1 .. E_K)``,
    per instance, with ``alpha`` from :func:`solve` (or fixed at ``alpha``); see the module docstring.
    The weights do not sum to one and are not for mixing losses: the weighted sum of the teachers'
    logits is the fused model's (:class:`Fused`). The last weights are kept in :attr:`last`.

    Args:
        alpha: a static weight for every expert instead of the per-instance search.
        grid: the values each ``alpha_k`` is searched over (default 0, 0.1, .., 2).
        sweeps: coordinate-descent passes over the experts (several experts only).
    """

    def __init__(self, alpha: float | None = None, grid: Sequence[float] | None = None, sweeps: int = 2):
        super().__init__()
        values = torch.linspace(0, 2, 21) if grid is None else torch.as_tensor(list(grid), dtype=torch.float32)
        if values.ndim != 1 or not len(values) or not torch.isfinite(values).all():
            raise ValueError(f"fusion grid: give a non-empty list of finite weights, got {grid!r}")
        if sweeps < 1:
            raise ValueError(f"fusion sweeps={sweeps}: give at least 1")
        self.alpha, self.sweeps = alpha, int(sweeps)
        self.register_buffer("grid", values, persistent=False)
        self.last: Tensor | None = None

    def forward(self, student: Output | None, teachers: Sequence[Output], batch: Batch) -> Tensor:
        if len(teachers) < 3:
            raise ValueError(f"fusion: the teachers are (large, base, expert 1, ...): at least 3, got {len(teachers)}")
        large, base = teachers[0].logits, teachers[1].logits
        experts = torch.stack([t.logits for t in teachers[2:]], 1)
        if self.alpha is not None:
            alpha = large.new_full(experts.shape[:2], float(self.alpha), dtype=torch.float32)
        else:
            alpha = solve(large, base, experts, self.grid.to(large.device), self.sweeps)
        self.last = alpha
        return torch.cat([torch.ones_like(alpha[:, :1]), -alpha.sum(1, keepdim=True), alpha], 1)


class Fused(nn.Module):
    """A sequence model whose logits are ``router``'s weighted sum of its models' logits, per token:
    ``forward(ids [B, T]) -> [B, T, V]``, the models called on the same ids (no gradient flows into
    the choice of weights; the models are usually frozen and in eval mode).

    Args:
        large: the large model ``L``.
        base: the small base model ``S``.
        experts: the small experts ``E_1 .. E_K``.
        router: a :class:`DynamicFusion` (default: the per-token search).
    """

    def __init__(self, large: nn.Module, base: nn.Module, experts: Sequence[nn.Module],
                 router: Router | None = None):
        super().__init__()
        if not experts:
            raise ValueError("Fused: give at least one expert")
        self.models = nn.ModuleList([large, base, *experts])
        self.router = DynamicFusion() if router is None else router

    def forward(self, ids: Tensor) -> Tensor:
        logits = [m(ids) for m in self.models]
        shape = logits[0].shape
        outs = [Output(z.reshape(-1, shape[-1])) for z in logits]
        with torch.no_grad():
            w = self.router(None, outs, {"input_ids": ids})
        fused = sum(w[:, i, None] * o.logits for i, o in enumerate(outs))
        return fused.reshape(shape)
