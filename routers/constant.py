"""Fixed teacher weights, the same for every instance."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mmkd.net import Batch, Output
from mmkd.routers.base import Router, register_router


@register_router("constant")
class ConstantRouter(Router):
    """w[b, t] = c_t / sum_t' c_t' for every instance b.

    Args:
        weights: one non-negative weight per teacher; ``None`` weighs all teachers equally. With a
            single teacher this is plain single-teacher distillation.
        num_teachers: if given (``mmkd run`` gives it), ``weights`` must have that many entries.
    """

    def __init__(self, weights: Sequence[float] | None = None, num_teachers: int | None = None):
        super().__init__()
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if self.weights is not None and (self.weights.ndim != 1 or (self.weights < 0).any()
                                         or self.weights.sum() <= 0):
            raise ValueError(f"router weights must be non-negative with a positive sum, got {list(weights)}")
        if self.weights is not None and num_teachers is not None and len(self.weights) != num_teachers:
            raise ValueError(f"{len(self.weights)} router weights for {num_teachers} teachers; give one per teacher")
        self._w: Tensor | None = None  # the normalised weights on the device last used

    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        n, b, device = len(teachers), student.logits.shape[0], student.logits.device
        if self.weights is not None and len(self.weights) != n:
            raise ValueError(f"router has {len(self.weights)} weights but there are {n} teachers")
        if self._w is None or len(self._w) != n or self._w.device != device:
            w = torch.full((n,), 1.0 / n) if self.weights is None else self.weights / self.weights.sum()
            self._w = w.to(device)
        return self._w.expand(b, n)
