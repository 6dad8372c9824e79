"""Probabilistic knowledge transfer (PKT): match the batch's conditional similarity distributions.

With the cosine-similarity kernel on the (flattened) features of the batch, scaled to ``[0, 1]``,

    K_ij = (1 + x_i^T x_j / ((||x_i|| + eps) (||x_j|| + eps))) / 2,    p_{j|i} = K_ij / sum_k K_ik

for the teacher (``p``) and the student (``q``), PKT is the divergence of the teacher's from the
student's, averaged over all ``B^2`` pairs:

    PKT(s, t) = (1/B^2) sum_{i,j} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))

Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.
The paper sums ``KL(P_T || P_S)`` over the rows; this is the form of its code and of mdistiller
(rows include ``j = i``, mean over all pairs, ``eps = 1e-7``). A batch-level loss: each row depends on
the whole batch. mdistiller (CIFAR-100) applies it to the pooled embeddings (``pool`` of the CIFAR
ResNets) with weight 30000, next to CE of weight 1.0.
"""
from __future__ import annotations

import torch

from mmkd.checks import POSITIVE
from mmkd.losses import register_loss
from mmkd.losses.features import same_batch


def _conditional(features, eps):
    """``p_{j|i}``: rows of the scaled cosine-similarity matrix of ``features`` normalised to sum to 1."""
    x = features.flatten(1)
    x = x / (x.norm(dim=1, keepdim=True) + eps)
    kernel = (x @ x.T + 1) / 2
    return kernel / kernel.sum(1, keepdim=True)


@register_loss("pkt", teacher=True, per_sample=False, ranges={"eps": POSITIVE})
def pkt(student_features, teacher_features, target=None, *, eps=1e-7):
    """``mean_{i,j} p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps))`` with ``p`` (teacher) and ``q``
    (student) the row-normalised cosine-similarity kernels of the batch (PKT, ECCV 2018).

    Use it on embeddings: ``Term("pkt", student="features.pool", teacher="features.pool")``; the two
    widths may differ. A scalar (batch-level).
    """
    same_batch("pkt", student_features, teacher_features)
    p, q = _conditional(teacher_features, eps), _conditional(student_features, eps)
    return (p * torch.log((p + eps) / (q + eps))).mean()
