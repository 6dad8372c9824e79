"""Normalized knowledge distillation (NKD).

With p = softmax(z) at T = 1, target y, and N(z)_i = softmax over the non-target logits z_{i != y}/T:

    NKD = -t_y * log s_y  -  gamma * T^2 * sum_{i != y} N(t)_i * log N(s)_i

where t_y (the teacher's target probability) is detached. Yang, Zeng, Li, Zhang, Yuan and Li,
"From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized
Loss and Customized Soft Labels", ICCV 2023. The teacher-free variant of the same paper is
``uskd`` (:mod:`mmkd.losses.self.uskd`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkd.checks import NON_NEGATIVE, TEMPERATURE
from mmkd.losses import reduce, register_loss
from mmkd.losses.kd import zscore


def non_target(z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ``[batch, classes - 1]`` logits of the classes other than each row's target, in class order."""
    b, c = z.shape
    other = torch.ones_like(z, dtype=torch.bool).scatter_(1, target[:, None], False)
    return z[other].view(b, c - 1)


@register_loss("nkd", teacher=True, per_sample=True, ranges={"temperature": TEMPERATURE, "gamma": NON_NEGATIVE})
def nkd(student_logits, teacher_logits, target, *, temperature=1.0, gamma=1.5, standardize=False,
        reduction="mean"):
    """``-t_y log s_y - gamma T^2 sum_{i != y} N(t)_i log N(s)_i`` per instance (t_y detached).

    Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach
    with Normalized Loss and Customized Soft Labels", ICCV 2023.

    ``standardize``: z-score each side's logits first (:func:`mmkd.losses.kd.zscore`; Sun et al.,
    "Logit Standardization in Knowledge Distillation", CVPR 2024), so both the target term and the
    non-target term see standardised logits; off by default. The official LS code covers KD, DKD and
    MLKD, not NKD, so there is no official temperature or weight for this combination.
    """
    if standardize:
        student_logits, teacher_logits = zscore(student_logits), zscore(teacher_logits)
    idx = target[:, None]
    t_y = F.softmax(teacher_logits.detach(), dim=1).gather(1, idx)[:, 0]
    log_s_y = F.log_softmax(student_logits, dim=1).gather(1, idx)[:, 0]
    non_s = F.log_softmax(non_target(student_logits, target) / temperature, dim=1)
    non_t = F.softmax(non_target(teacher_logits, target) / temperature, dim=1)
    per_sample = -t_y * log_s_y - gamma * temperature**2 * (non_t * non_s).sum(1)
    return reduce(per_sample, reduction)
