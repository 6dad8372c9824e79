"""FF-G2M: low- and high-frequency knowledge of a GNN, distilled into a graph-free MLP.

    LFD = (1/|E~|) sum_{(j, i) in E~} KL(p_T(j) || p_S(i)),         p = softmax(z / T)
    HFD = (1/|E|)  sum_{(j, i) in E}  KL(softmax(|z_T,i - z_T,j| / tau) || softmax(|z_S,i - z_S,j| / tau))
    L   = lambda * CE(labelled nodes) + (1 - lambda) * (LFD + HFD)

with ``E`` the graph's edges without self-loops (``j -> i``: ``edge_index[0]`` is j, ``edge_index[1]``
is i), ``E~ = E`` plus one self-loop per node, ``z`` logits and the absolute differences taken per
class. The low-frequency term makes each node's student prediction agree with its neighbours' (and
its own) teacher predictions; the high-frequency term transfers how differently the teacher sees the
two ends of each edge. Wu, Lin, Huang, Xia and Li, "Extracting Low-/High- Frequency Knowledge from
Graph Neural Networks and Injecting it into Graph-free MLPs", AAAI 2023.

In a run config these are the terms ``ce`` (weight lambda), ``ffg2m_lfd`` and ``ffg2m_hfd`` (weight
1 - lambda each); dropping one gives the LFD-only / HFD-only ablations. Both read the batch's
``edge_index`` (in mini-batch mode: the edges of the sampled subgraph).

The official code (LirongWu/FF-G2M, ``src/train_and_eval.py`` and ``src/models.py``) computes the same
terms: LFD is ``KLDivLoss(batchmean)`` of the student's log-probabilities against the teacher's over
the edges with one self-loop per node, without a temperature (T = 1); HFD the same over the edges
without self-loops of ``log_softmax(|z_i - z_j| / tau)``, teacher as the target; the loss is
``lamb * CE + (1 - lamb) * (LFD + HFD)`` (``lamb`` = lambda, ``tau`` = tau here, no ``tau^2`` factor).
``configs/experiment/g2m_ffg2m_<cora|citeseer>_<gcn|sage|gat>.yaml`` carry its best settings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.checks import TEMPERATURE
from mmkd.losses import register_loss


def _kl_rows(log_t: Tensor, log_s: Tensor) -> Tensor:
    """``KL(p || q)`` per row for log-probabilities ``log_t`` (p) and ``log_s`` (q)."""
    return (log_t.exp() * (log_t - log_s)).sum(1)


def edges_without_loops(batch) -> Tensor:
    """``batch["edge_index"]`` without its self-loops."""
    edge_index = batch["edge_index"]
    return edge_index[:, edge_index[0] != edge_index[1]]


@register_loss("ffg2m_lfd", teacher=True, per_sample=False, batch=True, ranges={"temperature": TEMPERATURE})
def ffg2m_lfd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, *,
              temperature: float = 1.0, batch=None) -> Tensor:
    """Low-frequency distillation: mean over edges ``j -> i`` plus one self-loop per node of
    ``KL(softmax(z_T,j / T) || softmax(z_S,i / T))``."""
    loops = torch.arange(len(student_logits), device=student_logits.device)
    src, dst = torch.cat([edges_without_loops(batch), torch.stack([loops, loops])], 1)
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    return _kl_rows(log_t[src], log_s[dst]).mean()


@register_loss("ffg2m_hfd", teacher=True, per_sample=False, batch=True, ranges={"tau": TEMPERATURE})
def ffg2m_hfd(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, *,
              tau: float = 1.0, batch=None) -> Tensor:
    """High-frequency distillation: mean over edges ``j -> i`` (no self-loops) of
    ``KL(softmax(|z_T,i - z_T,j| / tau) || softmax(|z_S,i - z_S,j| / tau))``; 0 without edges."""
    src, dst = edges_without_loops(batch)
    if len(src) == 0:
        return student_logits.sum() * 0.0
    log_t = F.log_softmax((teacher_logits[dst] - teacher_logits[src]).abs() / tau, dim=1)
    log_s = F.log_softmax((student_logits[dst] - student_logits[src]).abs() / tau, dim=1)
    return _kl_rows(log_t, log_s).mean()
