"""OFD: the overhaul of feature distillation, a partial L2 on pre-ReLU features above a margin.

The student's pre-ReLU feature map goes through a connector ``r`` (a 1x1 convolution and BatchNorm
to the teacher's channels); the teacher's pre-ReLU map ``t`` is raised to a per-channel margin ``m``,
the expected value of the teacher's negative responses, and the squared distance counts only where
it carries information:

    t' = max(t, m),   OFD(s, t) = sum_{c,h,w} (r(s) - t')^2 * [r(s) > t'  or  t' > 0]   per instance

(a negative teacher response is "off": a student response below it is as good as equal). With the
teacher's BatchNorm before the ReLU of weight ``gamma_c`` and bias ``beta_c`` (its response taken as
``N(beta_c, gamma_c^2)``), ``m_c = E[x | x < 0] = beta_c - |gamma_c| phi(beta_c / |gamma_c|) /
Phi(-beta_c / |gamma_c|)``, and ``-3 |gamma_c|`` where ``Phi(-beta_c / |gamma_c|) <= 0.001``.
Heo, Kim, Yun, Park, Kwak and Choi, "A Comprehensive Overhaul of Feature Distillation", ICCV 2019
(arXiv:1904.01866; official code: clovaai/overhaul-distillation, ``CIFAR-100/distiller.py``:
``distillation_loss``, ``build_feature_connector``, ``get_margin_from_BN``). mdistiller's ``OFD``
(megvii-research/mdistiller, ``mdistiller/distillers/OFD.py``) is the same loss written with three
masks, on the stage outputs before the last ReLU (``preact_feats``) of the three stages, the
teacher's map average-pooled to the student's size; the per-instance sums are averaged over the
batch, divided by ``2^(3 - stage)`` (stage 3 by 1, stage 1 by 4) and weighted by 0.001, next to CE
of weight 1.0 (the official CIFAR script: the batch sum over ``batch_size * 1000``). Here that is
one term per stage, the stage factor in its weight, the connector and margin the term's module
(:class:`Connector`), its margin computed from the teacher's BatchNorm named by ``teacher_bn``
when the fit starts. The CIFAR ResNets expose the pre-ReLU stage outputs with ``preact=True``
(``preact1`` to ``preact3``; their BatchNorms: ``layer1.-1.bn2`` ...).

One deviation: the official code and mdistiller run the teacher in training mode during
distillation (its BatchNorms normalise with batch statistics); a frozen teacher here stays in
evaluation mode (its running statistics), as for every other loss, which also lets its features be
cached.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import same_batch


def bn_margin(weight: Tensor, bias: Tensor) -> Tensor:
    """The per-channel margin ``E[x | x < 0]`` of ``x ~ N(bias, weight^2)`` (``-3 |weight|`` where
    ``P(x < 0) <= 0.001``), from a BatchNorm's ``weight`` and ``bias`` (computed in float64)."""
    s, m = weight.detach().double().abs(), bias.detach().double()
    below = torch.special.ndtr(-m / s)
    expected = m - s * torch.exp(-(m / s).pow(2) / 2) / math.sqrt(2 * math.pi) / below
    return torch.where(below > 0.001, expected, -3 * s).float()


