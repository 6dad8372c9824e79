"""VID: variational information distillation, the teacher's features as a Gaussian given the student's.

A regressor ``mu`` (three 1x1 convolutions with ReLUs between, no biases) predicts the mean of the
teacher's feature map ``t`` from the student's ``s``, with a learned per-channel variance
``sigma_c^2 = softplus(alpha_c) + eps``; the loss is the Gaussian negative log-likelihood (without
its constant), a variational lower bound on the mutual information of the two features:

    VID(s, t) = mean_{c,h,w} 1/2 [ (t_chw - mu(s)_chw)^2 / sigma_c^2 + log sigma_c^2 ]   per instance.

Ahn, Hu, Damianou, Lawrence and Dai, "Variational Information Distillation for Knowledge Transfer",
CVPR 2019 (arXiv:1904.05835). Followed: the authors' PyTorch code as packaged in CRD
(HobbitLong/RepDistiller, ``distiller_zoo/VID.py``, ``VIDLoss``) and mdistiller
(megvii-research/mdistiller, ``mdistiller/distillers/VID.py``): the regressor's hidden width is the
teacher's channel count, ``alpha`` starts at ``log(exp(init_var - eps) - 1)`` so the variance starts
at ``init_var = 5``, ``eps = 1e-5``, the larger map is average-pooled to the smaller one's size, the
teacher's side is not differentiated. mdistiller (CIFAR-100) applies it to the outputs of the three
stages (``layer1`` to ``layer3``), weight 1.0 each (the stage losses are summed), next to CE of
weight 1.0; here one term per stage, the regressor and variance the term's module
(:class:`Regressor`, sized from the features it reads). The variance trains with the student, as in
the paper and CRD's code; mdistiller keeps its ``log_scales`` in a plain list that its optimiser
never sees, so its variance stays at ``init_var``: ``learn_var=False`` reproduces that.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import POSITIVE
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import match_spatial


def gaussian_nll(mean: Tensor, variance: Tensor, target: Tensor) -> Tensor:
    """``mean_{c,h,w} ((target - mean)^2 / variance_c + log variance_c) / 2`` per instance of
    ``[batch, C, H, W]`` maps, ``variance`` ``[C]``."""
    var = variance.view(1, -1, 1, 1)
    return (0.5 * ((target - mean).pow(2) / var + var.log())).flatten(1).mean(1)


class Regressor(nn.Module):
    """VID's learned part: the mean regressor ``C_s -> C_t -> C_t -> C_t`` (1x1 convolutions, ReLUs
    between, no biases, PyTorch's default initialisation) and the per-channel variance
    ``softplus(log_scale) + eps``, starting at ``init_var``; ``learn_var=False`` holds it there."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int] | None, init_var: float = 5.0,
                 eps: float = 1e-5, learn_var: bool = True):
        super().__init__()
        if teacher_shape is None or len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(f"loss vid: student features {tuple(student_shape)} and teacher features "
                             f"{None if teacher_shape is None else tuple(teacher_shape)}; it needs the feature maps "
                             "[channels, height, width] of a teacher and a student (e.g. features.layer1)")
        if not init_var > eps:
            raise ValueError(f"loss vid: init_var={init_var} must exceed eps={eps} (the variance is softplus(.) + eps)")
        c_s, c_t = student_shape[0], teacher_shape[0]
        self.mean = nn.Sequential(nn.Conv2d(c_s, c_t, 1, bias=False), nn.ReLU(), nn.Conv2d(c_t, c_t, 1, bias=False),
                                  nn.ReLU(), nn.Conv2d(c_t, c_t, 1, bias=False))
        self.log_scale = nn.Parameter(torch.full((c_t,), math.log(math.expm1(init_var - eps))), requires_grad=learn_var)
        self.eps = float(eps)

    def variance(self) -> Tensor:
        """``softplus(log_scale) + eps``, one per teacher channel."""
        return F.softplus(self.log_scale) + self.eps

    def forward(self, x: Tensor) -> Tensor:
        return self.mean(x)


@register_loss("vid", teacher=True, per_sample=True, module=Regressor, ranges={"init_var": POSITIVE, "eps": POSITIVE})
def vid(student_features, teacher_features, target=None, *, module=None, reduction="mean"):
    """``mean 1/2 [(t - mu(s))^2 / sigma^2 + log sigma^2]`` per instance (VID, CVPR 2019), ``mu`` and
    ``sigma^2`` the term's :class:`Regressor` (``module``).

    Use it on feature maps: ``Term("vid", student="features.layer1", teacher="features.layer1")``;
    a larger map is average-pooled to the smaller one's size.
    """
    if module is None:
        raise ValueError("loss vid: no regressor module; use it as a loss term (Term('vid', student=..., "
                         "teacher=...)), which makes one")
    s, t = match_spatial("vid", student_features, teacher_features)
    mean = module(s)
    if mean.shape[1] != t.shape[1]:
        raise ValueError(f"loss vid: the regressor predicts {mean.shape[1]} channels, the teacher features have "
                         f"{t.shape[1]}; the term's module was sized for other features")
    return reduce(gaussian_nll(mean, module.variance().to(mean.dtype), t.detach()), reduction)
