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
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w is not None and (w.ndim != 1 or (w < 0).any() or w.sum() <= 0):
            raise ValueError(f"router weights must be non-negative with a positive sum, got {list(weights)}")
        if w is not None and num_teachers is not None and len(w) != num_teachers:
            raise ValueError(f"{len(w)} router weights for {num_teachers} teachers; give one per teacher")
        self.register_buffer("normalised", None if w is None else w / w.sum(), persistent=False)

    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        n, b = len(teachers), student.logits.shape[0]
        if self.normalised is None:
            return student.logits.new_full((b, n), 1.0 / n, dtype=torch.float32)
        if len(self.normalised) != n:
            raise ValueError(f"router has {len(self.normalised)} weights but there are {n} teachers")
        return self.normalised.to(student.logits.device).expand(b, n)
