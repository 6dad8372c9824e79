"""DAC-KL: forward KL to the teacher's distribution clipped to a dense region that a sub-network learns.

Per token, with ``p = softmax(z_t / T)`` the teacher's and ``q = softmax(z_s / T)`` the student's
distribution, sort the teacher's probabilities in descending order, ``p_(1) >= ... >= p_(V)``. A small
sub-network ``f`` reads them and predicts the region to keep as the teacher mass cut from the head,
``h``, and from the tail, ``t`` (``h, t >= 0``, ``h + t < 1``; the lower and upper limits of the region
are the cumulative masses ``h`` and ``1 - t``). Clipping keeps, of each class, the part of its mass that
lies between them,

    (h, t) = f(p_(1), ..., p_(V))
    A_r = sum_{i<r} p_(i),   B_r = sum_{i>r} p_(i)                  (mass above, below rank r)
    k_r = p_(r) - min(p_(r), max(0, h - A_r)) - min(p_(r), max(0, t - B_r))
    p~_(r) = k_r / sum_i k_i                                        (renormalised: sum_i k_i = 1 - h - t)
    DAC-KL(q, p) = KL(p~ || q) + lambda * (-log(1 - h - t)),

so ``h`` flattens the teacher's over-confident peak, ``t`` drops its long tail of redundant classes,
and ``h = t = 0`` keeps everything: the forward KL (:func:`mmkd.losses.tokens.fkl`). ``k_r`` is piecewise
linear in ``h`` and ``t``, so the sub-network receives the loss's gradient and trains with the student
(the term's module). Liu, Zhang, Li, Li, Huang, Chen, Tang, Hu, Xiong and Wang, "Multi-Granularity
Semantic Revision for Large Language Model Distillation" (MGSR), arXiv 2407.10068, 2024, the token level
(its ``L = L_SFT + L_DAC-KL + L_span``: add ``ce`` and :mod:`~mmkd.losses.tokens.span` as terms).

No official code could be found, nor the paper's equations in full text; this is reconstructed from
its abstract and the OpenReview reviews' account of its Eq. 6 (an MLP sub-network predicts an upper and
a lower quantile, ``(u, l)``, from the teacher's sorted output; the teacher is clipped to the dense region
between them and the student matched to it by KL). These choices are mmkd's: the limits are cumulative
masses (clipping cuts mass, not whole classes, so the limits get a gradient); the sub-network is
``Linear(V, 64) - ReLU - Linear(64, 3)`` with a softmax over ``(h, 1 - h - t, t)``, starting near
``h = t = 0``; and ``lambda * -log(1 - h - t)`` (``keep``, default 0.1, 0 at the full region) keeps the
sub-network, which minimises the same loss, from shrinking the region to the one class the student
already matches (a region of one class makes the KL ``-log q`` of that class). A
:class:`~mmkd.sparse.SparseLogits` teacher is densified (registered without ``sparse``): the
sub-network reads the sorted probabilities of the whole vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import COUNT, NON_NEGATIVE, TEMPERATURE
from mmkd.losses import register_loss
from mmkd.losses.tokens import log_probs, per_token, same_vocab
from mmkd.sparse import SparseLogits


class ClipRegion(nn.Module):
    """DAC-KL's sub-network: sorted teacher probabilities ``[N, V]`` (descending) to the masses cut from
    the head and from the tail ``[N, 2]``, through an MLP with one hidden layer and a softmax over
    ``(head, kept, tail)``; ``inputs`` (default: all ``num_classes``) is how many of the largest
    probabilities it reads."""

    def __init__(self, num_classes: int, hidden: int = 64, inputs: int | None = None):
        super().__init__()
        self.inputs = int(inputs or num_classes)
        if self.inputs > num_classes:
            raise ValueError(f"loss dac_kl: inputs={self.inputs} exceeds the vocabulary of {num_classes} classes; "
                             "give inputs <= num_classes (or leave it unset: all of them)")
        self.net = nn.Sequential(nn.Linear(self.inputs, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        with torch.no_grad():
            self.net[-1].bias.copy_(torch.tensor([-4.0, 4.0, -4.0]))  # kept mass ~0.9993 at the start

    def forward(self, sorted_probs: Tensor) -> Tensor:
        x = sorted_probs[..., :self.inputs].to(self.net[0].weight.dtype)
        return torch.softmax(self.net(x), dim=-1)[..., [0, 2]]


def clipped(log_p_sorted: Tensor, cuts: Tensor) -> Tensor:
    """``log p~`` over the sorted classes (module docstring): the head mass ``cuts[..., 0]`` and the
    tail mass ``cuts[..., 1]`` cut, the rest renormalised; ``-inf`` where nothing of a class is kept."""
    p = log_p_sorted.exp()
    above = F.pad(p.cumsum(-1)[..., :-1], (1, 0))
    below = F.pad(p.flip(-1).cumsum(-1)[..., :-1], (1, 0)).flip(-1)  # summed from the tail: exact for small p
    head = torch.minimum(p, (cuts[..., :1] - above).clamp(min=0))
    tail = torch.minimum(p, (cuts[..., 1:] - below).clamp(min=0))
    kept = (p - head - tail).clamp(min=0)
    safe = torch.where(kept > 0, kept, torch.ones_like(kept)).log()  # no inf * 0 in the backward pass
    log_kept = torch.where((head > 0) | (tail > 0), torch.where(kept > 0, safe, -torch.inf), log_p_sorted)
    return log_kept - kept.sum(-1, keepdim=True).log()  # untouched classes keep their exact log p


@register_loss("dac_kl", teacher=True, per_sample=True, module=ClipRegion,
               ranges={"keep": NON_NEGATIVE, "temperature": TEMPERATURE, "hidden": COUNT, "inputs": COUNT})
def dac_kl(student_logits, teacher_logits, target=None, *, module=None, keep=0.1, temperature=1.0, mask=None,
           reduction="mean"):
    """``KL(p~ || q) - keep * log(1 - h - t)`` per token, ``p~`` the teacher clipped to the region
    ``(h, t) = module(sorted p)`` (:class:`ClipRegion`, the term's module; MGSR's DAC-KL)."""
    if module is None:
        raise ValueError("loss dac_kl: no sub-network; use it as a loss term (Term('dac_kl')), which makes one")
    if isinstance(teacher_logits, SparseLogits):
        teacher_logits = teacher_logits.dense()
    same_vocab("dac_kl", student_logits, teacher_logits)
    log_q, log_p = log_probs(student_logits, temperature), log_probs(teacher_logits, temperature)
    log_p_sorted, order = log_p.sort(dim=-1, descending=True, stable=True)
    cuts = module(log_p_sorted.exp().detach()).to(log_p.dtype)
    log_c = clipped(log_p_sorted, cuts)
    c = log_c.exp()
    kl = (c * torch.where(c > 0, log_c - log_q.gather(-1, order), torch.zeros_like(c))).sum(-1)
    return per_token(kl - keep * torch.log1p(-cuts.sum(-1)), mask, reduction)
