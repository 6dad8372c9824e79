"""DGL interop (the optional ``dgl`` extra): DGL graph <-> Graph, the ``dgl`` data set, and the
``dgl_gcn`` teacher against a hand-computed GCN and through the Trainer."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from mmkd import Distiller, Net, Term, Trainer
from mmkd.config import ConfigError
from mmkd.graphs.data import Graph, GraphError
from mmkd.graphs.datasets import FullGraph
from mmkd.graphs.dgl import DGLGCN, dgl_splits, from_dgl, import_dgl, to_dgl
from mmkd.registry import DATASETS, MODELS


@pytest.fixture(scope="module")
def dgl():
    if importlib.util.find_spec("dgl") is None:
        pytest.skip("dgl is not installed: pip install 'mmkd[dgl]'")
    return import_dgl()  # installed but failing to import is a failure, not a skip


def tiny_dgl(dgl, n: int = 6):
    """A path 0-1-2-3-4-5 plus the chord 0-3, both directions, listed out of order, with node data."""
    pairs = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (0, 3)]
    src = torch.tensor([a for a, b in pairs] + [b for a, b in pairs])
    dst = torch.tensor([b for a, b in pairs] + [a for a, b in pairs])
    perm = torch.randperm(len(src), generator=torch.Generator().manual_seed(0))
    g = dgl.graph((src[perm], dst[perm]), num_nodes=n)
    g.ndata["feat"] = torch.rand(n, 3, generator=torch.Generator().manual_seed(1))  # counts-like: row-normalised
    g.ndata["label"] = torch.tensor([0, 1, 0, 1, 0, 1])
    g.ndata["train_mask"] = torch.tensor([1, 1, 0, 0, 0, 0]).bool()
    g.ndata["val_mask"] = torch.tensor([0, 0, 1, 1, 0, 0]).bool()
    g.ndata["test_mask"] = torch.tensor([0, 0, 0, 0, 1, 1]).bool()
    return g


def edge_set(src, dst) -> set[tuple[int, int]]:
    return set(zip(src.tolist(), dst.tolist()))


def test_dgl_graph_round_trip(dgl):
    g = tiny_dgl(dgl)
    graph = from_dgl(g)
    assert graph.num_nodes == 6 and graph.edge_index.dtype == torch.long
    assert edge_set(*graph.edge_index) == edge_set(*g.edges()) and graph.edge_index.shape[1] == g.num_edges()
    assert torch.equal(graph.x, g.ndata["feat"]) and torch.equal(graph.y, g.ndata["label"])
    assert set(graph.masks) == {"train", "val", "test"}
    for part in graph.masks:
        assert torch.equal(graph.masks[part], g.ndata[f"{part}_mask"])
    back = to_dgl(graph)
    assert back.num_nodes() == g.num_nodes() and edge_set(*back.edges()) == edge_set(*g.edges())
    for key in g.ndata:
        assert torch.equal(back.ndata[key], g.ndata[key]), key


def test_from_dgl_drops_self_loops_and_duplicates_like_every_loader(dgl):
    g = dgl.graph((torch.tensor([0, 0, 1, 2]), torch.tensor([1, 1, 1, 0])), num_nodes=3)
    g.ndata["feat"], g.ndata["label"] = torch.ones(3, 2), torch.tensor([0, 1, 0])
    assert edge_set(*from_dgl(g).edge_index) == {(0, 1), (2, 0)}


def test_from_dgl_errors(dgl):
    g = tiny_dgl(dgl)
    with pytest.raises(GraphError, match="no node data 'x'; it has: feat, label"):
        from_dgl(g, x="x")
    hetero = dgl.heterograph({("a", "r", "b"): (torch.tensor([0]), torch.tensor([0]))})
    with pytest.raises(GraphError, match="heterogeneous"):
        from_dgl(hetero)


def test_missing_dgl_names_the_extra(dgl, monkeypatch):
    monkeypatch.delitem(sys.modules, "dgl")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"pip install 'mmkd\[dgl\]'"):
        import_dgl()


def test_dgl_data_set_from_a_saved_graph(dgl, tmp_path):
    dgl.save_graphs(str(tmp_path / "tiny.bin"), [tiny_dgl(dgl)])
    data = DATASETS["dgl"](root=str(tmp_path), path="tiny.bin")
    assert data.num_classes == 2 and data.shapes["x"] == (3,)
    assert data.preprocessing == {"x": [{"op": "row_normalize"}]}
    batch = data.train[0]
    assert torch.equal(batch["label"], torch.tensor([0, 1, -1, -1, -1, -1]))  # the shipped train mask
    assert torch.equal(data.test[0]["label"], torch.tensor([-1, -1, -1, -1, 0, 1]))
    x = tiny_dgl(dgl).ndata["feat"]
    torch.testing.assert_close(batch["x"], x / x.sum(1, keepdim=True))
    with pytest.raises(ConfigError, match="no DGL graph file .*nope.bin"):
        dgl_splits(str(tmp_path), "nope.bin")


def reference_gcn(model: DGLGCN, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
    """Two GCN layers from the dense formula D^-1/2 (A + I) D^-1/2 X W + b (ReLU between)."""
    a = adj + torch.eye(len(adj))
    d = a.sum(1).rsqrt()
    norm = d[:, None] * a * d[None, :]
    (w1, b1), (w2, b2) = [(c.weight, c.bias) for c in model.convs]
    return norm @ torch.relu(norm @ x @ w1 + b1) @ w2 + b2


def test_dgl_gcn_equals_the_formula(dgl):
    torch.manual_seed(0)
    adj = torch.tensor([[0, 1, 1, 0, 0],   # hand-made undirected graph: a triangle 0-1-2, a tail 2-3-4
                        [1, 0, 1, 0, 0],
                        [1, 1, 0, 1, 0],
                        [0, 0, 1, 0, 1],
                        [0, 0, 0, 1, 0]], dtype=torch.float32)
    edge_index = adj.nonzero().T
    x = torch.randn(5, 4)
    model = MODELS["dgl_gcn"](num_classes=3, in_shape=(4,), hidden=6).eval()
    with torch.no_grad():
        for c in model.convs:  # non-zero biases, so a missing bias would show
            c.bias.normal_()
        got = model(x, edge_index)
    torch.testing.assert_close(got, reference_gcn(model, x, adj), atol=1e-6, rtol=1e-5)


def test_dgl_gcn_trains_through_the_trainer(dgl, tmp_path):
    graph: Graph = from_dgl(tiny_dgl(dgl))
    train = FullGraph("tiny/train", graph.x, graph.edge_index, torch.where(graph.masks["train"], graph.y, -1))
    val = FullGraph("tiny/val", graph.x, graph.edge_index, torch.where(graph.masks["val"], graph.y, -1))
    torch.manual_seed(0)
    model = DGLGCN(2, (3,), hidden=8, dropout=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    module = Distiller(Net(model, ["x", "edge_index"]), [], [Term("ce")])
    trainer = Trainer(run_dir=tmp_path, max_epochs=1, batch_size=1, device="cpu", progress="off",
                      tensorboard=False, lr=0.1)
    result = trainer.fit(module, train, val)
    assert len(result.history) == 1 and torch.isfinite(torch.tensor(result.history[0]["train/loss"]))
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "a weight did not move"
    # the reported validation loss is cross-entropy on the two validation nodes, recomputed here
    with torch.no_grad():
        logits = model.eval()(graph.x, graph.edge_index)[graph.masks["val"]]
    want = torch.nn.functional.cross_entropy(logits, graph.y[graph.masks["val"]]).item()
    assert result.history[0]["val/loss"] == pytest.approx(want, rel=1e-5)


def test_mmkd_run_on_a_dgl_graph_with_the_dgl_teacher(dgl, tmp_path):
    """The whole path from the command line: a saved DGL graph, the dgl_gcn teacher, an MLP student."""
    from mmkd.cli import main

    dgl.save_graphs(str(tmp_path / "tiny.bin"), [tiny_dgl(dgl)])
    args = ["run", "experiment=g2m_glnn", "data.name=dgl", f"data_root={tmp_path}", "data.args.path=tiny.bin",
            "data.args.split=public", "teachers.gnn.name=dgl_gcn", "teachers.gnn.args.hidden=16", "~teachers.gnn.args.input_dropout",
            "teachers.gnn.epochs=2", "trainer.max_epochs=2",
            "export=[]", "baseline=false", "trainer.device=cpu", "trainer.tensorboard=false",
            "trainer.progress=off", f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["teachers"]["gnn"]["params"] == 3 * 16 + 16 + 16 * 2 + 2  # GraphConv 3 -> 16 -> 2
    assert (tmp_path / "run" / "teachers" / "gnn" / "best.pt").is_file()


def test_missing_dgl_file_is_a_one_line_error(dgl, tmp_path, capsys):
    from mmkd.cli import main

    code = main(["run", "experiment=g2m_glnn", "data.name=dgl", f"data_root={tmp_path}", "data.args.path=g.bin"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmkd: error: data.args.path: no DGL graph file") and err.count("\n") == 1
