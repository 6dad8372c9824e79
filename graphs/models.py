"""GNN teachers on PyG, registered by name: ``gcn``, ``sage``, ``gat``, ``appnp``.

Every model's forward is ``forward(x, edge_index) -> logits [nodes, classes]`` (a config lists
``inputs: [x, edge_index]``). Factories take ``num_classes``, ``in_shape`` (``(features,)``, or the
data set's per-key shapes ``{"x": (features,), "edge_index": ...}`` when the model reads several
keys) and ``hidden`` (the width of the hidden layers), plus their own arguments.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import APPNP as APPNPProp
from torch_geometric.nn import GATConv, GCNConv, SAGEConv
from torch_geometric.utils import add_self_loops, remove_self_loops

from mmkd.checks import COUNT, FRACTION, PROBABILITY
from mmkd.registry import MODELS


def in_features(in_shape: Sequence[int] | Mapping[str, Sequence[int]]) -> int:
    """The node-feature width from a model factory's ``in_shape``."""
    shape = in_shape["x"] if isinstance(in_shape, Mapping) else in_shape
    if len(shape) != 1:
        raise ValueError(f"GNN models read node features of shape (features,), got in_shape {tuple(shape)}")
    return int(shape[0])


ACTIVATIONS = {"relu": F.relu, "elu": F.elu}


class MessagePassingNet(nn.Module):
    """A stack of graph convolutions ``convs`` with ``activation`` and dropout between them; with
    ``input_dropout`` the node features are dropped out too, before the first convolution."""

    def __init__(self, convs: list[nn.Module], dropout: float, activation: str = "relu",
                 input_dropout: bool = True):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        self.convs = nn.ModuleList(convs)
        self.dropout = dropout
        self.act = ACTIVATIONS[activation]
        self.input_dropout = input_dropout

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for i, conv in enumerate(self.convs):
            if i or self.input_dropout:
                x = F.dropout(x, self.dropout, self.training)
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = self.act(x)
        return x


def widths(in_shape, hidden: int, num_classes: int, layers: int) -> list[int]:
    """Input width, ``layers - 1`` hidden widths, output width."""
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    return [in_features(in_shape), *[hidden] * (layers - 1), num_classes]


GNN_RANGES = {"hidden": COUNT, "layers": COUNT, "dropout": PROBABILITY}  # what every GNN here accepts


@MODELS.register("gcn", ranges=GNN_RANGES)
class GCN(MessagePassingNet):
    """Kipf and Welling, "Semi-Supervised Classification with Graph Convolutional Networks", ICLR 2017:
    ``H' = D^-1/2 (A + I) D^-1/2 H W`` per layer (symmetric normalisation with self-loops).
    ``input_dropout=False`` drops out between layers only, as DGL's ``GraphConv`` stacks do."""

    def __init__(self, num_classes: int, in_shape, hidden: int = 64, layers: int = 2, dropout: float = 0.5,
                 input_dropout: bool = True):
        w = widths(in_shape, hidden, num_classes, layers)
        super().__init__([GCNConv(a, b) for a, b in zip(w, w[1:])], dropout, input_dropout=input_dropout)


class GCNAggregation(SAGEConv):
    """GraphSAGE's GCN aggregator: ``h_i' = W mean_{j in N(i) + {i}} h_j + b``, the mean over the
    neighbours and the node itself, ``(h_i + sum_j h_j) / (deg_i + 1)`` (DGL's ``aggregator_type='gcn'``)."""

    def __init__(self, a: int, b: int):
        super().__init__(a, b, aggr="mean", root_weight=False)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return super().forward(x, add_self_loops(remove_self_loops(edge_index)[0], num_nodes=x.size(0))[0])


@MODELS.register("sage", ranges=GNN_RANGES)
class SAGE(MessagePassingNet):
    """GraphSAGE (Hamilton, Ying and Leskovec, NeurIPS 2017): ``h_i' = W1 h_i + W2 agg_{j in N(i)} h_j``
    with ``aggr`` (``mean`` by default; any PyG aggregation), or ``aggr="gcn"``: ``h_i' = W
    mean_{j in N(i) + {i}} h_j``. ``input_dropout=False`` drops out between layers only."""

    def __init__(self, num_classes: int, in_shape, hidden: int = 64, layers: int = 2, dropout: float = 0.5,
                 aggr: str = "mean", input_dropout: bool = True):
        w = widths(in_shape, hidden, num_classes, layers)
        conv = GCNAggregation if aggr == "gcn" else lambda a, b: SAGEConv(a, b, aggr=aggr)
        super().__init__([conv(a, b) for a, b in zip(w, w[1:])], dropout, input_dropout=input_dropout)


@MODELS.register("gat", ranges={**GNN_RANGES, "heads": COUNT, "attn_dropout": PROBABILITY})
class GAT(MessagePassingNet):
    """Graph attention (Velickovic et al., ICLR 2018): hidden layers of ``heads`` attention heads of
    width ``hidden // heads`` (concatenated, then ``activation``: ELU as in the paper, or ReLU), one
    head on the output layer."""

    def __init__(self, num_classes: int, in_shape, hidden: int = 64, layers: int = 2, dropout: float = 0.6,
                 heads: int = 8, attn_dropout: float = 0.6, activation: str = "elu"):
        if hidden % heads:
            raise ValueError(f"gat: hidden ({hidden}) must be a multiple of heads ({heads})")
        w = widths(in_shape, hidden, num_classes, layers)
        convs = [GATConv(a, hidden // heads, heads=heads, dropout=attn_dropout) for a in w[:-2]]
        convs.append(GATConv(w[-2], num_classes, heads=1, dropout=attn_dropout))
        super().__init__(convs, dropout, activation)


@MODELS.register("appnp", ranges={**GNN_RANGES, "k": COUNT, "alpha": FRACTION})
class APPNP(nn.Module):
    """Klicpera, Bojchevski and Guennemann, "Predict then Propagate", ICLR 2019: an MLP predicts
    ``H = f(X)``, then ``K`` steps of personalised PageRank ``Z <- (1 - alpha) A_hat Z + alpha H``."""

    def __init__(self, num_classes: int, in_shape, hidden: int = 64, layers: int = 2, dropout: float = 0.5,
                 k: int = 10, alpha: float = 0.1):
        super().__init__()
        w = widths(in_shape, hidden, num_classes, layers)
        self.lins = nn.ModuleList(nn.Linear(a, b) for a, b in zip(w, w[1:]))
        self.dropout = dropout
        self.prop = APPNPProp(k, alpha)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        for i, lin in enumerate(self.lins):
            x = lin(F.dropout(x, self.dropout, self.training))
            if i < len(self.lins) - 1:
                x = F.relu(x)
        return self.prop(x, edge_index)
