"""Binary KL: the logit-level loss of Dual-Head Knowledge Distillation (Yang et al., "Dual-Head
Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head", arXiv:2411.08937, 2024).

    BKL(s, t) = T^2 / N * sum_n sum_c KL(Bernoulli(0.5) || Bernoulli(sigmoid((s_nc - t_nc) / T)))

with ``KL(Bern(0.5) || Bern(q)) = -log 2 - (log q + log(1 - q)) / 2``; it is 0 exactly when the
student's logit equals the teacher's, class by class. This is the loss the official training script
uses (``BinaryKLNorm`` in ``distiller_zoo/``, default T = 2); the official clamps ``q`` to
``[1e-8, 1 - 1e-8]``, here ``log q`` and ``log(1 - q)`` are log-sigmoids (equal inside that range,
finite beyond it). It is meant for an auxiliary head (the main head keeps cross-entropy), which avoids
the classifier collapse of training one head on both.
"""
from __future__ import annotations

import math

import torch.nn.functional as F

from mmkd.checks import TEMPERATURE
from mmkd.losses import reduce, register_loss


@register_loss("bkl", teacher=True, per_sample=True, ranges={"temperature": TEMPERATURE})
def bkl(student_logits, teacher_logits, target=None, *, temperature=2.0, reduction="mean"):
    """``T^2 * sum_c KL(Bern(0.5) || Bern(sigmoid((s_c - t_c) / T)))`` per instance (the mean over
    instances gives the paper's ``T^2 / N`` sum); ``log q`` and ``log(1 - q)`` are log-sigmoids, so
    large logit gaps stay finite."""
    d = (student_logits - teacher_logits) / temperature
    kl = -math.log(2.0) - 0.5 * (F.logsigmoid(d) + F.logsigmoid(-d))
    return reduce(kl.sum(dim=1) * temperature**2, reduction)
