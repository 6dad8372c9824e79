"""Dual-head students: one backbone, a cross-entropy head and a distillation head.

Two methods share the model :class:`DualHead` (registered as ``dual_head``), each in its own module:

* DHO (:mod:`mmkd.methods.dual_head.dho`, Kang et al., arXiv:2505.07675, 2025; ``inference="combine"``): at
  inference ``p = (1 - alpha) * softmax(z_ce) + alpha * softmax(z_kd / beta)``, ``alpha`` and ``beta``
  picked on the validation split (:meth:`DualHead.calibrate`) and stored as buffers: after every
  epoch, so that the checkpoint kept is the epoch with the best searched accuracy (``search="epoch"``,
  the official procedure), or once on the best epoch's weights (``search="end"``, our variant).
* Dual-Head KD (:mod:`mmkd.methods.dual_head.kd`, Yang et al., arXiv:2411.08937, 2024;
  ``inference="ce"``): CE on the main head, the binary KL loss ``bkl`` on the auxiliary head (linear, or
  the official non-linear ``aux_head="nonlinear"``), only the main head predicts. The official gradient
  alignment is the trainer's backward rule ``align`` (:class:`mmkd.gradients.Align`, over all
  parameters); ``align="features"`` is our variant on the shared features.

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
from mmkd.checks import COUNT, FRACTION, POSITIVE
from .dho import calibrate, combine
from .kd import align_gradients
from mmkd.models import strip_head
from mmkd.registry import MODELS

log = logging.getLogger("mmkd")

CHOICES = {"inference": ("combine", "ce"), "align": ("none", "features"), "aux_head": ("linear", "nonlinear"),
           "search": ("epoch", "end")}


def nonlinear_head(width: int, num_classes: int, hidden: int = 200, dropout: float = 0.1) -> nn.Sequential:
    """Dual-Head KD's non-linear auxiliary head (``NonLinearClassifier`` of the official code):
    ``Linear(width, hidden) -> Dropout -> BatchNorm1d -> ReLU -> Linear(hidden, num_classes)``."""
    return nn.Sequential(nn.Linear(width, hidden), nn.Dropout(dropout), nn.BatchNorm1d(hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


class DualHead(nn.Module, Callback):
    """A backbone returning features ``[B, width]`` and two heads: ``ce_head`` (linear) and ``kd_head``
    (linear, or :func:`nonlinear_head` with ``aux_head="nonlinear"``).

    It is also a :class:`~mmkd.callbacks.Callback`, which the Distiller training it runs. With
    ``inference="combine"`` it picks ``alpha``/``beta`` on the validation split (:meth:`calibrate`):
    ``search="epoch"`` after every epoch's validation (:meth:`on_epoch_end`; the official DHO
    procedure), ``search="end"`` once at the end of the fit on the best epoch's weights (:meth:`on_fit_end`).

    ``forward(*inputs)``: in training, the CE head's logits (the KD head's are the ``kd_head`` feature);
    in eval mode, ``inference="combine"`` returns the DHO log-probabilities
    :func:`~mmkd.methods.dho.combine` with the ``alpha``/``beta`` buffers, ``inference="ce"`` the CE
    head's logits. ``align="features"`` puts :func:`~mmkd.methods.dual_head.kd.align_gradients` between
    the backbone and the heads in training (our variant of Dual-Head KD's alignment).
    """

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, inference: str = "combine",
                 align: str = "none", alpha: float = 0.5, beta: float = 1.0, aux_head: str = "linear",
                 aux_hidden: int = 200, search: str = "epoch"):
        super().__init__()
        for key, value in (("inference", inference), ("align", align), ("aux_head", aux_head), ("search", search)):
            if value not in CHOICES[key]:
                raise ValueError(f"dual_head.{key}={value!r}; choose from: {', '.join(CHOICES[key])}")
        self.backbone, self.inference, self.align, self.search = backbone, inference, align, search
        self.ce_head = nn.Linear(width, num_classes)
        self.kd_head = nn.Linear(width, num_classes) if aux_head == "linear" else nonlinear_head(width, num_classes,
                                                                                                  aux_hidden)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def heads(self, x: Tensor, *more: Tensor) -> tuple[Tensor, Tensor]:
        """Both heads' logits ``(z_ce, z_kd)`` for the backbone's inputs."""
        h = self.backbone(x, *more).flatten(1)
        h_ce, h_kd = align_gradients(h) if self.align == "features" and self.training else (h, h)
        return self.ce_head(h_ce), self.kd_head(h_kd)

    def calibrate(self, dataset, keys: Sequence[str], label_key: str = "label") -> dict[str, float]:
        """Pick ``alpha``/``beta`` on ``dataset`` (the validation split); see
        :func:`~mmkd.methods.dho.calibrate`. With ``inference="ce"`` nothing is picked (``{}``)."""
        return calibrate(self, dataset, keys, label_key=label_key) if self.inference == "combine" else {}

    def on_epoch_end(self, trainer, module, metrics) -> None:
        """``search="epoch"``: pick ``alpha``/``beta`` on ``trainer.val_data`` with this epoch's weights,
        store them, and evaluate again, so that ``val/*`` (``val/acc``: the searched accuracy, which the
        checkpoint callback after this one monitors by default) are those of the model as it is saved;
        the picks are ``dho/alpha``, ``dho/beta`` and ``dho/searched_acc``. Nothing is kept between epochs
        but the buffers, which are in the model's state (a resumed fit continues exactly)."""
        if self.search != "epoch" or self.inference != "combine":
            return
        picked = self.calibrate(trainer.val_data, module.student.keys, module.label_key)
        metrics.update({f"val/{k}": v for k, v in trainer.evaluate(module, trainer.val_data).items()})
        metrics.update({"dho/alpha": picked["alpha"], "dho/beta": picked["beta"], "dho/searched_acc": picked["acc"]})

    def on_fit_end(self, trainer, module, result) -> None:
        """``search="end"``: calibrate on ``trainer.val_data`` (before the test evaluation); the picks land
        in the fit's metrics as ``calibrated/<key>``, and the calibrated model's ``acc`` replaces
        ``val/acc``. ``search="epoch"``: the best epoch's picks (loaded with its weights) are reported."""
        if self.inference != "combine":
            return
        if self.search == "epoch":
            result.metrics.update({"calibrated/alpha": round(self.alpha.item(), 6),
                                   "calibrated/beta": self.beta.item()})
            return
        picked = self.calibrate(trainer.val_data, module.student.keys, module.label_key)
        log.info("stage %s: calibrated on the validation split: %s", trainer.stage, picked)
        result.metrics.update({f"calibrated/{k}": v for k, v in picked.items()})
        result.metrics["val/acc"] = picked["acc"]

    def forward(self, x: Tensor, *more: Tensor) -> Tensor:
        z_ce, z_kd = self.heads(x, *more)
        if self.training or self.inference == "ce":
            return z_ce
        return combine(z_ce, z_kd, self.alpha, self.beta)


@MODELS.register("dual_head", ranges={"alpha": FRACTION, "beta": POSITIVE, "aux_hidden": COUNT})
def dual_head(num_classes: int, in_shape: Any, backbone: Mapping[str, Any], inference: str = "combine",
              align: str = "none", alpha: float = 0.5, beta: float = 1.0, aux_head: str = "linear",
              aux_hidden: int = 200, search: str = "epoch") -> DualHead:
    """A :class:`DualHead` on a registered model whose linear classifier (``head`` or ``fc``) is removed.

    Args:
        backbone: ``{name: <registered model>, args: {...}}``, e.g. ``{name: cnn, args: {channels: [16, 32]}}``.
        inference: ``combine`` (DHO) or ``ce`` (Dual-Head KD: main head only).
        align: ``features`` projects the KD head's conflicting gradient on the shared features off the
            CE head's (our variant; the official alignment over all parameters is the backward rule
            ``align``, :class:`mmkd.gradients.Align`); ``none``.
        alpha, beta: the initial DHO mixing weight and KD-head temperature (set by
            :func:`~mmkd.methods.dho.calibrate`).
        aux_head: the KD head: ``linear``, or ``nonlinear`` (Dual-Head KD's :func:`nonlinear_head`
            with ``aux_hidden`` units).
        search: when DHO's alpha/beta are picked: ``epoch`` (after every epoch; the checkpoint is the
            epoch with the best searched accuracy, as the official code) or ``end`` (once, after the fit).
    """
    if isinstance(backbone, DictConfig):
        backbone = OmegaConf.to_container(backbone, resolve=True)
    if "name" not in backbone or set(backbone) - {"name", "args"}:
        raise ValueError(f"dual_head.backbone: expected {{name, args}}, got keys {sorted(backbone)}")
    model = create_model(backbone["name"], num_classes, in_shape, "dual_head.backbone", **(backbone.get("args") or {}))
    width = strip_head(model, "dual_head.backbone")
    return DualHead(model, width, num_classes, inference, align, alpha, beta, aux_head, aux_hidden, search)
