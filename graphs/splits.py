"""Node splits: the public (shipped) split, GLNN's per-class split, and the inductive hold-out.

Transductive: every node and edge is visible during training, only labels are split. Inductive
("production", Zhang et al., ICLR 2022, Sec. 5): a random ``fraction`` of the test nodes is held out;
they and every edge touching them are invisible while teachers and students train, and they are
evaluated afterwards on the full graph (GNNs) or on their own features (MLPs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmkd.config import ConfigError
from mmkd.graphs.data import Graph, GraphError


@dataclass
class Split:
    """Node ids of each part; ``held_out`` (inductive only) is the part of ``test`` hidden in training."""

    train: Tensor
    val: Tensor
    test: Tensor
    held_out: Tensor | None = None

    def observed(self, num_nodes: int) -> Tensor:
        """The sorted ids of the nodes visible during training: all but ``held_out``."""
        visible = torch.ones(num_nodes, dtype=torch.bool)
        if self.held_out is not None:
            visible[self.held_out] = False
        return visible.nonzero().flatten()

    def check(self, g: Graph, how: str) -> "Split":
        """Raise :class:`GraphError` if some class has no training node."""
        have = torch.bincount(g.y[self.train], minlength=g.num_classes)
        if (have == 0).any():
            c = int((have == 0).nonzero()[0])
            raise GraphError(f"{g.name}: class {c} has no labelled node in the training part of the {how} "
                             f"split; every class needs at least one")
        return self


def public(g: Graph, index: int = 0) -> Split:
    """The ``index``-th split that ships with the data (Planetoid's public split, the masks of an npz
    file; see :meth:`Graph.split`)."""
    if set(g.masks) != {"train", "val", "test"}:
        raise GraphError(f"{g.name}: no split ships with this graph; use data.args.split=glnn")
    masks = g.split(index)
    return Split(*(masks[p].nonzero().flatten() for p in ("train", "val", "test"))).check(g, "public")


def per_class(g: Graph, train_per_class: int = 20, val_per_class: int = 30, seed: int = 0) -> Split:
    """GLNN's split (after CPF, Yang et al., WWW 2021): per class, ``train_per_class`` random labelled
    nodes for training and ``val_per_class`` for validation; every other labelled node is a test node."""
    gen = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[], [], []]
    need = train_per_class + val_per_class
    for c in range(g.num_classes):
        idx = (g.y == c).nonzero().flatten()
        if len(idx) < need:
            raise GraphError(f"{g.name}: class {c} has {len(idx)} labelled nodes; the glnn split takes "
                             f"train_per_class + val_per_class = {need}; lower them in data.args")
        idx = idx[torch.randperm(len(idx), generator=gen)]
        for part, chunk in zip(parts, (idx[:train_per_class], idx[train_per_class:need], idx[need:])):
            part.append(chunk)
    return Split(*(torch.cat(p).sort().values for p in parts)).check(g, "glnn")


def hold_out(split: Split, fraction: float = 0.2, seed: int = 0) -> Split:
    """The inductive version of ``split``: a random ``fraction`` of its test nodes becomes ``held_out``."""
    if not 0 < fraction < 1:
        raise ConfigError(f"data.args.held_out={fraction}: the held-out fraction of test nodes must be in (0, 1)")
    gen = torch.Generator().manual_seed(seed)
    perm = split.test[torch.randperm(len(split.test), generator=gen)]
    held = perm[:max(1, round(fraction * len(perm)))].sort().values
    if len(held) == len(split.test):
        raise GraphError(f"{len(split.test)} test nodes are too few to hold out a fraction of {fraction}")
    return Split(split.train, split.val, split.test, held)


def subgraph(edge_index: Tensor, nodes: Tensor, num_nodes: int) -> Tensor:
    """The edges between ``nodes``, renumbered to positions in ``nodes``."""
    local = torch.full((num_nodes,), -1, dtype=torch.long)
    local[nodes] = torch.arange(len(nodes))
    keep = (local[edge_index[0]] >= 0) & (local[edge_index[1]] >= 0)
    return local[edge_index[:, keep]]
