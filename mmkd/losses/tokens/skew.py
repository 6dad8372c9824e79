"""DistiLLM's skew Kullback-Leibler divergences.

    SKL_alpha(p, q)  = KL(p || alpha p + (1 - alpha) q)       (skew forward KL)
    SRKL_alpha(p, q) = KL(q || (1 - alpha) p + alpha q)       (skew reverse KL)

per token, with ``p`` the teacher's and ``q`` the student's next-token distribution; alpha = 0 gives
the forward, resp. reverse KL, and larger alpha bounds the divergence (by ``-log alpha``) and its
gradient, which stabilises optimisation. Default alpha = 0.1, the official setting (``--skew-alpha``
in jongwooko/distillm). The official ``skewed_forward_kl`` returns the cross entropy
``-sum p log m``, this KL minus the teacher's entropy: the same gradient, shifted so that the loss is
0 at q = p. Ko, Kim, Chen and Yun, "DistiLLM: Towards Streamlined Distillation for Large Language
Models", ICML 2024.
A :class:`~mmkd.sparse.SparseLogits` teacher (a top-k cache) is compared on its k classes plus
the tail bucket (:func:`mmkd.losses.tokens.pair`); at temperature 1 the value is at most the dense one.
"""
from __future__ import annotations

import math

import torch

from mmkd.checks import PROBABILITY, TEMPERATURE
from mmkd.losses import register_loss
from mmkd.losses.tokens import pair, per_token, xlogy_sum


def skewed(log_a, log_b, alpha):
    """``log(alpha exp(log_a) + (1 - alpha) exp(log_b))``, computed in log space."""
    if alpha == 0:
        return log_b
    return torch.logaddexp(log_a + math.log(alpha), log_b + math.log(1 - alpha))


@register_loss("skew_fkl", teacher=True, per_sample=True, sparse=True,
               ranges={"alpha": PROBABILITY, "temperature": TEMPERATURE})
def skew_fkl(student_logits, teacher_logits, target=None, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean"):
    """``KL(p || alpha p + (1 - alpha) q)`` per token (DistiLLM, ICML 2024)."""
    log_q, log_p = pair("skew_fkl", student_logits, teacher_logits, temperature)
    return per_token(xlogy_sum(log_p.exp(), log_p, skewed(log_p, log_q, alpha)), mask, reduction)


@register_loss("skew_rkl", teacher=True, per_sample=True, sparse=True,
               ranges={"alpha": PROBABILITY, "temperature": TEMPERATURE})
def skew_rkl(student_logits, teacher_logits, target=None, *, alpha=0.1, temperature=1.0, mask=None, reduction="mean"):
    """``KL(q || (1 - alpha) p + alpha q)`` per token (DistiLLM, ICML 2024)."""
    log_q, log_p = pair("skew_rkl", student_logits, teacher_logits, temperature)
    return per_token(xlogy_sum(log_q.exp(), log_q, skewed(log_q, log_p, alpha)), mask, reduction)
