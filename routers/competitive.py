"""Teachers that beat the student: learn from a teacher only on the instances it gets more right.

``w[b, t] = 1[CE_t(b) < CE_s(b)] / #{t' : CE_t'(b) < CE_s(b)}``, with ``CE_m(b) = -log p_m(y_b | x_b)``
the cross-entropy of the label under model ``m`` (the student ``s`` or teacher ``t``): on an instance
where no teacher beats the student, every weight is 0 (and on unlabelled rows, label < 0). The
direction of competitive distillation (CoMD: Li et al., "CoMD: Competitive Multimodal Distillation",
arXiv:2311.08213, 2023; :mod:`mmkd.methods.comd`), where each of two models learns from the other
where the other is better, is this router with the other model as the teacher.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.net import Batch, Output
from mmkd.routers.base import Router, register_router


@register_router("competitive")
class CompetitiveRouter(Router):
    """``w[b, t]``: an equal share among the teachers whose cross-entropy on instance ``b``'s label is
    lower than the student's (module docstring); ``label_key`` names the labels."""

    mode = "hard"

    def __init__(self, label_key: str = "label"):
        super().__init__()
        self.label_key = label_key

    @torch.no_grad()
    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        if self.label_key not in batch:
            raise KeyError(f"router competitive compares the models on the labels; the batch has no "
                           f"{self.label_key!r} (it has: {', '.join(batch)})")
        y = batch[self.label_key]
        labelled = y >= 0
        target = y.clamp(min=0)

        def ce(out: Output) -> Tensor:
            return F.cross_entropy(out.logits.float(), target, reduction="none")

        s = ce(student)
        wins = torch.stack([(ce(t) < s) & labelled for t in teachers], 1).float()
        return wins / wins.sum(1, keepdim=True).clamp(min=1)
