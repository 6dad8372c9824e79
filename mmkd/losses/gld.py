"""Graph-on-logits distillation (GLD), batch-level: co-activation graphs over the classes, aligned by a
sorting-based approximation of the Gromov-Wasserstein discrepancy.

With p_b = softmax(z_b / T) for each of the B rows of a batch and p~_b its top-k sparsification (the k
largest probabilities of the row kept, the others set to 0), each side's co-activation graph over the
C classes is

    A = (1/B) sum_b p~_b p~_b^T            A_ij: how strongly classes i and j are active together.

The Gromov-Wasserstein discrepancy (square loss, weight 1/C on every node) of the student's graph A^s
and the teacher's A^t is

    GW(A^s, A^t) = min_{pi in U(1/C, 1/C)} sum_{i,j,k,l} (A^s_ik - A^t_jl)^2 pi_ij pi_kl,

a non-convex quadratic programme with O(C^4) terms. GLD replaces the search over couplings by a
sort: with d_i = sum_j A_ij the strength of node i, and sigma, tau the ascending orders of d^s and d^t
(stable: ties by class index), the r-th weakest student node is matched to the r-th weakest teacher
node and

    GLD = (1/C^2) sum_{r,q} (A^s_{sigma(r) sigma(q)} - A^t_{tau(r) tau(q)})^2,

the GW objective at that permutation coupling, in closed form after an O(C log C) sort.

Guarantees (tests/mmkd/losses/test_gld.py checks them, against an exact GW where one is involved):

- ``GW <= GLD`` always: GLD is the objective at a feasible coupling. Both graphs are Gram matrices
  (positive semi-definite), so the objective, const - 2 tr(pi^T A^s pi A^t), is concave in pi and GW
  itself is attained at one of the C! permutations; GLD picks one by sorting instead of searching.
- ``GLD = GW`` when each graph has rank one (a single row, or rows that are multiples of one vector
  after the top-k: the 1-D case). Then A = a a^T with a >= 0, the cross term is (a^T pi b)^2, and
  the sorted (monotone) coupling maximises a^T pi b (rearrangement inequality).
- ``GLD = 0`` when the teacher's graph is a relabelling of the student's with distinct node
  strengths, in particular when student == teacher.
- Unchanged by relabelling the classes of either side (GW compares structures, not class
  identities; with distinct node strengths), by the order or a duplication of the rows, and by a
  shift of a row's logits.

The loss does not pair the student's rows with the teacher's: both graphs aggregate the batch, so
only the batch's joint structure is distilled (the method combines it with a token-level loss and
the task loss). Its scale is a GW value with node weights 1/C (entries of A lie in [0, 1]), small
when k << C; choose the term weight accordingly. The sort orders and the top-k support are piecewise
constant and carry no gradient; the gradient flows through the kept probabilities.

Wang, Yan, Zhang, Zhou, Gu, Wu and Yang, "InfiGFusion: Graph-on-Logits Distillation via Efficient
Gromov-Wasserstein for Model Fusion", NeurIPS 2025 (arXiv:2505.13893). The official repository, as it
could be consulted for this module (Reallm-Labs/InfiGFusion; the authors also link InfiXAI/InfiGFusion),
holds no GLD criterion: only the README, the training driver distillation_multi_zero3.py (whose
``criterions.build_criterion`` is not included) and a data loader; and of the paper only the
abstract could be read: "we retain the top-k logits per output and aggregate their outer
products across sequence positions to form a global co-activation graph, where nodes represent
vocabulary channels", aligned by "a sorting-based closed-form approximation" of GW "with provable
approximation guarantees". The rest is this module's reading of that sentence, not the official
code: the graph is built on softmax(z / T) (non-negative and shift-invariant, which the rank-one
exactness needs; the abstract says "logits"), normalised by 1/B, the nodes are all C classes with
weight 1/C, the sort key is the node strength, and the defaults T = 1, k = 10 are not the paper's
(which are unknown here). The paper fuses language models with different vocabularies; here the
student and the teacher share the C classes.
"""
from __future__ import annotations

import torch

from mmkd.checks import COUNT, TEMPERATURE
from mmkd.losses import register_loss


def coactivation_graph(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """``(1/B) sum_b p~_b p~_b^T`` ([C, C]): p = softmax(z / T) per row, only its ``top_k`` largest
    entries kept (all with ``None`` or ``top_k >= C``; ties by class index)."""
    p = (logits / temperature).softmax(dim=1)
    if top_k is not None and top_k < p.shape[1]:
        keep = p.detach().argsort(dim=1, descending=True, stable=True)[:, :int(top_k)]
        p = p * torch.zeros_like(p).scatter(1, keep, 1.0)
    return p.T @ p / p.shape[0]


def _by_strength(graph: torch.Tensor) -> torch.Tensor:
    """The graph with its nodes in ascending order of strength (row sum; stable)."""
    order = graph.detach().sum(dim=1).argsort(stable=True)
    return graph[order][:, order]


@register_loss("gld", teacher=True, per_sample=False, ranges={"temperature": TEMPERATURE, "top_k": COUNT})
def gld(student_logits, teacher_logits, target=None, *, temperature=1.0, top_k=10):
    """``(1/C^2) sum_{r,q} (A^s_{sigma(r) sigma(q)} - A^t_{tau(r) tau(q)})^2`` (scalar).

    A = (1/B) sum_b p~_b p~_b^T, the co-activation graph of the top-``top_k`` entries of
    softmax(z / T) per row; sigma, tau sort the nodes of each graph by strength. An upper bound on the
    Gromov-Wasserstein discrepancy of the two graphs, equal to it for rank-one graphs. Wang et al.,
    "InfiGFusion: Graph-on-Logits Distillation via Efficient Gromov-Wasserstein for Model Fusion",
    NeurIPS 2025 (the module docstring says what follows the paper and what is this module's).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"gld needs student and teacher logits of one shape [batch, classes]; got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    a_s = _by_strength(coactivation_graph(student_logits, temperature, top_k))
    a_t = _by_strength(coactivation_graph(teacher_logits, temperature, top_k))
    return (a_s - a_t).pow(2).mean()
