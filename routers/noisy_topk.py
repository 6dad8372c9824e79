"""Noisy top-k gating (Shazeer et al., "Outrageously Large Neural Networks: The Sparsely-Gated
Mixture-of-Experts Layer", ICLR 2017, eqs. 3-5):

    H(x)_t = (x W_g)_t + StandardNormal() * Softplus((x W_noise)_t)     (training; eval: x W_g)
    G(x)   = Softmax(KeepTopK(H(x), k))
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.routers.base import register_router
from mmkd.routers.learned import GateRouter, input_width


@register_router("noisy_topk")
class NoisyTopKRouter(GateRouter):
    """Shazeer et al.'s noisy top-k gate on the student's logits or a student feature.

    ``W_g`` and ``W_noise`` start at zero, as in the paper (no signal, some noise); the noise is
    drawn only in training mode, so evaluation is deterministic. The default ``mode="topk"`` with
    ``k=2`` is the paper's gate (``k > 1`` lets the distillation terms train the gate); ``balance="cv2"``
    with a weight is its importance loss. Other arguments: see :class:`~mmkd.routers.learned.LinearRouter`.
    """

    def __init__(self, num_teachers: int, in_features: int | None = None, num_classes: int | None = None,
                 feature_shapes: dict[str, Sequence[int]] | None = None, source: str = "logits",
                 mode: str = "topk", k: int = 2, **routing):
        width = input_width(source, in_features, num_classes, feature_shapes)
        super().__init__(nn.Linear(width, num_teachers, bias=False), num_teachers, source, mode, k, **routing)
        self.noise = nn.Linear(width, num_teachers, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    def gate_logits(self, x: Tensor) -> Tensor:
        """``H(x)``: clean logits plus, in training, Gaussian noise of learned scale."""
        clean = self.gate(x)
        if not self.training:
            return clean
        return clean + torch.randn_like(clean) * F.softplus(self.noise(x))
