"""Attention transfer (AT): match the normalised spatial attention maps of a stage.

For a feature map ``A`` of ``[C, H, W]`` the activation-based attention map is the channel mean of
the p-th powers, flattened and L2-normalised:

    q(A) = vec( (1/C) sum_c A_c^p ),   a(A) = q(A) / ||q(A)||_2
    AT(s, t) = (1/HW) sum_j (a(A_S)_j - a(A_T)_j)^2   per instance

Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the Performance of
Convolutional Neural Networks via Attention Transfer", ICLR 2017 (arXiv:1612.03928). The paper writes
the distance as ``||a_S - a_T||_2``; this is the squared, averaged form of its code and of mdistiller,
whose batch value is the mean of these per-instance values. Where the two maps differ in size the
larger is average-pooled to the smaller (mdistiller). mdistiller (CIFAR-100) applies it with ``p = 2``
to the outputs of the three stages (``layer1`` to ``layer3`` of the CIFAR ResNets), weight 1000 each
(the stage losses are summed, then weighted), next to CE of weight 1.0.
"""
from __future__ import annotations

import torch.nn.functional as F

from mmkd.checks import POSITIVE
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import match_spatial


def attention(features, p):
    """``normalize(mean_c f^p)`` flattened: ``[B, C, H, W] -> [B, H * W]``, each row of unit L2 norm."""
    return F.normalize(features.pow(p).mean(1).flatten(1), dim=1)


@register_loss("at", teacher=True, per_sample=True, ranges={"p": POSITIVE})
def at(student_features, teacher_features, target=None, *, p=2.0, reduction="mean"):
    """``mean_j (a_S,j - a_T,j)^2`` per instance with ``a = normalize(vec(mean_c f^p))`` (AT, ICLR 2017).

    Use it on feature maps ``[batch, channels, height, width]``: ``Term("at", student="features.layer2",
    teacher="features.layer2")``; channel counts may differ, and a larger map is average-pooled to the
    smaller one's size. An odd or fractional ``p`` expects non-negative (post-ReLU) features.
    """
    s, t = match_spatial("at", student_features, teacher_features)
    return reduce((attention(s, p) - attention(t, p)).pow(2).mean(1), reduction)
