"""Generated graphs of known structure: the contextual stochastic block model (CSBM).

Deshpande et al. (NeurIPS 2018): node ``i`` has a class ``y_i`` (uniform over ``classes``), a
feature vector ``x_i = signal * mu_{y_i} + eps_i`` (``mu_c ~ N(0, I_F / F) * sqrt(F)``, i.e. unit
variance per feature, and ``eps_i ~ N(0, I_F)``) and ``degree / 2`` edges it starts, each to a
node of its own class with probability ``homophily`` and to a uniformly random node otherwise;
the edges are then made undirected. The structure is known, so a GNN should beat an MLP by a margin
that grows with ``homophily`` and shrinks with ``signal`` (features alone already separate the
classes at high signal), and a teacher that does not converge shows as one that falls short of it.
The same ``graph_seed`` gives the same graph on every machine; the split is drawn from ``split_seed``.
"""
from __future__ import annotations

import torch

from mmkd.checks import COUNT, FRACTION, NON_NEGATIVE, POSITIVE, SEED, Range
from mmkd.data import DataSplits
from mmkd.graphs.data import Graph, check_graph, to_undirected
from mmkd.graphs.datasets import GRAPH_RANGES, check_args, graph_splits
from mmkd.registry import DATASETS


def csbm(nodes: int = 10_000, classes: int = 5, degree: float = 10.0, homophily: float = 0.8,
         features: int = 100, signal: float = 0.3, graph_seed: int = 0) -> Graph:
    """A CSBM graph (see the module docstring); ``degree`` is the mean undirected degree."""
    g = torch.Generator().manual_seed(graph_seed)
    y = torch.randint(0, classes, (nodes,), generator=g)
    mu = torch.randn(classes, features, generator=g)
    x = signal * mu[y] + torch.randn(nodes, features, generator=g)
    per = max(1, round(degree / 2))
    src = torch.arange(nodes).repeat_interleave(per)
    order = torch.argsort(y, stable=True)  # nodes grouped by class: members of c are order[start_c:end_c]
    counts = torch.bincount(y, minlength=classes)
    start = torch.cumsum(counts, 0) - counts
    same = torch.rand(len(src), generator=g) < homophily
    pick = (torch.rand(len(src), generator=g) * counts[y[src]]).long().clamp_max(counts[y[src]] - 1)
    dst = torch.where(same, order[start[y[src]] + pick], torch.randint(0, nodes, (len(src),), generator=g))
    name = f"csbm-{nodes}-{classes}-{degree:g}-{homophily:g}-{features}-{signal:g}-{graph_seed}"
    return check_graph(x, torch.stack([src, dst]), y, name)


CSBM_RANGES = {**GRAPH_RANGES, "nodes": COUNT, "classes": Range(2, 10_000, integer=True), "degree": POSITIVE,
               "homophily": FRACTION, "features": COUNT, "signal": NON_NEGATIVE, "graph_seed": SEED}


@DATASETS.register("csbm", ranges=CSBM_RANGES)
def csbm_splits(root: str | None = None, nodes: int = 10_000, classes: int = 5, degree: float = 10.0,
                homophily: float = 0.8, features: int = 100, signal: float = 0.3, graph_seed: int = 0,
                **kwargs) -> DataSplits:
    """A generated CSBM graph (:func:`csbm`; nothing is read from ``root``); ``kwargs`` go to
    :func:`~mmkd.graphs.datasets.graph_splits` (default split: ``glnn``, 20/30 labelled nodes a class)."""
    check_args(kwargs)
    g = csbm(nodes, classes, degree, homophily, features, signal, graph_seed)
    g.edge_index = to_undirected(g.edge_index, g.num_nodes)
    return graph_splits(g, **kwargs)
