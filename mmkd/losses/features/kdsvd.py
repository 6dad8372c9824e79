"""KD-SVD: distil the relations between the dominant singular vectors of consecutive stages.

Each stage's feature map, a matrix of ``H W`` positions by ``C`` channels, is compressed by a
singular value decomposition to its leading right singular vectors (``[C, k]``): the teacher's top
``k``, scaled by its top ``k`` singular values (L2-normalised over those ``k``), and the student's top
``k + 3``, of which each teacher vector takes the one most aligned with it (largest ``|cos|``), its
sign flipped to agree, and scales it by the same singular values. Between stages ``l - 1`` and ``l``,
an RBF kernel relates every channel's entry of one to every channel's entry of the other:

    G_l[i, j, n] = exp(-(v_l[i, n] - v_{l-1}[j, n])^2 / 8)
    KDSVD(s, t) = sum_{l >= 2} sum_{i, j, n} (G^S_l[i, j, n] - G^T_l[i, j, n])^2   per instance

(non-finite singular values or vectors and non-finite entries count as 0, and so do non-finite entries
of the gradient through the SVD, which is infinite where singular values repeat). Lee, Kim and Song,
"Self-supervised Knowledge Distillation Using Singular Value Decomposition", ECCV 2018
(arXiv:1807.06819; official code: sseung0703/SSKD_SVD, TensorFlow). Followed: mdistiller's port
(megvii-research/mdistiller, ``mdistiller/distillers/KDSVD.py``, ``kdsvd_loss``): ``k = 1``, the
student's ``k + 3`` candidates, the alignment, the ``/ 8`` kernel, the teacher's kernel not
differentiated, the gradient through the SVD by autograd, the sum over stage pairs averaged over the
batch; on CIFAR the outputs of the three stages (``layer1`` to ``layer3``: a term that reads
``features``, the list of them), weight 1.0, next to CE of weight 1.0.

One deviation, named: mdistiller reshapes PyTorch's ``[B, C, H, W]`` maps as ``[B, C H, W]``, the
TensorFlow code's ``[B, H W, C]`` reshape carried over from its channels-last maps, so its singular
vectors run over the image's columns instead of the channels. By default this is the paper's and the
official code's matrix (``layout="channels"``: rows the positions, columns the channels);
``layout="mdistiller"`` decomposes mdistiller's ``[C H, W]`` instead.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.checks import COUNT
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import same_batch

LAYOUTS = ("channels", "mdistiller")


def finite(x: Tensor) -> Tensor:
    """``x`` with its non-finite entries set to 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def leading(features: Tensor, n: int, layout: str) -> tuple[Tensor, Tensor]:
    """The top ``n`` singular values (L2-normalised, ``[B, n]``) and right singular vectors (unit
    columns, ``[B, D, n]``) of each map of ``[B, C, H, W]`` taken as a matrix (``layout``: ``[H W, C]``
    for ``"channels"``, ``D = C``; ``[C H, W]`` for ``"mdistiller"``, ``D = W``)."""
    b, c, h, w = features.shape
    x = features.flatten(2).transpose(1, 2) if layout == "channels" else features.reshape(b, c * h, w)
    if x.requires_grad:  # the SVD's gradient is infinite at repeated singular values: those entries count as 0
        x.register_hook(lambda g: None if g is None else finite(g))
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    s, v = finite(s), finite(vh.transpose(1, 2))
    return F.normalize(s[:, :n], dim=1), F.normalize(v[:, :, :n], dim=1)


def align(candidates: Tensor, reference: Tensor) -> Tensor:
    """For each reference vector (columns of ``[B, D, k]``), the candidate column (of ``[B, D, m]``)
    of the largest ``|cos|`` with it, times the sign of that cosine: ``[B, D, k]``."""
    cosine = candidates.transpose(1, 2) @ reference
    best = cosine.abs() == cosine.abs().amax(1, keepdim=True)
    return candidates @ torch.where(best, cosine.sign(), torch.zeros_like(cosine))


def rbf(v: Tensor, v_prev: Tensor) -> Tensor:
    """``exp(-(v[:, i, n] - v_prev[:, j, n])^2 / 8)``: ``[B, D, k]`` and ``[B, D', k] -> [B, D, D', k]``."""
    return torch.exp(-(v.unsqueeze(2) - v_prev.unsqueeze(1)).pow(2) / 8)


@register_loss("kdsvd", teacher=True, per_sample=True, ranges={"k": COUNT})
def kdsvd(student_features, teacher_features, target=None, *, k=1, layout="channels", reduction="mean"):
    """``sum_l ||G^S_l - G^T_l||^2`` per instance over consecutive stages (KD-SVD, ECCV 2018).

    Use it on the list of stage maps: ``Term("kdsvd", student="features", teacher="features")``
    with the student's and the teacher's ``features`` naming the same number of stages, in order;
    the student's and the teacher's maps of a stage must share the dimension the singular vectors
    run over (the channels; the width with ``layout="mdistiller"``).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"loss kdsvd: layout={layout!r}; choose from: {', '.join(LAYOUTS)}")
    if not isinstance(student_features, (list, tuple)) or not isinstance(teacher_features, (list, tuple)) \
            or len(student_features) != len(teacher_features) or len(student_features) < 2:
        count = [len(f) if isinstance(f, (list, tuple)) else "one tensor" for f in (student_features, teacher_features)]
        raise ValueError(f"loss kdsvd: student features {count[0]}, teacher features {count[1]}; it relates "
                         "consecutive stages, so both sides read the list of at least two stage maps (student: "
                         "features, teacher: features, each model listing the same number of stages)")
    total, prev = None, None
    for i, (f_s, f_t) in enumerate(zip(student_features, teacher_features)):
        if f_s.ndim != 4 or f_t.ndim != 4:
            raise ValueError(f"loss kdsvd: stage {i + 1}: student features {tuple(f_s.shape)}, teacher features "
                             f"{tuple(f_t.shape)}; it needs feature maps [batch, channels, height, width]")
        same_batch("kdsvd", f_s, f_t)
        d = 1 if layout == "channels" else 3
        if f_s.shape[d] != f_t.shape[d]:
            raise ValueError(f"loss kdsvd: stage {i + 1}: student features {tuple(f_s.shape)} and teacher features "
                             f"{tuple(f_t.shape)} differ in dimension {d}, which the singular vectors run over "
                             f"(layout={layout!r}); read stages of equal {'channels' if d == 1 else 'width'}")
        sigma, v_t = leading(f_t.detach(), k, layout)
        _, v_s = leading(f_s, k + 3, layout)
        v_s = align(v_s, v_t) * sigma.unsqueeze(1)
        v_t = v_t * sigma.unsqueeze(1)
        if prev is not None:
            gap = finite((rbf(v_s, prev[0]) - rbf(v_t, prev[1])).pow(2)).flatten(1).sum(1)
            total = gap if total is None else total + gap
        prev = v_s, v_t
    return reduce(total, reduction)
