"""ReviewKD: distil every teacher stage from a fusion of the student's stage and its deeper stages.

With the student's stages ``S_1 .. S_n`` (shallow to deep) and the teacher's ``T_1 .. T_n``, learned
attention-based fusion (ABF) modules ``F_i`` review the student from deep to shallow:

    R_n = conv1_n(S_n),                                   O_n = conv2_n(R_n)
    R_i = a_i * conv1_i(S_i) + b_i * up(R_{i+1}),         O_i = conv2_i(R_i)      (i < n)
    [a_i, b_i] = sigmoid(att_i([conv1_i(S_i), up(R_{i+1})]))   two maps [B, 1, H, W]

(``conv1``: 1x1 convolution to ``mid`` channels + BatchNorm; ``conv2``: 3x3 convolution to the
teacher's channels + BatchNorm; ``att``: 1x1 convolution with bias to 2 channels; ``up``: nearest
resizing to the student stage's size; where the teacher's map has another size, ``R_i`` is resized
(nearest) to it before ``conv2``). ``a`` and ``b`` are two independent sigmoids (they need not add
to 1). The hierarchical context loss (HCL) compares each output with the teacher's stage over a
pyramid of average-pooled levels:

    HCL(O, T) = sum_i [ MSE(O_i, T_i) + sum_k w_k MSE(P_k(O_i), P_k(T_i)) ] / (1 + sum_k w_k)

where ``P_k`` is adaptive average pooling to ``k x k`` for the levels ``k = 4, 2, 1`` smaller than the
map's height, and ``w_k`` halves from 1/2 at each level used (1/2, 1/4, 1/8 for an 8x8 map; a 1x1 map
is its full-size term alone). MSE is the mean over the batch and all elements, here the mean over
the batch of per-instance means (the same value).

Chen, Liu, Zhao and Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021 (arXiv:2104.09044).
Followed: the official code (dvlab-research/ReviewKD, ``CIFAR-100/model/reviewkd.py``: ``ABF``,
``ReviewKD``, ``hcl``; ``CIFAR-100/train.py``) and mdistiller's ``ReviewKD``: ``mid = min(512, C)`` with
``C`` the student's deepest channels, the Kaiming-uniform (``a = 1``) initialisation of both
convolutions, the term's weight warmed up over 20 epochs on top of CE 1.0 (``{schedule: warmup, epochs:
20}``; 0.6 for ResNet-56 -> ResNet-20 in the official script, ``cifar10_reviewkd``). For the CIFAR
ResNets the student's stages are ``layer1`` to ``layer3`` (after their ReLU) and ``pool`` (the pooled
feature, read as a ``[B, C, 1, 1]`` map), the teacher's are its stages before their last ReLU
(``preact1`` to ``preact3`` of a ResNet built with ``preact: true``) and ``pool``, as both codes; the
stem is unused (their ``zip`` drops it). Each stage's output is sized from the teacher's
(``teacher_shape``). The fusion modules train with the student (the term's module). With several
teachers the fusion (built for the first teacher's shapes) runs once per teacher.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import COUNT
from mmkd.losses import reduce, register_loss

LEVELS = (4, 2, 1)  # the pooled sizes of the HCL pyramid


def as_map(x: Tensor) -> Tensor:
    """A ``[B, C]`` feature (a pooled embedding) as a ``[B, C, 1, 1]`` map; a map unchanged."""
    return x[:, :, None, None] if x.ndim == 2 else x


def _mse(a: Tensor, b: Tensor) -> Tensor:
    """``[B]``: the mean squared difference of each instance."""
    return (a - b).pow(2).flatten(1).mean(1)


def hcl(student: Sequence[Tensor], teacher: Sequence[Tensor], reduction: str = "mean") -> Tensor:
    """The hierarchical context loss (module docstring) between two lists of ``[B, C, H, W]`` maps of
    equal shapes, summed over the stages; per instance with ``reduction="none"``."""
    if len(student) != len(teacher):
        raise ValueError(f"hcl: {len(student)} student and {len(teacher)} teacher stages; give one per stage")
    total = 0
    for i, (s, t) in enumerate(zip(student, teacher)):
        if s.shape != t.shape or s.ndim != 4:
            raise ValueError(f"hcl: stage {i}: student {tuple(s.shape)} and teacher {tuple(t.shape)}; it needs "
                             "maps [batch, channels, height, width] of one shape (the fusion sizes them)")
        loss, weight, norm = _mse(s, t), 1.0, 1.0
        for k in LEVELS:
            if k >= s.shape[2]:
                continue
            weight /= 2
            loss = loss + weight * _mse(F.adaptive_avg_pool2d(s, k), F.adaptive_avg_pool2d(t, k))
            norm += weight
        total = total + loss / norm
    return reduce(total, reduction)


class ABF(nn.Module):
    """One attention-based fusion: ``conv1`` the student's stage, fuse it with the deeper stages'
    residual (``fuse``), resize to the teacher's size, ``conv2`` to the teacher's channels."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``(output, fused)`` for the stage ``x``: the output at ``size`` with the teacher's channels,
        and the fused ``mid``-channel map that the next (shallower) stage fuses with."""
        x = self.conv1(x)
        if self.att is not None:
            residual = F.interpolate(residual, x.shape[2:], mode="nearest")
            z = self.att(torch.cat([x, residual], 1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size, mode="nearest")
        return self.conv2(x), x


def _map_shape(shape: Sequence[int], who: str) -> tuple[int, int, int]:
    if len(shape) not in (1, 3):
        raise ValueError(f"reviewkd: a {who} stage of shape {tuple(shape)}; each stage must be a map [C, H, W] "
                         "or a pooled feature [C]")
    return (shape[0], 1, 1) if len(shape) == 1 else tuple(shape)


class ReviewFusion(nn.Module):
    """ReviewKD's ABF modules for the student's stages (``student_shape``, shallow to deep) and the
    teacher's (``teacher_shape``), the shapes without batch; ``mid_channels`` defaults to the official
    ``min(512, C)`` with ``C`` the student's deepest channels. Call it on the student's list of stage
    features; it returns the list of outputs, shaped as the teacher's stages (maps)."""

    def __init__(self, student_shape: Sequence[Sequence[int]], teacher_shape: Sequence[Sequence[int]] | None,
                 mid_channels: int | None = None):
        super().__init__()
        if teacher_shape is None:
            raise ValueError("reviewkd: no teacher; the fusion is sized from the teacher's stages")
        if not isinstance(student_shape, list) or not isinstance(teacher_shape, list):
            raise ValueError("reviewkd reads every stage; give the term student: features and teacher: features")
        if len(student_shape) != len(teacher_shape):
            raise ValueError(f"reviewkd: the student exposes {len(student_shape)} features and the teacher "
                             f"{len(teacher_shape)}; list the same stages in both (features: [...])")
        s = [_map_shape(x, "student") for x in student_shape]
        self.out_shapes = [_map_shape(x, "teacher") for x in teacher_shape]
        for who, shapes in (("student", s), ("teacher", self.out_shapes)):
            sizes = [x[1:] for x in shapes]
            if any(a[0] < b[0] or a[1] < b[1] for a, b in zip(sizes, sizes[1:])):
                raise ValueError(f"reviewkd: the {who}'s stages come with the sizes {sizes}; they must run from "
                                 "shallow to deep (sizes not growing): list the features in that order")
        mid = int(mid_channels) if mid_channels is not None else min(512, s[-1][0])
        self.abfs = nn.ModuleList(ABF(c, mid, t[0], i < len(s) - 1) for i, ((c, _, _), t) in
                                  enumerate(zip(s, self.out_shapes)))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The fused outputs of the student's stage ``features`` (shallow to deep), computed deep to shallow."""
        if len(features) != len(self.abfs):
            raise ValueError(f"reviewkd: {len(features)} student features for {len(self.abfs)} fusion stages")
        outputs, residual = [], None
        for i in reversed(range(len(self.abfs))):
            out, residual = self.abfs[i](as_map(features[i]), residual, self.out_shapes[i][1:])
            outputs.insert(0, out)
        return outputs


@register_loss("reviewkd", teacher=True, per_sample=True, module=ReviewFusion, ranges={"mid_channels": COUNT})
def reviewkd(student_features, teacher_features, target=None, *, module=None, reduction="mean"):
    """``HCL(fusion(student stages), teacher stages)`` (ReviewKD, CVPR 2021), per instance.

    Use it on every stage: ``Term("reviewkd", student="features", teacher="features")`` with the same
    stages listed (shallow to deep) in the student's and the teacher's ``features``; a pooled
    ``[B, C]`` feature is a ``[B, C, 1, 1]`` map. ``module`` is the term's :class:`ReviewFusion`.
    """
    if module is None:
        raise ValueError("loss reviewkd: no fusion module; use it as a loss term (Term('reviewkd', "
                         "student='features', teacher='features')), which makes one")
    if not isinstance(student_features, (list, tuple)) or not isinstance(teacher_features, (list, tuple)):
        raise ValueError("reviewkd reads every stage; give the term student: features and teacher: features")
    return hcl(module(student_features), [as_map(t) for t in teacher_features], reduction)
