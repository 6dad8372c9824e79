"""Dual-Head KD (Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an
Auxiliary Head", arXiv:2411.08937, 2024).

A :class:`~mmkd.methods.dual_head.DualHead` student (``inference="ce"``): the main head learns with CE,
the auxiliary head with the binary KL loss (``bkl``, :mod:`mmkd.losses.bkl`); only the main head
predicts. Optionally (``align=True``) the auxiliary head's gradient on the shared features is
projected off the CE gradient when they conflict (:func:`align_gradients`):

    g_kd <- g_kd - min(<g_kd, g_ce>, 0) / ||g_ce||^2 * g_ce,   the features receive g_ce + g_kd.

In a config: ``student: {name: dual_head, features: [kd_head], args: {backbone: ..., inference: ce,
align: true}}``, the terms ``ce`` (on logits) and ``bkl`` with ``student: features.kd_head``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class _AlignGradients(torch.autograd.Function):
    """Identity into two branches; backward projects the second branch's gradient off the first's when
    they conflict (PCGrad-style): ``g_2 <- g_2 - min(<g_2, g_1>, 0) / ||g_1||^2 * g_1``, returns ``g_1 + g_2``."""

    @staticmethod
    def forward(ctx, h: Tensor) -> tuple[Tensor, Tensor]:
        return h.clone(), h.clone()

    @staticmethod
    def backward(ctx, g_1: Optional[Tensor], g_2: Optional[Tensor]) -> Tensor:
        if g_1 is None or g_2 is None:
            return g_2 if g_1 is None else g_1
        dot = (g_1 * g_2).sum()
        return g_1 + g_2 - dot.clamp(max=0) / g_1.pow(2).sum().clamp(min=1e-12) * g_1


def align_gradients(h: Tensor) -> tuple[Tensor, Tensor]:
    """Two copies ``(h_ce, h_kd)`` of the shared features ``h`` for the CE and the KD head. In the
    backward pass the KD gradient ``g_kd`` (over the whole batch tensor) is replaced, when
    ``<g_kd, g_ce> < 0``, by its projection ``g_kd - <g_kd, g_ce> / ||g_ce||^2 * g_ce`` orthogonal to
    the CE gradient; ``h`` receives ``g_ce + g_kd``. Trainer-agnostic: it lives in the model's graph."""
    return _AlignGradients.apply(h)
