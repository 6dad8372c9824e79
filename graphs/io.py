"""Graph readers: files and networkx graphs -> a checked :class:`~mmkd.graphs.data.Graph`.

The Planetoid citation graphs (Cora, CiteSeer, PubMed) read offline from their raw files
(:func:`planetoid`), ``.npz`` files in the two common layouts (:func:`read_npz`) and networkx graphs
with node attributes (:func:`from_networkx`). Every reader returns a graph checked by
:func:`~mmkd.graphs.data.check_graph`: edges in range, features finite and as many as labels, at least
one node, every class present; self-loops dropped and duplicate edges merged; isolated nodes stay.
``.npz`` files are read without pickle (``allow_pickle=False``: unpickling can run code), so every
array in them, class names included, must be a plain numeric or string array.
"""
from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mmkd.config import ConfigError
from mmkd.graphs.data import Graph, GraphError, check_graph, check_masks, to_undirected
from mmkd.io import first_line

PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")


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
_REWRITE = "write it again with np.savez (see graphs/io.py::read_npz for the layouts)"


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
    return torch.as_tensor(a.astype(bool))


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


def _class_names(z: Any, where: str) -> list[str]:
    """The ``class_names`` string array of an npz file as a list (either layout)."""
    c = _array(z, "class_names", where)
    if c.dtype.kind not in "US" or c.ndim != 1:
        raise GraphError(f"{where}: class_names must be a 1-d string array, got dtype {c.dtype} and "
                         f"shape {c.shape}; store class_names as a string array (np.array(names, dtype=str))")
    return [v.decode() if isinstance(v, bytes) else str(v) for v in c.tolist()]


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
      (``[nodes]``, or several splits as ``[splits, nodes]`` or ``[nodes, splits]``; ``data.args.split_index``
      picks one) shipped as the ``public`` split,
      and optional ``class_names``.

    Class names found in the file become the data set's ``class_names`` (what ``mmkd predict``
    writes); there must be at least one per class.

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
        elif {"node_features", "node_labels", "edges"} <= keys:
            x = _features(_array(z, "node_features", where), "node_features", where)
            y = _labels(_array(z, "node_labels", where), "node_labels", where)
            edges = _ints(_array(z, "edges", where), "edges", where)
            if edges.ndim == 2 and edges.shape[1] == 2:
                edges = edges.T
            for part in ("train", "val", "test"):
                if f"{part}_masks" in keys:
                    masks[part] = _mask(_array(z, f"{part}_masks", where), f"{part}_masks", where)
        else:
            raise GraphError(f"{where}: unknown npz layout (keys: {', '.join(sorted(keys))}); expected "
                             "adj_data/adj_indices/adj_indptr/adj_shape + attr_* + labels, or "
                             "node_features + node_labels + edges")
        names = _class_names(z, where) if "class_names" in keys else []
    try:
        g = check_graph(torch.as_tensor(x), torch.as_tensor(edges), torch.as_tensor(y), path.stem)
        n = g.num_nodes
        for part, m in masks.items():
            if m.ndim == 2 and m.shape[0] == n != m.shape[1]:  # [nodes, splits], as Geom-GCN's files
                masks[part] = m = m.T.contiguous()
            if m.ndim not in (1, 2) or m.shape[-1] != n:
                raise GraphError(f"{part}_masks has shape {tuple(m.shape)}; expected ({n},) or (splits, {n})")
        check_masks(masks, n, path.stem)
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
