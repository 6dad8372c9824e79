"""The GNN teachers' options that the official FF-G2M settings need, against hand-written layers."""
import pytest
import torch
import torch.nn.functional as F

from mmkd.registry import MODELS

# a path 0-1-2 plus an isolated node 3, both directions, one duplicate self-loop on node 1
EDGES = torch.tensor([[0, 1, 1, 2, 1], [1, 0, 2, 1, 1]])


def neighbours(n: int) -> list[list[int]]:
    """Each node's in-neighbours, self-loops left out."""
    out = [[] for _ in range(n)]
    for s, d in EDGES.t().tolist():
        if s != d:
            out[d].append(s)
    return out


def test_sage_gcn_aggregator_is_the_mean_over_neighbours_and_self():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    model = MODELS["sage"](num_classes=3, in_shape=(5,), layers=1, aggr="gcn").eval()
    (conv,) = model.convs
    lin = conv.lin_l
    expected = torch.stack([
        lin((x[i] + sum((x[j] for j in nb), torch.zeros(5))) / (len(nb) + 1))
        for i, nb in enumerate(neighbours(4))])
    assert torch.allclose(model(x, EDGES), expected, atol=1e-6)
    assert not hasattr(conv, "lin_r")  # no root weight of its own: the node is one of the averaged terms


def test_sage_mean_aggregator_keeps_its_root_weight():
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    model = MODELS["sage"](num_classes=3, in_shape=(5,), layers=1).eval()
    (conv,) = model.convs
    mean = torch.stack([sum((x[j] for j in nb), torch.zeros(5)) / max(len(nb), 1) for nb in neighbours(4)])
    # PyG keeps the self-loop edge 1->1 as a neighbour in the mean aggregator
    mean[1] = (x[0] + x[2] + x[1]) / 3
    assert torch.allclose(model(x, EDGES), conv.lin_l(mean) + conv.lin_r(x), atol=1e-6)


@pytest.mark.parametrize("name", ["gcn", "sage"])
def test_input_dropout_off_leaves_the_features_alone(name):
    """With one layer, the only dropout is on the input: off, training and eval outputs agree."""
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    on = MODELS[name](num_classes=3, in_shape=(5,), layers=1, dropout=0.9)
    off = MODELS[name](num_classes=3, in_shape=(5,), layers=1, dropout=0.9, input_dropout=False)
    off.load_state_dict(on.state_dict())
    ref = off.eval()(x, EDGES)
    assert torch.allclose(off.train()(x, EDGES), ref)
    assert not torch.allclose(on.train()(x, EDGES), ref)


@pytest.mark.parametrize("activation, fn", [("elu", F.elu), ("relu", F.relu)])
def test_gat_activation_between_layers(activation, fn):
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    model = MODELS["gat"](num_classes=3, in_shape=(5,), hidden=8, heads=2, activation=activation).eval()
    first, last = model.convs
    assert torch.allclose(model(x, EDGES), last(fn(first(x, EDGES)), EDGES), atol=1e-6)


def test_unknown_activation_is_one_line():
    with pytest.raises(ValueError, match="activation must be one of"):
        MODELS["gat"](num_classes=3, in_shape=(5,), activation="tanh")
