"""KD^3: knowledge distillation between different distributions (Tang, Chen, Niu, Sugiyama and Gong,
"Distribution Shift Matters for Knowledge Distillation with Webly Collected Images", ICCV 2023,
arXiv:2307.11469).

The teacher's training data is unavailable; the student learns, without labels, from a pool whose
distribution differs from it (web images; here, e.g., CIFAR-10 images the teacher never saw under
strong corruptions and colour shifts: ``cifar10``'s ``corrupt``). Three parts, each an extension
point of the mixture core:

1. **Dynamic instance selection** (the router ``kd3``). The combined prediction of teacher and
   student, with the student's share growing as it learns (``alpha`` from ``start`` to ``end`` over
   the fit),

       p_c(x) = alpha p_T(x) + (1 - alpha) p_S(x),       w(x) = 1[max_k p_c(x)_k >= threshold],

   selects, at every step, the pool instances the teacher's knowledge is reliable on; ``w`` is the
   router's weight, so every teacher term (KD, the alignment below) learns from selected instances
   only. ``kd3/selected`` logs the selected share of each epoch.
2. **Alignment of weighted features and of classifier parameters** (the loss ``kd3_align``). With
   ``f_S``, ``f_T`` the penultimate embeddings, ``P`` a learned projection of the student's into the
   teacher's space and ``(W, b)`` the two linear classifiers,

       L_align(x) = ||P f_S(x) - f_T(x)||^2 / d_T
                    + beta (||W_S - W_T P||_F^2 + ||b_S - b_T||^2) / (C d_S),

   weighted per instance by ``w(x)``: if both hold, ``W_S f_S + b_S = W_T f_T + b_T``, the student's
   classifier is the teacher's read through ``P`` (knowledge memorization).
3. **MixDistribution** (the batch transform ``mixdist`` and the loss ``kd3_contrast``). Perturbed
   copies of the batch with a new distribution: each image's per-channel statistics are replaced by a
   mix of its own and those of another image of the batch (``lambda ~ Beta(a, a)``, ``pi`` a
   permutation),

       x~ = sigma_mix (x - mu(x)) / sigma(x) + mu_mix,
       mu_mix = lambda mu(x) + (1 - lambda) mu(x_pi),   sigma_mix likewise,

   and an InfoNCE loss aligns each instance with its perturbed copy among the batch, on the student's
   embedding through a projection head ``g`` (``z = g(f_S) / ||g(f_S)||``, ``tau`` the temperature):

       L_MD(x) = -log exp(<z(x), z(x~)> / tau) / sum_{x' != x} exp(<z(x), z(x')> / tau),

   so that the student's representation does not depend on the distribution. The copies also take part
   in the teacher terms (selected, like the originals, by ``w``).

The student's loss is ``KD + lambda_align L_align + lambda_MD L_MD`` (``configs/experiment/cifar10_kd3.yaml``).
No official code was reachable: the three parts follow the paper's description (selection by the
combined predictions of teacher and student, alignment of weighted features and of classifier
parameters, a MixDistribution contrastive block on perturbed data); the schedule of ``alpha``, the
threshold, the projection ``P`` shared by both alignments, MixStyle's statistics mixing (Zhou et
al., ICLR 2021) on the input images as the perturbation, and the loss weights are ours.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.cache import Cached
from mmkd.callbacks import Callback
from mmkd.checks import NON_NEGATIVE, POSITIVE, PROBABILITY, TEMPERATURE
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import same_batch
from mmkd.net import Batch, Output
from mmkd.routers.base import Router, register_router
from mmkd.transforms import BatchTransform, register_transform


@register_router("kd3")
class KD3Router(Router, Callback):
    """KD^3's dynamic instance selection (module docstring, part 1): weight ``1 / teachers`` for every
    teacher on an instance whose combined prediction ``alpha p_T + (1 - alpha) p_S`` reaches
    ``threshold`` (``p_T`` the teachers' mean probability), 0 elsewhere; ``alpha`` moves linearly
    from ``start`` to ``end`` over the fit."""

    mode = "hard"

    def __init__(self, threshold: float = 0.5, start: float = 1.0, end: float = 0.5):
        super().__init__()
        for name, v in (("threshold", threshold), ("start", start), ("end", end)):
            if not 0 <= v <= 1:
                raise ValueError(f"router kd3: {name}={v} must lie in [0, 1]")
        self.threshold, self.start, self.end = threshold, start, end
        self.selected: list[float] = []

    def alpha(self) -> float:
        """The teachers' share of the combined prediction at the current progress."""
        return self.start + (self.end - self.start) * float(self.progress)

    @torch.no_grad()
    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        p_t = torch.stack([t.logits.float().softmax(-1) for t in teachers]).mean(0)
        a = self.alpha()
        p = a * p_t + (1 - a) * student.logits.detach().float().softmax(-1)
        keep = (p.max(-1).values >= self.threshold).float()
        if self.training:
            self.selected.append(float(keep.mean()))
        return keep[:, None].expand(-1, len(teachers)) / len(teachers)

    def on_epoch_end(self, trainer, module, metrics):
        if self.selected:
            metrics["kd3/selected"] = sum(self.selected) / len(self.selected)
        self.selected = []


def linear_head(model: nn.Module, who: str) -> nn.Linear:
    """The linear classifier of ``model`` (a :class:`~mmkd.models.Classifier`), or a one-line error."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"loss kd3_align: the {who} ({type(model).__name__}) has no linear classifier behind "
                         "get_classifier() (mmkd.models.Classifier); its classifier parameters cannot be aligned")
    return head


class KD3Align(nn.Module, Callback):
    """``kd3_align``'s learned projection ``P`` (student embedding -> teacher embedding, no bias) and,
    from the fit's start, the two classifiers it aligns (the student's and the first teacher's; not
    sub-modules: their parameters are the models')."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int] | None):
        super().__init__()
        if teacher_shape is None:
            raise ValueError("loss kd3_align reads a teacher's features; the run has no teacher")
        d_s, d_t = int(torch.tensor(student_shape).prod()), int(torch.tensor(teacher_shape).prod())
        self.project = nn.Linear(d_s, d_t, bias=False)
        if d_s == d_t:
            nn.init.eye_(self.project.weight)
        self.heads: tuple[nn.Linear, nn.Linear] | None = None

    def on_fit_start(self, trainer, module):
        teacher = module.teachers[0]
        teacher = teacher.live if isinstance(teacher, Cached) else teacher
        self.heads = (linear_head(module.student.model, "student"), linear_head(teacher.model, "teacher"))

    def classifier_gap(self) -> Tensor:
        """``(||W_S - W_T P||_F^2 + ||b_S - b_T||^2) / (C d_S)`` (module docstring)."""
        if self.heads is None:
            raise ValueError("loss kd3_align: the classifiers are found when the fit starts (the term's module is a "
                             "callback of the Distiller); call it inside Trainer.fit")
        s, t = self.heads
        gap = (s.weight - t.weight.detach() @ self.project.weight).square().sum()
        if s.bias is not None and t.bias is not None:
            gap = gap + (s.bias - t.bias.detach()).square().sum()
        return gap / s.weight.numel()


@register_loss("kd3_align", teacher=True, per_sample=True, module=KD3Align, ranges={"classifier": NON_NEGATIVE})
def kd3_align(student_features, teacher_features, target=None, *, module=None, classifier=1.0, reduction="mean"):
    """``||P f_S - f_T||^2 / d_T + beta (||W_S - W_T P||_F^2 + ||b_S - b_T||^2) / (C d_S)`` per instance
    (KD^3's feature and classifier alignment, module docstring; ``classifier`` is ``beta``). Use it on
    the penultimate embeddings (``student: features.pool``, ``teacher: features.pool``) beside the
    router ``kd3``, whose weights make the feature part the weighted one."""
    if module is None:
        raise ValueError("loss kd3_align: no module; use it as a loss term (Term('kd3_align', ...)), which makes one")
    same_batch("kd3_align", student_features, teacher_features)
    t = teacher_features.flatten(1)
    gap = (module.project(student_features.flatten(1)) - t).square().mean(1)
    return reduce(gap + classifier * module.classifier_gap() if classifier else gap, reduction)


@register_transform("mixdist", ranges={"alpha": POSITIVE})
class MixDistribution(BatchTransform):
    """KD^3's MixDistribution perturbation (module docstring, part 3): appends to the batch a copy of
    every image with its per-channel mean and standard deviation mixed with another image's
    (``lambda ~ Beta(alpha, alpha)`` per image, one random permutation per batch). The copies carry
    label ``-1`` (label terms see none of them) and every row the entry ``pair_key``: an original and
    its copy share one value, which ``kd3_contrast`` pairs them by."""

    keeps_inputs = False

    def __init__(self, key: str = "image", label_key: str = "label", alpha: float = 0.1, pair_key: str = "pair",
                 eps: float = 1e-6):
        super().__init__()
        self.key, self.label_key, self.alpha, self.pair_key, self.eps = key, label_key, alpha, pair_key, eps

    def perturb(self, x: Tensor) -> Tensor:
        """``x`` (``[B, C, ...]``) with mixed per-channel statistics."""
        dims = tuple(range(2, x.dim()))
        mu = x.mean(dims, keepdim=True)
        sigma = (x.var(dims, keepdim=True) + self.eps).sqrt()
        lam = torch.distributions.Beta(self.alpha, self.alpha).sample((len(x),)).to(x).view(-1, *[1] * (x.dim() - 1))
        perm = torch.randperm(len(x), device=x.device)
        mu_mix, sigma_mix = lam * mu + (1 - lam) * mu[perm], lam * sigma + (1 - lam) * sigma[perm]
        return sigma_mix * (x - mu) / sigma + mu_mix

    def forward(self, batch: Batch, student: nn.Module, teachers: Sequence[nn.Module]) -> Batch:
        if self.key not in batch:
            raise KeyError(f"mixdist: the batch has no {self.key!r}; it has: {', '.join(batch)} (set args.key)")
        x = batch[self.key]
        copy = {**batch, self.key: self.perturb(x)}
        if self.label_key in batch:
            copy[self.label_key] = torch.full_like(batch[self.label_key], -1)
        out = {k: torch.cat([v, copy[k]]) for k, v in batch.items()}
        pair = torch.arange(len(x), device=x.device)
        out[self.pair_key] = torch.cat([pair, pair])
        return out


class ContrastHead(nn.Module):
    """``kd3_contrast``'s projection head ``g``: linear, ReLU, linear to ``dim`` (SimCLR's)."""

    def __init__(self, student_shape: Sequence[int], dim: int = 128):
        super().__init__()
        d = int(torch.tensor(student_shape).prod())
        self.net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, dim))

    def forward(self, f: Tensor) -> Tensor:
        return F.normalize(self.net(f.flatten(1)), dim=1)


