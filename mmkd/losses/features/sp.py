"""Similarity-preserving KD (SP): match the batch's pairwise-similarity (Gram) matrices.

With ``Q`` the ``[B, D]`` flattened features of the batch, ``G = Q Q^T`` and ``G~`` its rows divided by
their L2 norms, for the student (``G~_S``) and the teacher (``G~_T``):

    SP(s, t) = (1/B^2) ||G~_T - G~_S||_F^2

Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019 (arXiv:1907.09682). A
batch-level loss; the two feature widths (and shapes) may differ, only the batch is shared.
mdistiller (CIFAR-100) applies it to the output of the last stage (``layer3`` of the CIFAR ResNets)
with weight 3000, next to CE of weight 1.0.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmkd.losses import register_loss
from mmkd.losses.features import same_batch


def _similarity(features):
    """``G~``: the batch Gram matrix ``Q Q^T`` of the flattened features, rows L2-normalised."""
    q = features.flatten(1)
    return F.normalize(q @ q.T, dim=1)


@register_loss("sp", teacher=True, per_sample=False)
def sp(student_features, teacher_features, target=None):
    """``||G~_T - G~_S||_F^2 / B^2`` with ``G~`` the row-normalised batch Gram matrix (SP, ICCV 2019).

    Use it on any ``[batch, ...]`` features: ``Term("sp", student="features.layer3",
    teacher="features.layer3")``. A scalar (batch-level).
    """
    same_batch("sp", student_features, teacher_features)
    b = student_features.shape[0]
    return (_similarity(teacher_features) - _similarity(student_features)).pow(2).sum() / b**2
