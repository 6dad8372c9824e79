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

import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

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


MODES = ("append", "replace")


class MixTransform(BatchTransform):
    """What :class:`Mixup` and :class:`CutMix` share: one ``lam ~ Beta(alpha, alpha)`` and one random
    permutation ``pi`` per batch (drawn in that order), the choice and checks of the entries to mix,
    and how the mixed copies join the batch. A subclass names itself (``name``, for messages) and
    implements :meth:`mix`; :meth:`check` may refuse entries it cannot mix.

    ``mode``: ``append`` (the default) keeps the originals and appends the mixed copies, which carry
    label ``-1``: label terms (``ce``) train on the originals, teacher terms on both, and the teachers
    are shown the mixed copies. ``replace`` returns the mixed batch alone, as the official code of the
    mixup-KD study does (Choi et al., "Understanding the Role of Mixup in Knowledge Distillation: An
    Empirical Study", WACV 2023: student and teacher see only the mixed images); its rows carry label
    ``-1`` too, so label terms see none of them. The study's classification term on the mixed label
    ``lam * y_i + (1 - lam) * y_pi(i)`` is not reproduced: label terms take hard labels. After each
    batch, ``lam`` holds the coefficient used (for CutMix the exact kept-area fraction).
    """

    keeps_inputs = False
    name = "mix"

    def __init__(self, alpha: float, keys: Sequence[str] | None, label_key: str, mode: str):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"{self.name}.mode={mode!r}; choose from: {', '.join(MODES)}")
        self.alpha, self.keys, self.label_key, self.mode = float(alpha), list(keys) if keys else None, label_key, mode
        self.lam: float | None = None

    def default_keys(self, batch: Batch) -> list[str]:
        """The entries mixed when ``keys`` is not given: every floating-point entry."""
        return [k for k, v in batch.items() if v.is_floating_point()]

    def check(self, batch: Batch, keys: list[str]) -> None:
        """Raise ``ValueError`` (one line, naming the entry) for entries this transform cannot mix."""

    def mix(self, values: dict[str, Tensor], lam: float, perm: Tensor) -> tuple[dict[str, Tensor], float]:
        """The mixed copies of ``values`` (entry -> ``[B, ...]``) and the coefficient they realise."""
        raise NotImplementedError

    def forward(self, batch: Batch, student: nn.Module, teachers: Sequence[nn.Module]) -> Batch:
        if not isinstance(batch, dict) or "edge_index" in batch:
            raise ValueError(f"{self.name}: needs a batch of independent instances (a dict of tensors, not a graph)")
        if self.label_key not in batch:
            raise KeyError(f"{self.name}.label_key: the batch has no {self.label_key}; it has: {', '.join(batch)}")
        keys = self.keys or self.default_keys(batch)
        if missing := [k for k in keys if k not in batch]:
            raise KeyError(f"{self.name}.keys: the batch has no {', '.join(missing)}; it has: {', '.join(batch)}")
        self.check(batch, keys)
        lam = float(torch.distributions.Beta(self.alpha, self.alpha).sample())
        labels = batch[self.label_key]
        perm = torch.randperm(len(labels), device=labels.device)
        copies, self.lam = self.mix({k: batch[k] for k in keys}, lam, perm)
        out = {}
        for k, v in batch.items():
            copy = torch.full_like(v, -1) if k == self.label_key else copies.get(k, v)
            out[k] = copy if self.mode == "replace" else torch.cat([v, copy])
        return out


@register_transform("mixup", ranges={"alpha": POSITIVE})
class Mixup(MixTransform):
    """Mixup copies appended to the batch (Zhang et al., "mixup: Beyond Empirical Risk Minimization",
    ICLR 2018; used for distillation by MixKD, Liang et al., ICLR 2021):

        x~_i = lam * x_i + (1 - lam) * x_pi(i),   lam ~ Beta(alpha, alpha),  pi a random permutation,

    one ``lam`` per batch as in the official code. The mixed copies carry label ``-1``, so label terms
    (``ce``) train on the original instances and teacher terms on both: the student matches the
    teachers between the training points. The mixup-KD study (Choi et al., WACV 2023) names
    smoothness as what links mixup and the KD temperature; its code mixes with Beta(1, 1) and
    divides each logit vector by its standard deviation instead of a fixed temperature.

    Args:
        alpha: the Beta distribution's parameter.
        keys: the batch entries to mix (default: every floating-point entry); the other entries of a
            copy are those of ``x_i``.
        label_key: the entry holding labels.
        mode: ``append`` (copies beside the originals) or ``replace`` (the mixed batch alone, the
            study's recipe); see :class:`MixTransform`.
    """

    name = "mixup"

    def __init__(self, alpha: float = 0.4, keys: Sequence[str] | None = None, label_key: str = "label",
                 mode: str = "append"):
        super().__init__(alpha, keys, label_key, mode)

    def mix(self, values: dict[str, Tensor], lam: float, perm: Tensor) -> tuple[dict[str, Tensor], float]:
        return {k: lam * v + (1 - lam) * v[perm] for k, v in values.items()}, lam


