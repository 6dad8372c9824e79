"""Safe loading of untrusted files: npz graphs without pickle, weights-only torch.load of checkpoints,
teacher weights and caches, and damaged checkpoints and cache entries as one-line errors or rebuilds.

Every malicious file here carries a pickle whose only effect is to write a marker file: the tests
first prove that an unsafe load really runs it, then that our loaders do not."""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch import nn

import mmkd.io
from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer, cache_teacher
from mmkd.config import ConfigError
from mmkd.data import DataError, loader
from mmkd.graphs import GraphError, check_graph, graph_splits, read_npz
from mmkd.graphs.io import planetoid
from mmkd.modalities import avdigits as av
from mmkd.build import load_weights
from mmkd.trainer import _rng_state, _set_rng_state


class Payload:
    """Unpickles into a call of ``exec`` that writes ``marker``: harmless, and detectable."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def one_line(e: pytest.ExceptionInfo, *parts: str) -> str:
    """The exception's message, after checking it is one line and names every part."""
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, (p, msg)
    return msg


# ---------------------------------------------------------------- npz graphs
def gnn_benchmark(path: Path, **override) -> Path:
    """A 4-node graph in the gnn-benchmark layout; ``override`` replaces (or adds) arrays."""
    adj = sp.csr_matrix(np.array([[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=np.float32))
    arrays = dict(adj_data=adj.data, adj_indices=adj.indices, adj_indptr=adj.indptr, adj_shape=np.array(adj.shape),
                  attr_matrix=np.eye(4, 3, dtype=np.float32) + 1, labels=np.array([0, 1, 1, 0]),
                  class_names=np.array(["a", "b"]))
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def edge_list(path: Path, **override) -> Path:
    """A 6-node graph in the node/edge-list layout with disjoint masks; ``override`` replaces arrays."""
    n = 6
    arrays = dict(node_features=np.ones((n, 2), dtype=np.float32), node_labels=np.arange(n) % 2,
                  edges=np.array([[0, 1], [1, 2], [2, 3], [4, 5]]),
                  train_masks=np.isin(np.arange(n), [0, 1]), val_masks=np.isin(np.arange(n), [2, 3]),
                  test_masks=np.isin(np.arange(n), [4, 5]))
    arrays.update(override)
    np.savez(path, **arrays)
    return path


def test_graph_error_is_a_data_error_and_config_mistakes_stay_config_errors(tmp_path):
    assert issubclass(GraphError, DataError) and not issubclass(GraphError, ConfigError)
    with pytest.raises(ConfigError) as e:
        planetoid(tmp_path, "nope")
    assert not isinstance(e.value, DataError)
    g = check_graph(torch.ones(30, 2), torch.tensor([[0], [1]]), torch.arange(30) % 3, "g")
    with pytest.raises(ConfigError, match=r"data.args.held_out=1.5: the held-out fraction"):
        graph_splits(g, split="glnn", setting="inductive", held_out=1.5, train_per_class=2, val_per_class=2)


def test_malicious_npz_runs_no_code(tmp_path):
    marker = tmp_path / "marker"
    path = gnn_benchmark(tmp_path / "evil.npz", class_names=np.array([Payload(marker), "b"], dtype=object))
    # the file really is malicious: the old, unsafe read runs its payload
    with np.load(path, allow_pickle=True) as z:
        z["class_names"]
    assert marker.read_text() == "ran"
    marker.unlink()

    with pytest.raises(DataError) as e:
        read_npz(path)
    one_line(e, str(path), "class_names", "np.array(names, dtype=str)")
    assert not marker.exists()
    # an object array in the other layout too
    path = edge_list(tmp_path / "evil2.npz", node_labels=np.array([Payload(marker)] * 6, dtype=object))
    with pytest.raises(DataError) as e:
        read_npz(path)
    one_line(e, str(path), "node_labels", "object array")
    assert not marker.exists()


def test_string_class_names_need_no_pickle(tmp_path):
    g = read_npz(gnn_benchmark(tmp_path / "g.npz"))
    assert g.class_names == ["a", "b"] and g.y.tolist() == [0, 1, 1, 0]
    g = read_npz(gnn_benchmark(tmp_path / "b.npz", class_names=np.array([b"x", b"y"])))
    assert g.class_names == ["x", "y"]


def _garbage(tmp_path: Path) -> dict[str, Path]:
    files = {}
    (p := tmp_path / "empty.npz").write_bytes(b"")
    files["empty"] = p
    (p := tmp_path / "text.npz").write_text("node_features,labels\n1,2\n")
    files["text"] = p
    zipfile.ZipFile(p := tmp_path / "noarrays.npz", "w").close()
    files["no arrays"] = p
    with open(p := tmp_path / "single.npz", "wb") as f:
        np.save(f, np.ones(3))
    files["npy"] = p
    full = gnn_benchmark(tmp_path / "full.npz").read_bytes()
    (p := tmp_path / "truncated.npz").write_bytes(full[: len(full) // 2])
    files["truncated"] = p
    return files


@pytest.mark.parametrize("kind,words", [("empty", "empty"), ("text", "not an .npz"), ("no arrays", "no arrays"),
                                        ("npy", "single array"), ("truncated", "cannot read")])
def test_garbage_npz_is_one_line_data_error(tmp_path, kind, words):
    path = _garbage(tmp_path)[kind]
    with pytest.raises(DataError) as e:
        read_npz(path)
    one_line(e, str(path), words, "np.savez")


@pytest.mark.parametrize("layout,override,words", [
    ("edges", dict(node_labels=np.array(["a", "b", "a", "b", "a", "b"])), "node_labels must hold integer class ids"),
    ("edges", dict(node_labels=np.array([0, 1, 0.5, 1, 0, 1])), "fractional"),
    ("edges", dict(edges=np.array([[0, 1.7], [1, 2], [2, 3], [4, 5]])), "edges must hold integer"),
    ("gnn", dict(adj_indices=np.array([1.0, 2.9, 2.0])), "adj_indices must hold integer"),
    ("gnn", dict(labels=np.array(["x", "y", "y", "x"])), "labels must hold integer class ids 0..C-1"),
    ("gnn", dict(attr_matrix=np.array([["a", "b", "c"]] * 4)), "attr_matrix must hold numbers"),
    ("gnn", dict(adj_indptr=np.array([0, 1, 2, 9, 3])), "not a valid CSR matrix"),
])
def test_bad_arrays_are_refused_not_cast(tmp_path, layout, override, words):
    path = (edge_list if layout == "edges" else gnn_benchmark)(tmp_path / "g.npz", **override)
    with pytest.raises(DataError) as e:
        read_npz(path)
    one_line(e, str(path), words)


def test_float_edge_ids_were_truncated_by_a_cast(tmp_path):
    # what the refused file would have become: edge 0 -> 1.7 read as 0 -> 1, a wrong graph
    assert np.asarray(np.array([[0, 1.7]]), dtype=np.int64).tolist() == [[0, 1]]
    # whole-number float labels are exact and accepted
    g = read_npz(edge_list(tmp_path / "g.npz", node_labels=np.array([0.0, 1, 0, 1, 0, 1])))
    assert g.y.tolist() == [0, 1, 0, 1, 0, 1]


def test_identical_or_overlapping_masks_are_refused(tmp_path):
    n = 6
    ok = read_npz(edge_list(tmp_path / "ok.npz"))
    assert [ok.masks[p].nonzero().flatten().tolist() for p in ("train", "val", "test")] == [[0, 1], [2, 3], [4, 5]]
    same = np.isin(np.arange(n), [0, 1])
    path = edge_list(tmp_path / "same.npz", val_masks=same)
    with pytest.raises(DataError) as e:
        read_npz(path)
    one_line(e, str(path), "train and val masks are identical")
    path = edge_list(tmp_path / "overlap.npz", test_masks=np.isin(np.arange(n), [1, 4, 5]))
    with pytest.raises(DataError) as e:
        read_npz(path)
    one_line(e, str(path), "1 nodes are in both the train and the test mask (first: node 1)")
    # masks set on a graph by hand are checked where the public split uses them
    g = check_graph(torch.ones(4, 2), torch.tensor([[0], [1]]), torch.tensor([0, 1, 0, 1]), "hand")
    g.masks = {"train": torch.tensor([True, True, False, False]), "val": torch.tensor([False, True, True, False]),
               "test": torch.tensor([False, False, False, True])}
    with pytest.raises(GraphError, match="hand: 1 nodes are in both the train and the val mask"):
        graph_splits(g, split="public")


# ---------------------------------------------------------------- torch.load of checkpoints and weights
D, C = 4, 3


def tiny_data(n=48, seed=0, name="train"):
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(name, x=torch.randn(n, D, generator=g), label=torch.randint(0, C, (n,), generator=g))


def tiny_module(seed=0):
    torch.manual_seed(seed)
    return Distiller(Net(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C)), keys=("x",)), [], [Term("ce")])


def fit(run_dir, epochs=1, resume=False):
    t = Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=16, lr=1e-2, tensorboard=False, progress="off",
                device="cpu", resume=resume)
    return t.fit(tiny_module(), tiny_data(), tiny_data(24, 1, "val"))


def draws():
    return ([random.random() for _ in range(3)] + [random.gauss(0, 1)], np.random.rand(3).tolist()
            + [float(np.random.standard_normal())], torch.rand(3).tolist())


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()  # leave a cached Gaussian in both (gauss_next, has_gauss)
    assert random.getstate()[2] is not None and np.random.get_state()[3] == 1
    mmkd.io.save({"rng": _rng_state()}, tmp_path / "rng.pt")
    expected = draws()
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert draws() != expected
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == expected
    # and the restored states are the originals, bit for bit
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), np.random.standard_normal()
    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    _set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert random.getstate() == py and torch.equal(torch.get_rng_state(), pt)
    got = np.random.get_state()
    assert got[0] == npy[0] and np.array_equal(got[1], npy[1]) and got[2:] == npy[2:]


