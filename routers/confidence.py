"""Teachers weighted by how confident each is on each instance."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from mmkd.net import Batch, Output
from mmkd.routers.base import Router, register_router


@register_router("confidence")
class ConfidenceRouter(Router):
    """w[b, t] = c_bt^(1/tau) / sum_t' c_bt'^(1/tau), i.e. softmax_t(log c_bt / tau).

    The confidence c_bt of teacher t on instance b is its top softmax probability
    (``by="max"``) or, in the spirit of confidence-aware multi-teacher KD (Zhang et al., ICASSP
    2022), the probability it gives the true label (``by="target"``, needs the label in the batch).
    ``tau`` -> 0 picks the most confident teacher; ``tau`` -> inf weighs all equally.
    """

    def __init__(self, by: str = "max", temperature: float = 1.0, label_key: str = "label"):
        super().__init__()
        if by not in ("max", "target"):
            raise ValueError(f"ConfidenceRouter: by={by!r}; choose from: max, target")
        if temperature <= 0:
            raise ValueError(f"ConfidenceRouter: temperature must be positive, got {temperature}")
        self.by, self.temperature, self.label_key = by, temperature, label_key

    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        logp = torch.stack([t.logits.detach().float().log_softmax(dim=1) for t in teachers], dim=1)
        if self.by == "max":
            log_conf = logp.max(dim=2).values
        else:
            y = batch[self.label_key].view(-1, 1, 1).expand(-1, len(teachers), 1)
            log_conf = logp.gather(2, y).squeeze(2)
        return (log_conf / self.temperature).softmax(dim=1)
