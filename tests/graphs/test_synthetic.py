"""Generated CSBM graphs (mmkd.graphs.synthetic): the structure asked for, the same graph for a seed."""
from __future__ import annotations

import pytest
import torch

from mmkd.graphs.synthetic import csbm
from mmkd.registry import DATASETS


def test_csbm_has_the_homophily_degree_and_feature_signal_asked_for():
    g = csbm(nodes=4000, classes=4, degree=10, homophily=0.7, features=16, signal=2.0, graph_seed=3)
    src, dst = g.edge_index
    same = (g.y[src] == g.y[dst]).float().mean().item()
    assert same == pytest.approx(0.7 + 0.3 / 4, abs=0.02)  # random edges land in the own class 1/4 of the time
    assert g.edge_index.shape[1] / g.num_nodes == pytest.approx(5, abs=0.1)  # degree / 2 started per node
    means = torch.stack([g.x[g.y == c].mean(0) for c in range(4)])
    assert (means.norm(dim=1) / 16 ** 0.5).mean().item() == pytest.approx(2.0, rel=0.15)  # signal * unit-variance means
    assert torch.bincount(g.y).min() > 900
    again = csbm(nodes=4000, classes=4, degree=10, homophily=0.7, features=16, signal=2.0, graph_seed=3)
    assert torch.equal(again.x, g.x) and torch.equal(again.edge_index, g.edge_index)
    assert not torch.equal(csbm(nodes=4000, classes=4, graph_seed=4).y, csbm(nodes=4000, classes=4, graph_seed=3).y)


def test_csbm_data_set_defaults_to_the_glnn_split():
    d = DATASETS["csbm"](nodes=500, classes=3, features=8)
    labelled = [(s[0]["label"] >= 0).sum().item() for s in (d.train, d.val, d.test)]
    assert labelled == [60, 90, 500 - 150] and d.metrics == ["acc", "loss"]
