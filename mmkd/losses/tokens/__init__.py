"""Divergences between next-token distributions: the token-level losses of language-model distillation.

Each compares the student's and the teacher's distributions over the vocabulary row by row: logits
``[..., vocab]`` (a row is a token; ``[tokens, vocab]`` over the unmasked positions is what the
mixture core hands a loss), both divided by a ``temperature`` first (1 by default, as in GKD and
DistiLLM, and no ``T^2`` factor). Every one takes a token ``mask`` ``[...]`` (True: the token
counts): masked rows contribute nothing, ``reduction="mean"`` averages over the unmasked tokens and
``"none"`` returns 0 at masked ones. Entries where a logit is ``-inf`` (a vocabulary masked out) are
left out of the sums.

A teacher served from a top-k cache (:class:`~mmkd.sparse.SparseLogits`, rows ``[tokens]``) is read
as it is by the six divergences (registered ``sparse=True``): they compare the two distributions on
the teacher's k classes plus one tail bucket, the student's probability outside the support pooled
into it (:func:`mmkd.sparse.bucket`; :func:`pair`). Merging classes never increases these divergences
(data processing), so at temperature 1 the sparse value is at most the dense one, and it equals the
dense one when k is the vocabulary; for forward KL the gap is ``tail * KL(p_T || q_T)``, the KL of the
two distributions within the tail classes ``T``. Another temperature re-tempers the stored teacher
probabilities with the bucket as one class.

- ``fkl``, ``rkl``: forward ``KL(p || q)`` and reverse ``KL(q || p)`` (p: teacher, q: student);
- ``gjsd``: the generalised Jensen-Shannon divergence of GKD, beta = 0 forward and 1 reverse KL;
- ``skew_fkl``, ``skew_rkl``: DistiLLM's skew KLs against a mixture of both distributions;
- ``tvd``: total variation, ``1/2 sum_v |p_v - q_v|``;
- ``dac_kl``: forward KL to the teacher clipped to a dense region that a learned sub-network picks
  from the sorted teacher probabilities (MGSR's DAC-KL; a sparse teacher is densified);
- ``span_corr``: MGSR's span-level correlation consistency, the products ``p_i * p_{i+1}`` of
  neighbouring tokens within spans matched between teacher and student (reads the batch's token mask).

TAID (:mod:`mmkd.losses.adaptive.taid`) applies to tokens as it is: its rows may be tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.losses import reduce
from mmkd.sparse import SparseLogits, bucket


def log_probs(logits: Tensor, temperature: float) -> Tensor:
    """``log softmax(z / T)`` over the last dimension, in float32 at least (half precision is promoted)."""
    return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def xlogy_sum(p: Tensor, log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_v p_v (log p_v - log q_v)`` over the last dimension, 0 where ``p_v = 0`` (``-inf`` logits)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def per_token(values: Tensor, mask: Tensor | None, reduction: str) -> Tensor:
    """Reduce per-token values ``[...]`` over the tokens where ``mask`` is True (all without a mask)."""
    if mask is None:
        return reduce(values.reshape(-1), reduction)
    if mask.shape != values.shape:
        raise ValueError(f"token mask of shape {tuple(mask.shape)} for logits of {tuple(values.shape)} rows; "
                         "give one entry per token (the logits' shape without the vocabulary)")
    mask = mask.bool()
    if reduction == "none":
        return torch.where(mask, values, torch.zeros_like(values)).reshape(-1)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1) if reduction == "mean" else reduce(total.reshape(1), "sum")


def same_vocab(name: str, student: Tensor, teacher: Tensor) -> None:
    """A one-line ``ValueError`` unless both logits have the same shape."""
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} "
                         "differ; both sides need the same tokens and the same vocabulary")


def pair(name: str, student: Tensor, teacher: Tensor | SparseLogits, temperature: float) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's log-probabilities at ``temperature``: over the vocabulary for dense
    teacher logits, over the teacher's support plus the tail bucket (:func:`mmkd.sparse.bucket`) for a
    :class:`~mmkd.sparse.SparseLogits` teacher. A support that covers the vocabulary has no bucket (its
    stored tail is only rounding)."""
    if not isinstance(teacher, SparseLogits):
        same_vocab(name, student, teacher)
        return log_probs(student, temperature), log_probs(teacher, temperature)
    if student.shape != teacher.shape:
        raise ValueError(f"{name}: student logits {tuple(student.shape)} for a sparse teacher of {len(teacher)} rows "
                         f"over {teacher.vocab} classes; give the student's [tokens, vocab] rows")
    if teacher.k < teacher.vocab:
        return bucket(student, teacher, temperature)
    full = SparseLogits(teacher.values, teacher.indices, torch.zeros_like(teacher.tail), teacher.vocab)
    log_q, log_p = bucket(student, full, temperature)
    return log_q[..., :-1], log_p[..., :-1]


from mmkd.losses.tokens.dac_kl import dac_kl  # noqa: E402  (imports register the losses)
from mmkd.losses.tokens.gjsd import gjsd  # noqa: E402
from mmkd.losses.tokens.kl import fkl, rkl  # noqa: E402
from mmkd.losses.tokens.skew import skew_fkl, skew_rkl  # noqa: E402
from mmkd.losses.tokens.span import span_corr  # noqa: E402
from mmkd.losses.tokens.tvd import tvd  # noqa: E402

__all__ = ["log_probs", "per_token", "pair", "fkl", "rkl", "gjsd", "skew_fkl", "skew_rkl", "tvd", "dac_kl", "span_corr"]
