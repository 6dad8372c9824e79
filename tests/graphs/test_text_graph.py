"""Text-attributed graphs (graphs/text_graph.py): node tables and edge lists read by id, text and
integer labels, unlabelled nodes, the split column, bad files as one-line errors, sentence-embedding
features against a hand-pooled reference (MiniLM: against sentence-transformers), the feature cache
and what invalidates it, and the recorded ``sentence_embedding`` text step."""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmkd import preprocess
from mmkd.config import ConfigError
from mmkd.data import DataError
from mmkd.graphs import GraphError
from mmkd.graphs import text_graph as T
from mmkd.registry import DATASETS, MODELS

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
TINY = {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}  # a small random text_transformer
L = 16  # max_length

NODES = [  # id, text, label: string ids, commas and quotes inside texts, one unlabelled node
    ("p1", "graph neural networks, a survey", "ml"),
    ("p2", "convolutions on graphs", "ml"),
    ("p3", 'the "attention" paper', "ml"),
    ("p4", "stock prices fell", "finance"),
    ("p5", "markets rallied on earnings", "finance"),
    ("p6", "bond yields rose", "finance"),
    ("p7", "a recipe for bread", "cooking"),
    ("p8", "how to roast a chicken", "cooking"),
    ("p9", "sourdough starter tips", "cooking"),
    ("u1", "an unlabelled abstract", ""),
]
EDGES = [("p1", "p2"), ("p2", "p3"), ("p4", "p5"), ("p5", "p6"), ("p7", "p8"), ("p8", "p9"), ("u1", "p1"),
         ("p3", "p4"), ("p1", "p1")]  # a self-loop, dropped


