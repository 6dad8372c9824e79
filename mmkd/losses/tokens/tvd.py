"""Total variation distance between next-token distributions.

    TVD(p, q) = 1/2 sum_v |p_v - q_v|

per token (p: teacher, q: student); bounded by 1, symmetric, and an f-divergence that is neither
mean- nor mode-seeking. Wen, Li, Du and Mou, "f-Divergence Minimization for Sequence-Level Knowledge
Distillation", ACL 2023 (the token-level form, as DistiLLM's ``tvd`` baseline).
A :class:`~mmkd.sparse.SparseLogits` teacher (a top-k cache) is compared on its k classes plus
the tail bucket (:func:`mmkd.losses.tokens.pair`); at temperature 1 the value is at most the dense one.
"""
from __future__ import annotations

from mmkd.checks import TEMPERATURE
from mmkd.losses import register_loss
from mmkd.losses.tokens import pair, per_token


@register_loss("tvd", teacher=True, per_sample=True, sparse=True,
               ranges={"temperature": TEMPERATURE})
def tvd(student_logits, teacher_logits, target=None, *, temperature=1.0, mask=None, reduction="mean"):
    """``1/2 sum_v |p_v - q_v|`` per token."""
    log_q, log_p = pair("tvd", student_logits, teacher_logits, temperature)
    return per_token(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), mask, reduction)
