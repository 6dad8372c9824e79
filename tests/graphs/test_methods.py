"""GNN-to-MLP methods: GLNN and FF-G2M losses against naive loops on hand-made graphs, their
invariants, the mixture core on graph batches (full and neighbour-sampled), and ``mmkd run`` on Cora."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.cli import main
from mmkd.graphs import check_graph, graph_splits
from mmkd.graphs.ffg2m import ffg2m_hfd, ffg2m_lfd
from mmkd.graphs.glnn import glnn
from mmkd.models import MLP
from mmkd.registry import LOSSES, MODELS
from mmkd.routers import ConstantRouter

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None

# a hand-made graph: 5 nodes, a self-loop (2 -> 2), node 4 isolated
EDGES = [(0, 1), (1, 0), (1, 2), (2, 1), (2, 2), (3, 1), (1, 3)]
N, C = 5, 3


def logits(seed):
    return torch.randn(N, C, generator=torch.Generator().manual_seed(seed)) * 2


def kl(p, q):
    """KL(p || q) of two probability vectors, by the definition."""
    return sum(pc * math.log(pc / qc) for pc, qc in zip(p.tolist(), q.tolist()))


def batch_of(edges=EDGES, seed=None):
    b = {"edge_index": torch.tensor(edges, dtype=torch.long).reshape(-1, 2).T}
    if seed is not None:
        b["seed"] = seed
    return b


# ---------------------------------------------------------------- GLNN
def test_glnn_matches_loop_and_masks_seeds():
    s, t = logits(0), logits(1)
    ref = sum(kl(t[i].softmax(0), s[i].softmax(0)) for i in range(N)) / N
    assert glnn(s, t, batch=batch_of()) == pytest.approx(ref, rel=1e-5)
    T = 2.0
    ref_t = sum(kl((t[i] / T).softmax(0), (s[i] / T).softmax(0)) for i in range(N)) / N * T**2
    assert glnn(s, t, temperature=T, batch=batch_of()) == pytest.approx(ref_t, rel=1e-5)
    seed = torch.tensor([True, False, True, True, False])
    ref_seed = sum(kl(t[i].softmax(0), s[i].softmax(0)) for i in (0, 2, 3)) / 3
    assert glnn(s, t, batch=batch_of(seed=seed)) == pytest.approx(ref_seed, rel=1e-5)
    per_node = glnn(s, t, batch=batch_of(seed=seed), reduction="none")
    assert per_node.shape == (N,) and per_node[~seed].abs().sum() == 0
    assert per_node.mean() == pytest.approx(ref_seed, rel=1e-5)  # what the mixture core averages
    assert glnn(t, t, batch=batch_of()) == pytest.approx(0.0, abs=1e-6)
    assert {"teacher": True, "per_sample": True, "batch": True}.items() <= LOSSES.meta("glnn").items()


# ---------------------------------------------------------------- FF-G2M
def test_lfd_matches_loop_over_edges_with_one_self_loop_per_node():
    s, t = logits(2), logits(3)
    pairs = [(j, i) for j, i in EDGES if j != i] + [(v, v) for v in range(N)]  # the given loop replaced
    ref = sum(kl(t[j].softmax(0), s[i].softmax(0)) for j, i in pairs) / len(pairs)
    assert ffg2m_lfd(s, t, batch=batch_of()) == pytest.approx(ref, rel=1e-5)
    T = 0.5
    ref_t = sum(kl((t[j] / T).softmax(0), (s[i] / T).softmax(0)) for j, i in pairs) / len(pairs)
    assert ffg2m_lfd(s, t, temperature=T, batch=batch_of()) == pytest.approx(ref_t, rel=1e-5)


def test_lfd_vanishes_when_student_equals_teacher_and_neighbours_agree():
    t = logits(4)
    assert ffg2m_lfd(t, t, batch=batch_of([])) == pytest.approx(0.0, abs=1e-6)  # self-loops only
    same = t[:1].repeat(N, 1)  # one prediction everywhere: neighbours agree
    assert ffg2m_lfd(same, same, batch=batch_of()) == pytest.approx(0.0, abs=1e-6)
    assert ffg2m_lfd(t, t, batch=batch_of()) > 1e-3  # otherwise neighbours' disagreement remains


def test_hfd_matches_loop_and_its_invariants():
    s, t = logits(5), logits(6)
    pairs = [(j, i) for j, i in EDGES if j != i]
    for tau in (1.0, 0.5):
        ref = sum(kl(((t[i] - t[j]).abs() / tau).softmax(0), ((s[i] - s[j]).abs() / tau).softmax(0))
                  for j, i in pairs) / len(pairs)
        assert ffg2m_hfd(s, t, tau=tau, batch=batch_of()) == pytest.approx(ref, rel=1e-5)
    assert ffg2m_hfd(t, t, batch=batch_of()) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([3.0, -1.0, 0.5])  # the same shift on every node leaves differences alone
    base = float(ffg2m_hfd(s, t, batch=batch_of()))
    assert ffg2m_hfd(s + shift, t, batch=batch_of()) == pytest.approx(base, rel=1e-5)
    assert ffg2m_hfd(s, t, batch=batch_of([(2, 2)])) == 0  # no edges besides a self-loop
    s.requires_grad_(True)
    ffg2m_hfd(s, t, batch=batch_of([])).backward()  # differentiable even without edges


def test_mlp_bn_momentum_one_evaluates_with_the_last_full_batch_statistics():
    x = torch.rand(500, 20) * 0.01  # small inputs (as row-normalised features): stats far from (0, 1)
    outs = {}
    for momentum in (1.0, 0.1):
        torch.manual_seed(0)
        mlp = MLP(num_classes=3, in_shape=(20,), hidden=[16], batch_norm=True, bn_momentum=momentum)
        train_out = mlp.train()(x)  # one full-batch step updates the running statistics once
        outs[momentum] = (train_out, mlp.eval()(x))
    assert torch.allclose(outs[1.0][1], outs[1.0][0], rtol=1e-2, atol=1e-3)  # (unbiased vs biased variance)
    assert not torch.allclose(outs[0.1][1], outs[0.1][0], rtol=1e-1, atol=1e-2)


# ---------------------------------------------------------------- the mixture core on graph batches
def tiny_splits(**kw):
    g = torch.Generator().manual_seed(0)
    n, classes = 60, 3
    y = torch.arange(n) % classes
    x = torch.rand(n, 6, generator=g) + torch.nn.functional.one_hot(y, 6) * 2
    ring = torch.stack([torch.arange(n), (torch.arange(n) + classes) % n])  # links nodes of one class
    graph = check_graph(x, torch.cat([ring, ring.flip(0)], 1), y, "tiny")
    return graph_splits(graph, split="glnn", train_per_class=4, val_per_class=4, **kw)


def test_distiller_sums_graph_terms_over_cached_teachers(tmp_path):
    d = tiny_splits()
    torch.manual_seed(0)
    teachers = [Teacher(MODELS[name](num_classes=3, in_shape=(6,), hidden=8), ["x", "edge_index"])
                for name in ("gcn", "sage")]
    cached = [cache_teacher(t, d.train, tmp_path) for t in teachers]
    student = Net(MLP(num_classes=3, in_shape=(6,), hidden=[16]), ["x"])
    terms = [Term("ce", 0.2), Term("glnn", 0.8), Term("ffg2m_lfd", 0.8), Term("ffg2m_hfd", 0.8)]
    mix = Distiller(student, cached, terms, ConstantRouter([0.25, 0.75])).eval()
    batch = d.train[0]
    with torch.no_grad():
        out = mix(batch)
        s = student(batch).logits
        t = [teacher(batch).logits for teacher in teachers]
    for name, fn, weight in (("glnn", glnn, 0.8), ("ffg2m_lfd", ffg2m_lfd, 0.8), ("ffg2m_hfd", ffg2m_hfd, 0.8)):
        ref = weight * (0.25 * fn(s, t[0], batch=batch) + 0.75 * fn(s, t[1], batch=batch))
        assert float(out[name]) == pytest.approx(float(ref), rel=1e-5)
    assert torch.equal(cached[0](batch).logits, t[0])  # cache rows follow the batch's index


def test_neighbor_batches_train_an_mlp_with_a_live_teacher(tmp_path):
    d = tiny_splits(setting="inductive", batching="neighbor", num_neighbors=[3, 3])
    torch.manual_seed(0)
    gcn = MODELS["gcn"](num_classes=3, in_shape=(6,), hidden=16)
    Trainer(run_dir=tmp_path / "t", max_epochs=15, batch_size=16, lr=0.02, tensorboard=False,
            progress="off").fit(Distiller(Net(gcn, ["x", "edge_index"]), [], [Term("ce")]), d.train, d.val)
    student = Net(MLP(num_classes=3, in_shape=(6,), hidden=[16]), ["x"])
    mix = Distiller(student, [Teacher(gcn, ["x", "edge_index"])],
                    [Term("ce", 0.5), Term("ffg2m_lfd", 0.5), Term("ffg2m_hfd", 0.5)], ConstantRouter())
    trainer = Trainer(run_dir=tmp_path / "s", max_epochs=15, batch_size=16, lr=0.02, tensorboard=False, progress="off")
    fitted = trainer.fit(mix, d.train, d.val)
    assert all(math.isfinite(h["train/ffg2m_hfd"]) for h in fitted.history)
    assert trainer.evaluate(mix, d.test)["acc"] > 0.6  # a separable toy task: well above chance (1/3)


# ---------------------------------------------------------------- mmkd run on Cora
@pytest.mark.slow
@pytest.mark.parametrize("experiment,extra", [
    ("g2m_ffg2m", []),
    ("g2m_glnn", ["data.args.setting=inductive", "data.args.batching=neighbor", "trainer.batch_size=1024",
                  "baseline=false"]),
])
def test_mmkd_run_g2m_on_cora(tmp_path, experiment, extra):
    if DATA is None:
        pytest.skip("set MMKD_DATA to the data root (for example ../shared/data)")
    rc = main(["run", f"experiment={experiment}", f"data_root={DATA}", f"run_dir={tmp_path / 'run'}",
               "trainer.max_epochs=2", "teachers.gnn.epochs=1", "trainer.tensorboard=false", "export=[onnx]",
               *extra])
    assert rc == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["student"]["test_acc"] <= 1 and 0 <= results["teachers"]["gnn"]["test_acc"] <= 1
    assert (tmp_path / "run" / "export" / "student.onnx").is_file()
    history = (tmp_path / "run" / "student" / "metrics.csv").read_text()
    assert ("train/ffg2m_lfd" in history) == (experiment == "g2m_ffg2m")
