"""Node-classification graphs: one in-memory :class:`Graph`, its checks, and the loaders.

Loaders: the Planetoid citation graphs (Cora, CiteSeer, PubMed) read offline from their raw files
(:func:`planetoid`), ``.npz`` files in the two common layouts (:func:`read_npz`) and networkx graphs
with node attributes (:func:`from_networkx`). Every loader returns a checked :class:`Graph`: edges
in range, features finite and as many as labels, at least one node, every class present. Self-loops
are dropped (the models and losses add their own) and duplicate edges merged; isolated nodes stay.
``.npz`` files are read without pickle (``allow_pickle=False``: unpickling can run code), so every
array in them, class names included, must be a plain numeric or string array.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmkd.config import ConfigError
from mmkd.data import DataError
from mmkd.io import first_line

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


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


def check_masks(masks: dict[str, Tensor], n: int, name: str = "graph") -> None:
    """Raise :class:`GraphError` unless every mask is boolean ``[n]`` and no node is in two parts
    (``train``/``val``/``test``); identical train and validation masks are named as such."""
    for part, m in masks.items():
        if m.dtype != torch.bool or m.shape != (n,):
            raise GraphError(f"{name}: the {part} mask has shape {tuple(m.shape)} and dtype {m.dtype}; "
                             f"expected a boolean mask of shape ({n},)")
    if "train" in masks and "val" in masks and torch.equal(masks["train"], masks["val"]):
        raise GraphError(f"{name}: the train and val masks are identical ({int(masks['train'].sum())} nodes), so "
                         f"validation would score the training nodes; give disjoint splits or use data.args.split=glnn")
    parts = [p for p in ("train", "val", "test") if p in masks]
    for i, a in enumerate(parts):
        for b in parts[i + 1:]:
            both = masks[a] & masks[b]
            if both.any():
                raise GraphError(f"{name}: {int(both.sum())} nodes are in both the {a} and the {b} mask (first: node "
                                 f"{int(both.nonzero()[0])}); give disjoint splits or use data.args.split=glnn")


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


# what reading an npz file or one of its arrays raises on a damaged or foreign file
_READ_ERRORS = (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)
_REWRITE = "write it again with np.savez (see graphs/data.py::read_npz for the layouts)"


def _array(z: Any, key: str, where: str) -> np.ndarray:
    """``z[key]`` read without pickle; an object array (which only pickle can read) or a damaged
    entry is a one-line :class:`GraphError`."""
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            fix = ("store class_names as a string array (np.array(names, dtype=str))" if key == "class_names"
                   else f"store {key} as a plain numeric array")
            raise GraphError(f"{where}: {key} is an object array, which only pickle can read (unpickling an "
                             f"untrusted file can run code), so it is refused; {fix}") from None
        raise GraphError(f"{where}: cannot read {key} ({first_line(e)}); {_REWRITE}") from None
    except _READ_ERRORS as e:
        raise GraphError(f"{where}: cannot read {key} ({first_line(e)}); {_REWRITE}") from None


def _ints(a: np.ndarray, key: str, where: str) -> np.ndarray:
    """``a`` as int64 if it holds integers; floats (which a cast would silently truncate), strings
    and anything else are a :class:`GraphError`."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    raise GraphError(f"{where}: {key} must hold integer node ids or counts, got dtype {a.dtype}; "
                     f"store it as an integer array ({key}.astype(np.int64)), never as floats or strings")


def _labels(a: np.ndarray, key: str, where: str) -> np.ndarray:
    """Integer class ids (floats only where every value is a whole number); strings are refused."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return a.astype(np.int64)
    if a.dtype.kind == "f" and np.isfinite(a).all() and (a == np.round(a)).all():
        return a.astype(np.int64)
    what = "strings" if a.dtype.kind in "US" else f"dtype {a.dtype}"
    if a.dtype.kind == "f":
        what = "fractional or non-finite floats"
    raise GraphError(f"{where}: {key} must hold integer class ids 0..C-1 (negative: unlabelled), got {what}; "
                     f"map each class to its id and store the names as class_names (np.array(names, dtype=str))")


def _features(a: np.ndarray, key: str, where: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind not in "biuf":
        raise GraphError(f"{where}: {key} must hold numbers, got dtype {a.dtype}; store the node features "
                         f"as a float array")
    return a.astype(np.float32)


def _mask(a: np.ndarray, key: str, where: str) -> Tensor:
    a = np.asarray(a)
    if a.dtype.kind != "b" and not (a.dtype.kind in "iuf" and np.isin(a, (0, 1)).all()):
        raise GraphError(f"{where}: {key} must be a boolean mask (or 0/1), got dtype {a.dtype}; "
                         f"store it as np.array(mask, dtype=bool)")
    m = torch.as_tensor(a.astype(bool))
    return m[0] if m.ndim == 2 else m


def _csr(z: Any, prefix: str, where: str) -> Any:
    """The CSR matrix of the pieces ``<prefix>_{data,indices,indptr,shape}`` of an npz file (index
    arrays must be integers)."""
    import scipy.sparse as sp

    data = _array(z, f"{prefix}_data", where)
    indices, indptr, shape = (_ints(_array(z, f"{prefix}_{k}", where), f"{prefix}_{k}", where)
                              for k in ("indices", "indptr", "shape"))
    if data.dtype.kind not in "biuf":
        raise GraphError(f"{where}: {prefix}_data must hold numbers, got dtype {data.dtype}; store it as a float array")
    if shape.shape != (2,):
        raise GraphError(f"{where}: {prefix}_shape must be two integers (rows, columns), got {shape.tolist()}; "
                         f"store matrix.shape")
    try:
        m = sp.csr_matrix((data, indices, indptr), shape=tuple(int(v) for v in shape))
        m.check_format(full_check=True)  # indices in range, indptr non-decreasing
        return m
    except ValueError as e:
        raise GraphError(f"{where}: the {prefix}_* pieces are not a valid CSR matrix ({first_line(e)}); "
                         f"store matrix.data, .indices, .indptr and .shape of one scipy.sparse.csr_matrix") from None


def _open_npz(path: Path) -> Any:
    """``np.load(path, allow_pickle=False)`` as an archive of named arrays, or a :class:`GraphError`."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise GraphError(f"{path}: the file is empty (0 bytes); {_REWRITE}")
    if head == b"\x93NUM":
        raise GraphError(f"{path}: holds a single array (.npy), not an .npz archive of named arrays; {_REWRITE}")
    if head[:2] != b"PK":
        raise GraphError(f"{path}: not an .npz file (an .npz is a zip archive of arrays; this file starts with "
                         f"{head!r}); {_REWRITE}")
    try:
        z = np.load(path, allow_pickle=False)
    except _READ_ERRORS as e:
        raise GraphError(f"{path}: cannot read it as an .npz archive ({first_line(e)}); {_REWRITE}") from None
    if not hasattr(z, "files"):
        raise GraphError(f"{path}: holds a single array (.npy), not an .npz archive of named arrays; {_REWRITE}")
    if not z.files:
        z.close()
        raise GraphError(f"{path}: the .npz archive holds no arrays; {_REWRITE}")
    return z


