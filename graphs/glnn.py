"""GLNN: distilling a GNN into a graph-less MLP through the teacher's soft labels on every node.

    L = lambda * (1/|V_L|) sum_{i in V_L} CE(y_i, p_S(i))
        + (1 - lambda) * (1/|V|) sum_{i in V} KL(p_T(i) || p_S(i)),   p = softmax(z)

with V_L the labelled training nodes and V every node of the training graph: all nodes in the
transductive setting, the observed nodes in the inductive one (held-out nodes are not in it). Zhang,
Liu, Sun and Shah, "Graph-less Neural Networks: Teaching Old MLPs New Tricks via Distillation",
ICLR 2022. The teacher's soft labels come from the teacher-output cache. In a run config this is two
terms of the mixture core: ``ce`` with weight lambda and ``glnn`` (the KL part) with weight 1 - lambda.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from mmkd.checks import TEMPERATURE
from mmkd.losses import reduce, register_loss


@register_loss("glnn", teacher=True, per_sample=True, batch=True, ranges={"temperature": TEMPERATURE})
def glnn(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None, *,
         temperature: float = 1.0, batch=None, reduction: str = "mean") -> Tensor:
    """``T^2 * KL(softmax(z_T/T) || softmax(z_S/T))`` averaged over the batch's seed nodes
    (``batch["seed"]``; every node in full-batch mode), labelled or not.

    With ``reduction="none"`` the per-node values are zero off the seeds and scaled by
    ``nodes / seeds``, so that their plain mean is the mean over the seeds (what the mixture core
    takes when it weighs teachers per node).
    """
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    per_node = (log_t.exp() * (log_t - log_s)).sum(1) * temperature**2
    seed = batch.get("seed") if batch is not None else None
    if seed is None or bool(seed.all()):
        return reduce(per_node, reduction)
    per_node = per_node * seed
    if reduction == "sum":
        return per_node.sum()
    return reduce(per_node * (len(seed) / seed.sum().clamp(min=1)), reduction)
