"""Graph data: the Planetoid loader on the real Cora/CiteSeer files (``MMKD_DATA``), npz and networkx
loaders on hand-made graphs, splits, the inductive hold-out, neighbour sampling and bad input."""
from __future__ import annotations

import os
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch_geometric.utils import k_hop_subgraph

from mmkd.build import load_data
from mmkd.cli import compose
from mmkd.config import ConfigError
from mmkd.graphs import FullGraph, GraphError, NeighborGraph, check_graph, from_networkx, graph_splits, read_npz
from mmkd.graphs.io import planetoid
from mmkd.graphs.sampling import CSC, sample
from mmkd.registry import DATASETS

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


def data_root() -> Path:
    if DATA is None:
        pytest.skip("set MMKD_DATA to the data root (for example ../shared/data)")
    return DATA


def tiny(n_per_class=10, classes=3, seed=0):
    """A graph with ``classes * n_per_class`` nodes, 4 features, a ring plus random chords."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * classes
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    chords = torch.randint(0, n, (2, n), generator=g)
    edges = torch.cat([ring, ring.flip(0), chords, chords.flip(0)], 1)
    y = torch.arange(n) % classes
    return check_graph(torch.rand(n, 4, generator=g), edges, y, "tiny")


# ---------------------------------------------------------------- Planetoid on the real files
def test_cora_counts_and_public_split():
    d = DATASETS["cora"](root=str(data_root()))
    batch = d.train[0]
    assert batch["x"].shape == (2708, 1433) and batch["edge_index"].shape == (2, 10556)
    assert d.num_classes == 7 and d.shapes["x"] == (1433,)
    sizes = [int((ds[0]["label"] >= 0).sum()) for ds in (d.train, d.val, d.test)]
    assert sizes == [140, 500, 1000]
    # the public split: the first 20 nodes of each class train (Planetoid's layout: nodes 0..139)
    assert torch.equal((batch["label"] >= 0).nonzero().flatten(), torch.arange(140))
    assert torch.allclose(batch["x"].sum(1)[batch["x"].sum(1) > 0], torch.ones(1))  # rows normalised
    assert d.preprocessing == {"x": [{"op": "row_normalize"}]}
    edges = set(map(tuple, batch["edge_index"].T.tolist()))
    assert all((j, i) in edges for i, j in edges) and not any(i == j for i, j in edges)


def test_citeseer_counts():
    g = planetoid(data_root() / "planetoid", "CiteSeer")
    assert (g.num_nodes, g.x.shape[1], g.num_classes) == (3327, 3703, 6)
    assert [int(g.masks[p].sum()) for p in ("train", "val", "test")] == [120, 500, 1000]


def test_missing_planetoid_files_name_folder_and_files(tmp_path):
    with pytest.raises(ConfigError) as e:
        DATASETS["pubmed"](root=str(tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "planetoid" / "PubMed" / "raw") in msg
    assert "ind.pubmed.x" in msg and "ind.pubmed.test.index" in msg and "\n" not in msg


# ---------------------------------------------------------------- npz and networkx
def test_npz_gnn_benchmark_layout(tmp_path):
    adj = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    attr = sp.csr_matrix(np.array([[1, 0, 2], [0, 0, 1], [3, 0, 0], [0, 1, 0]], dtype=np.float32))
    np.savez(tmp_path / "g.npz", adj_data=adj.data, adj_indices=adj.indices, adj_indptr=adj.indptr,
             adj_shape=adj.shape, attr_data=attr.data, attr_indices=attr.indices, attr_indptr=attr.indptr,
             attr_shape=attr.shape, labels=np.array([0, 1, 1, 0]), class_names=np.array(["a", "b"]))
    g = read_npz(tmp_path / "g.npz")
    assert torch.equal(g.x, torch.tensor(attr.toarray()))
    assert sorted(map(tuple, g.edge_index.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    assert g.y.tolist() == [0, 1, 1, 0] and g.class_names == ["a", "b"]
    directed = read_npz(tmp_path / "g.npz", undirected=False)
    assert sorted(map(tuple, directed.edge_index.T.tolist())) == [(0, 1), (1, 2), (3, 2)]
    np.savez(tmp_path / "dense.npz", adj_data=adj.data, adj_indices=adj.indices, adj_indptr=adj.indptr,
             adj_shape=adj.shape, attr_matrix=attr.toarray(), labels=np.array([0, 1, 1, 0]))
    assert torch.equal(read_npz(tmp_path / "dense.npz").x, g.x)


def ten_split_npz(path, n=12, splits=3, transpose=False):
    """An edge-list npz file shipping ``splits`` splits: split i trains on nodes {i, i+1, i+2} (mod n),
    validates on the next three and tests on the rest."""
    masks = np.zeros((3, splits, n), dtype=bool)  # [part, split, node]
    for i in range(splits):
        order = (np.arange(n) + i) % n
        masks[0, i, order[:3]] = masks[1, i, order[3:6]] = masks[2, i, order[6:]] = True
    layout = (lambda m: m.T) if transpose else (lambda m: m)  # [nodes, splits] as Geom-GCN's files
    np.savez(path, node_features=np.eye(n, 5, dtype=np.float32) + 1, node_labels=np.arange(n) % 3,
             edges=np.array([[0, 1], [1, 2], [2, 3], [5, 4]]),
             **{f"{p}_masks": layout(masks[k]) for k, p in enumerate(("train", "val", "test"))})
    return masks


def labelled(d):
    return [(ds[0]["label"] >= 0).nonzero().flatten().tolist() for ds in (d.train, d.val, d.test)]


@pytest.mark.parametrize("transpose", [False, True])
def test_npz_shipped_splits_are_the_default_and_split_index_picks_one(tmp_path, transpose):
    n = 12
    masks = ten_split_npz(tmp_path / "h.npz", n, splits=3, transpose=transpose)
    assert read_npz(tmp_path / "h.npz").num_splits == 3
    d = DATASETS["npz"](root=str(tmp_path), path="h.npz")  # no split named: the file's own
    assert labelled(d) == [[0, 1, 2], [3, 4, 5], list(range(6, n))]
    assert d.train[0]["edge_index"].shape == (2, 8)
    for i in range(3):
        d = DATASETS["npz"](root=str(tmp_path), path="h.npz", split_index=i)
        assert labelled(d) == [np.flatnonzero(masks[k, i]).tolist() for k in range(3)]
    assert DATASETS["npz"](root=str(tmp_path), path="h.npz", split_index=2).train.name == "h/public/transductive/0/2/train"
    with pytest.raises(ConfigError, match=r"^data.args.split_index=3: h ships 3 splits \(split_index 0-2\); choose"):
        DATASETS["npz"](root=str(tmp_path), path="h.npz", split_index=3)
    with pytest.raises(ConfigError, match="split_index=1 picks a shipped split; it needs data.args.split=public"):
        DATASETS["npz"](root=str(tmp_path), path="h.npz", split="glnn", split_index=1, train_per_class=1,
                        val_per_class=1)


def test_split_index_through_the_config_and_its_range(tmp_path):
    ten_split_npz(tmp_path / "h.npz", splits=3)
    base = [f"data_root={tmp_path}", "data.name=npz", "data.args.path=h.npz"]
    cfg = compose(["experiment=g2m_glnn", *base, "data.args.split_index=1"])
    assert labelled(load_data(cfg)[0])[0] == [1, 2, 3]
    with pytest.raises(ConfigError, match="data.args.split_index=-1"):
        compose(["experiment=g2m_glnn", *base, "data.args.split_index=-1"])
    ten_split_npz(tmp_path / "one.npz", splits=1)
    with pytest.raises(ConfigError, match="data.args.split_index=1: one ships one split"):
        load_data(compose(["experiment=g2m_glnn", *base[:2], "data.args.path=one.npz", "data.args.split_index=1"]))


def test_npz_masks_that_overlap_in_a_later_split_are_refused(tmp_path):
    masks = ten_split_npz(tmp_path / "h.npz", splits=2)
    masks[1, 1, 0] = masks[0, 1, 0] = True  # node 0 in train and val of split 1
    np.savez(tmp_path / "bad.npz", node_features=np.ones((12, 2), np.float32), node_labels=np.arange(12) % 3,
             edges=np.array([[0, 1]]), train_masks=masks[0], val_masks=masks[1], test_masks=masks[2])
    with pytest.raises(GraphError, match=r"nodes are in both the train and the val mask \(split 1\)"):
        read_npz(tmp_path / "bad.npz")


def test_unknown_npz_layout(tmp_path):
    with pytest.raises(GraphError, match="unknown npz layout"):
        np.savez(tmp_path / "bad.npz", features=np.ones((2, 2)))
        read_npz(tmp_path / "bad.npz")


def test_networkx_loader():
    G = nx.Graph()
    G.add_node("a", x=[1.0, 0.0], y=0)
    G.add_node("b", x=[0.0, 1.0], y=1)
    G.add_node("c", x=[1.0, 1.0], y=1)
    G.add_node("lonely", x=[0.5, 0.5], y=0)
    G.add_edges_from([("a", "b"), ("b", "c"), ("c", "c")])
    g = from_networkx(G)
    assert g.x.tolist() == [[1, 0], [0, 1], [1, 1], [0.5, 0.5]] and g.y.tolist() == [0, 1, 1, 0]
    assert sorted(map(tuple, g.edge_index.T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]  # no self-loop
    G.add_node("d", x=[0.0, 0.0])
    with pytest.raises(GraphError, match="'d' has no attribute 'y'"):
        from_networkx(G)


# ---------------------------------------------------------------- splits
def test_glnn_split_sizes_per_class_and_seeded():
    g = tiny(n_per_class=10, classes=3)
    d = graph_splits(g, split="glnn", train_per_class=2, val_per_class=3, split_seed=1)
    parts = [(ds[0]["label"] >= 0).nonzero().flatten() for ds in (d.train, d.val, d.test)]
    assert [len(p) for p in parts] == [6, 9, 15]
    for p, k in zip(parts, (2, 3, 5)):
        assert torch.bincount(g.y[p], minlength=3).tolist() == [k, k, k]
    assert torch.equal(torch.sort(torch.cat(parts)).values, torch.arange(30))  # a partition
    again = graph_splits(g, split="glnn", train_per_class=2, val_per_class=3, split_seed=1)
    other = graph_splits(g, split="glnn", train_per_class=2, val_per_class=3, split_seed=2)
    assert again.train.fingerprint == d.train.fingerprint != other.train.fingerprint
    with pytest.raises(GraphError, match="class 0 has 10 labelled nodes"):
        graph_splits(g, split="glnn", train_per_class=8, val_per_class=3)


def test_inductive_split_leaks_no_held_out_node_or_edge():
    g = tiny(n_per_class=20, classes=3)
    d = graph_splits(g, split="glnn", setting="inductive", train_per_class=3, val_per_class=3,
                     held_out=0.25, normalize=False)
    test = d.test[0]
    held = test["node"][test["label"] >= 0]
    n_test = 60 - 18
    assert len(held) == round(0.25 * n_test)
    assert torch.equal(test["edge_index"], g.edge_index) and torch.equal(test["x"], g.x)  # GNN: full graph
    for ds in (d.train, d.val):
        b = ds[0]
        assert not set(b["node"].tolist()) & set(held.tolist())
        assert len(b["node"]) == 60 - len(held) and torch.equal(b["x"], g.x[b["node"]])
        global_edges = b["node"][b["edge_index"]]  # back to the original numbering
        assert not torch.isin(global_edges, held).any()
        observed = ~torch.isin(g.edge_index, held).any(0)
        assert global_edges.shape[1] == int(observed.sum())  # every edge among observed nodes kept
    labelled = d.train[0]["node"][d.train[0]["label"] >= 0]
    assert torch.equal(d.train[0]["label"][d.train[0]["label"] >= 0], g.y[labelled])
    mb = graph_splits(g, split="glnn", setting="inductive", train_per_class=3, val_per_class=3, held_out=0.25,
                      batching="neighbor", num_neighbors=[-1, -1])
    batch = mb.train.__getitems__(list(range(len(mb.train))))
    assert not torch.isin(batch["node"], held).any()


def test_full_graph_item_and_fingerprint():
    g = tiny()
    d = graph_splits(g, split="glnn", train_per_class=2, val_per_class=3)
    assert isinstance(d.train, FullGraph) and len(d.train) == 1 and d.train.deterministic
    b = d.train.__getitems__([0])
    assert set(b) == {"x", "edge_index", "label", "index", "node", "seed"}
    assert torch.equal(b["index"], torch.arange(30)) and bool(b["seed"].all())
    assert d.train.fingerprint != d.val.fingerprint
    with pytest.raises(IndexError):
        d.train[1]


# ---------------------------------------------------------------- neighbour sampling
def test_neighbor_sampling_matches_k_hop_and_respects_fan_out():
    g = tiny(n_per_class=30, classes=3, seed=3)
    csc = CSC(g.edge_index, g.num_nodes)
    seeds = torch.tensor([5, 17, 40])
    nodes, edges = sample(csc, seeds, [-1, -1])
    ref, _, _, _ = k_hop_subgraph(seeds, 2, g.edge_index, num_nodes=g.num_nodes)
    assert torch.equal(nodes[:3], seeds) and set(nodes.tolist()) == set(ref.tolist())
    assert len(set(nodes.tolist())) == len(nodes)
    real = set(map(tuple, g.edge_index.T.tolist()))
    torch.manual_seed(0)
    nodes, edges = sample(csc, seeds, [2, 1])
    glob = nodes[edges]
    assert set(map(tuple, glob.T.tolist())) <= real and len(set(map(tuple, glob.T.tolist()))) == glob.shape[1]
    indeg = torch.bincount(edges[1], minlength=len(nodes))
    assert (indeg[:3] <= 2).all() and (indeg[3:] <= 1).all()
    assert indeg[:3].tolist() == [min(2, int((g.edge_index[1] == s).sum())) for s in seeds.tolist()]


def test_neighbor_batches_label_only_the_seeds():
    g = tiny(n_per_class=20, classes=3)
    d = graph_splits(g, split="glnn", train_per_class=3, val_per_class=3, batching="neighbor", num_neighbors=[3, 3])
    assert isinstance(d.val, NeighborGraph) and not d.train.deterministic and len(d.train) == 60
    b = d.val.__getitems__([0, 1, 2])
    assert b["seed"].tolist() == [True] * 3 + [False] * (len(b["node"]) - 3)
    assert (b["label"][3:] == -1).all() and torch.equal(b["label"][:3], g.y[b["node"][:3]])
    assert torch.equal(b["x"], g.x[b["node"]] / g.x[b["node"]].sum(1, keepdim=True))
    # teachers on labels alone draw batches for the 9 labelled training nodes only, not all 60
    assert len(d.labelled) == 9 and graph_splits(g, split="glnn", train_per_class=3, val_per_class=3).labelled is None
    b = d.labelled.__getitems__(list(range(9)))
    assert (b["label"][:9] >= 0).all() and (b["label"][9:] == -1).all()
    assert sorted(b["node"][:9].tolist()) == (d.train.label >= 0).nonzero().flatten().tolist()


# ---------------------------------------------------------------- bad input, and what is handled
@pytest.mark.parametrize("x,edges,y,match", [
    (torch.ones(3, 2), torch.tensor([[0, 1], [1, 3]]), torch.tensor([0, 1, 0]), "edge 1 \\(1 -> 3\\) points outside"),
    (torch.ones(3, 2), torch.tensor([[0, -1], [1, 2]]), torch.tensor([0, 1, 0]), "edge 1 \\(-1 -> 2\\) points outside"),
    (torch.ones(3, 2), torch.tensor([[0], [1]]), torch.tensor([0, 1]), "3 nodes have features but labels have shape"),
    (torch.tensor([[1.0, float("nan")], [1, 1], [1, 1]]), torch.tensor([[0], [1]]), torch.tensor([0, 1, 0]),
     "1 nodes have NaN or infinite features \\(first: node 0\\)"),
    (torch.tensor([[1.0, 1], [1, float("inf")], [1, 1]]), torch.tensor([[0], [1]]), torch.tensor([0, 1, 0]),
     "NaN or infinite features \\(first: node 1\\)"),
    (torch.ones(3, 2), torch.tensor([[0], [1]]), torch.tensor([0, 2, 0]), "class 1 has no labelled node"),
    (torch.ones(0, 2), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), "empty"),
    (torch.ones(3, 2), torch.tensor([[0, 1, 2]]), torch.tensor([0, 1, 0]), "edge index must be \\[2, edges\\]"),
])
def test_bad_graphs_get_one_clear_error(x, edges, y, match):
    with pytest.raises(GraphError, match=match) as e:
        check_graph(x, edges, y, "g")
    assert "\n" not in str(e.value)


def test_bad_data_args_name_the_key_and_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="data.args: unknown argument 'splt'; choose from: split, setting"):
        DATASETS["cora"](root=str(tmp_path), splt="glnn")
    g = tiny()
    for key, value in (("split", "random"), ("setting", "semi"), ("batching", "cluster")):
        with pytest.raises(ConfigError, match=f"data.args.{key}='{value}'; choose from"):
            graph_splits(g, **{"split": "glnn", "train_per_class": 2, "val_per_class": 3, key: value})


def test_class_without_training_node_is_refused():
    g = check_graph(torch.ones(4, 2), torch.tensor([[0], [1]]), torch.tensor([0, 1, 1, 0]), "g")
    g.masks = {"train": torch.tensor([True, False, False, False]), "val": torch.tensor([False, True, False, False]),
               "test": torch.tensor([False, False, True, True])}
    with pytest.raises(GraphError, match="class 1 has no labelled node in the training part"):
        graph_splits(g, split="public")


def test_isolated_nodes_self_loops_and_duplicates_are_handled():
    x = torch.rand(5, 3)
    edges = torch.tensor([[0, 0, 0, 1, 2, 3], [1, 1, 0, 0, 2, 1]])  # duplicate 0->1, self-loops 0->0 and 2->2
    g = check_graph(x, edges, torch.tensor([0, 1, 0, 1, 0]), "g")
    assert g.edge_index.tolist() == [[0, 1, 3], [1, 0, 1]]  # loops dropped, duplicate merged; node 4 isolated
    assert g.num_nodes == 5
    from mmkd.registry import MODELS

    for name in ("gcn", "sage", "gat", "appnp"):
        out = MODELS[name](num_classes=2, in_shape=(3,), hidden=8)(g.x, g.edge_index)
        assert out.shape == (5, 2) and torch.isfinite(out).all()
