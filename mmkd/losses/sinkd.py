"""Sinkhorn knowledge distillation (SinKD), batch-wise.

With p^s_i = softmax(s_i / T) and p^t_j = softmax(t_j / T) the B student and B teacher rows of a
batch, the ground cost is the L1 distance C_ij = |p^s_i - p^t_j|_1 (as in the official code,
torch.cdist(p=1)). The entropic transport plan with uniform marginals 1/B,

    P = argmin_{P 1 = 1/B, P^T 1 = 1/B} <P, C> - epsilon * H(P),

is approximated by a fixed number of Sinkhorn iterations (alternating row then column scaling
of K = exp(-C / epsilon)), run in the log domain and differentiated through, and

    SinKD = <P, C> = sum_ij P_ij C_ij.

Cui, Qin, Gao, Zhang, Xu, Wu, Li, Sun, Zhou and Li, "Sinkhorn Distance Minimization for Knowledge
Distillation", LREC-COLING 2024. Defaults follow the official code (T = 2, epsilon = 0.1, 20
iterations as its signature states); that code normalises rows and columns to 1 rather than 1/B,
which makes its value B times this one (it is then scaled by a small loss weight).
"""
from __future__ import annotations

import math

import torch

from mmkd.checks import COUNT, POSITIVE, TEMPERATURE
from mmkd.losses import register_loss


@register_loss("sinkd", teacher=True, per_sample=False,
               ranges={"temperature": TEMPERATURE, "epsilon": POSITIVE, "iterations": COUNT})
def sinkd(student_logits, teacher_logits, target=None, *, temperature=2.0, epsilon=0.1,
          iterations=20):
    """``<P, C>`` with C_ij = |softmax(s_i/T) - softmax(t_j/T)|_1 and P the Sinkhorn plan (scalar).

    P has uniform marginals 1/B and comes from ``iterations`` log-domain Sinkhorn steps at
    entropic regularisation ``epsilon``. Cui et al., "Sinkhorn Distance Minimization for
    Knowledge Distillation", LREC-COLING 2024.
    """
    cost = torch.cdist((student_logits / temperature).softmax(1),
                       (teacher_logits / temperature).softmax(1), p=1)
    log_k = -cost / epsilon
    log_a = -math.log(cost.shape[0])
    f = torch.zeros_like(cost[:, 0])
    g = torch.zeros_like(cost[0])
    for _ in range(iterations):
        f = log_a - (log_k + g[None, :]).logsumexp(1)
        g = log_a - (log_k + f[:, None]).logsumexp(0)
    return ((f[:, None] + log_k + g[None, :]).exp() * cost).sum()
