"""Unified self-knowledge distillation (USKD): NKD's normalised loss with soft labels the student makes
itself, no teacher.

With s = softmax(z) at T = 1, target y, a batch of B labelled instances and N(z) = softmax over the
non-target logits z_{c != y}:

    p_y  = s_y^2 + 1 - mean_batch(s_y^2)                           customised target label (detached)
    r_c  = the rank of class c among all C classes by the student's logits, 1 = highest (y included)
    q_c  = (1 / r_c) / sum_{k != y} (1 / r_k)   for c != y         Zipf non-target label (detached)

    USKD = alpha * (-p_y log s_y)  +  beta * (-sum_{c != y} q_c log N(z)_c)

Yang, Zeng, Li, Zhang, Yuan and Li, "From Knowledge Distillation to Self-Knowledge Distillation: A
Unified Approach with Normalized Loss and Customized Soft Labels", ICCV 2023 (official code:
``mmcls/distillation/losses/uskd.py`` of github.com/yzd-v/cls_KD). ``nkd`` is the same paper's loss
with a teacher.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mmkd.checks import NON_NEGATIVE
from mmkd.losses import reduce, register_loss
from mmkd.losses.nkd import non_target


def zipf_labels(score: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The ``[batch, classes - 1]`` Zipf soft label over the non-target classes, in class order.

    All classes, the target included, are ranked by ``score`` (descending; ties by class index);
    the class at rank r gets 1 / r, the target's entry is dropped and the rest is renormalised.
    """
    b, c = score.shape
    order = score.detach().argsort(dim=1, descending=True, stable=True)
    ranks = torch.arange(1, c + 1, device=score.device, dtype=score.dtype).expand(b, c)
    weight = torch.empty_like(ranks).scatter_(1, order, 1.0 / ranks)  # weight[b, order[b, k]] = 1 / (k + 1)
    rest = non_target(weight, target)
    return rest / rest.sum(dim=1, keepdim=True)


@register_loss("uskd", teacher=False, per_sample=True, ranges={"alpha": NON_NEGATIVE, "beta": NON_NEGATIVE})
def uskd(student_logits, teacher_logits=None, target=None, *, alpha=1.0, beta=0.1, reduction="mean"):
    """``alpha * -p_y log s_y + beta * -sum_{c != y} q_c log N(z)_c`` per instance; no teacher.

    p_y = s_y^2 + 1 - mean_batch(s_y^2) and the Zipf label q (class at rank r of the student's own
    logits weighted 1/r, target dropped, renormalised) are detached, as in the official code; the
    gradient flows through log s_y and the non-target log-softmax only. Yang et al., "From Knowledge
    Distillation to Self-Knowledge Distillation: A Unified Approach with Normalized Loss and
    Customized Soft Labels", ICCV 2023.

    Defaults are the official ones (the class defaults and the ImageNet configs: alpha = 1,
    beta = 0.1; the CIFAR-100 config uses alpha = 0.1, beta = 0.1). The official loss is added, with
    weight 1, to the student's own cross-entropy, so pair this term with ``ce``. ``teacher_logits``
    is ignored. The batch mean in p_y couples the instances, so ``reduction="none"`` returns each
    instance's term given its batch (their mean is the official value). Instances with a negative
    label are unlabelled, as in ``ce``: their loss is 0 and they take no part in the batch mean of
    s_y^2 or in ``"mean"``.

    Left out, because the student net does not provide it: the official loss also trains a linear
    layer on an intermediate feature (ResNets: the pooled features of the stage before the last;
    ViTs: an intermediate token feature that its modified backbone returns), giving weak logits w, and

    1. adds ``mu * CE(w, y)`` with label smoothing 0.1 (target ``0.9 onehot(y) + 0.1 / C``),
       mu = 0.005 (ImageNet) or 0.1 (CIFAR-100);
    2. ranks the classes for the Zipf label by ``softmax(w)_c / (1 - softmax(w)_y + 1e-6)
       + log s_c / (1 - log s_y + 1e-6)`` (the official code divides log-probabilities in the second
       part). Without w this order is that of z, which is what is ranked here.

    Part 1 can be added in Python as a separate term on a pooled ``[batch, channels]`` feature,
    ``Term("ce", weight=mu, args={"label_smoothing": 0.1}, student="features.<path>",
    adapter=nn.Linear(channels, C))`` (a config's adapters map to a teacher); part 2 cannot, so
    the ranking here follows the final logits alone. Mixed (two-label) targets of the official
    mixup / cutmix path are not supported either: targets are class indices.
    """
    labelled = target >= 0
    y = target.clamp(min=0)
    n = labelled.sum().clamp(min=1)
    log_s_y = F.log_softmax(student_logits, dim=1).gather(1, y[:, None])[:, 0]
    with torch.no_grad():
        s_y2 = log_s_y.exp() ** 2
        p_y = s_y2 + 1 - (s_y2 * labelled).sum() / n
        q = zipf_labels(student_logits, y)
    non_s = F.log_softmax(non_target(student_logits, y), dim=1)
    per_sample = (alpha * -p_y * log_s_y - beta * (q * non_s).sum(1)) * labelled
    if reduction == "mean":
        return per_sample.sum() / n
    return reduce(per_sample, reduction)
