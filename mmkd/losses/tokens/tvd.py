"""Total variation distance between next-token distributions.

    TVD(p, q) = 1/2 sum_v |p_v - q_v|

per token (p: teacher, q: student); bounded by 1, symmetric, and an f-divergence that is neither
mean- nor mode-seeking. Wen, Li, Du and Mou, "f-Divergence Minimization for Sequence-Level Knowledge
Distillation", ACL 2023 (the token-level form, as DistiLLM's ``tvd`` baseline).
"""
from __future__ import annotations

from mmkd.checks import TEMPERATURE
from mmkd.losses import register_loss
from mmkd.losses.tokens import log_probs, per_token, same_vocab


@register_loss("tvd", teacher=True, per_sample=True, ranges={"temperature": TEMPERATURE})
def tvd(student_logits, teacher_logits, target=None, *, temperature=1.0, mask=None, reduction="mean"):
    """``1/2 sum_v |p_v - q_v|`` per token."""
    same_vocab("tvd", student_logits, teacher_logits)
    q, p = log_probs(student_logits, temperature).exp(), log_probs(teacher_logits, temperature).exp()
    return per_token(0.5 * (p - q).abs().sum(-1), mask, reduction)