def read_npz(path: str | os.PathLike, undirected: bool = True) -> Graph:
    """A graph from an ``.npz`` file in either common layout:

    - the gnn-benchmark layout (Shchur et al. 2018): the adjacency as CSR pieces
      ``adj_data, adj_indices, adj_indptr, adj_shape``, features as ``attr_data, attr_indices,
      attr_indptr, attr_shape`` (or a dense ``attr_matrix``), ``labels`` and optional ``class_names``
      (a string array);
    - the node/edge-list layout: ``node_features [nodes, features]``, ``node_labels [nodes]``,
      ``edges [edges, 2]`` (or ``[2, edges]``) and optional ``train_masks``/``val_masks``/``test_masks``
      (``[nodes]``, or ``[splits, nodes]`` of which the first is used) shipped as the ``public`` split.

    The file is read without pickle; node ids and labels must be integers (never cast from floats
    or strings), masks boolean and disjoint. Any problem is a one-line :class:`GraphError` (a
    :class:`mmkd.data.DataError`) naming the file.

    ``undirected``: add the reverse of every edge (what GNNs on these graphs expect).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no graph file {str(path)!r}; give an .npz file under the data root")
    where = str(path)
    with _open_npz(path) as z:
        keys = set(z.files)
        masks = {}
        if {"adj_data", "adj_indices", "adj_indptr", "adj_shape", "labels"} <= keys:
            adj = _csr(z, "adj", where).tocoo()
            edges = np.stack([adj.row, adj.col]).astype(np.int64)
            if {"attr_data", "attr_indices", "attr_indptr", "attr_shape"} <= keys:
                x = _features(_csr(z, "attr", where).toarray(), "attr_data", where)
            elif "attr_matrix" in keys:
                x = _features(_array(z, "attr_matrix", where), "attr_matrix", where)
            else:
                raise GraphError(f"{where}: gnn-benchmark layout without features; expected attr_data, "
                                 f"attr_indices, attr_indptr, attr_shape or attr_matrix")
            y = _labels(_array(z, "labels", where), "labels", where)
            names = []
            if "class_names" in keys:
                c = _array(z, "class_names", where)
                if c.dtype.kind not in "US" or c.ndim != 1:
                    raise GraphError(f"{where}: class_names must be a 1-d string array, got dtype {c.dtype} and "
                                     f"shape {c.shape}; store class_names as a string array (np.array(names, dtype=str))")
                names = [v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist()]
        elif {"node_features", "node_labels", "edges"} <= keys:
            x = _features(_array(z, "node_features", where), "node_features", where)
            y = _labels(_array(z, "node_labels", where), "node_labels", where)
            edges = _ints(_array(z, "edges", where), "edges", where)
            if edges.ndim == 2 and edges.shape[1] == 2:
                edges = edges.T
            names = []
            for part in ("train", "val", "test"):
                if f"{part}_masks" in keys:
                    masks[part] = _mask(_array(z, f"{part}_masks", where), f"{part}_masks", where)
        else:
            raise GraphError(f"{where}: unknown npz layout (keys: {', '.join(sorted(keys))}); expected "
                             "adj_data/adj_indices/adj_indptr/adj_shape + attr_* + labels, or "
                             "node_features + node_labels + edges")
    try:
        g = check_graph(torch.as_tensor(x), torch.as_tensor(edges), torch.as_tensor(y), path.stem)
        for part, m in masks.items():
            if m.shape != (g.num_nodes,):
                raise GraphError(f"{part}_masks has shape {tuple(m.shape)}; expected ({g.num_nodes},)")
        check_masks(masks, g.num_nodes, path.stem)
    except GraphError as e:  # name the file, not only the graph
        raise GraphError(f"{where}: {str(e).removeprefix(f'{path.stem}: ')}") from None
    if undirected:
        g.edge_index = to_undirected(g.edge_index, g.num_nodes)
    if names and len(names) < g.num_classes:
        raise GraphError(f"{where}: {len(names)} class_names for {g.num_classes} classes; give one name per class")
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
