"""Vanilla knowledge distillation.

    KD(s, t) = T^2 * KL(softmax(t/T) || softmax(s/T)) = T^2 * sum_c p^t_c (log p^t_c - log p^s_c)

per instance (summed over classes). Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network", NIPS Deep Learning Workshop, 2015 (arXiv:1503.02531).
"""
from __future__ import annotations

import torch.nn.functional as F

from mmkd.checks import TEMPERATURE
from mmkd.losses import reduce, register_loss


@register_loss("kd", teacher=True, per_sample=True, ranges={"temperature": TEMPERATURE})
def kd(student_logits, teacher_logits, target=None, *, temperature=4.0, reduction="mean"):
    """``T^2 * sum_c p^t_c (log p^t_c - log p^s_c)`` with ``p = softmax(z / T)``.

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2015.
    The T^2 factor keeps gradient magnitudes comparable across temperatures.
    """
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature**2
    return reduce(per_sample, reduction)
