"""Graph data, GNN teachers and GNN-to-MLP distillation (installed as ``mmkd.graphs``).

Importing it registers the GNN models (``gcn``, ``sage``, ``gat``, ``appnp``), the graph data sets
(``planetoid``, ``cora``, ``citeseer``, ``pubmed``, ``npz``) and the graph losses (``glnn``,
``ffg2m_lfd``, ``ffg2m_hfd``).
"""
from mmkd.graphs import datasets, ffg2m, glnn, models  # noqa: F401  (registration)
from mmkd.graphs.data import Graph, GraphError, check_graph, from_networkx, planetoid, read_npz
from mmkd.graphs.datasets import FullGraph, NeighborGraph, graph_splits

__all__ = ["Graph", "GraphError", "check_graph", "from_networkx", "planetoid", "read_npz",
           "FullGraph", "NeighborGraph", "graph_splits"]