def test_trainer_checkpoints_load_weights_only_and_resume(tmp_path):
    first = fit(tmp_path / "r", epochs=2)
    for name in ("last.pt", "best.pt"):
        torch.load(tmp_path / "r" / name, weights_only=True)  # raises if anything in it needs pickle
    again = fit(tmp_path / "r", epochs=2, resume=True)  # a finished run: everything comes from last.pt
    assert again.history == first.history and again.best_epoch == first.best_epoch


@pytest.mark.parametrize("damage", ["truncated", "text", "empty", "pickled objects"])
def test_damaged_last_pt_is_one_line_data_error(tmp_path, damage):
    fit(tmp_path, epochs=1)
    last = tmp_path / "last.pt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "text":
        last.write_text("epoch: 1\nthis is not a checkpoint\n")
    elif damage == "empty":
        last.write_bytes(b"")
    else:  # what an old last.pt held: numpy's RNG state, an array only full unpickling can read
        torch.save({"rng": {"numpy": np.random.get_state()}}, last)
    with pytest.raises(DataError) as e:
        fit(tmp_path, epochs=2, resume=True)
    msg = one_line(e, str(last), "delete it to train that stage again")
    if damage == "pickled objects":
        assert "weights-only load refuses" in msg


def test_teacher_weights_load_safely(tmp_path):
    model = nn.Linear(D, C)
    good = tmp_path / "good.pt"
    torch.save(nn.Linear(D, C).state_dict(), good)
    load_weights(model, str(good), "teachers.t.weights")
    assert torch.equal(model.weight, torch.load(good, weights_only=True)["weight"])
    fix = "a state dict saved with torch.save"
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "text.pt"
    text.write_text("hello\nworld\n")
    for path in (truncated, text):
        with pytest.raises(DataError) as e:
            load_weights(model, str(path), "teachers.t.weights")
        one_line(e, str(path), fix)
    not_dict = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), not_dict)
    with pytest.raises(DataError) as e:
        load_weights(model, str(not_dict), "teachers.t.weights")
    one_line(e, str(not_dict), "not a state dict", fix)
    # a pickle that runs code: proven to run under an unsafe load, refused by ours
    marker, evil = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"weight": Payload(marker)}, evil)
    torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError) as e:
        load_weights(model, str(evil), "teachers.t.weights")
    one_line(e, str(evil), "weights-only load refuses", fix)
    assert not marker.exists()


