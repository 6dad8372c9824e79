"""Self-distillation towards a mix of the labels and the teacher's predictions.

    q = alpha * onehot(y) + (1 - alpha) * softmax(z_t)        (the teacher at T = 1)
    gt_mix(z_s, z_t, y) = mean_c (softmax(z_s)_c - q_c)^2      criterion "mse" (the official one)
                        = -sum_c q_c log softmax(z_s)_c        criterion "ce"

per instance. ``alpha`` weighs the ground truth, as in the paper and its code: ``alpha = 1`` fits the
labels alone (:func:`gt_labels`, round 0 of :mod:`mmkd.methods.self_distill`), ``alpha = 0`` the
teacher alone. Borup and Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen
Regularization Imposed by Self-Distillation", NeurIPS 2021 (arXiv:2102.13088).

The official code (github.com/Kennethborup/self_distillation, ``self_distiller.py``) writes the
"mse" loss as two terms, ``alpha * mse(p_s, y) + (1 - alpha) * mse(p_s, p_t)`` with
``p = softmax(z)`` and ``F.mse_loss``'s mean over the classes. Since
``a |p - y|^2 + (1 - a) |p - t|^2 = |p - (a y + (1 - a) t)|^2 + a (1 - a) |y - t|^2``, that is
this loss plus ``alpha (1 - alpha) mean_c (y_c - p^t_c)^2``, a constant of the student: the
gradients are the same, the values differ by it. The "ce" criterion equals, in the same sense,
``alpha * ce + (1 - alpha) * kd(T=1)``: the values differ by ``(1 - alpha) H(p_t)``. The teacher
enters through its probabilities only and is never differentiated (it is frozen, or cached).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmkd.checks import FRACTION
from mmkd.losses import reduce, register_loss

CRITERIA = ("mse", "ce")


@dataclass(frozen=True)
class OneOf:
    """A value among ``choices`` (a loss argument's range, :mod:`mmkd.checks`)."""

    choices: tuple[str, ...]

    def check(self, key: str, value: Any) -> None:
        if value not in self.choices:
            raise ValueError(f"{key}={value!r}; choose from: {', '.join(self.choices)}")


def mixed_target(student_logits: torch.Tensor, target: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                 alpha: float = 1.0) -> torch.Tensor:
    """``q = alpha * onehot(y) + (1 - alpha) * softmax(z_t)``, ``[batch, classes]``, in the dtype of
    ``student_logits``; without ``teacher_logits``, ``onehot(y)`` (``alpha`` is then ignored)."""
    if target is None or (target < 0).any():
        raise ValueError("gt_mix, gt_labels: every item needs its label (got none, or -1: unlabelled); the target mixes "
                         "the labels in, so train on labelled items only")
    y = F.one_hot(target, student_logits.shape[1]).to(student_logits.dtype)
    if teacher_logits is None:
        return y
    return alpha * y + (1 - alpha) * teacher_logits.detach().softmax(1)


def fit(student_logits: torch.Tensor, q: torch.Tensor, criterion: str) -> torch.Tensor:
    """Per instance: ``mean_c (softmax(z)_c - q_c)^2`` (``mse``) or ``-sum_c q_c log softmax(z)_c`` (``ce``)."""
    if criterion == "mse":
        return (student_logits.softmax(1) - q).pow(2).mean(1)
    if criterion == "ce":
        return -(q * student_logits.log_softmax(1)).sum(1)
    raise ValueError(f"gt_mix: criterion={criterion!r}; choose from: {', '.join(CRITERIA)}")


@register_loss("gt_mix", teacher=True, per_sample=True, ranges={"alpha": FRACTION, "criterion": OneOf(CRITERIA)})
def gt_mix(student_logits, teacher_logits, target=None, *, alpha=0.6, criterion="mse", reduction="mean"):
    """``fit(z_s, alpha * onehot(y) + (1 - alpha) * softmax(z_t))``: the mean squared error of the
    student's probabilities to the mixed target (``criterion="mse"``, the official) or its
    cross-entropy (``"ce"``). ``alpha`` (default 0.6, the official README's) weighs the labels.

    Borup and Andersen, "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization
    Imposed by Self-Distillation", NeurIPS 2021.
    """
    q = mixed_target(student_logits, target, teacher_logits, alpha)
    return reduce(fit(student_logits, q, criterion), reduction)


@register_loss("gt_labels", teacher=False, per_sample=True, ranges={"criterion": OneOf(CRITERIA)})
def gt_labels(student_logits, teacher_logits=None, target=None, *, criterion="mse", reduction="mean"):
    """:func:`gt_mix` at ``alpha = 1``, without a teacher: ``mean_c (softmax(z)_c - onehot(y)_c)^2``
    (``"mse"``; the official round 0) or the cross-entropy (``"ce"``, equal to ``ce``)."""
    return reduce(fit(student_logits, mixed_target(student_logits, target), criterion), reduction)
