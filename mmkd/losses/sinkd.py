"""Sinkhorn knowledge distillation (SinKD), batch-wise, at the official code's scale.

With p^s_i = softmax(s_i / T) and p^t_j = softmax(t_j / T) the B student and B teacher rows of a
batch, the ground cost is the L1 distance C_ij = |p^s_i - p^t_j|_1 (torch.cdist(p=1), as in the
official code). Starting from K = exp(-C / epsilon), ``iterations`` Sinkhorn steps each scale every
row of the plan to sum 1, then every column to sum 1:

    P <- P / (P 1) (rows),   P <- P / (1^T P) (columns),   P_0 = K,

run in the log domain and differentiated through, and

    SinKD = <P, C> = sum_ij P_ij C_ij.

Cui, Qin, Gao, Zhang, Xu, Wu, Li, Sun, Zhou and Li, "Sinkhorn Distance Minimization for Knowledge
Distillation", LREC-COLING 2024. Official code (2018cx/SinKD, loss.py, class ``Sinkhorn``):
``sinkhorn_normalized`` scales rows then columns to 1 (not 1/B), ``sinkhorn_loss`` returns
``sum(P * Wxy)``, with epsilon = 0.1, 20 iterations and T = 2 (hard-coded; the constructor's T is
ignored). This function is that ``sinkhorn_loss`` value: a plan with marginals 1/B (a transport plan
of total mass 1) gives exactly this value divided by B. The official ``forward`` then multiplies by
0.001 (an earlier version of loss.py by 0.0008 * 20 / 8 = 0.002) and ``glue_train.py`` adds
``beta * loss`` (``--beta``, e.g. 0.8 in script/student/rte.sh): the official ``--beta b`` is
``weight = 0.001 * b`` here.
"""
from __future__ import annotations

import torch

from mmkd.checks import COUNT, POSITIVE, TEMPERATURE
from mmkd.losses import register_loss


@register_loss("sinkd", teacher=True, per_sample=False,
               ranges={"temperature": TEMPERATURE, "epsilon": POSITIVE, "iterations": COUNT})
def sinkd(student_logits, teacher_logits, target=None, *, temperature=2.0, epsilon=0.1,
          iterations=20):
    """``<P, C>`` with C_ij = |softmax(s_i/T) - softmax(t_j/T)|_1 and P the Sinkhorn plan (scalar).

    P starts from exp(-C / epsilon) and takes ``iterations`` steps of scaling its rows, then its
    columns, to sum 1 (the official code's scale: B times a plan with marginals 1/B). Cui et al.,
    "Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING 2024.
    """
    cost = torch.cdist((student_logits / temperature).softmax(1),
                       (teacher_logits / temperature).softmax(1), p=1)
    log_k = -cost / epsilon
    f = torch.zeros_like(cost[:, 0])
    g = torch.zeros_like(cost[0])
    for _ in range(iterations):
        f = -(log_k + g[None, :]).logsumexp(1)
        g = -(log_k + f[:, None]).logsumexp(0)
    return ((f[:, None] + log_k + g[None, :]).exp() * cost).sum()
