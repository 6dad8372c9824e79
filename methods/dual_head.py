"""Dual-head students: one backbone, a cross-entropy head and a distillation head.

Two methods share the model :class:`DualHead` (registered as ``dual_head``), each in its own module:

* DHO (:mod:`mmkd.methods.dho`, Kang et al., arXiv:2505.07675, 2025; ``inference="combine"``): at
  inference ``p = (1 - alpha) * softmax(z_ce) + alpha * softmax(z_kd / beta)``, ``alpha`` and ``beta``
  picked on the validation split (:meth:`DualHead.calibrate`) and stored as buffers.
* Dual-Head KD (:mod:`mmkd.methods.dual_head_kd`, Yang et al., arXiv:2411.08937, 2024;
  ``inference="ce"``): CE on the main head, the binary KL loss ``bkl`` on the auxiliary head, only the
  main head predicts; ``align=True`` projects the auxiliary head's conflicting gradient off the CE one.

Wiring through the mixture core: in training the model returns the CE head's logits (the ``logits`` the
``ce`` term reads) and the KD head is a sub-module whose output the Net exposes as the feature
``kd_head``; so a run lists ``features: [kd_head]`` and uses the terms ``ce`` (on logits; label -1 =
unlabelled is ignored) and ``kd``/``bkl`` with ``student: features.kd_head`` against the teacher's
logits. In eval mode the model returns the inference rule's output (log-probabilities for DHO), which
is what ``Trainer.evaluate``, ``mmkd.export`` and ``mmkd predict`` see.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mmkd.build import create_model
from mmkd.callbacks import Callback
from mmkd.checks import FRACTION, POSITIVE
from mmkd.methods.dho import calibrate, combine
from mmkd.methods.dual_head_kd import align_gradients
from mmkd.models import strip_head
from mmkd.registry import MODELS

log = logging.getLogger("mmkd")

class DualHead(nn.Module, Callback):
    """A backbone returning features ``[B, width]`` and two linear heads, ``ce_head`` and ``kd_head``.

    It is also a :class:`~mmkd.callbacks.Callback`, which the Distiller training it runs: at the end of
    the fit (best weights loaded) it calibrates ``alpha``/``beta`` on the validation split
    (:meth:`on_fit_end`).

    ``forward(*inputs)``: in training, the CE head's logits (the KD head's are the ``kd_head`` feature);
    in eval mode, ``inference="combine"`` returns the DHO log-probabilities
    :func:`~mmkd.methods.dho.combine` with the ``alpha``/``beta`` buffers, ``inference="ce"`` the CE
    head's logits. ``align=True`` puts :func:`~mmkd.methods.dual_head_kd.align_gradients` between the
    backbone and the heads in training.
    """

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, inference: str = "combine",
                 align: bool = False, alpha: float = 0.5, beta: float = 1.0):
        super().__init__()
        if inference not in ("combine", "ce"):
            raise ValueError(f"dual_head.inference={inference!r}; choose from: combine, ce")
        self.backbone, self.inference, self.align = backbone, inference, align
        self.ce_head, self.kd_head = nn.Linear(width, num_classes), nn.Linear(width, num_classes)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def heads(self, x: Tensor, *more: Tensor) -> tuple[Tensor, Tensor]:
        """Both heads' logits ``(z_ce, z_kd)`` for the backbone's inputs."""
        h = self.backbone(x, *more).flatten(1)
        h_ce, h_kd = align_gradients(h) if self.align and self.training else (h, h)
        return self.ce_head(h_ce), self.kd_head(h_kd)

    def calibrate(self, dataset, keys: Sequence[str], label_key: str = "label") -> dict[str, float]:
        """Pick ``alpha``/``beta`` on ``dataset`` (the validation split); see
        :func:`~mmkd.methods.dho.calibrate`. With ``inference="ce"`` nothing is picked (``{}``)."""
        return calibrate(self, dataset, keys, label_key=label_key) if self.inference == "combine" else {}

    def on_fit_end(self, trainer, module, result) -> None:
        """Calibrate on ``trainer.val_data`` (before the test evaluation); the picks land in the fit's
        metrics as ``calibrated/<key>``, and the calibrated model's ``acc`` replaces ``val/acc``."""
        picked = self.calibrate(trainer.val_data, module.student.keys, module.label_key)
        if picked:
            log.info("stage %s: calibrated on the validation split: %s", trainer.stage, picked)
        result.metrics.update({f"calibrated/{k}": v for k, v in picked.items()})
        result.metrics["val/acc"] = picked.get("acc", result.metrics["val/acc"])

    def forward(self, x: Tensor, *more: Tensor) -> Tensor:
        z_ce, z_kd = self.heads(x, *more)
        if self.training or self.inference == "ce":
            return z_ce
        return combine(z_ce, z_kd, self.alpha, self.beta)


@MODELS.register("dual_head", ranges={"alpha": FRACTION, "beta": POSITIVE})
def dual_head(num_classes: int, in_shape: Any, backbone: Mapping[str, Any], inference: str = "combine",
              align: bool = False, alpha: float = 0.5, beta: float = 1.0) -> DualHead:
    """A :class:`DualHead` on a registered model whose linear classifier (``head`` or ``fc``) is removed.

    Args:
        backbone: ``{name: <registered model>, args: {...}}``, e.g. ``{name: cnn, args: {channels: [16, 32]}}``.
        inference: ``combine`` (DHO) or ``ce`` (Dual-Head KD: main head only).
        align: project the KD head's conflicting gradient off the CE head's (Dual-Head KD).
        alpha, beta: the initial DHO mixing weight and KD-head temperature (set by
            :func:`~mmkd.methods.dho.calibrate`).
    """
    if isinstance(backbone, DictConfig):
        backbone = OmegaConf.to_container(backbone, resolve=True)
    if "name" not in backbone or set(backbone) - {"name", "args"}:
        raise ValueError(f"dual_head.backbone: expected {{name, args}}, got keys {sorted(backbone)}")
    model = create_model(backbone["name"], num_classes, in_shape, "dual_head.backbone", **(backbone.get("args") or {}))
    width = strip_head(model, "dual_head.backbone")
    return DualHead(model, width, num_classes, inference, align, alpha, beta)
