"""Span-level correlation consistency: the products of neighbouring tokens' distributions within spans.

Per sequence, with ``p_i = softmax(z_t,i / T)`` the teacher's and ``q_i = softmax(z_s,i / T)`` the
student's next-token distribution at position ``i``, the correlation of two neighbouring tokens of one
span is the element-wise (Hadamard) product of their distributions, and the loss matches the student's
to the teacher's:

    C^t_i = p_i * p_{i+1},   C^s_i = q_i * q_{i+1}                  (vectors over the vocabulary)
    L_span = 1/|P| sum_{(i, i+1) in P} ||C^s_i - C^t_i||_2^2,

``P`` the pairs of neighbouring positions that lie in the same span and are both kept by the batch's
token mask (masked positions -- prompt, padding -- never count, nor do pairs across them). Liu, Zhang,
Li, Li, Huang, Chen, Tang, Hu, Xiong and Wang, "Multi-Granularity Semantic Revision for Large Language
Model Distillation" (MGSR), arXiv 2407.10068, 2024, the span level.

The paper's spans are phrases (noun, verb, prepositional) from an external chunker. Without one,
spans are fixed windows of ``length`` positions, ``[0, length), [length, 2 length), ...`` along each
sequence; ``spans`` names a batch entry of span ids ``[batch, time]`` instead (phrases chunked
offline: neighbours with the same id >= 0 share a span). No official code could be found, nor the
paper's equations in full text; the products of neighbouring distributions follow the OpenReview
reviews' account of its Eq. 10, and the squared Euclidean distance between teacher's and student's is
mmkd's reading of "constrain the probability correlations to be consistent". The loss reads the batch
(``batch=True``): the ``N`` logits rows are the kept positions of ``batch[tokens]`` in row-major order
(the :class:`~mmkd.net.Net`'s ``tokens`` mask). A :class:`~mmkd.sparse.SparseLogits` teacher is
densified.
"""
from __future__ import annotations

import torch
from torch import Tensor

from mmkd.checks import COUNT, TEMPERATURE
from mmkd.losses import reduce, register_loss
from mmkd.losses.tokens import log_probs, same_vocab
from mmkd.sparse import SparseLogits


def neighbours(layout: Tensor, counted: Tensor, span_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Row indices ``(a, b)`` of the pairs of neighbouring positions ``(i, i + 1)`` that share a span and
    are both ``counted``; ``layout`` (``[batch, time]``) places the rows, row-major."""
    rows = torch.full(layout.shape, -1, dtype=torch.long, device=layout.device)
    rows[layout] = torch.arange(int(layout.sum()), device=layout.device)
    same = (span_ids[:, :-1] == span_ids[:, 1:]) & (span_ids[:, :-1] >= 0)
    valid = counted[:, :-1] & counted[:, 1:] & same
    return rows[:, :-1][valid], rows[:, 1:][valid]


@register_loss("span_corr", teacher=True, per_sample=True, batch=True,
               ranges={"length": COUNT, "temperature": TEMPERATURE})
def span_corr(student_logits, teacher_logits, target=None, *, batch=None, length=4, spans=None, tokens="mask",
              temperature=1.0, mask=None, reduction="mean"):
    """``mean_pairs ||q_i q_{i+1} - p_i p_{i+1}||^2`` over neighbouring kept tokens within spans (MGSR);
    ``reduction="none"`` gives each row the value of the pair it starts (0 without one)."""
    if batch is None:
        raise ValueError("loss span_corr: no batch; it reads the sequence layout, use it as a loss term "
                         "(Term('span_corr'))")
    if tokens not in batch:
        raise ValueError(f"loss span_corr: tokens={tokens!r} is not a batch entry; the batch has: "
                         f"{', '.join(sorted(batch))} (set tokens to the [batch, time] token mask)")
    if isinstance(teacher_logits, SparseLogits):
        teacher_logits = teacher_logits.dense()
    same_vocab("span_corr", student_logits, teacher_logits)
    keep = batch[tokens].bool().to(student_logits.device)
    n = len(student_logits)
    if keep.dim() != 2 or int(keep.sum()) != n:
        raise ValueError(f"loss span_corr: batch[{tokens!r}] of shape {tuple(keep.shape)} keeps {int(keep.sum())} "
                         f"positions for {n} logits rows; give the [batch, time] mask that selected the rows")
    if spans is None:
        span_ids = (torch.arange(keep.shape[1], device=keep.device) // length).expand(keep.shape)
    else:
        if spans not in batch or batch[spans].shape != keep.shape:
            raise ValueError(f"loss span_corr: spans={spans!r} must be a batch entry of span ids shaped like "
                             f"batch[{tokens!r}] {tuple(keep.shape)}; leave it unset for spans of `length` tokens")
        span_ids = batch[spans].to(keep.device)
    counted = keep
    if mask is not None:
        if mask.shape != (n,):
            raise ValueError(f"token mask of shape {tuple(mask.shape)} for {n} logits rows; give one entry per row")
        counted = keep.clone()
        counted[keep] = mask.bool().to(keep.device)
    a, b = neighbours(keep, counted, span_ids)
    q, p = log_probs(student_logits, temperature).exp(), log_probs(teacher_logits, temperature).exp()
    per_pair = (q[a] * q[b] - p[a] * p[b]).pow(2).sum(-1)
    if reduction == "none":
        return per_pair.new_zeros(n).index_put((a,), per_pair)
    if reduction == "mean":
        return per_pair.sum() / max(len(a), 1)
    return reduce(per_pair, reduction)