def write_csv(path: Path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerows(rows)
    return path


def write_graph(folder: Path, nodes=NODES, edges=EDGES, header=("id", "text", "label"), suffix=".csv"):
    folder.mkdir(parents=True, exist_ok=True)
    d = "\t" if suffix == ".tsv" else ","
    if suffix == ".tsv":  # TSV has no quoting: write lines by hand
        (folder / "nodes.tsv").write_text("\n".join("\t".join(r) for r in [header, *nodes]) + "\n", encoding="utf-8")
    else:
        write_csv(folder / f"nodes{suffix}", [header, *nodes], d)
    write_csv(folder / f"edges{suffix}", [("source", "target"), *edges], d)
    return f"nodes{suffix}", f"edges{suffix}"


def load(root: Path, cache: Path, **kw):
    nodes, edges = kw.pop("files", ("nodes.csv", "edges.csv"))
    args = {"encoder": "text_transformer", "encoder_args": TINY, "max_length": L, "cache_dir": str(cache),
            "train_per_class": 1, "val_per_class": 1, **kw}
    return DATASETS["text_graph"](root=str(root), nodes=nodes, edges=edges, **args)


@pytest.fixture
def graph(tmp_path):
    root = tmp_path / "data"
    write_graph(root)
    return root, tmp_path / "cache"


def reference_embeddings(texts, seed=0, args=TINY, max_length=L):
    """Built and pooled by hand: the random text_transformer drawn from ``seed``, its encoder's token
    states, a plain mean over each text's real tokens (a loop, not MeanPool)."""
    from mmkd.modalities.text import load_tokenizer

    torch.manual_seed(seed)
    model = MODELS["text_transformer"](num_classes=1, in_shape=(max_length,), **args).eval()
    enc = load_tokenizer("minilm")(list(texts), padding="max_length", truncation=True, max_length=max_length,
                                   return_tensors="pt")
    with torch.no_grad():
        h = model.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    return torch.stack([h[i][enc["attention_mask"][i].bool()].mean(0) for i in range(len(texts))])


# ---------------------------------------------------------------- reading the files
def test_ids_texts_labels_edges(graph):
    root, cache = graph
    d = load(root, cache)
    full = d.test[0]
    # labels sorted as strings -> cooking 0, finance 1, ml 2; the unlabelled node -1
    assert d.class_names == ["cooking", "finance", "ml"] and d.num_classes == 3
    want_y = torch.tensor([2, 2, 2, 1, 1, 1, 0, 0, 0, -1])
    ids = [n[0] for n in NODES]
    got = {(ids[u], ids[v]) for u, v in full["edge_index"].T.tolist()}
    want = {(a, b) for a, b in EDGES if a != b} | {(b, a) for a, b in EDGES if a != b}
    assert got == want  # undirected, self-loop dropped, ids mapped by name
    assert full["x"].shape == (10, 16) and d.shapes["x"] == (16,)
    # the glnn split (1 + 1 per class): every labelled node in exactly one part, the unlabelled node in none
    parts = torch.stack([ds[0]["label"] for ds in (d.train, d.val, d.test)])
    seen = (parts >= 0).sum(0)
    assert seen[:9].tolist() == [1] * 9 and seen[9] == 0
    assert torch.equal(parts.max(0).values[:9], want_y[:9])
    assert (parts[0] >= 0).sum() == 3 and (parts[1] >= 0).sum() == 3


def test_features_are_mean_pooled_embeddings(graph):
    root, cache = graph
    d = load(root, cache)
    want = reference_embeddings([n[1] for n in NODES])
    assert torch.allclose(d.test[0]["x"], want, atol=1e-5)
    assert d.preprocessing == {}  # auto: embeddings have negative values, so they are left as they are


def test_tsv_integer_labels_sorted_numerically_and_no_edge_header(tmp_path):
    root = tmp_path / "data"
    nodes = [(f"{i}", f"text number {i}", str(lab)) for i, lab in enumerate([10, 2, 2, 10, 1, 1, 2, 10, 1])]
    write_graph(root, nodes=nodes, edges=[], suffix=".tsv")
    (root / "edges.tsv").write_text("0\t1\n1\t2\n")  # no header: the first row is an edge
    d = load(root, tmp_path / "cache", files=("nodes.tsv", "edges.tsv"))
    assert d.class_names == ["1", "2", "10"]  # numeric order, not "1", "10", "2"
    labels = torch.stack([ds[0]["label"] for ds in (d.train, d.val, d.test)]).max(0).values
    assert labels.tolist() == [2, 1, 1, 2, 0, 0, 1, 2, 0]
    assert sorted(map(tuple, d.test[0]["edge_index"].T.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1)]


def test_whitespace_edge_list_and_absolute_paths(tmp_path):
    root = tmp_path / "data"
    write_graph(root)
    (root / "edges.txt").write_text("p1 p4\np4  p7\n")
    d = load(tmp_path / "elsewhere", tmp_path / "cache", files=(str(root / "nodes.csv"), str(root / "edges.txt")),
             undirected=False)
    assert sorted(map(tuple, d.test[0]["edge_index"].T.tolist())) == [(0, 3), (3, 6)]


def test_classes_fix_the_order(graph):
    root, cache = graph
    d = load(root, cache, classes=["ml", "finance", "cooking"])
    assert d.class_names == ["ml", "finance", "cooking"]
    labels = torch.stack([ds[0]["label"] for ds in (d.train, d.val, d.test)]).max(0).values
    assert labels[:9].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_split_column_is_the_public_split(tmp_path):
    root = tmp_path / "data"
    parts = ["train", "val", "test", "train", "val", "test", "TRAIN", "val", "", "test"]
    nodes = [(*n, p) for n, p in zip(NODES, parts)]
    write_graph(root, nodes=nodes, header=("id", "text", "label", "split"))
    d = load(root, tmp_path / "cache")  # split defaults to public with a split column
    for ds, part in zip((d.train, d.val, d.test), ("train", "val", "test")):
        got = (ds[0]["label"] >= 0).nonzero().flatten().tolist()
        assert got == [i for i, p in enumerate(parts) if p.lower() == part and NODES[i][2]]


def bad(tmp_path, name, text):
    path = tmp_path / "data" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return name


GOOD_EDGES = "source,target\na,b\n"
GOOD_NODES = "id,text,label\na,x y,u\nb,y z,v\n"


@pytest.mark.parametrize("nodes, edges, match", [
    (None, GOOD_EDGES, r"no node table '.*nodes\.csv'; give data\.args\.nodes"),
    (GOOD_NODES, None, r"no edge list '.*edges\.csv'; give data\.args\.edges"),
    ("", GOOD_EDGES, r"nodes\.csv: the node table is empty"),
    ("id,text,label\n", GOOD_EDGES, r"header but no node"),
    ("id,body,label\na,x,u\n", GOOD_EDGES, r"nodes\.csv:1: no column 'text' in the header \(columns: 'id', 'body', "
                                           r"'label'\); name it 'text' or set data\.args\.text_column"),
    ("id,text,label\na,x,y,u\n", GOOD_EDGES, r"nodes\.csv:2: 4 fields, but the header has 3 .*double quotes"),
    ("id,text,label\na,x,u\nb,y,v\na,z,u\n", GOOD_EDGES, r"nodes\.csv:4: node id 'a' is given again \(first on line 2\)"),
    ("id,text,label\n,x,u\n", GOOD_EDGES, r"nodes\.csv:2: empty node id"),
    ("id,text,label\na,x,\nb,y,\n", GOOD_EDGES, r"no node has a label in column 'label'"),
    ("id,text,label\na,x,u\nb,y,u\n", GOOD_EDGES, r"every labelled node has the label 'u'.*at least two classes"),
    ("id,text,label\na,\"x,u\nb,y,v\n", GOOD_EDGES, r"nodes\.csv:\d+: not valid CSV"),
    (b"id,text,label\na,caf\xe9,u\nb,y,v\n", GOOD_EDGES, r"nodes\.csv: not UTF-8 text .*byte 0xe9.*save it as UTF-8"),
    ("id,text,label,split\na,x,u,train\nb,y,v,holdout\n", GOOD_EDGES,
     r"nodes\.csv:3: split 'holdout' in column 'split'; give train, val, test or leave it empty"),
    ("id,text,label,split\na,x,u,train\nb,y,v,test\n", GOOD_EDGES, r"column 'split' puts no node in val"),
    (GOOD_NODES, "source,target\na,b\nb,zz\n", r"edges\.csv:3: node id 'zz' is not in the node table"),
    (GOOD_NODES, "a,b\nc\n", r"edges\.csv:2: 1 field; an edge is two node ids"),
])
def test_bad_files_are_one_line_errors(tmp_path, nodes, edges, match):
    if nodes is not None:
        bad(tmp_path, "nodes.csv", nodes)
    if edges is not None:
        bad(tmp_path, "edges.csv", edges)
    (tmp_path / "data").mkdir(exist_ok=True)
    with pytest.raises(DataError, match=match) as e:
        load(tmp_path / "data", tmp_path / "cache")
    assert isinstance(e.value, GraphError) and "\n" not in str(e.value)


def test_label_outside_classes_lists_them(graph):
    root, cache = graph
    with pytest.raises(GraphError, match=r"nodes\.csv:2: label 'ml' is not one of data\.args\.classes "
                                         r"\(cooking, finance\); add it to classes") as e:
        load(root, cache, classes=["cooking", "finance"])
    assert "\n" not in str(e.value)
    with pytest.raises(GraphError, match=r"no node has the label 'art' of data\.args\.classes"):
        load(root, cache, classes=["cooking", "finance", "ml", "art"])


def test_bad_arguments_are_config_errors(graph):
    root, cache = graph
    with pytest.raises(ConfigError, match=r"data\.args\.normalize='rows'; choose from: auto, row, standardize, none"):
        load(root, cache, normalize="rows")
    with pytest.raises(ConfigError, match=r"data\.args: unknown argument 'hiden'"):
        load(root, cache, hiden=3)
    with pytest.raises(ConfigError, match=r"lies inside the data root"):
        load(root, root / "cache")
    with pytest.raises(Exception, match=r"unknown model 'text_nope'"):
        load(root, cache, encoder="text_nope")
    with pytest.raises(ConfigError, match=r"data\.args\.encoder='mlp' is not a mmkd\.models\.Classifier|"
                                          r"data\.args\.encoder\.args"):
        load(root, cache, encoder="mlp", encoder_args={})
    assert not cache.exists() or not any(cache.glob("*.pt"))  # nothing encoded for a bad config


# ---------------------------------------------------------------- the feature cache
def cache_logs(caplog):
    return [r.getMessage() for r in caplog.records if "feature cache" in r.getMessage()]


def test_cache_hit_and_invalidation(graph, caplog, monkeypatch):
    root, cache = graph
    caplog.set_level(logging.INFO, logger="mmkd")
    first = load(root, cache).test[0]["x"]
    assert len(list(cache.glob("text_graph-*.pt"))) == 1 and "miss" in cache_logs(caplog)[-1]

    calls = []
    real = T.encode
    monkeypatch.setattr(T, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load(root, cache, split_seed=3, setting="inductive").test[0]["x"]  # another split: same features
    assert calls == [] and "hit" in cache_logs(caplog)[-1] and torch.equal(again, first)

    # another label or edge leaves the texts, so the features, as they were
    nodes = [(i, t, "ml" if i == "u1" else lab) for i, t, lab in NODES]
    write_graph(root, nodes=nodes, edges=EDGES[:3])
    load(root, cache)
    assert calls == [] and "hit" in cache_logs(caplog)[-1]

    # one text changed: a miss, a new entry, that row changes and the others do not
    nodes[0] = ("p1", "a different abstract", "ml")
    write_graph(root, nodes=nodes)
    changed = load(root, cache).test[0]["x"]
    assert calls == [1] and "miss" in cache_logs(caplog)[-1] and len(list(cache.glob("text_graph-*.pt"))) == 2
    assert not torch.allclose(changed[0], first[0]) and torch.allclose(changed[1:], first[1:], atol=1e-6)

    # the encoder changed: its weights (seed), its arguments, max_length: each a miss
    for kw in ({"encoder_seed": 1}, {"encoder_args": {**TINY, "hidden": 8}}, {"max_length": 4}):  # 4 cuts texts
        x = load(root, cache, **kw).test[0]["x"]
        assert "miss" in cache_logs(caplog)[-1], kw
        assert not torch.allclose(x[:, :8], changed[:, :8], atol=1e-3)
    assert len(calls) == 4 and len(list(cache.glob("text_graph-*.pt"))) == 5
    load(root, cache, batch_size=3)  # batch size changes nothing
    assert len(calls) == 4 and "hit" in cache_logs(caplog)[-1]


def test_damaged_cache_entry_is_rebuilt(graph, caplog):
    root, cache = graph
    first = load(root, cache).test[0]["x"]
    (entry,) = cache.glob("text_graph-*.pt")
    entry.write_bytes(entry.read_bytes()[:-10])
    caplog.set_level(logging.INFO, logger="mmkd")
    again = load(root, cache).test[0]["x"]
    assert any("damaged cache file" in r.getMessage() for r in caplog.records)
    assert "miss" in cache_logs(caplog)[-1] and torch.equal(again, first)


def test_default_cache_dir_is_xdg(graph, monkeypatch, tmp_path):
    root, _ = graph
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    DATASETS["text_graph"](root=str(root), nodes="nodes.csv", edges="edges.csv", encoder="text_transformer",
                           encoder_args=TINY, max_length=L, train_per_class=1, val_per_class=1)
    assert len(list((tmp_path / "xdg" / "mmkd").glob("text_graph-*.pt"))) == 1


# ---------------------------------------------------------------- the text step (deployment)
def test_text_step_recorded_and_replayed(graph):
    root, cache = graph
    d = load(root, cache, setting="inductive", held_out=0.5)
    step = d.text_inputs["text"]
    assert step["op"] == "sentence_embedding" and step["keys"] == ["x"]
    assert {k: step[k] for k in ("encoder", "encoder_args", "tokenizer", "max_length", "seed")} == {
        "encoder": "text_transformer", "encoder_args": TINY, "tokenizer": "minilm", "max_length": L, "seed": 0}
    assert d.meta()["text_inputs"] == d.text_inputs
    # new texts -> the same rows as the data set's features for those texts, and as the reference
    texts = [NODES[4][1], "a completely new abstract", NODES[0][1]]
    x = preprocess.apply_text(step, texts)["x"]
    want = reference_embeddings(texts)
    assert torch.allclose(x, want, atol=1e-5)
    assert torch.allclose(x[[0, 2]], d.test[0]["x"][[4, 0]], atol=1e-5)


def test_text_step_refuses_other_weights(graph):
    root, cache = graph
    step = dict(load(root, cache).text_inputs["text"])
    step["weights"] = "0" * 64
    T._ENCODERS.clear()
    with pytest.raises(GraphError, match=r"is not the one the features were computed with"):
        preprocess.apply_text(step, ["some text"])


# ---------------------------------------------------------------- MiniLM, the default encoder
def test_minilm_features_match_sentence_transformers(tmp_path):
    from sentence_transformers import SentenceTransformer

    from mmkd.modalities.text import minilm_dir

    root = tmp_path / "data"
    write_graph(root)
    d = DATASETS["text_graph"](root=str(root), nodes="nodes.csv", edges="edges.csv", max_length=32,
                               cache_dir=str(tmp_path / "cache"), train_per_class=1, val_per_class=1)
    texts = [n[1] for n in NODES]
    st = SentenceTransformer(str(minilm_dir()), device="cpu")  # Transformer -> mean Pooling -> Normalize
    want = torch.as_tensor(st.encode(texts, convert_to_numpy=True))
    x = d.test[0]["x"]
    assert x.shape == (10, 384) and d.text_inputs["text"]["encoder"] == "text_minilm"
    assert torch.allclose(F.normalize(x, dim=1), want, atol=1e-5)
    assert d.preprocessing == {}  # MiniLM embeddings have negative values: auto leaves them


# ---------------------------------------------------------------- end to end: train, export, predict from text
def test_mlp_student_predicts_new_nodes_from_text(tmp_path):
    """``mmkd run`` (GCN teacher -> MLP, inductive) on a text graph, then ``mmkd predict`` on a CSV of
    new node texts: the probabilities are the run's MLP applied to hand-pooled embeddings of them."""
    import json
    import random

    from omegaconf import OmegaConf

    from mmkd.cli import main

    rnd = random.Random(0)
    words = {"finance": "stock market shares bank price profit".split(), "sport": "football goal match team win".split(),
             "food": "bread cheese recipe oven soup bake".split()}
    nodes = [(f"n{i}", " ".join(rnd.choices(words[c], k=5)), c if i < 42 else "")
             for i, c in enumerate(list(words)[i % 3] for i in range(45))]
    edges = [(f"n{i}", f"n{(i + 3) % 45}") for i in range(45)]
    root = tmp_path / "data"
    write_graph(root, nodes=nodes, edges=edges)
    args = (f"+data.args={{nodes: nodes.csv, edges: edges.csv, encoder: text_transformer, encoder_args: "
            f"{{hidden: 16, layers: 1, heads: 2, intermediate: 32}}, max_length: {L}, cache_dir: {tmp_path / 'cache'}, "
            f"train_per_class: 3, val_per_class: 3, split: glnn, setting: inductive, batching: full}}")
    run = tmp_path / "run"
    code = main(["run", "experiment=g2m_glnn", f"data_root={root}", "data.name=text_graph", args,
                 f"run_dir={run}", f"out_dir={tmp_path}", "trainer.max_epochs=3", "teachers.gnn.epochs=3",
                 "trainer.progress=off", "trainer.tensorboard=false", "baseline=false", "export=[onnx]"])
    assert code == 0
    data = json.loads((run / "data.json").read_text())
    assert data["class_names"] == ["finance", "food", "sport"] and data["preprocessing"] == {}
    assert data["text_inputs"]["text"]["op"] == "sentence_embedding"

    new = ["bank shares profit", "goal match win", "soup recipe, with bread"]
    write_csv(tmp_path / "new.csv", [("text",), *[(t,) for t in new]])
    out = tmp_path / "preds.csv"
    assert main(["predict", f"run_dir={run}", f"input={tmp_path / 'new.csv'}", f"output={out}"]) == 0
    with out.open() as f:
        rows = list(csv.DictReader(f))
    cfg = OmegaConf.load(run / "config.yaml")
    mlp = MODELS[cfg.student.name](num_classes=3, in_shape=(16,), **cfg.student.args)
    mlp.load_state_dict(torch.load(run / "student.pt"))
    with torch.no_grad():
        want = mlp.eval()(reference_embeddings(new)).softmax(1)
    got = torch.tensor([[float(r[f"prob_{c}"]) for c in ("finance", "food", "sport")] for r in rows])
    assert len(rows) == 3 and torch.allclose(got, want.float(), atol=1e-5)
    assert [r["class_name"] for r in rows] == [data["class_names"][i] for i in want.argmax(1).tolist()]


@pytest.mark.parametrize("nodes, edges, extra, message", [
    (GOOD_NODES, "source,target\na,zz\n", "", r"edges\.csv:2: node id 'zz' is not in the node table"),
    ("id,body,label\na,x,u\n", GOOD_EDGES, "", r"nodes\.csv:1: no column 'text' in the header"),
    (GOOD_NODES, GOOD_EDGES, "data.args.normalize=l2", r"data\.args\.normalize='l2'; choose from"),
    (GOOD_NODES, GOOD_EDGES, "+data.args.max_length=0", r"data\.args\.max_length"),
    (GOOD_NODES, GOOD_EDGES, "data.args.split=glnn",  # the default 20 + 30 per class: checked before encoding
     r"nodes\.csv: class 0 has 1 labelled nodes; the glnn split takes train_per_class \+ val_per_class = 50"),
    (GOOD_NODES, GOOD_EDGES, "data.args.split=public", r"nodes\.csv: no split ships with this graph"),
])
def test_mmkd_run_refuses_bad_text_graphs(tmp_path, capsys, nodes, edges, extra, message):
    """Exit 2, one line on stderr, nothing written under out_dir."""
    import re

    from mmkd.cli import main

    bad(tmp_path, "nodes.csv", nodes)
    bad(tmp_path, "edges.csv", edges)
    out = tmp_path / "out"
    argv = ["run", "experiment=g2m_glnn", f"data_root={tmp_path / 'data'}", "data.name=text_graph",
            "+data.args={nodes: nodes.csv, edges: edges.csv, encoder: text_transformer, "
            f"cache_dir: {tmp_path / 'cache'}}}", f"out_dir={out}", "trainer.progress=off", "baseline=false"]
    code = main(argv + ([extra] if extra else []))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and re.search(message, err), err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))
    assert not list((tmp_path / "cache").glob("*.pt"))  # the encoder never ran