@register_transform("cutmix", ranges={"alpha": POSITIVE})
class CutMix(MixTransform):
    """CutMix copies appended to the batch (Yun et al., "CutMix: Regularization Strategy to Train
    Strong Classifiers with Localizable Features", ICCV 2019): a box of the permuted image is pasted
    into each image,

        x~_i = (1 - M) * x_i + M * x_pi(i),   M = 1 on the box B, 0 elsewhere,

    the box of height ``int(H sqrt(1 - lam))`` and width ``int(W sqrt(1 - lam))`` centred on a
    uniformly drawn pixel (row, then column) and clipped at the border, ``lam ~ Beta(alpha, alpha)``;
    ``lam`` is then set to the exact kept fraction ``1 - |B| / (H W)``, one box per batch, as in the
    official code. It mixes image batches ``[B, C, H, W]`` only (all of one ``H x W``); the other
    entries of a copy are those of ``x_i``, its label ``-1`` as for :class:`Mixup`. After each batch
    ``box`` holds ``(row0, row1, col0, col1)``, the half-open pixel ranges pasted.

    Args:
        alpha: the Beta distribution's parameter (1.0 in the official CIFAR and ImageNet recipes).
        keys: the image entries to cut (default: every floating-point entry with 4 dimensions).
        label_key: the entry holding labels.
        mode: ``append`` or ``replace``; see :class:`MixTransform`.
    """

    name = "cutmix"

    def __init__(self, alpha: float = 1.0, keys: Sequence[str] | None = None, label_key: str = "label",
                 mode: str = "append"):
        super().__init__(alpha, keys, label_key, mode)
        self.box: tuple[int, int, int, int] | None = None

    def default_keys(self, batch: Batch) -> list[str]:
        return [k for k, v in batch.items() if v.is_floating_point() and v.dim() == 4]

    def check(self, batch: Batch, keys: list[str]) -> None:
        if not keys:
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in batch.items())
            raise ValueError(f"cutmix: the batch has no image entry [B, C, H, W] to cut (it has: {shapes}); "
                             "name the image entries with keys")
        for k in keys:
            if batch[k].dim() != 4:
                raise ValueError(f"cutmix.keys: {k} has shape {list(batch[k].shape)}; cutmix pastes boxes into "
                                 "image batches [B, C, H, W]")
            if batch[k].shape[-2:] != batch[keys[0]].shape[-2:]:
                raise ValueError(f"cutmix.keys: {k} is {tuple(batch[k].shape[-2:])} pixels but {keys[0]} is "
                                 f"{tuple(batch[keys[0]].shape[-2:])}; one box needs one image size")

    def mix(self, values: dict[str, Tensor], lam: float, perm: Tensor) -> tuple[dict[str, Tensor], float]:
        h, w = next(iter(values.values())).shape[-2:]
        cut = math.sqrt(max(0.0, 1.0 - lam))
        cut_h, cut_w = int(h * cut), int(w * cut)
        row, col = int(torch.randint(h, ())), int(torch.randint(w, ()))
        r0, r1 = max(row - cut_h // 2, 0), min(row + cut_h // 2, h)
        c0, c1 = max(col - cut_w // 2, 0), min(col + cut_w // 2, w)
        self.box = (r0, r1, c0, c1)
        copies = {}
        for k, v in values.items():
            copy = v.clone()
            copy[:, :, r0:r1, c0:c1] = v[perm, :, r0:r1, c0:c1]
            copies[k] = copy
        return copies, 1.0 - (r1 - r0) * (c1 - c0) / (h * w)
