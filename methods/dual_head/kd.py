"""Dual-Head KD (Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an
Auxiliary Head", arXiv:2411.08937, 2024).

A :class:`~mmkd.methods.dual_head.model.DualHead` student (``inference="ce"``): the main head learns with CE,
the auxiliary head (the official non-linear one: ``aux_head="nonlinear"``) with the binary KL loss
(``bkl``, :mod:`mmkd.losses.bkl`, T = 2); only the main head predicts:

    L = gamma * CE(z_main, y) + alpha_kd * BKL(z_aux, z_t)       (gamma = alpha_kd = 1)

Gradient alignment (the official ``--ga``): with ``g_ce``, ``g_kd`` the gradients of the two weighted
terms over all parameters (flattened),

    g_kd <- g_kd - min(<g_kd, g_ce>, 0) / ||g_ce||^2 * g_ce,    theta.grad = g_ce + g_kd,

which is the trainer's backward rule ``align`` (:class:`mmkd.gradients.Align`, ``backward: {name:
align, args: {primary: [ce], secondary: [bkl]}}``). :func:`align_gradients` (model argument
``align: features``) is our variant: the same projection of the two heads' gradients on the shared
features of the batch, inside the model's graph, instead of on the parameters.

In a config: ``student: {name: dual_head, features: [kd_head], args: {backbone: ..., inference: ce,
aux_head: nonlinear}}``, the terms ``ce`` (on logits) and ``bkl`` with ``student: features.kd_head``,
and the backward rule above.
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
    """Our feature-level variant of Dual-Head KD's gradient alignment (the official one projects the
    gradients over all parameters: :class:`mmkd.gradients.Align`).

    Two copies ``(h_ce, h_kd)`` of the shared features ``h`` for the CE and the KD head. In the
    backward pass the KD gradient ``g_kd`` (over the whole batch tensor) is replaced, when
    ``<g_kd, g_ce> < 0``, by its projection ``g_kd - <g_kd, g_ce> / ||g_ce||^2 * g_ce`` orthogonal to
    the CE gradient; ``h`` receives ``g_ce + g_kd``. Trainer-agnostic: it lives in the model's graph."""
    return _AlignGradients.apply(h)
