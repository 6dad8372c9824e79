"""Shared routing helpers: gate probabilities, top-k selection and load-balancing losses.

All functions take gate logits or probabilities of shape ``[batch, teachers]``.

- :func:`softmax_weights`: soft (differentiable) weighting, ``P = softmax(H)``.
- :func:`top_k_mask`: the ``k`` largest entries of each row (exactly ``k``, ties broken by position).
- :func:`top_k_gates`: Shazeer et al.'s ``softmax(KeepTopK(H, k))`` = the top-k of ``P`` renormalised.
- :func:`hard_top_k`: MST-Distill's selection, weight ``1/k`` on each picked teacher, no gradient.
- :func:`kl_balance`, :func:`cv_balance`: load-balancing losses on the gate probabilities.
"""
from __future__ import annotations

import torch
from torch import Tensor


def softmax_weights(logits: Tensor) -> Tensor:
    """``P[b, t] = exp(H[b, t]) / sum_t' exp(H[b, t'])``: every teacher weighted, differentiably."""
    return logits.float().softmax(dim=1)


def top_k_mask(scores: Tensor, k: int) -> Tensor:
    """Boolean ``[batch, teachers]`` mask with exactly ``k`` True entries per row: each row's ``k``
    largest scores (ties go to the lower teacher index)."""
    if not 1 <= k <= scores.shape[1]:
        raise ValueError(f"top-k routing: k={k} must be between 1 and the number of teachers ({scores.shape[1]})")
    idx = scores.topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, idx, True)


def top_k_gates(logits: Tensor, k: int) -> Tensor:
    """``G = softmax(KeepTopK(H, k))``, ``KeepTopK`` setting all but each row's ``k`` largest to -inf.

    Equal to the top-k gate probabilities renormalised, ``P * M / sum_t (P * M)`` with ``M`` the
    top-k mask; differentiable with respect to the kept logits. Shazeer et al., "Outrageously Large
    Neural Networks: The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017, eq. 3.
    """
    logits = logits.float()
    return logits.masked_fill(~top_k_mask(logits, k), float("-inf")).softmax(dim=1)


def hard_top_k(scores: Tensor, k: int) -> Tensor:
    """``W = M / k`` with ``M`` the top-k mask of ``scores``: weight ``1/k`` on each picked teacher.

    With these weights the mixture core computes MST-Distill's ``(1/k) sum_{t in top-k} KL_t``
    (Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge
    Distillation", ACM MM 2025). The weights are constant: no gradient reaches the scores.
    """
    return top_k_mask(scores.detach(), k).float() / k


def kl_balance(probs: Tensor) -> Tensor:
    """``KL(u || m) = sum_t (1/T) log((1/T) / m_t) = -mean_t log(T m_t)`` with ``m = mean_b P[b]`` and ``u`` uniform.

    Zero when the teachers are used equally over the batch (``m = u``); infinite when the batch
    never gives some teacher any probability. MST-Distill's reference code evaluates this with
    ``KLDivLoss(reduction="batchmean")`` on the ``[T]`` vector, i.e. divides it by ``T`` too; that
    constant factor is left to the loss weight here.
    """
    m = probs.float().mean(dim=0)
    return -(m * m.shape[0]).log().mean()


def cv_balance(probs: Tensor) -> Tensor:
    """``CV(I)^2 = Var(I) / mean(I)^2`` of the importance ``I_t = sum_b P[b, t]``.

    Shazeer et al.'s importance loss (ICLR 2017, eq. 6, without its weight), with the population
    variance ``Var(I) = mean_t (I_t - mean(I))^2`` as in their reference implementation
    (``cv_squared`` in tensor2tensor). ``torch.std`` (unbiased) would give ``T / (T - 1)`` times
    this; MST-Distill's reference code uses the unbiased CV itself, not squared.
    """
    importance = probs.float().sum(dim=0)
    mean = importance.mean()
    return (importance - mean).pow(2).mean() / mean.pow(2)


BALANCES = {"kl": kl_balance, "cv": cv_balance}
