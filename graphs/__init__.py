"""Graph data, GNN teachers and GNN-to-MLP distillation (installed as ``mmkd.graphs``).

Importing it registers the GNN models (``gcn``, ``sage``, ``gat``, ``appnp``), the graph data sets
(``planetoid``, ``cora``, ``citeseer``, ``pubmed``, ``npz``, ``text_graph``, ``csbm``), the graph losses (``glnn``,
``ffg2m_lfd``, ``ffg2m_hfd``) and the ``sentence_embedding`` text step (``mmkd.preprocess``).

Modules, as in PyG: ``data`` (the in-memory :class:`Graph` container and its checks), ``io`` (the
readers: Planetoid raw files, ``.npz`` files, networkx graphs), ``datasets`` (the torch data sets and
their registered factories), ``splits`` and ``sampling`` (node splits, neighbour sampling), ``models``
(the GNN teachers), ``glnn`` and ``ffg2m`` (the losses), ``text_graph`` (text-attributed graphs:
node tables and edge lists, sentence-embedding features), ``synthetic`` (generated graphs of known
structure: the contextual stochastic block model), ``dgl`` (DGL interop, optional).
"""
from mmkd.graphs import datasets, ffg2m, glnn, models, synthetic, text_graph  # noqa: F401  (registration)
from mmkd.graphs.data import Graph, GraphError, check_graph
from mmkd.graphs.io import from_networkx, planetoid, read_npz
from mmkd.graphs.datasets import FullGraph, NeighborGraph, graph_splits

__all__ = ["Graph", "GraphError", "check_graph", "from_networkx", "planetoid", "read_npz",
           "FullGraph", "NeighborGraph", "graph_splits"]
