"""Node-classification graphs: one in-memory :class:`Graph`, its checks, and the loaders.

Loaders: the Planetoid citation graphs (Cora, CiteSeer, PubMed) read offline from their raw files
(:func:`planetoid`), ``.npz`` files in the two common layouts (:func:`read_npz`) and networkx graphs
with node attributes (:func:`from_networkx`). Every loader returns a checked :class:`Graph`: edges
in range, features finite and as many as labels, at least one node, every class present. Self-loops
are dropped (the models and losses add their own) and duplicate edges merged; isolated nodes stay.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmkd.config import ConfigError

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


class GraphError(ConfigError):
    """A graph (or a split of it) that cannot be used; the message names the problem and the fix."""


@dataclass
class Graph:
    """A node-classification graph.

    Attributes:
        x: node features ``[nodes, features]``, float.
        edge_index: directed edges ``[2, edges]`` (source row 0, target row 1), int64.
        y: node labels ``[nodes]``, int64; a negative label marks a node without one.
        name: identifies the graph (part of its data sets' fingerprints).
        masks: splits that ship with the data (``train``/``val``/``test`` boolean ``[nodes]``), if any.
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


def planetoid(root: str | os.PathLike, name: str) -> Graph:
    """A Planetoid citation graph (Yang, Cohen and Salakhutdinov, ICML 2016) with its public split
    (20 labelled nodes per class for training, 500 for validation, 1,000 for test).

    Reads the raw files ``<root>/<Name>/raw/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}`` as
    ``torch_geometric.datasets.Planetoid`` does, without writing anything (``root`` may be read-only).
    """
    key = name.lower()
    if key not in PLANETOID:
        raise ConfigError(f"data.args.name: unknown Planetoid graph {name!r}; "
                          f"choose from: {', '.join(PLANETOID.values())}")
    raw = Path(root) / PLANETOID[key] / "raw"
    files = [f"ind.{key}.{f}" for f in PLANETOID_FILES]
    absent = [f for f in files if not (raw / f).is_file()]
    if absent:
        raise ConfigError(f"Planetoid {PLANETOID[key]}: missing {', '.join(absent)} in {raw}; "
                          f"put the raw files ({', '.join(files)}) there or set data_root / MMKD_DATA")
    from torch_geometric.io import read_planetoid_data

    d = read_planetoid_data(str(raw), key)
    g = check_graph(d.x, d.edge_index, d.y, PLANETOID[key])
    g.masks = {"train": d.train_mask, "val": d.val_mask, "test": d.test_mask}
    return g


def _csr(z: Any, prefix: str) -> np.ndarray:
    """The dense matrix of the CSR pieces ``<prefix>_{data,indices,indptr,shape}`` of an npz file."""
    import scipy.sparse as sp

    return sp.csr_matrix((z[f"{prefix}_data"], z[f"{prefix}_indices"], z[f"{prefix}_indptr"]),
                         shape=tuple(z[f"{prefix}_shape"]))


def read_npz(path: str | os.PathLike, undirected: bool = True) -> Graph:
    """A graph from an ``.npz`` file in either common layout:

    - the gnn-benchmark layout (Shchur et al. 2018): the adjacency as CSR pieces
      ``adj_data, adj_indices, adj_indptr, adj_shape``, features as ``attr_data, attr_indices,
      attr_indptr, attr_shape`` (or a dense ``attr_matrix``), ``labels`` and optional ``class_names``;
    - the node/edge-list layout: ``node_features [nodes, features]``, ``node_labels [nodes]``,
      ``edges [edges, 2]`` (or ``[2, edges]``) and optional ``train_masks``/``val_masks``/``test_masks``
      (``[nodes]``, or ``[splits, nodes]`` of which the first is used) shipped as the ``public`` split.

    ``undirected``: add the reverse of every edge (what GNNs on these graphs expect).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no graph file {str(path)!r}; give an .npz file under the data root")
    with np.load(path, allow_pickle=True) as z:
        keys = set(z.files)
        masks = {}
        if {"adj_data", "adj_indices", "adj_indptr", "adj_shape", "labels"} <= keys:
            adj = _csr(z, "adj").tocoo()
            edges = np.stack([adj.row, adj.col])
            if {"attr_data", "attr_indices", "attr_indptr", "attr_shape"} <= keys:
                x = _csr(z, "attr").toarray()
            elif "attr_matrix" in keys:
                x = z["attr_matrix"]
            else:
                raise GraphError(f"{path.name}: gnn-benchmark layout without features; expected attr_data, "
                                 f"attr_indices, attr_indptr, attr_shape or attr_matrix")
            y = z["labels"]
            names = [str(c) for c in z["class_names"]] if "class_names" in keys else []
        elif {"node_features", "node_labels", "edges"} <= keys:
            x, y, edges = z["node_features"], z["node_labels"], z["edges"]
            if edges.ndim == 2 and edges.shape[1] == 2:
                edges = edges.T
            names = []
            for part in ("train", "val", "test"):
                if f"{part}_masks" in keys:
                    m = torch.as_tensor(z[f"{part}_masks"]).bool()
                    masks[part] = m[0] if m.ndim == 2 else m
        else:
            raise GraphError(f"{path.name}: unknown npz layout (keys: {', '.join(sorted(keys))}); expected "
                             "adj_data/adj_indices/adj_indptr/adj_shape + attr_* + labels, or "
                             "node_features + node_labels + edges")
    x = torch.as_tensor(np.asarray(x, dtype=np.float32))
    edges = torch.as_tensor(np.asarray(edges, dtype=np.int64))
    g = check_graph(x, edges, torch.as_tensor(np.asarray(y, dtype=np.int64)), path.stem)
    if undirected:
        g.edge_index = to_undirected(g.edge_index, g.num_nodes)
    for part, m in masks.items():
        if m.shape != (g.num_nodes,):
            raise GraphError(f"{path.name}: {part}_masks has shape {tuple(m.shape)}; expected ({g.num_nodes},)")
    g.masks, g.class_names = masks, names
    return g


def from_networkx(nx_graph, x: str = "x", y: str = "y", name: str = "networkx",
                  undirected: bool = True) -> Graph:
    """A graph from a networkx graph whose nodes carry a feature vector (attribute ``x``) and a label
    (attribute ``y``). Nodes are numbered in ``nx_graph.nodes`` order."""
    nodes = list(nx_graph.nodes)
    ids = {v: i for i, v in enumerate(nodes)}
    feats, labels = [], []
    for v in nodes:
        attrs = nx_graph.nodes[v]
        for key in (x, y):
            if key not in attrs:
                raise GraphError(f"{name}: node {v!r} has no attribute {key!r}; every node needs "
                                 f"features ({x!r}) and a label ({y!r})")
        feats.append(torch.as_tensor(np.asarray(attrs[x], dtype=np.float32)).reshape(-1))
        labels.append(int(attrs[y]))
    if not nodes:
        raise GraphError(f"{name}: the graph is empty (no nodes)")
    widths = {len(f) for f in feats}
    if len(widths) != 1:
        raise GraphError(f"{name}: node feature vectors differ in length: {sorted(widths)}")
    edges = torch.tensor([[ids[u], ids[v]] for u, v in nx_graph.edges], dtype=torch.long).reshape(-1, 2).T
    g = check_graph(torch.stack(feats), edges, torch.tensor(labels), name)
    if undirected:
        g.edge_index = to_undirected(g.edge_index, g.num_nodes)
    return g
