"""DGL interop: DGL graphs to and from mmkd's :class:`~mmkd.graphs.data.Graph`, a data set ``dgl``
reading graphs saved with ``dgl.save_graphs``, and a GCN teacher on DGL's ``GraphConv`` (``dgl_gcn``).

This is the only module that imports ``dgl``, and only when a function here needs it (the optional
extra: ``pip install 'mmkd[dgl]'``). dgl 2.1.0, the newest Linux wheel, imports ``dgl.graphbolt`` on
``import dgl``; graphbolt cannot load with the torch mmkd uses (its Python code imports
``torchdata.datapipes``, gone since torchdata 0.10, and its C++ library ships for torch 2.0-2.2 only),
so :func:`import_dgl` places an empty stub ``dgl.graphbolt`` module in ``sys.modules`` first. Only
graphbolt (DGL's newer data-loading pipeline) is lost. DGL finds no ``tensoradapter`` library for this
torch version either, so its C++ arrays use DGL's own allocator rather than torch's (it logs this at
debug level); results are unaffected. The PyPI wheel is CPU-only: train ``dgl_gcn`` with
``trainer.device=cpu``.
"""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.config import ConfigError
from mmkd.data import DataSplits
from mmkd.graphs.data import Graph, GraphError, check_graph
from mmkd.graphs.datasets import GRAPH_RANGES, graph_splits
from mmkd.graphs.models import GNN_RANGES, widths
from mmkd.registry import DATASETS, MODELS


def import_dgl() -> Any:
    """``import dgl`` behind the ``dgl.graphbolt`` stub; a clear error when dgl is not installed."""
    if "dgl" not in sys.modules:
        if importlib.util.find_spec("dgl") is None:
            raise ImportError("DGL interop needs the dgl extra: pip install 'mmkd[dgl]'")
        sys.modules.setdefault("dgl.graphbolt", types.ModuleType("dgl.graphbolt"))
    import dgl

    return dgl


def from_dgl(g: Any, x: str = "feat", y: str = "label", name: str = "dgl") -> Graph:
    """A :class:`Graph` from a homogeneous ``DGLGraph`` whose node data hold features under ``x`` and
    labels under ``y``; boolean ``train_mask``/``val_mask``/``test_mask`` node data become its masks.

    Edges keep their direction (``src -> dst`` is ``edge_index[0] -> edge_index[1]``); as for every
    loader, self-loops are dropped and duplicate edges merged.
    """
    if len(g.ntypes) != 1 or len(g.etypes) != 1:
        raise GraphError(f"{name}: a heterogeneous DGL graph (node types {g.ntypes}, edge types {g.etypes}); "
                         "convert it with dgl.to_homogeneous first")
    for key in (x, y):
        if key not in g.ndata:
            raise GraphError(f"{name}: the DGL graph has no node data {key!r}; it has: {', '.join(g.ndata) or 'none'}")
    src, dst = g.edges()
    graph = check_graph(g.ndata[x], torch.stack([src, dst]), g.ndata[y], name)
    graph.masks = {part: g.ndata[f"{part}_mask"].bool() for part in ("train", "val", "test")
                   if f"{part}_mask" in g.ndata}
    return graph


def to_dgl(graph: Graph) -> Any:
    """A ``DGLGraph`` holding ``graph``: node data ``feat``, ``label`` and ``<split>_mask``."""
    dgl = import_dgl()
    g = dgl.graph((graph.edge_index[0], graph.edge_index[1]), num_nodes=graph.num_nodes)
    g.ndata["feat"], g.ndata["label"] = graph.x, graph.y
    for part, mask in graph.masks.items():
        g.ndata[f"{part}_mask"] = mask
    return g


@DATASETS.register("dgl", ranges=GRAPH_RANGES)
def dgl_splits(root: str, path: str, feat: str = "feat", label: str = "label", **kwargs) -> DataSplits:
    """The first graph of a file written by ``dgl.save_graphs`` (``path``, relative to the data root
    unless absolute), converted by :func:`from_dgl` with node data ``feat`` and ``label``; ``kwargs`` go
    to :func:`~mmkd.graphs.datasets.graph_splits` (default split: ``public`` when the graph has
    ``train_mask``/``val_mask``/``test_mask``, else ``glnn``). In Python, a ``DGLGraph`` ``g`` in
    memory is ``graph_splits(from_dgl(g), ...)``."""
    file = Path(root) / path
    if not file.is_file():
        raise ConfigError(f"data.args.path: no DGL graph file {str(file)!r}; write one with dgl.save_graphs "
                          f"into {str(file.parent)!r} or set data_root / MMKD_DATA")
    graphs, _ = import_dgl().load_graphs(str(file))
    g = from_dgl(graphs[0], feat, label, file.stem)
    return graph_splits(g, **kwargs)


@MODELS.register("dgl_gcn", ranges=GNN_RANGES)
class DGLGCN(nn.Module):
    """GCN (Kipf and Welling, ICLR 2017) on DGL's ``GraphConv``: per layer
    ``H' = D^-1/2 (A + I) D^-1/2 H W + b``, ReLU and dropout between layers.

    ``forward(x, edge_index)`` like the PyG teachers (``gcn``, ``sage``, ...): the DGL graph with
    self-loops is built from ``edge_index`` on every call. DGL normalises the source side by
    out-degree and the target side by in-degree, which is the formula above on undirected graphs.
    """

    def __init__(self, num_classes: int, in_shape, hidden: int = 64, layers: int = 2, dropout: float = 0.5):
        super().__init__()
        conv = import_dgl().nn.GraphConv
        w = widths(in_shape, hidden, num_classes, layers)
        self.convs = nn.ModuleList(conv(a, b, norm="both") for a, b in zip(w, w[1:]))
        self.dropout = dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        dgl = import_dgl()
        g = dgl.graph((edge_index[0], edge_index[1]), num_nodes=x.shape[0])
        g = dgl.add_self_loop(dgl.remove_self_loop(g))
        for i, conv in enumerate(self.convs):
            x = conv(g, F.dropout(x, self.dropout, self.training))
            if i < len(self.convs) - 1:
                x = F.relu(x)
        return x