@register_loss("kd3_contrast", teacher=False, per_sample=True, batch=True, module=ContrastHead,
               ranges={"temperature": TEMPERATURE, "dim": POSITIVE})
def kd3_contrast(student_features, teacher_features=None, target=None, *, module=None, batch=None,
                 temperature=0.5, key="pair", reduction="mean"):
    """``-log exp(<z_i, z_j> / tau) / sum_{k != i} exp(<z_i, z_k> / tau)`` per row ``i``, ``j`` the row
    sharing its ``batch[key]`` (KD^3's MixDistribution alignment, module docstring); rows without a
    partner give 0 and are left out of the mean. Beside the transform ``mixdist``."""
    if module is None:
        raise ValueError("loss kd3_contrast: no module; use it as a loss term (Term('kd3_contrast', ...))")
    if batch is None or key not in batch:
        raise ValueError(f"loss kd3_contrast: the batch has no {key!r} entry; add the transform that pairs the rows "
                         "(transforms: [{name: mixdist}])")
    z = module(student_features)
    pair = batch[key].to(z.device)
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    pos = (pair[:, None] == pair[None, :]) & ~eye
    logp = (z @ z.T / temperature).masked_fill(eye, float("-inf")).log_softmax(1)
    has = pos.any(1)
    per = -(logp.masked_fill(~pos, 0)).sum(1) / pos.sum(1).clamp(min=1)
    if reduction == "mean":
        return per.sum() / has.sum().clamp(min=1)
    return reduce(per, reduction)
