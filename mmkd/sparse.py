"""Sparse teacher distributions: per row, the top-k log-probabilities, their classes and the tail mass.

A frozen teacher's next-token distribution over a vocabulary of tens of thousands is kept, per token,
as its ``k`` largest log-probabilities ``values`` ``[N, k]``, their vocabulary ``indices`` ``[N, k]``
and the probability left outside them, ``tail`` ``[N]`` (``1 - sum_j exp(values_j)``, measured on the
full distribution when the cache was written). Losses registered with ``sparse=True`` (the token
divergences of :mod:`mmkd.losses.tokens`) read this form directly: they compare the two
distributions on the support plus one tail bucket. Every other consumer gets :meth:`SparseLogits.dense`
-- the k probabilities and the tail spread evenly over the other classes, as log-probabilities --
which the :class:`~mmkd.distiller.Distiller` hands to losses that are not sparse-aware and which any
``torch`` function applied to a :class:`SparseLogits` (a router's ``softmax``) receives automatically.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._pytree import tree_map


@dataclass
class SparseLogits:
    """Top-k log-probabilities ``values`` at ``indices`` (both ``[N, k]``), the ``tail`` mass ``[N]``
    outside them, over a vocabulary of ``vocab`` classes; rows are tokens (or instances)."""

    values: Tensor
    indices: Tensor
    tail: Tensor
    vocab: int

    @classmethod
    def topk(cls, logits: Tensor, k: int) -> "SparseLogits":
        """The sparse form of the distributions ``softmax(logits)`` (``[N, V]``), keeping ``k`` classes."""
        log_p = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        values, indices = log_p.topk(min(k, logits.shape[-1]), dim=-1)
        tail = log_p.scatter(-1, indices, -math.inf).logsumexp(-1).exp()  # exact; 0 when k covers the vocabulary
        return cls(values, indices, tail, logits.shape[-1])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.values), self.vocab))

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows) -> "SparseLogits":
        return SparseLogits(self.values[rows], self.indices[rows], self.tail[rows], self.vocab)

    def float(self) -> "SparseLogits":
        return SparseLogits(self.values.float(), self.indices.long(), self.tail.float(), self.vocab)

    def dense(self) -> Tensor:
        """Log-probabilities ``[N, V]``: the k stored ones and the tail spread evenly over the rest."""
        rest = self.vocab - self.k
        fill = (self.tail.float().clamp(min=1e-30) / rest).log() if rest else self.tail.new_full(self.tail.shape, -math.inf)
        out = fill.float().unsqueeze(-1).expand(len(self), self.vocab).clone()
        return out.scatter_(-1, self.indices.long(), self.values.float())

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Any torch function sees the dense log-probabilities (what a router's softmax needs)."""
        dense = lambda x: x.dense() if isinstance(x, SparseLogits) else x  # noqa: E731
        return func(*tree_map(dense, args), **tree_map(dense, kwargs or {}))


def bucket(student_logits: Tensor, teacher: SparseLogits, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's log-probabilities on the teacher's support plus one tail bucket
    (``[N, k + 1]``, the bucket last): ``log q_S`` gathered at ``teacher.indices`` and
    ``log(1 - sum_S q)``; ``log p_S`` and ``log tail``. Any divergence of the two rows is at most the
    dense one (data processing: merging classes never increases an f-divergence), and equal to it when
    the tail is empty. A temperature other than 1 re-tempers the stored teacher probabilities,
    ``p^(1/T)`` renormalised over support and bucket (the bucket treated as one class)."""
    log_q = torch.log_softmax(student_logits.to(torch.promote_types(student_logits.dtype, torch.float32))
                              / temperature, dim=-1)
    q_support = log_q.gather(-1, teacher.indices.long())
    q_tail = log_q.scatter(-1, teacher.indices.long(), -math.inf).logsumexp(-1, keepdim=True)
    p = torch.cat([teacher.values.to(log_q.dtype), teacher.tail.to(log_q.dtype).clamp(min=0).log().unsqueeze(-1)], -1)
    if temperature != 1:
        p = torch.log_softmax(p / temperature, dim=-1)
    return torch.cat([q_support, q_tail], -1), p