def test_io_load_names_the_file_and_the_fix(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(pickle.dumps([1, 2]))  # a plain pickle, not a torch.save file
    with pytest.raises(DataError) as e:
        mmkd.io.load(path, "the thing", "make it again")
    one_line(e, str(path), "cannot read the thing", "make it again")
    with pytest.raises(DataError) as e:
        mmkd.io.load(tmp_path / "absent.pt", "the thing", "make it again")
    one_line(e, "absent.pt", "no such file", "make it again")


# ---------------------------------------------------------------- the teacher-output cache
def make_teacher(seed=0):
    torch.manual_seed(seed)
    return Teacher(nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)), keys=("x",), features=("1",))


def cache_data():
    g = torch.Generator().manual_seed(5)
    return TensorDictDataset("train", deterministic=True, x=torch.randn(100, D, generator=g),
                             label=torch.randint(0, C, (100,), generator=g))


def live_outputs(teacher, ds, batch_size=32):
    """The teacher's outputs in the cache's batches (a matrix product's rounding may depend on the
    batch size, so other batches need not match bit for bit)."""
    with torch.no_grad():
        outs = [teacher(b) for b in loader(ds, batch_size)]
    return torch.cat([o.logits for o in outs]), torch.cat([o.features["1"] for o in outs])


def forward_counter(teacher):
    calls = []
    teacher.model.register_forward_hook(lambda *a: calls.append(1))
    return calls


