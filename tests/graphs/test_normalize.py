"""Graph feature normalisation (``normalize`` of graph_splits): ``auto`` row-normalises count features
exactly as the old default did and leaves embedding features alone; ``row``, ``standardize`` and
``none``; the true/false aliases; the recorded steps replayed by mmkd.preprocess; class names of npz
files (both layouts) reaching DataSplits."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd import preprocess
from mmkd.config import ConfigError
from mmkd.graphs import check_graph, graph_splits, read_npz
from mmkd.registry import DATASETS

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


def graph(x: torch.Tensor, classes: int = 3, seed: int = 0):
    n = len(x)
    g = torch.Generator().manual_seed(seed)
    ring = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    chords = torch.randint(0, n, (2, n), generator=g)
    return check_graph(x, torch.cat([ring, chords], 1), torch.arange(n) % classes, "t")


def counts(n=30, f=6, seed=0):
    """Bag-of-words counts with some all-zero rows."""
    x = torch.randint(0, 4, (n, f), generator=torch.Generator().manual_seed(seed)).float()
    x[[2, 7]] = 0
    return x


def embeddings(n=30, f=6, seed=0):
    return torch.randn(n, f, generator=torch.Generator().manual_seed(seed))


def by_hand_row(x):
    """Each row divided by its sum, zero rows kept: a loop, not preprocess.row_normalize."""
    out = x.clone()
    for i in range(len(x)):
        s = float(sum(x[i].tolist()))
        if s != 0:
            out[i] = x[i] / s
    return out


def split(g, **kw):
    return graph_splits(g, split="glnn", train_per_class=2, val_per_class=2, **kw)


def test_auto_row_normalises_counts_exactly_as_before(caplog):
    g = graph(counts())
    caplog.set_level(logging.INFO, logger="mmkd")
    d = split(g)
    assert any("normalize=auto -> row-normalised" in r.getMessage() for r in caplog.records)
    x = d.train[0]["x"]
    old = preprocess.row_normalize(g.x)  # the old path: normalize=True always divided by the row sum
    assert torch.equal(x, old)  # bit for bit
    assert torch.allclose(x, by_hand_row(g.x), atol=1e-7)
    assert d.preprocessing == {"x": [{"op": "row_normalize"}]}
    for alias in (True, "row", "true", "ROW"):
        other = split(g, normalize=alias)
        assert torch.equal(other.train[0]["x"], old) and other.preprocessing == d.preprocessing


def test_binary_features_are_row_normalised():
    x = (counts() > 1).float()
    assert split(graph(x)).preprocessing == {"x": [{"op": "row_normalize"}]}


def test_auto_leaves_embeddings(caplog):
    g = graph(embeddings())
    caplog.set_level(logging.INFO, logger="mmkd")
    d = split(g)
    assert any("normalize=auto -> left as they are" in r.getMessage() and "negative" in r.getMessage()
               for r in caplog.records)
    assert torch.equal(d.train[0]["x"], g.x) and torch.equal(d.test[0]["x"], g.x)
    assert d.preprocessing == {}
    # what the old default did to them: rows with near-zero or negative sums blown up or flipped
    row = split(g, normalize="row").train[0]["x"]
    assert torch.allclose(row, by_hand_row(g.x), atol=1e-6) and not torch.allclose(row, g.x)
    for alias in (False, "none", "false"):
        assert torch.equal(split(g, normalize=alias).train[0]["x"], g.x)


def test_a_single_negative_value_turns_auto_off():
    x = counts()
    x[5, 3] = -0.5
    assert split(graph(x)).preprocessing == {}


@pytest.mark.parametrize("setting", ["transductive", "inductive"])
def test_standardize_uses_the_nodes_seen_in_training(setting):
    g = graph(embeddings() * 3 + 1)
    d = split(g, normalize="standardize", setting=setting, held_out=0.5)
    (step,) = d.preprocessing["x"]
    assert step["op"] == "standardize"
    test = d.test[0]
    seen = np.ones(g.num_nodes, bool)
    if setting == "inductive":
        seen[(test["label"] >= 0).numpy()] = False  # the held-out nodes, the inductive test set
        assert 0 < seen.sum() < g.num_nodes
    xs = g.x.numpy()[seen].astype(np.float64)
    mean, std = xs.mean(0), xs.std(0)  # population std, in float64
    assert np.allclose(step["mean"], mean, atol=1e-5) and np.allclose(step["std"], std, atol=1e-5)
    want = (g.x.numpy() - mean) / std
    assert np.allclose(test["x"].numpy(), want, atol=1e-5)
    observed = d.train[0]["x"].numpy()
    assert np.allclose(observed.mean(0), 0, atol=1e-5) and np.allclose(observed.std(0), 1, atol=1e-4)
    # predict replays the recorded step on raw rows: the same rows
    assert torch.equal(preprocess.apply(d.preprocessing["x"], g.x[:7]), test["x"][:7])


def test_unknown_normalize_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.args\.normalize='l2'; choose from: auto, row, standardize, none"):
        split(graph(counts()), normalize="l2")
    with pytest.raises(ConfigError, match=r"data\.args\.normalize=1"):
        split(graph(counts()), normalize=1)


def test_planetoid_cora_unchanged():
    if DATA is None:
        pytest.skip("set MMKD_DATA to the data root (for example ../shared/data)")
    from mmkd.graphs.io import planetoid

    g = planetoid(DATA / "planetoid", "cora")
    d = DATASETS["cora"](root=str(DATA))
    assert d.preprocessing == {"x": [{"op": "row_normalize"}]}
    assert torch.equal(d.train[0]["x"], preprocess.row_normalize(g.x))
    assert torch.equal(d.train[0]["x"], DATASETS["cora"](root=str(DATA), normalize=True).train[0]["x"])


# ---------------------------------------------------------------- class names from npz files
def test_class_names_from_npz_both_layouts(tmp_path):
    import scipy.sparse as sp

    x = counts(12, 4)
    y = np.arange(12) % 3
    edges = np.array([[i, (i + 1) % 12] for i in range(12)])
    names = np.array(["theory", "systems", "vision"])
    np.savez(tmp_path / "list.npz", node_features=x.numpy(), node_labels=y, edges=edges, class_names=names)
    adj = sp.csr_matrix((np.ones(12), (edges[:, 0], edges[:, 1])), shape=(12, 12))
    np.savez(tmp_path / "gnnb.npz", adj_data=adj.data, adj_indices=adj.indices, adj_indptr=adj.indptr,
             adj_shape=np.array(adj.shape), attr_matrix=x.numpy(), labels=y, class_names=names)
    for f in ("list.npz", "gnnb.npz"):
        assert read_npz(tmp_path / f).class_names == list(names)
        d = DATASETS["npz"](root=str(tmp_path), path=f, train_per_class=1, val_per_class=1)
        assert d.class_names == ["theory", "systems", "vision"] and d.meta()["class_names"] == d.class_names
    np.savez(tmp_path / "plain.npz", node_features=x.numpy(), node_labels=y, edges=edges)
    assert DATASETS["npz"](root=str(tmp_path), path="plain.npz", train_per_class=1,
                           val_per_class=1).class_names == ["0", "1", "2"]
    np.savez(tmp_path / "short.npz", node_features=x.numpy(), node_labels=y, edges=edges, class_names=names[:2])
    with pytest.raises(Exception, match=r"short\.npz: 2 class_names for 3 classes"):
        read_npz(tmp_path / "short.npz")
