"""Relational knowledge distillation (RKD): match the distances and angles within the batch.

With ``e_i`` the flattened features of the batch (``[B, D]``), ``d_ij = ||e_i - e_j||_2`` (``d_ii = 0``)
normalised by its mean over the ``B (B - 1)`` pairs ``i != j``, and the angle at ``e_i``

    psi_D(i, j) = d_ij / mean_{k != l} d_kl,       psi_A(i, j, k) = <n(e_j - e_i), n(e_k - e_i)>

(``n(v) = v / ||v||``, ``n(0) = 0``), with ``l`` the smooth-L1 (Huber, delta 1) loss:

    D(s, t) = (1/B^2) sum_{i,j} l(psi_D^S(i, j) - psi_D^T(i, j))
    A(s, t) = (1/B^3) sum_{i,j,k} l(psi_A^S(i, j, k) - psi_A^T(i, j, k))
    RKD(s, t) = distance_weight * D + angle_weight * A

Park, Kim, Lu and Cho, "Relational Knowledge Distillation", CVPR 2019 (arXiv:1904.05068). The
averages over all ``B^2`` and ``B^3`` index tuples (degenerate ones included) and the distances
``sqrt(max(||e_i||^2 + ||e_j||^2 - 2 e_i^T e_j, eps))`` (``eps = 1e-12``; ``squared``: without the
root) follow the code of the paper and of mdistiller. A batch-level loss; the two feature widths may
differ. A batch of one instance has no pairs: the loss is 0. mdistiller (CIFAR-100) applies it to the
pooled embeddings (``pool`` of the CIFAR ResNets) with ``distance_weight = 25``, ``angle_weight = 50``
and term weight 1.0, next to CE of weight 1.0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkd.checks import NON_NEGATIVE, POSITIVE
from mmkd.losses import register_loss
from mmkd.losses.features import same_batch


def _distances(e, squared, eps):
    """``[B, B]`` pairwise (squared) Euclidean distances of the rows of ``e``, the diagonal 0, divided
    by their mean over the off-diagonal pairs."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * e @ e.T).clamp(min=eps)
    if not squared:
        d = d.sqrt()
    b = len(e)
    d = d * (1 - torch.eye(b, dtype=d.dtype, device=d.device))
    return d / (d.sum() / (b * (b - 1)))


def _angles(e):
    """``[B, B, B]``: entry ``(i, j, k)`` is the cosine of the angle at ``e_i`` between ``e_j`` and ``e_k``."""
    unit = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # [i, j] = n(e_j - e_i)
    return unit @ unit.transpose(1, 2)


@register_loss("rkd", teacher=True, per_sample=False,
               ranges={"distance_weight": NON_NEGATIVE, "angle_weight": NON_NEGATIVE, "eps": POSITIVE})
def rkd(student_features, teacher_features, target=None, *, distance_weight=25.0, angle_weight=50.0,
        squared=False, eps=1e-12):
    """``distance_weight * D + angle_weight * A``: smooth-L1 between the batch's mean-normalised pairwise
    distances and between its angle cosines, student against teacher (RKD, CVPR 2019).

    Use it on embeddings: ``Term("rkd", student="features.pool", teacher="features.pool")``; the two
    widths may differ. A scalar (batch-level).
    """
    same_batch("rkd", student_features, teacher_features)
    s, t = student_features.flatten(1), teacher_features.flatten(1)
    if len(s) < 2:
        return s.sum() * 0.0
    loss_d = F.smooth_l1_loss(_distances(s, squared, eps), _distances(t, squared, eps))
    loss_a = F.smooth_l1_loss(_angles(s), _angles(t))
    return distance_weight * loss_d + angle_weight * loss_a
