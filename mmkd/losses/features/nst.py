"""Neuron selectivity transfer (NST): match the distributions of the channels' spatial responses.

A feature map ``[C, H, W]`` is read as ``C`` samples ``f_c`` in ``R^{HW}`` (the response of one channel
over all positions), each L2-normalised. NST is their squared maximum mean discrepancy under the
polynomial kernel ``k(x, y) = (x^T y)^2`` (degree 2, no offset):

    NST(s, t) = (1/C_T^2) sum_{i,j} k(t_i, t_j) + (1/C_S^2) sum_{i,j} k(s_i, s_j)
                - (2 / (C_S C_T)) sum_{i,j} k(s_i, t_j)                          per instance

Huang and Wang, "Like What You Like: Knowledge Distill via Neuron Selectivity Transfer",
arXiv:1707.01219, 2017. The batch value of mdistiller is the mean of these per-instance values (it
detaches the teacher-only sum, which has no student gradient anyway; a frozen teacher has none at
all). Channel counts may differ; where the two maps differ in size the larger is average-pooled to the
smaller. mdistiller (CIFAR-100) applies it to the outputs of the three stages (``layer1`` to
``layer3``), weight 50 each (the stage losses are summed, then weighted), next to CE of weight 1.0.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmkd.losses import reduce, register_loss
from mmkd.losses.features import match_spatial


def _kernel_mean(a, b):
    """``mean_{i,j} (a_i^T b_j)^2`` per instance for ``a: [B, C_a, N]``, ``b: [B, C_b, N]``."""
    return (a @ b.transpose(1, 2)).pow(2).mean((1, 2))


@register_loss("nst", teacher=True, per_sample=True)
def nst(student_features, teacher_features, target=None, *, reduction="mean"):
    """Squared MMD (polynomial kernel ``(x^T y)^2``) between the L2-normalised channel responses of the
    student's and the teacher's feature maps, per instance (NST, Huang and Wang 2017).

    Use it on feature maps ``[batch, channels, height, width]``: ``Term("nst", student="features.layer2",
    teacher="features.layer2")``.
    """
    s, t = match_spatial("nst", student_features, teacher_features)
    s = F.normalize(s.flatten(2), dim=2)
    t = F.normalize(t.flatten(2), dim=2)
    per_sample = _kernel_mean(t, t) + _kernel_mean(s, s) - 2 * _kernel_mean(s, t)
    return reduce(per_sample, reduction)
