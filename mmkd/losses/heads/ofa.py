"""OFA-KD: one-for-all distillation between heterogeneous architectures, through the logit space.

Intermediate student features (each a chosen stage) go through their own small branch that ends in a
classifier, so every stage predicts the classes; each branch and the student's final logits learn the
teacher's logits with the OFA loss, the cross-entropy to the teacher's distribution with the target
class enhanced by an exponent ``eps`` (temperature ``T``, 1 by default; ``p = softmax(z / T)``,
``y`` the label, ``1_y`` its one-hot):

    OFA(s, t, y) = - sum_c [ (p^t_c + 1_y(c))^eps - 1_y(c) ] log p^s_c                   per instance
                 = - ((1 + p^t_y)^eps - 1) log p^s_y - sum_{c != y} (p^t_c)^eps log p^s_c.

At ``eps = 1`` it is the cross-entropy ``- sum_c p^t_c log p^s_c``, i.e. KD at temperature 1 (without
the ``T^2``) plus the teacher's entropy, a constant for the student; ``eps > 1`` raises the weight of
the target class the more, the more confident the teacher is in it. The objective is

    L = CE(s, y) + OFA(s, t, y) + lambda sum_stages OFA(branch_k(f_k), t, y).

Hao, Guo, Han, Tang, Hu, Wang and Xu, "One-for-All: Bridge the Gap Between Heterogeneous Architectures
in Knowledge Distillation", NeurIPS 2023 (arXiv:2310.19444). Followed: the official code
(Hao840/OFAKD), ``distillers/ofa.py`` (``ofa_loss``, the OFA projectors) and ``distillers/utils.py``
(``SepConv``, ``PatchMerging``, ``init_weights``). The loss is ``ofa_loss`` as that code computes it
(its non-target weights are ``(p^t_c)^eps`` too); the teacher runs without gradient there, as a frozen
teacher does here. ``ofa`` is the term on the final logits (the official ``kd_loss_weight``, 1),
``ofa_branches`` the term on the stages (``student: features``, every listed feature a stage; the
official ``ofa_loss_weight``, 1 by default, 0.1 in the author's posted CIFAR-100 runs with CNN
students), with ``ce`` beside them (``gt_loss_weight`` 1). The official default is ``eps = 1``
(``--ofa-eps``; the author's posted CIFAR-100 arguments use 1, the README's ImageNet command 1.5).

Branches (:class:`OFABranches`), for the ``i``-th of ``n`` stages (0-based; the official stage is
``i + 1`` of 4, so ``n - 1 - i`` is its ``4 - stage``), ``dim`` their width (the official
``max(student width, teacher width)`` for CNN students, the student's width for ViT students):

- a map ``[C, H, W]``: ``n - 1 - i`` separable convolutions (each ``dw3x3/2 -> pw -> BN -> ReLU ->
  dw3x3 -> pw -> BN -> ReLU``, channels doubling, the last to ``dim``), a 1x1 convolution to ``dim``
  for the last stage; then average pooling and a linear classifier;
- tokens ``[L, D]`` (``tokens`` class tokens first, then a square grid of patches): patch merging
  (2x2 neighbours concatenated, LayerNorm, linear without bias, to ``dim``; GELU after each, except
  the last of two or more) ``int(log2(side / grid))`` times, ``grid`` 7 (a 14x14 DeiT grid merges once
  to 7x7, a 32x32 patch-4 ViT's 8x8 not at all), the class tokens passed by; then
  ``max(n - 1 - i, 1)`` pre-norm transformer blocks of ``heads`` (4) heads, MLP ratio 4; then the
  (first) class token, or the mean token without one, and a linear classifier;
- a vector ``[D]`` (an MLP's hidden layer; the official code has no such stage, this is ours):
  ``max(n - 1 - i, 1)`` ``Linear -> GELU`` layers to ``dim``, then a linear classifier.

Initialised as ``init_weights``: convolutions Kaiming normal (fan-out), BatchNorm 1 and 0, linear
layers (the attention's q, k, v too) truncated normal (std 0.02) with zero biases.
Deviations: the transformer blocks are ``nn.TransformerEncoderLayer`` (pre-norm, GELU), whose q, k, v
projection has a bias (timm 0.6.5's ``Block`` default has none); tokens at width ``D != dim`` that no
merge maps (the class tokens, or all tokens when nothing merges) go through a linear layer to ``dim``
(in the official settings ``D == dim`` there); vector stages are ours (above).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import COUNT, NON_NEGATIVE_INT, POSITIVE, TEMPERATURE
from mmkd.losses import reduce, register_loss


def _labelled_mean(per_sample: Tensor, labelled: Tensor, reduction: str) -> Tensor:
    """``reduction`` of ``per_sample`` where ``"mean"`` runs over the labelled instances only."""
    if reduction == "mean":
        return per_sample.sum() / labelled.sum().clamp(min=1)
    return reduce(per_sample, reduction)


def _ofa(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, eps: float, temperature: float) -> Tensor:
    """The OFA loss per instance (0 for a negative, i.e. unlabelled, label)."""
    if target is None:
        raise ValueError("loss ofa: no labels; OFA enhances the target class, so the batch needs its labels")
    labelled = target >= 0
    mask = F.one_hot(target.clamp(min=0), student_logits.shape[1]).to(student_logits.dtype)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    weight = (p_t + mask).pow(eps) - mask
    return -(weight * F.log_softmax(student_logits / temperature, dim=1)).sum(1) * labelled


@register_loss("ofa", teacher=True, per_sample=True, ranges={"eps": POSITIVE, "temperature": TEMPERATURE})
def ofa(student_logits, teacher_logits, target, *, eps=1.0, temperature=1.0, reduction="mean"):
    """``- sum_c [(p^t_c + 1_y(c))^eps - 1_y(c)] log p^s_c`` per instance, ``p = softmax(z / T)`` (OFA-KD,
    NeurIPS 2023; module docstring). Instances with a negative label (unlabelled) give 0 and are left
    out of the mean."""
    return _labelled_mean(_ofa(student_logits, teacher_logits, target, eps, temperature), target >= 0, reduction)


class SepConv(nn.Module):
    """Two depthwise-separable 3x3 convolutions, the first of stride 2, each with BatchNorm and ReLU:
    ``[c_in, H, W] -> [c_out, H/2, W/2]``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, 2, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, 1, 1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class PatchMerging(nn.Module):
    """``[B, g*g, C] -> [B, (g/2)^2, out]`` (Swin's): each 2x2 neighbourhood's tokens concatenated,
    LayerNorm, a linear map without bias, then ``act``."""

    def __init__(self, grid: int, dim: int, out: int, act: bool):
        super().__init__()
        self.grid = grid
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        b, _, c = x.shape
        x = x.view(b, self.grid, self.grid, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.act(self.reduction(self.norm(x.view(b, -1, 4 * c))))


class TokenBranch(nn.Module):
    """The OFA branch of a token stage ``[L, D]`` (module docstring): merge the patch tokens, run
    ``depth`` transformer blocks, classify the class token (or the mean token)."""

    def __init__(self, shape: Sequence[int], depth: int, dim: int, heads: int, grid: int, tokens: int | None,
                 num_classes: int):
        super().__init__()
        length, width = shape
        self.tokens = length - math.isqrt(length) ** 2 if tokens is None else tokens
        side = math.isqrt(length - self.tokens)
        merges = max(int(math.log2(side / grid)), 0) if side else 0
        if merges and (side * side != length - self.tokens or side % 2**merges):
            raise ValueError(f"ofa_branches: {length} tokens with {self.tokens} class tokens are not a grid that "
                             f"{merges} 2x2 patch merges can halve; give args.tokens (the class tokens) or a larger "
                             "args.grid")
        self.merge = nn.Sequential(*(PatchMerging(side >> k, width if k == 0 else dim, dim, k == 0 or k < merges - 1)
                                     for k in range(merges))) if merges else None
        self.lift = nn.Identity() if width == dim else nn.Linear(width, dim)  # the tokens no merge maps to dim
        self.blocks = nn.Sequential(*(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                                 batch_first=True, norm_first=True)
                                      for _ in range(depth)))
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.merge is None:
            x = self.lift(x)
        else:
            x = torch.cat([self.lift(x[:, :self.tokens]), self.merge(x[:, self.tokens:])], 1)
        x = self.blocks(x)
        return self.fc(x[:, 0] if self.tokens else x.mean(1))