def assert_valid_entry(path, logits):
    stored = mmkd.io.load_checked(path)
    assert stored is not None and torch.equal(stored["logits"], logits)
    index = json.loads(mmkd.io.index_path(path).read_text())
    assert index["size"] == path.stat().st_size and index["file"] == path.name


def test_cache_entry_has_a_checksum_index(tmp_path):
    ds, teacher = cache_data(), make_teacher()
    cached = cache_teacher(teacher, ds, tmp_path, batch_size=32)
    import hashlib

    index = json.loads(mmkd.io.index_path(cached.path).read_text())
    assert index["sha256"] == hashlib.sha256(cached.path.read_bytes()).hexdigest()
    assert_valid_entry(cached.path, live_outputs(teacher, ds)[0])


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "no index", "bad index"])
def test_damaged_cache_entry_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    ds, teacher = cache_data(), make_teacher()
    calls = forward_counter(teacher)
    path = cache_teacher(teacher, ds, tmp_path / "c", batch_size=32).path
    n = len(calls)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped byte":  # same size, other contents
        path.write_bytes(data[:-30] + bytes([data[-30] ^ 0xFF]) + data[-29:])
    elif damage == "no index":  # a complete, loadable file with other values, but no index: not trusted
        torch.save({"logits": torch.zeros(100, C), "features": {"1": torch.zeros(100, 16)}}, path)
        mmkd.io.index_path(path).unlink()
    else:
        mmkd.io.index_path(path).write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="mmkd"):
        again = cache_teacher(teacher, ds, tmp_path / "c", batch_size=32)
    assert len(calls) == 2 * n  # recomputed, once
    del calls[:]
    assert any(str(path) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING), caplog.text
    fresh = cache_teacher(make_teacher(), ds, tmp_path / "fresh", batch_size=32)
    assert torch.equal(again.logits, fresh.logits) and torch.equal(again.features["1"], fresh.features["1"])
    assert_valid_entry(path, fresh.logits)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mmkd"):
        cache_teacher(teacher, ds, tmp_path / "c", batch_size=32)  # the rebuilt entry is used as is
    assert not caplog.records and calls == []
    assert torch.equal(again.logits, live_outputs(teacher, ds)[0])


def _build_in_process(root, barrier, queue):
    torch.set_num_threads(1)
    ds, teacher = cache_data(), make_teacher()
    barrier.wait()
    for _ in range(3):  # build at once, then read (maybe while another process still writes)
        cached = cache_teacher(teacher, ds, root, batch_size=32)
        queue.put((cached.path.name, cached.logits.tolist(), cached.features["1"].tolist()))


def test_concurrent_builds_of_one_entry_agree_and_leave_it_valid(tmp_path):
    ctx = mp.get_context("fork")  # what DataLoader workers use on Linux; spawn would re-import torch 4 times
    n = 4
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(tmp_path / "c", barrier, queue)) for _ in range(n)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(3 * n)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    ref = cache_teacher(make_teacher(), cache_data(), tmp_path / "ref", batch_size=32)
    for name, logits, feats in results:
        assert name == ref.path.name
        assert torch.equal(torch.tensor(logits), ref.logits) and torch.equal(torch.tensor(feats), ref.features["1"])
    path = tmp_path / "c" / ref.path.name
    assert_valid_entry(path, ref.logits)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([path.name, mmkd.io.index_path(path).name])


# ---------------------------------------------------------------- the AV-digits feature cache
def test_avdigits_cache_is_checked_too(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(12.0).reshape(3, 4)

    params, files = {"n_mels": 4}, [["0_a_0.wav", 10, 123]]
    first = av.cached("logmel", params, files, compute, tmp_path, "avdigits")
    (path,) = tmp_path.glob("avdigits-logmel-*.pt")
    assert mmkd.io.index_path(path).exists() and len(calls) == 1
    assert torch.equal(av.cached("logmel", params, files, compute, tmp_path, "avdigits"), first) and len(calls) == 1
    path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="mmkd"):
        again = av.cached("logmel", params, files, compute, tmp_path, "avdigits")
    assert len(calls) == 2 and torch.equal(again, first)
    assert any(str(path) in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    mmkd.io.index_path(path).unlink()  # no index: recomputed, never loaded blindly
    av.cached("logmel", params, files, compute, tmp_path, "avdigits")
    assert len(calls) == 3 and mmkd.io.index_path(path).exists()
