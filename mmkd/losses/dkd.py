"""Decoupled knowledge distillation (DKD).

With p = softmax(z/T), target y, b = [p_y, 1 - p_y] and p_hat = softmax over the non-target
logits z_{c != y} / T:

    TCKD = KL(b^t || b^s),   NCKD = KL(p_hat^t || p_hat^s)
    DKD  = T^2 * (alpha * TCKD + beta * NCKD)

Zhao, Cui, Song, Qiu and Liang, "Decoupled Knowledge Distillation", CVPR 2022.
Both binary probabilities are formed in log space (log(1 - p_y) as a log-sum-exp over the
non-target logits), so nothing is logged after a softmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkd.checks import NON_NEGATIVE, TEMPERATURE
from mmkd.losses import reduce, register_loss
from mmkd.losses.kd import zscore


@register_loss("dkd", teacher=True, per_sample=True,
               ranges={"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE, "temperature": TEMPERATURE})
def dkd(student_logits, teacher_logits, target, *, alpha=1.0, beta=8.0, temperature=4.0,
        standardize=False, reduction="mean"):
    """``T^2 (alpha * KL(b^t || b^s) + beta * KL(p_hat^t || p_hat^s))`` per instance.

    b = [p_y, 1 - p_y] is the binary target/non-target split of softmax(z/T); p_hat is the softmax
    over the non-target classes only. Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022.

    ``standardize``: z-score each side's logits first (:func:`mmkd.losses.kd.zscore`; Sun et al.,
    "Logit Standardization in Knowledge Distillation", CVPR 2024), before both splits; off by default.
    The official LS setting for DKD on CIFAR-100 (``tools/train.py --logit-stand --base-temp 2
    --kd-weight 9``) multiplies alpha by the KD weight 9 and sets beta to the scaled alpha times 9
    (alpha = 9, beta = 81, as its code reads), keeping DKD's own temperature (4): ``--base-temp`` sets
    KD's temperature only; CE weight 1.
    """
    if standardize:
        student_logits, teacher_logits = zscore(student_logits), zscore(teacher_logits)
    b, c = student_logits.shape
    other = torch.ones_like(student_logits, dtype=torch.bool).scatter_(1, target[:, None], False)

    def split(z):  # log [p_y, 1 - p_y] and the log-softmax over the non-target classes
        z = z / temperature
        rest = z[other].view(b, c - 1)
        lse_all, lse_rest = z.logsumexp(1), rest.logsumexp(1)
        binary = torch.stack([z.gather(1, target[:, None])[:, 0] - lse_all, lse_rest - lse_all], 1)
        return binary, F.log_softmax(rest, dim=1)

    bin_s, non_s = split(student_logits)
    bin_t, non_t = split(teacher_logits)
    tckd = (bin_t.exp() * (bin_t - bin_s)).sum(1)
    nckd = (non_t.exp() * (non_t - non_s)).sum(1)
    return reduce((alpha * tckd + beta * nckd) * temperature**2, reduction)
