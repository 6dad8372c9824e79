"""Cross-entropy on the ground-truth labels, optionally label-smoothed.

    CE(z, y) = -sum_c q_c * log softmax(z)_c,   q = (1 - eps) * onehot(y) + eps / C

With eps = 0 this is -log softmax(z)_y. Instances with a negative label are unlabelled: their loss
is 0 and the mean runs over labelled instances only (how graph data sets mark nodes outside the
training split). Label smoothing follows Szegedy et al., "Rethinking the
Inception Architecture for Computer Vision", CVPR 2016.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmkd.checks import FRACTION
from mmkd.losses import reduce, register_loss


@register_loss("ce", teacher=False, per_sample=True, ranges={"label_smoothing": FRACTION})
def ce(student_logits, teacher_logits=None, target=None, *, label_smoothing=0.0, reduction="mean"):
    """Cross-entropy ``-sum_c q_c log softmax(z)_c`` with ``q = (1-eps) onehot(y) + eps/C``.

    ``label_smoothing`` is eps (Szegedy et al., "Rethinking the Inception Architecture for Computer
    Vision", CVPR 2016); ``teacher_logits`` is ignored.
    """
    labelled = target >= 0
    per_sample = F.cross_entropy(student_logits, target.clamp(min=0), label_smoothing=label_smoothing,
                                 reduction="none") * labelled
    if reduction == "mean":
        return per_sample.sum() / labelled.sum().clamp(min=1)
    return reduce(per_sample, reduction)
