"""Node-classification graphs in memory: the :class:`Graph` container and its checks.

:func:`check_graph` builds a checked :class:`Graph` from raw tensors: edges in range, features finite
and as many as labels, at least one node, every class present. Self-loops are dropped (the models and
losses add their own) and duplicate edges merged; isolated nodes stay. :func:`check_masks` checks the
splits shipped with a graph, :func:`to_undirected` adds the reverse edges. The file readers are in
:mod:`mmkd.graphs.io`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mmkd.config import ConfigError
from mmkd.data import DataError


class GraphError(DataError):
    """A graph (or a split of it) that cannot be used: bad input data, so a :class:`mmkd.data.DataError`
    (config mistakes, such as an unknown Planetoid name, stay :class:`mmkd.config.ConfigError`); the
    message names the problem and the fix."""


@dataclass
class Graph:
    """A node-classification graph.

    Attributes:
        x: node features ``[nodes, features]``, float.
        edge_index: directed edges ``[2, edges]`` (source row 0, target row 1), int64.
        y: node labels ``[nodes]``, int64; a negative label marks a node without one.
        name: identifies the graph (part of its data sets' fingerprints).
        masks: splits that ship with the data (``train``/``val``/``test`` boolean ``[nodes]``, or
            ``[splits, nodes]`` for a file that ships several, as the heterophilous benchmarks'
            ten), if any; :meth:`split` picks one.
        class_names: one name per class, if known.
    """

    x: Tensor
    edge_index: Tensor
    y: Tensor
    name: str = "graph"
    masks: dict[str, Tensor] = field(default_factory=dict)
    class_names: list[str] = field(default_factory=list)

    @property
    def num_nodes(self) -> int:
        """Number of nodes."""
        return self.x.shape[0]

    @property
    def num_classes(self) -> int:
        """``max(label) + 1``."""
        return int(self.y.max()) + 1

    @property
    def num_splits(self) -> int:
        """How many train/val/test splits ship with the graph (0 without masks)."""
        return max((m.shape[0] if m.ndim == 2 else 1 for m in self.masks.values()), default=0)

    def split(self, index: int = 0) -> dict[str, Tensor]:
        """The ``index``-th shipped split's masks, each ``[nodes]`` (a part that ships one mask serves
        every split); a :class:`~mmkd.config.ConfigError` naming ``data.args.split_index`` when there
        is no such split."""
        k = self.num_splits
        if not 0 <= index < max(k, 1):
            have = f"ships {k} splits (split_index 0-{k - 1})" if k > 1 else f"ships {'one split' if k else 'no split'}"
            raise ConfigError(f"data.args.split_index={index}: {self.name} {have}; choose an index in that range")
        return {p: m[index] if m.ndim == 2 else m for p, m in self.masks.items()}


def check_graph(x: Tensor, edge_index: Tensor, y: Tensor, name: str = "graph") -> Graph:
    """A :class:`Graph` from raw tensors, after checking them; raises :class:`GraphError`.

    Self-loops are removed and duplicate edges merged (both are handled, not rejected); isolated
    nodes are kept. Features become float32, edges and labels int64.
    """
    x, edge_index, y = torch.as_tensor(x), torch.as_tensor(edge_index), torch.as_tensor(y)
    if x.ndim != 2:
        raise GraphError(f"{name}: node features must be [nodes, features], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n == 0:
        raise GraphError(f"{name}: the graph is empty (no nodes)")
    if x.shape[1] == 0:
        raise GraphError(f"{name}: the nodes have no features (shape {tuple(x.shape)})")
    if y.ndim != 1 or len(y) != n:
        raise GraphError(f"{name}: {n} nodes have features but labels have shape {tuple(y.shape)}; "
                         f"give one label per node")
    x = x.float()
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        raise GraphError(f"{name}: {int(bad.sum())} nodes have NaN or infinite features "
                         f"(first: node {int(bad.nonzero()[0])}); clean or impute them first")
    if edge_index.ndim != 2 or edge_index.shape[0] != 2:
        raise GraphError(f"{name}: edge index must be [2, edges], got shape {tuple(edge_index.shape)}")
    if edge_index.is_floating_point():
        raise GraphError(f"{name}: edge index must hold integers, got {edge_index.dtype}")
    edge_index = edge_index.long()
    out = (edge_index < 0) | (edge_index >= n)
    if out.any():
        col = int(out.any(0).nonzero()[0])
        raise GraphError(f"{name}: edge {col} ({int(edge_index[0, col])} -> {int(edge_index[1, col])}) "
                         f"points outside the {n} nodes; node ids must be in [0, {n - 1}] "
                         f"({int(out.any(0).sum())} such edges)")
    y = y.long()
    labelled = y[y >= 0]
    if len(labelled) == 0:
        raise GraphError(f"{name}: no node has a label")
    missing = sorted(set(range(int(labelled.max()) + 1)) - set(labelled.unique().tolist()))
    if missing:
        raise GraphError(f"{name}: class {missing[0]} has no labelled node (labels must be 0..C-1 with "
                         f"every class present; missing: {missing})")
    edge_index = edge_index[:, edge_index[0] != edge_index[1]]
    edge_index = torch.unique(edge_index[0] * n + edge_index[1])  # sorted by source, then target
    return Graph(x, torch.stack([edge_index // n, edge_index % n]), y, name)


def to_undirected(edge_index: Tensor, n: int) -> Tensor:
    """Both directions of every edge, duplicates merged, sorted by source then target."""
    ids = torch.unique(torch.cat([edge_index[0] * n + edge_index[1], edge_index[1] * n + edge_index[0]]))
    return torch.stack([ids // n, ids % n])


def check_masks(masks: dict[str, Tensor], n: int, name: str = "graph") -> None:
    """Raise :class:`GraphError` unless every mask is boolean ``[n]`` or ``[splits, n]`` (the same
    ``splits`` for all) and, in each split, no node is in two parts (``train``/``val``/``test``);
    identical train and validation masks are named as such."""
    splits = {m.shape[0] for m in masks.values() if m.ndim == 2}
    for part, m in masks.items():
        if m.dtype != torch.bool or m.ndim not in (1, 2) or m.shape[-1] != n:
            raise GraphError(f"{name}: the {part} mask has shape {tuple(m.shape)} and dtype {m.dtype}; "
                             f"expected a boolean mask of shape ({n},) or (splits, {n})")
    if len(splits) > 1:
        shapes = ", ".join(f"{p} {tuple(m.shape)}" for p, m in masks.items())
        raise GraphError(f"{name}: the masks ship different numbers of splits ({shapes}); give each part the same")
    for i in range(max(splits, default=1)):
        one = {p: m[i] if m.ndim == 2 else m for p, m in masks.items()}
        at = f" (split {i})" if splits else ""
        if "train" in one and "val" in one and torch.equal(one["train"], one["val"]):
            raise GraphError(f"{name}: the train and val masks are identical{at} ({int(one['train'].sum())} nodes), so "
                             f"validation would score the training nodes; give disjoint splits or use data.args.split=glnn")
        parts = [p for p in ("train", "val", "test") if p in one]
        for j, a in enumerate(parts):
            for b in parts[j + 1:]:
                both = one[a] & one[b]
                if both.any():
                    raise GraphError(f"{name}: {int(both.sum())} nodes are in both the {a} and the {b} mask{at} (first: "
                                     f"node {int(both.nonzero()[0])}); give disjoint splits or use data.args.split=glnn")