def _branch(shape: Sequence[int], i: int, n: int, dim: int, heads: int, grid: int, tokens: int | None,
            num_classes: int) -> nn.Module:
    """The branch of the ``i``-th of ``n`` stages, of shape ``shape`` (module docstring)."""
    depth = max(n - 1 - i, 1)
    if len(shape) == 3:
        c, blocks = shape[0], []
        for k in range(n - 1 - i):
            blocks.append(SepConv(c, dim if k == n - 2 - i else 2 * c))
            c *= 2
        return nn.Sequential(*(blocks or [nn.Conv2d(shape[0], dim, 1)]), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(dim, num_classes))
    if len(shape) == 2:
        return TokenBranch(shape, depth, dim, heads, grid, tokens, num_classes)
    if len(shape) == 1:
        layers = [m for k in range(depth) for m in (nn.Linear(shape[0] if k == 0 else dim, dim), nn.GELU())]
        return nn.Sequential(*layers, nn.Linear(dim, num_classes))
    raise ValueError(f"ofa_branches: stage {i} has shape {tuple(shape)}; a stage is a map [C, H, W], tokens [L, D] "
                     "or a vector [D] (list other features in the student's features)")


class OFABranches(nn.Module):
    """The OFA branches of a student: one projector to the logit space per stage (module docstring),
    made from ``student_shape`` (the shapes of the features the term reads, in order) and
    ``num_classes``. ``dim``: the branches' width (default: the widest stage's channels or width);
    ``heads``: the transformer blocks' heads; ``grid``: a token grid of side ``g`` is merged
    ``int(log2(g / grid))`` times; ``tokens``: the class tokens before the patch tokens (default: what
    a square grid leaves)."""

    def __init__(self, student_shape, num_classes: int, dim: int | None = None, heads: int = 4, grid: int = 7,
                 tokens: int | None = None):
        super().__init__()
        shapes = [student_shape] if all(isinstance(s, int) for s in student_shape) else list(student_shape)
        dim = dim or max(s[0] if len(s) == 3 else s[-1] for s in shapes)
        if any(len(s) == 2 for s in shapes) and dim % heads:
            raise ValueError(f"ofa_branches: dim={dim} is not a multiple of heads={heads}; set args.dim or args.heads")
        self.branches = nn.ModuleList(_branch(s, i, len(shapes), dim, heads, grid, tokens, num_classes)
                                      for i, s in enumerate(shapes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.MultiheadAttention):
                nn.init.trunc_normal_(m.in_proj_weight, std=0.02)
                nn.init.zeros_(m.in_proj_bias)

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The logits ``[batch, num_classes]`` of every branch, in the order of ``features``."""
        if len(features) != len(self.branches):
            raise ValueError(f"ofa_branches: {len(features)} features for {len(self.branches)} branches; the term "
                             "must read the features its branches were made for")
        return [branch(f) for branch, f in zip(self.branches, features)]


@register_loss("ofa_branches", teacher=True, per_sample=True, module=OFABranches,
               ranges={"eps": POSITIVE, "temperature": TEMPERATURE, "dim": COUNT, "heads": COUNT, "grid": COUNT,
                       "tokens": NON_NEGATIVE_INT})
def ofa_branches(student_features, teacher_logits, target, *, module=None, eps=1.0, temperature=1.0,
                 reduction="mean"):
    """``sum_k OFA(branch_k(f_k), t, y)`` per instance over the student's stages ``f_k`` (the list a
    ``student: features`` term reads, or one ``features.<path>``), the branches the term's module
    (:class:`OFABranches`); OFA-KD, NeurIPS 2023. Unlabelled instances give 0 and are left out of
    the mean."""
    if module is None:
        raise ValueError("loss ofa_branches: no branches; use it as a loss term (Term('ofa_branches', "
                         "student='features')), which makes them")
    features = [student_features] if isinstance(student_features, Tensor) else list(student_features)
    per_sample = sum(_ofa(z.to(torch.promote_types(z.dtype, torch.float32)), teacher_logits, target, eps, temperature)
                     for z in module(features))  # branches under autocast give bf16 logits
    return _labelled_mean(per_sample, target >= 0, reduction)
