"""DIST: relational (Pearson-correlation) distillation, batch-level.

With Y = softmax(Z / tau) for student and teacher ([batch, classes]):

    inter = 1 - mean_i rho(Y^s[i, :], Y^t[i, :])     (per instance, across classes)
    intra = 1 - mean_j rho(Y^s[:, j], Y^t[:, j])     (per class, across the batch)
    DIST  = tau^2 * (beta * inter + gamma * intra)

rho(a, b) = <a - mean a, b - mean b> / (|a - mean a| |b - mean b| + eps), eps = 1e-8 as in the
official code. Huang, You, Wang, Qian and Xu, "Knowledge Distillation from A Stronger Teacher",
NeurIPS 2022.
"""
from __future__ import annotations

from mmkd.checks import NON_NEGATIVE, POSITIVE, TEMPERATURE
from mmkd.losses import register_loss


@register_loss("dist", teacher=True, per_sample=False,
               ranges={"beta": NON_NEGATIVE, "gamma": NON_NEGATIVE, "tau": TEMPERATURE, "eps": POSITIVE})
def dist(student_logits, teacher_logits, target=None, *, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    """``tau^2 (beta (1 - mean_i rho(rows)) + gamma (1 - mean_j rho(columns)))`` (scalar).

    rho is the Pearson correlation with ``eps`` in the denominator. Huang et al., "Knowledge
    Distillation from A Stronger Teacher", NeurIPS 2022.
    """
    y_s = (student_logits / tau).softmax(dim=1)
    y_t = (teacher_logits / tau).softmax(dim=1)

    def pearson(a, b, dim):
        a, b = a - a.mean(dim, keepdim=True), b - b.mean(dim, keepdim=True)
        return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)

    inter = 1 - pearson(y_s, y_t, 1).mean()
    intra = 1 - pearson(y_s, y_t, 0).mean()
    return tau**2 * (beta * inter + gamma * intra)
