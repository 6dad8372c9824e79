"""The generalised Jensen-Shannon divergence of on-policy distillation (GKD).

    m = beta p + (1 - beta) q
    JSD_beta(p, q) = beta KL(p || m) + (1 - beta) KL(q || m)

per token, with ``p`` the teacher's and ``q`` the student's next-token distribution. As in the
official implementation (TRL's ``GKDTrainer.generalized_jsd_loss``), ``beta = 0`` is the forward KL
``KL(p || q)`` and ``beta = 1`` the reverse KL ``KL(q || p)`` (JSD_beta itself vanishes at both ends;
these are its limits divided by beta, resp. 1 - beta), and the mixture is formed in log space.
Default beta = 0.5 (TRL's ``GKDConfig.beta``). Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist and
Bachem, "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", ICLR 2024.
A :class:`~mmkd.sparse.SparseLogits` teacher (a top-k cache) is compared on its k classes plus
the tail bucket (:func:`mmkd.losses.tokens.pair`); at temperature 1 the value is at most the dense one.
"""
from __future__ import annotations

import math

import torch

from mmkd.checks import FRACTION, TEMPERATURE
from mmkd.losses import register_loss
from mmkd.losses.tokens import pair, per_token, xlogy_sum


@register_loss("gjsd", teacher=True, per_sample=True, sparse=True,
               ranges={"beta": FRACTION, "temperature": TEMPERATURE})
def gjsd(student_logits, teacher_logits, target=None, *, beta=0.5, temperature=1.0, mask=None, reduction="mean"):
    """``beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q`` per token; forward KL at
    ``beta = 0``, reverse KL at ``beta = 1`` (GKD, ICLR 2024)."""
    log_q, log_p = pair("gjsd", student_logits, teacher_logits, temperature)
    p, q = log_p.exp(), log_q.exp()
    if beta == 0:
        return per_token(xlogy_sum(p, log_p, log_q), mask, reduction)
    if beta == 1:
        return per_token(xlogy_sum(q, log_q, log_p), mask, reduction)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return per_token(beta * xlogy_sum(p, log_p, log_m) + (1 - beta) * xlogy_sum(q, log_q, log_m), mask, reduction)
