"""CTKD: curriculum temperature for knowledge distillation, a learned temperature.

KD at a temperature that is itself learned, through a gradient-reversal layer whose strength follows
an easy-to-hard curriculum:

    tau = t_start + t_range * sigmoid(GRL_lambda(theta)),   theta a scalar parameter (init 1)
    CTKD(s, t) = tau^2 * KL(softmax(t / tau) || softmax(s / tau))   per instance,

where ``GRL_lambda`` is the identity forward and multiplies the gradient by ``-lambda`` backward, and
``lambda`` follows a cosine from ``lambda_max`` to ``lambda_min`` over the first ``loops`` epochs:
``lambda(i) = lambda_min + (lambda_max - lambda_min) (1 + cos(pi min(i, loops) / loops)) / 2`` in the
1-based epoch ``i``. Li, Li, Yang, Huang, Wang, Fan and Yang, "Curriculum Temperature for Knowledge
Distillation", AAAI 2023 (official code: zhengli97/CTKD, ``models/temp_global.py``, ``Global_T``;
``train_student.py``, ``CosineDecay``; ``helper/loops.py``). The defaults are the official CIFAR
script's (``--t_start 1 --t_end 20 --decay_max 0 --decay_min -1 --decay_loops 10``, CE 0.1 + KD 0.9,
the global temperature): lambda runs from 0 to -1, so the factor ``-lambda`` on the temperature's
gradient runs from 0 to 1, as in that script. The temperature module trains with the student (the
term's module, :func:`mmkd.losses.register_loss`); ``ctkd/t`` is logged each epoch.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.checks import COUNT, NON_NEGATIVE, POSITIVE
from mmkd.losses import register_loss
from mmkd.losses.kd import kd


class _Reverse(torch.autograd.Function):
    """Identity forward; the gradient times ``-lam`` backward (Ganin and Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return -ctx.lam * grad, None


class CurriculumTemperature(nn.Module, Callback):
    """CTKD's global temperature ``t_start + t_range * sigmoid(GRL(theta))`` with the cosine
    curriculum of the gradient-reversal strength (module docstring); a callback that sets lambda at
    the start of every epoch and logs the temperature."""

    def __init__(self, t_start: float = 1.0, t_range: float = 20.0, lambda_max: float = 0.0,
                 lambda_min: float = -1.0, loops: int = 10):
        super().__init__()
        self.t_start, self.t_range, self.loops = float(t_start), float(t_range), int(loops)
        self.lambda_max, self.lambda_min = float(lambda_max), float(lambda_min)
        self.theta = nn.Parameter(torch.ones(1))
        self.lam = self.curriculum(0)

    def curriculum(self, epoch: int) -> float:
        """lambda in the 0-based epoch ``epoch`` (the official 1-based ``epoch + 1``)."""
        i = min(max(epoch + 1, 0), self.loops)
        return self.lambda_min + (self.lambda_max - self.lambda_min) * (math.cos(i * math.pi / self.loops) + 1) / 2

    def forward(self) -> Tensor:
        return self.t_start + self.t_range * torch.sigmoid(_Reverse.apply(self.theta, self.lam))

    def on_epoch_start(self, trainer, module) -> None:
        self.lam = self.curriculum(trainer.epoch)

    def on_epoch_end(self, trainer, module, metrics) -> None:
        metrics["ctkd/t"] = float(self.t_start + self.t_range * torch.sigmoid(self.theta.detach()))


@register_loss("ctkd", teacher=True, per_sample=True, module=CurriculumTemperature,
               ranges={"t_start": POSITIVE, "t_range": NON_NEGATIVE, "loops": COUNT})
def ctkd(student_logits, teacher_logits, target=None, *, module=None, reduction="mean"):
    """``tau^2 KL(softmax(t / tau) || softmax(s / tau))`` with the learned temperature ``tau = module()``
    (:class:`CurriculumTemperature`, the term's module; CTKD, AAAI 2023)."""
    if module is None:
        raise ValueError("loss ctkd: no temperature module; use it as a loss term (Term('ctkd')), which makes one")
    return kd(student_logits, teacher_logits, temperature=module().squeeze(), reduction=reduction)