def partial_l2(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """``sum_{c,h,w} (source - t')^2 [source > t' or t' > 0]`` per instance, ``t' = max(target, margin)``
    with the per-channel ``margin`` (``[C]``) broadcast over ``[batch, C, H, W]``."""
    target = torch.maximum(target, margin.view(1, -1, 1, 1))
    keep = (source > target) | (target > 0)
    return ((source - target).pow(2) * keep).flatten(1).sum(1)


def find_module(model: nn.Module, path: str) -> nn.Module:
    """The sub-module of ``model`` at the dotted ``path``, where a part may index a sequence from its
    end (``layer1.-1.bn2``: the last block's ``bn2``, whatever the depth)."""
    m = model
    for part in path.split("."):
        indexed = isinstance(m, (nn.Sequential, nn.ModuleList)) and part.lstrip("-").isdigit()
        if indexed and -len(m) <= int(part) < len(m):
            m = m[int(part)]
        elif part in m._modules and m._modules[part] is not None:
            m = m._modules[part]
        else:
            raise ValueError(f"loss ofd: the teacher has no module {path!r} (teacher_bn names the BatchNorm before "
                             "the ReLU of the stage the term reads, e.g. layer1.-1.bn2)")
    return m


class Connector(nn.Module, Callback):
    """OFD's learned part: the connector from the student's channels to the teacher's (a 1x1
    convolution, no bias, initialised ``N(0, 2 / C_t)``, then BatchNorm) and the per-channel
    ``margin`` buffer, which the fit's start sets from the teacher's BatchNorm at ``teacher_bn``
    (:func:`bn_margin`; kept when a resumed fit has restored it). Outside a fit, :meth:`set_margin`."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int] | None,
                 teacher_bn: str | None = None):
        super().__init__()
        if teacher_shape is None or len(student_shape) != 3 or len(teacher_shape) != 3:
            raise ValueError(f"loss ofd: student features {tuple(student_shape)} and teacher features "
                             f"{None if teacher_shape is None else tuple(teacher_shape)}; it needs the feature maps "
                             "[channels, height, width] of a teacher and a student (e.g. features.preact1)")
        self.conv = nn.Conv2d(student_shape[0], teacher_shape[0], 1, bias=False)
        nn.init.normal_(self.conv.weight, 0.0, math.sqrt(2.0 / teacher_shape[0]))
        self.norm = nn.BatchNorm2d(teacher_shape[0])
        self.teacher_bn = teacher_bn
        self.register_buffer("margin", torch.full((teacher_shape[0],), math.nan))

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))

    def set_margin(self, bn: nn.Module) -> None:
        """Set the margin from the BatchNorm ``bn`` (its ``weight`` and ``bias``, one per channel)."""
        weight, bias = getattr(bn, "weight", None), getattr(bn, "bias", None)
        if weight is None or bias is None or weight.shape != self.margin.shape:
            raise ValueError(f"loss ofd: teacher_bn={self.teacher_bn!r} is a {type(bn).__name__}; it must be an affine "
                             f"BatchNorm of the {len(self.margin)} channels the term reads from the teacher")
        self.margin.copy_(bn_margin(weight, bias))

    def on_fit_start(self, trainer, module) -> None:
        if not torch.isnan(self.margin).any():  # set before, or restored by a resumed fit
            return
        if self.teacher_bn is None:
            raise ValueError("loss ofd: no margin; give the term args.teacher_bn, the teacher's BatchNorm before the "
                             "ReLU of the stage it reads (e.g. layer1.-1.bn2)")
        teachers = getattr(module, "teachers", [])
        if len(teachers) != 1:
            raise ValueError(f"loss ofd: the margin comes from one teacher's BatchNorm; the module has {len(teachers)}")
        teacher = teachers[0]
        while not hasattr(teacher, "model") and hasattr(teacher, "teacher"):  # a view cache holds the live teacher
            teacher = teacher.teacher
        if not hasattr(teacher, "model"):
            raise ValueError("loss ofd: the margin comes from the teacher's BatchNorm, but the teacher is a cache of "
                             "its outputs without its model; set teachers.<name>.cache=false")
        self.set_margin(find_module(teacher.model, self.teacher_bn))


@register_loss("ofd", teacher=True, per_sample=True, module=Connector)
def ofd(student_features, teacher_features, target=None, *, module=None, reduction="mean"):
    """``sum (r(s) - max(t, m))^2 [r(s) > max(t, m) or max(t, m) > 0]`` per instance (OFD, ICCV 2019),
    ``r`` and ``m`` the term's :class:`Connector` (``module``).

    Use it on pre-ReLU feature maps: ``Term("ofd", student="features.preact1",
    teacher="features.preact1", args={"teacher_bn": "layer1.-1.bn2"})``; the teacher's map is
    average-pooled to the student's size where they differ. The margin is set when the fit starts (or
    by :meth:`Connector.set_margin`); until then it is NaN, and so is the loss.
    """
    if module is None:
        raise ValueError("loss ofd: no connector module; use it as a loss term (Term('ofd', student=..., "
                         "teacher=...)), which makes one")
    if student_features.ndim != 4 or teacher_features.ndim != 4:
        raise ValueError(f"loss ofd: student features {tuple(student_features.shape)} and teacher features "
                         f"{tuple(teacher_features.shape)}; it needs feature maps [batch, channels, height, width] "
                         "(e.g. features.preact1)")
    same_batch("ofd", student_features, teacher_features)
    s, t = module(student_features), teacher_features.detach()
    if t.shape[2:] != s.shape[2:]:
        t = F.adaptive_avg_pool2d(t, s.shape[2:])
    if s.shape[1] != t.shape[1]:
        raise ValueError(f"loss ofd: the connector gives {s.shape[1]} channels, the teacher features have "
                         f"{t.shape[1]}; the term's module was sized for other features")
    return reduce(partial_l2(s, t, module.margin.to(s.dtype)), reduction)
