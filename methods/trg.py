"""TRG: knowledge distillation via token-level relationship graphs (Zhang et al., "Knowledge
Distillation via Token-level Relationship Graph", arXiv:2306.12442, 2023).

Tokens are ViT patch tokens ``[B, L, D]``, transformer text tokens ``[B, L, D]`` or the positions of a
CNN feature map (``[B, C, H, W] -> [B, HW, C]``). ``N`` token positions are drawn per instance and the
same positions are read from the teacher and the student (see :func:`paired_tokens` for token counts
that differ). Over the ``N`` sampled tokens ``t_1..t_N`` of one instance the graph is a k-NN graph
with Gaussian-kernel edge weights

    A_ij = exp(-||t_i - t_j||^2 / (2 sigma))   for j among the k nearest neighbours of i (i excluded),

and three registered feature losses compare student (S) and teacher (T) token sets:

* ``trg_local``: ``sum_i KL(P^S_i || P^T_i)`` with ``P_ij = A_ij / sum_{l in N(i)} A_il`` the kernel
  weights of i's edges normalised over its k neighbours N(i) (in the teacher's graph), that is
  ``P_ij = softmax_{j in N(i)}(-||t_i - t_j||^2 / (2 sigma))``; on L2-normalised tokens
  ``||t_i - t_j||^2 = 2 - 2 cos(t_i, t_j)``, so ``P_ij = softmax_j(cos(t_i, t_j) / sigma)`` and sigma is
  the temperature of the neighbour distribution;
* ``trg_global``: token-level InfoNCE after a projection, the teacher's token at the same position
  the positive, ``-log exp(<s_i, t_i>/tau) / sum_j exp(<s_i, t_j>/tau)`` on L2-normalised tokens,
  ``tau`` lowered on a schedule (a :class:`~mmkd.schedules.Schedule` in the term's args);
* ``trg_context``: ``mean_ij (M^S_ij - M^T_ij)^2`` with ``M = softmax(F F^T / sqrt(D))`` the
  intra-instance token similarity of each network (its own width D).

Logit KD is the core's ``kd`` term. The terms read token features through the Term selectors
(``student="features.<path>"``, ``teacher="features.<path>"``); ``trg_global`` needs the two token
widths equal, so a differing student width goes through the Term's ``adapter``, e.g.
:class:`TokenProjector` (in a config, ``adapter: conv`` projects CNN feature maps, ``adapter: token``
token sequences). ``trg_local`` and ``trg_context`` compare ``N x N`` relation matrices, so they need
no projector. For padded text, ``mask: attention_mask`` (the batch entry marking real tokens) keeps
the drawn positions off the padding.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import COUNT, NON_NEGATIVE_INT, POSITIVE, TEMPERATURE
from mmkd.losses import reduce, register_loss


def as_tokens(x: Tensor, skip: int = 0) -> Tensor:
    """``[B, C, H, W]`` feature maps -> ``[B, HW, C]`` tokens (row-major positions); ``[B, L, D]``
    token sequences are kept, minus their first ``skip`` tokens (e.g. ``skip=1`` drops a ViT's CLS)."""
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    if x.dim() == 3:
        return x[:, skip:]
    raise ValueError(f"TRG tokens: expected [B, C, H, W] maps or [B, L, D] tokens, got shape {tuple(x.shape)}")


def paired_tokens(student: Tensor, teacher: Tensor, num_tokens: int | None = None,
                  skip: int = 0, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The same ``num_tokens`` positions (drawn per instance, without replacement) of both networks:
    ``([B, N, C_s], [B, N, C_t])``; ``None`` (or at least the token count) keeps every token in order.

    ``valid`` (``[B, L_t]``, e.g. a text batch's attention mask; the first ``skip`` columns are
    dropped with the tokens) restricts the draw to real tokens: an instance with fewer than
    ``num_tokens`` of them takes all of them and fills up with padding positions.

    When the token counts differ: two feature maps are average-pooled to their common grid (the smaller
    height and width); for token sequences, positions are drawn among the teacher's ``L_t`` tokens and
    teacher position ``p`` maps to student position ``floor((p + 0.5) * L_s / L_t)`` (proportionally).
    """
    if student.dim() == 4 and teacher.dim() == 4 and student.shape[2:] != teacher.shape[2:]:
        grid = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
        student, teacher = F.adaptive_avg_pool2d(student, grid), F.adaptive_avg_pool2d(teacher, grid)
    s, t = as_tokens(student, skip), as_tokens(teacher, skip)
    if len(s) != len(t):
        raise ValueError(f"TRG tokens: student batch {len(s)} != teacher batch {len(t)}")
    n_s, n_t = s.shape[1], t.shape[1]
    if num_tokens is None or num_tokens >= n_t:
        pos = torch.arange(n_t, device=t.device).expand(len(t), n_t)
    else:
        scores = torch.rand(len(t), n_t, device=t.device)
        if valid is not None:
            valid = valid[:, skip:].to(device=t.device, dtype=torch.bool)
            if valid.shape != scores.shape:
                raise ValueError(f"TRG tokens: mask of shape {tuple(valid.shape)} (after skip) for "
                                 f"{tuple(scores.shape)} teacher tokens")
            scores = scores + (~valid).float()  # real tokens (in [0, 1)) sort before padding (in [1, 2))
        pos = scores.argsort(dim=1)[:, :num_tokens]
    pos_s = pos if n_s == n_t else ((pos + 0.5) * n_s / n_t).floor().long().clamp(max=n_s - 1)
    gather = lambda x, p: x.gather(1, p.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    return gather(s, pos_s), gather(t, pos)


def batch_mask(batch, mask: str | None) -> Tensor | None:
    """The batch entry named ``mask`` (the losses' ``mask`` argument), or None without one."""
    if mask is None:
        return None
    if batch is None or mask not in batch:
        raise KeyError(f"TRG: mask={mask!r} is not an entry of the batch; give the key of the attention mask "
                       "(e.g. attention_mask) or leave mask unset")
    return batch[mask]


def sq_dists(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances ``[B, N, N]`` of tokens ``[B, N, C]`` (clamped at 0)."""
    sq = x.pow(2).sum(-1)
    return (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * x @ x.transpose(1, 2)).clamp(min=0)


def neighbours(tokens: Tensor, k: int) -> Tensor:
    """Indices ``[B, N, k]`` of each token's ``k`` nearest other tokens (squared Euclidean distance;
    ties go to the lower index)."""
    n = tokens.shape[1]
    if not 0 < k < n:
        raise ValueError(f"TRG k-NN graph: k={k} must be in [1, {n - 1}] for {n} tokens; lower k or raise num_tokens")
    eye = torch.eye(n, dtype=torch.bool, device=tokens.device)
    return sq_dists(tokens.detach()).masked_fill(eye, float("inf")).topk(k, dim=-1, largest=False).indices


def knn_graph(tokens: Tensor, k: int, sigma: float = 1.0) -> tuple[Tensor, Tensor]:
    """The k-NN token graph of ``tokens`` ``[B, N, C]``: Gaussian edge weights ``A`` ``[B, N, N]``
    (``A_ij = exp(-||t_i - t_j||^2 / (2 sigma))`` on edges, 0 elsewhere) and the boolean edge mask
    (row i marks i's ``k`` nearest other tokens, see :func:`neighbours`)."""
    d = sq_dists(tokens)
    mask = torch.zeros_like(d, dtype=torch.bool).scatter_(-1, neighbours(tokens, k), True)
    return torch.exp(-d / (2 * sigma)) * mask, mask


def neighbour_log_probs(tokens: Tensor, nb: Tensor, sigma: float) -> Tensor:
    """``log P_ij`` ``[B, N, k]`` over the neighbours ``nb`` ``[B, N, k]`` of each token: the Gaussian
    kernel weights ``A_ij = exp(-||t_i - t_j||^2 / (2 sigma))`` normalised over i's neighbours,
    ``P_ij = A_ij / sum_{l in nb(i)} A_il = softmax_j(-||t_i - t_j||^2 / (2 sigma))``."""
    return F.log_softmax(-sq_dists(tokens).gather(-1, nb) / (2 * sigma), dim=-1)


@register_loss("trg_local", teacher=True, per_sample=True, batch=True,
               ranges={"k": COUNT, "sigma": POSITIVE, "num_tokens": COUNT, "skip": NON_NEGATIVE_INT})
def trg_local(student_feats, teacher_feats, target=None, *, k: int = 4, sigma: float = 0.1,
              num_tokens: int | None = 16, normalize: bool = True, skip: int = 0, mask: str | None = None,
              batch=None, reduction: str = "mean"):
    """TRG local loss ``sum_i KL(P^S_i || P^T_i)`` per instance, ``P_ij = A_ij / sum_{l in N(i)} A_il``.

    ``A_ij = exp(-||t_i - t_j||^2 / (2 sigma))`` are the k-NN graph's edge weights and ``P_i`` their
    normalisation over the k neighbours N(i) of token i, so ``P_ij = softmax_j(-||t_i - t_j||^2 /
    (2 sigma))`` (see :func:`neighbour_log_probs`). N(i) is i's neighbourhood in the teacher's k-NN
    graph (the two distributions need one support); the student's distribution uses the student's
    tokens on those edges. The direction is as written in the paper: the student's distribution comes
    first (``sum_j P^S_ij (log P^S_ij - log P^T_ij)``). ``normalize`` L2-normalises tokens first:
    squared distances are ``2 - 2 cos`` in ``[0, 4]``, ``P_ij = softmax_j(cos(t_i, t_j) / sigma)`` and
    ``sigma`` is a temperature on cosine similarities that needs no tuning per layer.
    """
    s, t = paired_tokens(student_feats, teacher_feats, num_tokens, skip, batch_mask(batch, mask))
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    nb = neighbours(t, k)  # the teacher's edges, [B, N, k]
    log_p_s, log_p_t = neighbour_log_probs(s, nb, sigma), neighbour_log_probs(t, nb, sigma)
    return reduce((log_p_s.exp() * (log_p_s - log_p_t)).sum(dim=(1, 2)), reduction)


@register_loss("trg_global", teacher=True, per_sample=True, batch=True,
               ranges={"temperature": TEMPERATURE, "num_tokens": COUNT, "skip": NON_NEGATIVE_INT})
def trg_global(student_feats, teacher_feats, target=None, *,
               temperature: Union[float, Tensor] = 0.1, num_tokens: int | None = 16,
               skip: int = 0, mask: str | None = None, batch=None, reduction: str = "mean"):
    """TRG global loss: token-level InfoNCE, the teacher token at the same position the positive.

    With ``s``, ``t`` the L2-normalised sampled tokens of the whole batch (``B * N`` of each),
    ``loss_(b,i) = -log exp(<s_bi, t_bi>/tau) / sum_(c,j) exp(<s_bi, t_cj>/tau)`` (every other sampled
    teacher token of the batch is a negative); an instance's loss is the mean over its ``N`` tokens.
    The TRG paper starts ``temperature`` high and lowers it: give the term a schedule, e.g.
    ``{schedule: cosine, start: 1.0, end: 0.1}`` in a config (see :mod:`mmkd.schedules`). The
    student tokens must have the teacher's width: project them with the Term's ``adapter``.
    """
    s, t = paired_tokens(student_feats, teacher_feats, num_tokens, skip, batch_mask(batch, mask))
    if s.shape[-1] != t.shape[-1]:
        raise ValueError(f"trg_global: student tokens have width {s.shape[-1]}, the teacher's {t.shape[-1]}; "
                         "give the term an adapter (TokenProjector, or adapter: conv for feature maps)")
    b, n, _ = s.shape
    s, t = F.normalize(s.reshape(b * n, -1), dim=-1), F.normalize(t.reshape(b * n, -1), dim=-1)
    nce = F.cross_entropy(s @ t.T / temperature, torch.arange(b * n, device=s.device), reduction="none")
    return reduce(nce.view(b, n).mean(dim=1), reduction)


@register_loss("trg_context", teacher=True, per_sample=True, batch=True,
               ranges={"num_tokens": COUNT, "skip": NON_NEGATIVE_INT})
def trg_context(student_feats, teacher_feats, target=None, *, num_tokens: int | None = 16, skip: int = 0,
                mask: str | None = None, batch=None, reduction: str = "mean"):
    """TRG contextual loss ``mean_ij (M^S_ij - M^T_ij)^2`` with ``M = softmax_j(F F^T / sqrt(D))``
    over the ``N`` sampled tokens ``F`` ``[N, D]`` of one instance (each network with its own width D)."""
    s, t = paired_tokens(student_feats, teacher_feats, num_tokens, skip, batch_mask(batch, mask))
    m_s = F.softmax(s @ s.transpose(1, 2) / math.sqrt(s.shape[-1]), dim=-1)
    m_t = F.softmax(t @ t.transpose(1, 2) / math.sqrt(t.shape[-1]), dim=-1)
    return reduce((m_s - m_t).pow(2).mean(dim=(1, 2)), reduction)


class TokenProjector(nn.Module):
    """A learned linear map of every token from width ``in_dim`` to ``out_dim``: ``Linear`` on the last
    dimension of ``[B, L, D]`` tokens, a 1x1 convolution (the same map) on ``[B, C, H, W]`` maps.
    Use it as a Term's ``adapter`` for ``trg_global`` when the student's width differs."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            return self.proj(x.movedim(1, -1)).movedim(-1, 1)
        return self.proj(x)
