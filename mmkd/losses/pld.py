"""Plackett-Luce distillation (PLD): a confidence-weighted list-wise loss replacing CE + KD.

The teacher-optimal permutation pi puts the true label first, then the other classes in
descending teacher logit. With w_k = softmax(t / tau)_{pi_k} (the teacher's confidence in the
class ranked k-th):

    PLD(s, t, y) = sum_{k=1}^{C} w_k * ( -s_{pi_k} + log sum_{l >= k} exp(s_{pi_l}) )

i.e. a weighted sum of the Plackett-Luce negative log-likelihoods of choosing pi_k among the
classes not yet ranked. Bassam, Zhu and Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
Distillation", arXiv:2506.12542, 2025.
"""
from __future__ import annotations

import torch

from mmkd.checks import TEMPERATURE
from mmkd.losses import reduce, register_loss


@register_loss("pld", teacher=True, per_sample=True, ranges={"tau": TEMPERATURE})
def pld(student_logits, teacher_logits, target, *, tau=1.0, reduction="mean"):
    """``sum_k w_k (-s_{pi_k} + logsumexp_{l >= k} s_{pi_l})`` per instance.

    pi = [y, remaining classes by descending teacher logit], w_k = softmax(t / tau)_{pi_k}.
    Bassam, Zhu and Bian, "PLD: A Choice-Theoretic List-Wise Knowledge Distillation", 2025.
    """
    ranking = teacher_logits.detach().scatter(1, target[:, None], float("inf"))
    pi = ranking.argsort(dim=1, descending=True, stable=True)
    s = student_logits.gather(1, pi)
    w = (teacher_logits / tau).softmax(dim=1).gather(1, pi)
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)  # logsumexp_{l >= k} s_l
    return reduce((w * (tail_lse - s)).sum(1), reduction)
