"""Co-training (deep mutual learning): several nets learn from the labels and from each other.

For members ``m`` with logits ``z_m``:

    L = sum_m [ CE(z_m, y) + w * sum_{o != m} T^2 KL(softmax(z_o/T) || softmax(z_m/T)) ]

MST-Distill (Li et al., ACM MM 2025) co-trains its multimodal teacher, its cross-modal teacher and
the student this way in its first stage. By default (``detach=False``, the official form: stage 1 of
its reference ``main-MST-Distill.py`` calls the undetached ``distillation_loss``) every KL term is
differentiated in both of its arguments, so the term ``KL(p_o || p_m)`` trains ``o`` as well as
``m``. With ``detach=True`` the target is ``softmax(sg(z_o)/T)`` (``sg`` stops the gradient), as in
deep mutual learning (Zhang et al., "Deep Mutual Learning", CVPR 2018): each member learns from the
others' current distributions, which are targets, not paths for gradients.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from mmkd.losses import ce, kd
from mmkd.net import Batch, Net
from mmkd.trainer import Module


class CoTraining(Module):
    """Members trained together; ``forward(batch)`` returns ``"<m>/ce"`` and ``"<m>/kd_<o>"`` for
    every member ``m`` and other member ``o`` (already weighted) and their sum under ``"loss"``.

    Args:
        nets: name -> :class:`~mmkd.net.Net`, all trainable.
        temperature: ``T`` of the KL terms.
        kd_weight: ``w``, the weight of each KL term.
        detach: stop the gradient of each KL term's target (``False``: MST-Distill's official form).
        predict_with: the member whose logits :meth:`predict` returns (what the trainer evaluates).
        label_key: the batch entry holding class labels.
    """

    def __init__(self, nets: Mapping[str, Net], temperature: float = 4.0, kd_weight: float = 1.0,
                 detach: bool = False, predict_with: str = "student", label_key: str = "label"):
        super().__init__()
        if predict_with not in nets:
            raise ValueError(f"co-training: predict_with={predict_with!r} is not a member; "
                             f"choose from: {', '.join(nets)}")
        self.nets = nn.ModuleDict(nets)
        self.temperature, self.kd_weight, self.detach = temperature, kd_weight, detach
        self.predict_with, self.label_key = predict_with, label_key

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        logits = {name: net(batch).logits.float() for name, net in self.nets.items()}
        y = batch[self.label_key]
        losses: dict[str, Tensor] = {}
        for m, z in logits.items():
            losses[f"{m}/ce"] = ce(z, None, y)
            for o, z_o in logits.items():
                if o != m:
                    target = z_o.detach() if self.detach else z_o
                    losses[f"{m}/kd_{o}"] = self.kd_weight * kd(z, target, temperature=self.temperature)
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """The logits of member ``predict_with`` (the student)."""
        return self.nets[self.predict_with](batch).logits
