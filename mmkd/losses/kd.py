"""Vanilla knowledge distillation.

    KD(s, t) = T^2 * KL(softmax(t/T) || softmax(s/T)) = T^2 * sum_c p^t_c (log p^t_c - log p^s_c)

per instance (summed over classes). Hinton, Vinyals and Dean, "Distilling the Knowledge in a
Neural Network", NIPS Deep Learning Workshop, 2015 (arXiv:1503.02531).

Also home of :func:`zscore`, the logit standardisation that ``kd``, ``dkd`` and ``nkd`` offer
as ``standardize=True``: Sun, Ren, Li, Wang and Cao, "Logit Standardization in Knowledge
Distillation", CVPR 2024.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkd.checks import TEMPERATURE
from mmkd.losses import reduce, register_loss


def zscore(z: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Z-score each row of ``[batch, classes]`` logits: ``(z - mean_c z) / (std_c z + eps)``.

    As in the official code of Sun et al., "Logit Standardization in Knowledge Distillation",
    CVPR 2024: ``std`` is ``torch.std``'s default (Bessel-corrected, divided by C - 1) and
    ``eps = 1e-7`` is added to it. The result is invariant to ``a * z + b`` per row (a > 0) up to
    that eps; the student and the teacher are standardised separately, so neither has to match the
    other's logit range, only its relations between classes. ``softmax(zscore(z) / T)`` is
    ``softmax((z - mean) / (T * std))``: each instance gets its own temperature, T times its logits'
    std, and T is what the paper calls the base temperature.
    """
    return (z - z.mean(dim=1, keepdim=True)) / (z.std(dim=1, keepdim=True) + eps)


@register_loss("kd", teacher=True, per_sample=True, ranges={"temperature": TEMPERATURE})
def kd(student_logits, teacher_logits, target=None, *, temperature=4.0, standardize=False, reduction="mean"):
    """``T^2 * sum_c p^t_c (log p^t_c - log p^s_c)`` with ``p = softmax(z / T)``.

    Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", NIPS DL Workshop 2015.
    The T^2 factor keeps gradient magnitudes comparable across temperatures.

    ``standardize``: z-score each side's logits first (:func:`zscore`; Sun et al., "Logit
    Standardization in Knowledge Distillation", CVPR 2024); off by default. The official LS setting
    for KD on CIFAR-100 is a base temperature of 2 (3 for some pairs) with KD weight 9 and CE weight 1
    (``tools/train.py --logit-stand --base-temp 2 --kd-weight 9``), not the T = 4 used without it.
    """
    if standardize:
        student_logits, teacher_logits = zscore(student_logits), zscore(teacher_logits)
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    per_sample = (log_t.exp() * (log_t - log_s)).sum(dim=1) * temperature**2
    return reduce(per_sample, reduction)
