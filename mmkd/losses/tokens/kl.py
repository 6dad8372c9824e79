"""Forward and reverse KL between next-token distributions.

    FKL(q, p) = sum_v p_v (log p_v - log q_v)      (mean-seeking: the student covers the teacher)
    RKL(q, p) = sum_v q_v (log q_v - log p_v)      (mode-seeking: the student keeps to its modes)

per token, with ``p = softmax(z_t / T)`` the teacher's and ``q = softmax(z_s / T)`` the student's
distribution. Forward KL is word-level KD (Kim and Rush, "Sequence-Level Knowledge Distillation",
EMNLP 2016); reverse KL is MiniLLM's objective at the token level (Gu, Dong, Wei and Huang, "MiniLLM:
Knowledge Distillation of Large Language Models", ICLR 2024). Both are the end points of GKD's
generalised JSD (:mod:`mmkd.losses.tokens.gjsd`). Without a temperature factor: ``fkl`` at
``temperature=T`` is :func:`mmkd.losses.kd` divided by ``T^2``.
A :class:`~mmkd.sparse.SparseLogits` teacher (a top-k cache) is compared on its k classes plus
the tail bucket (:func:`mmkd.losses.tokens.pair`); at temperature 1 the value is at most the dense one.
"""
from __future__ import annotations

from mmkd.checks import TEMPERATURE
from mmkd.losses import register_loss
from mmkd.losses.tokens import pair, per_token, xlogy_sum


@register_loss("fkl", teacher=True, per_sample=True, sparse=True,
               ranges={"temperature": TEMPERATURE})
def fkl(student_logits, teacher_logits, target=None, *, temperature=1.0, mask=None, reduction="mean"):
    """Forward KL ``sum_v p_v (log p_v - log q_v)`` per token (p: teacher, q: student)."""
    log_q, log_p = pair("fkl", student_logits, teacher_logits, temperature)
    return per_token(xlogy_sum(log_p.exp(), log_p, log_q), mask, reduction)


@register_loss("rkl", teacher=True, per_sample=True, sparse=True,
               ranges={"temperature": TEMPERATURE})
def rkl(student_logits, teacher_logits, target=None, *, temperature=1.0, mask=None, reduction="mean"):
    """Reverse KL ``sum_v q_v (log q_v - log p_v)`` per token (p: teacher, q: student)."""
    log_q, log_p = pair("rkl", student_logits, teacher_logits, temperature)
    return per_token(xlogy_sum(log_q.exp(), log_q, log_p), mask, reduction)
