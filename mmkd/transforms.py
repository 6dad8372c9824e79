"""Batch transforms: the mixture core's hook between the data and the loss terms.

A :class:`BatchTransform` sees each training batch, the student and the teachers before anything is
computed on it, and returns the batch the student, the teachers and the loss terms then see: mixed
inputs, hard augmentations, sequences the student generates, sequences a teacher corrects. The
:class:`~mmkd.distiller.Distiller` applies its transforms in order, in training only (``predict`` and
evaluation see the data as it is).

A transform that changes the inputs the teachers read sets ``keeps_inputs = False``: a cached
teacher's stored outputs would not match them, so teachers are then run live (the ``distill`` pipeline
does not cache them, and the Distiller refuses a cached teacher beside such a transform).

Register one with :func:`register_transform`; a config lists them as ``transforms: [{name, args}]``::

    import torch
    from mmkd.transforms import BatchTransform, register_transform

    @register_transform("noise")
    class Noise(BatchTransform):
        keeps_inputs = False

        def __init__(self, key="image", std=0.1):
            super().__init__()
            self.key, self.std = key, std

        def forward(self, batch, student, teachers):
            return {**batch, self.key: batch[self.key] + self.std * torch.randn_like(batch[self.key])}
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from mmkd.checks import POSITIVE
from mmkd.net import Batch
from mmkd.registry import TRANSFORMS


def register_transform(name: str, **meta: Any) -> Callable:
    """Register a :class:`BatchTransform` subclass under ``name`` (``meta``: e.g. ``ranges=`` for its args)."""
    return TRANSFORMS.register(name, **meta)


class BatchTransform(nn.Module):
    """``forward(batch, student, teachers) -> batch``; ``keeps_inputs``: whether the teachers' inputs
    are left as they were (so cached teacher outputs still apply)."""

    keeps_inputs = True

    def forward(self, batch: Batch, student: nn.Module, teachers: Sequence[nn.Module]) -> Batch:
        raise NotImplementedError


@register_transform("mixup", ranges={"alpha": POSITIVE})
class Mixup(BatchTransform):
    """Mixup copies appended to the batch (Zhang et al., "mixup: Beyond Empirical Risk Minimization",
    ICLR 2018; used for distillation by MixKD, Liang et al., ICLR 2021):

        x~_i = lam * x_i + (1 - lam) * x_pi(i),   lam ~ Beta(alpha, alpha),  pi a random permutation,

    one ``lam`` per batch as in the official code. The mixed copies carry label ``-1``, so label terms
    (``ce``) train on the original instances and teacher terms on both: the student matches the
    teachers between the training points.

    Args:
        alpha: the Beta distribution's parameter.
        keys: the batch entries to mix (default: every floating-point entry); the other entries of a
            copy are those of ``x_i``.
        label_key: the entry holding labels.
    """

    keeps_inputs = False

    def __init__(self, alpha: float = 0.4, keys: Sequence[str] | None = None, label_key: str = "label"):
        super().__init__()
        self.alpha, self.keys, self.label_key = float(alpha), list(keys) if keys else None, label_key

    def forward(self, batch: Batch, student: nn.Module, teachers: Sequence[nn.Module]) -> Batch:
        if not isinstance(batch, dict) or "edge_index" in batch:
            raise ValueError("mixup: needs a batch of independent instances (a dict of tensors, not a graph)")
        keys = self.keys or [k for k, v in batch.items() if v.is_floating_point()]
        if missing := [k for k in keys if k not in batch]:
            raise KeyError(f"mixup.keys: the batch has no {', '.join(missing)}; it has: {', '.join(batch)}")
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        n = len(batch[self.label_key])
        perm = torch.randperm(n, device=batch[self.label_key].device)
        out = {}
        for k, v in batch.items():
            copy = lam * v + (1 - lam) * v[perm] if k in keys else v
            if k == self.label_key:
                copy = torch.full_like(v, -1)
            out[k] = torch.cat([v, copy])
        return out
