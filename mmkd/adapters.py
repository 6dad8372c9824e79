"""Learned projectors that map a student's features to the shape of a teacher's (FitNet's regressor).

Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015: a hint loss ||r(f_S) - f_T||^2
with a learned regressor r from the student's guided layer to the teacher's hint layer.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

ADAPTERS = ("linear", "conv", "token")


def make_adapter(kind: str, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """A projector from features of ``student_shape`` to ``teacher_shape`` (shapes without batch).

    ``linear``: ``[C_s] -> [C_t]`` (flattening other dimensions); ``conv``: a 1x1 convolution with
    BatchNorm, ``[C_s, H, W] -> [C_t, H_t, W_t]``, resized by adaptive average pooling if needed;
    ``token``: one linear map of every token's width, ``[L, D_s] -> [L, D_t]`` (transformer tokens).
    """
    if kind == "linear":
        from math import prod

        return nn.Sequential(nn.Flatten(), nn.Linear(prod(student_shape), prod(teacher_shape)),
                             nn.Unflatten(1, tuple(teacher_shape)))
    if kind == "conv":
        if len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(f"a conv adapter needs [C, H, W] features, got {tuple(student_shape)} -> {tuple(teacher_shape)}")
        layers: list[nn.Module] = [nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False),
                                   nn.BatchNorm2d(teacher_shape[0])]
        if tuple(student_shape[1:]) != tuple(teacher_shape[1:]):
            layers.append(nn.AdaptiveAvgPool2d(tuple(teacher_shape[1:])))
        return nn.Sequential(*layers)
    if kind == "token":
        return nn.Linear(student_shape[-1], teacher_shape[-1])
    raise ValueError(f"unknown adapter {kind!r}; choose from: {', '.join(ADAPTERS)}")
