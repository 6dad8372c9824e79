"""Shared routing helpers: gate probabilities, top-k selection and load-balancing losses.

All functions take gate logits or probabilities of shape ``[batch, teachers]``.

- :func:`softmax_weights`: soft (differentiable) weighting, ``P = softmax(H)``.
- :func:`top_k_mask`: the ``k`` largest entries of each row (exactly ``k``, ties broken by position).
- :func:`top_k_gates`: Shazeer et al.'s ``softmax(KeepTopK(H, k))`` = the top-k of ``P`` renormalised.
- :func:`hard_top_k`: MST-Distill's selection, weight ``1/k`` on each picked teacher, no gradient.
- load-balancing losses on the gate probabilities (:data:`BALANCES`): :func:`kl_balance` and
  :func:`cv_balance`, MST-Distill's (its reference code's ``load_balancing_loss``), and the variants
  :func:`kl_sum_balance` (``T`` times ``kl``) and :func:`cv2_balance` (Shazeer et al.'s squared CV).
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
    """``KL(u || m) / T = (1/T) sum_t (1/T) log((1/T) / m_t)`` with ``m = mean_b P[b]``, ``u`` uniform
    over the ``T`` teachers.

    MST-Distill's balance loss as its reference code computes it (``load_balancing_loss``, mode
    ``KL``: ``KLDivLoss(reduction="batchmean")(log m, u)`` on the ``[T]`` vector, whose "batch" is the
    ``T`` teachers). Zero when the teachers are used equally over the batch (``m = u``); infinite
    when the batch gives some teacher no probability at all.
    """
    return kl_sum_balance(probs) / probs.shape[1]


def kl_sum_balance(probs: Tensor) -> Tensor:
    """``KL(u || m) = sum_t (1/T) log((1/T) / m_t) = -mean_t log(T m_t)``: :func:`kl_balance` times ``T``
    (the KL divergence itself, not divided by the number of teachers)."""
    m = probs.float().mean(dim=0)
    return -(m * m.shape[0]).log().mean()


def cv_balance(probs: Tensor) -> Tensor:
    """``CV(I) = std(I) / mean(I)`` of the importance ``I_t = sum_b P[b, t]``, ``std`` unbiased
    (``sqrt(sum_t (I_t - mean(I))^2 / (T - 1))``, ``torch.std``).

    MST-Distill's reference code (``load_balancing_loss``, mode ``CV``): the coefficient of
    variation itself, not squared. 0 for a single teacher (whose unbiased std is undefined).
    """
    importance = probs.float().sum(dim=0)
    if importance.numel() == 1:
        return importance.sum() * 0
    return importance.std() / importance.mean()


def cv2_balance(probs: Tensor) -> Tensor:
    """``CV(I)^2 = Var(I) / mean(I)^2`` of the importance ``I_t = sum_b P[b, t]`` with the population
    variance ``Var(I) = mean_t (I_t - mean(I))^2``.

    Shazeer et al.'s importance loss (ICLR 2017, eq. 6, without its weight), as in their reference
    implementation (``cv_squared`` in tensor2tensor); ``(T - 1) / T`` times :func:`cv_balance` squared.
    """
    importance = probs.float().sum(dim=0)
    mean = importance.mean()
    return (importance - mean).pow(2).mean() / mean.pow(2)


BALANCES = {"kl": kl_balance, "kl_sum": kl_sum_balance, "cv": cv_balance, "cv2": cv2_balance}
"""The load-balancing losses by name (a learned router's ``balance``); ``kl`` and ``cv`` are MST-Distill's."""
