"""CRD (mmkd.losses.features.crd): the NCE loss against a naive loop on a small bank with seeded
negatives, the momentum update of both memory banks, the negatives of other classes, float64
gradients, an exact resume (memory banks, Z and the negatives' generator), one-line errors, and the
shipped config training one epoch on a tiny real CIFAR-10 subset."""
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses.features.crd import CRDMemory, crd, nce
from mmkd.routers import ConstantRouter
from tests.reference import TINY_CIFAR10, Crash, CrashAtEpoch

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
F64 = torch.float64
CPU = torch.device("cpu")
N, C, DS, DT = 12, 3, 5, 7  # items, classes, student and teacher feature widths


def memory(k=4, dim=4, seed=0, **args):
    torch.manual_seed(seed)
    m = CRDMemory((DS,), (DT,), N, dim=dim, k=k, **args).double()
    m.labels = torch.arange(N) % C
    return m


def features(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, DS, generator=g, dtype=F64), torch.randn(b, DT, generator=g, dtype=F64)


def unit(v):
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v]


def ref_embed(linear, f):
    w, b = linear.weight.tolist(), linear.bias.tolist()
    return [unit([sum(a * x for a, x in zip(row, r)) + bi for row, bi in zip(w, b)]) for r in f.tolist()]


def ref_crd(m, f_s, f_t, idx, mem_s, mem_t):
    """Per-instance CRD and (Z_s, Z_t) in python floats, Z set from this batch (the first)."""
    v_s, v_t = ref_embed(m.embed_s, f_s), ref_embed(m.embed_t, f_t)
    sides = []
    for v, bank in ((v_s, mem_t.tolist()), (v_t, mem_s.tolist())):
        e = [[math.exp(sum(a * x for a, x in zip(v[b], bank[j])) / m.temperature) for j in row]
             for b, row in enumerate(idx.tolist())]
        z = N * sum(map(sum, e)) / sum(map(len, e))
        noise = m.k / N
        loss = []
        for row in e:
            p = [x / z for x in row]
            neg = sum(math.log(noise / (q + noise + 1e-7)) for q in p[1:])
            loss.append(-math.log(p[0] / (p[0] + noise + 1e-7)) - neg)
        sides.append((loss, z))
    return torch.tensor([a + b for a, b in zip(sides[0][0], sides[1][0])], dtype=F64), (sides[0][1], sides[1][1])


def seeded_draw(m, index):
    """The negatives the next call will draw (the generator put back where it was)."""
    rng = m.generator(CPU)
    state = rng.get_state()
    idx = m.draw(index)
    rng.set_state(state)
    return idx


def test_nce_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, 6, generator=g, dtype=F64) * 2
    ref = [-math.log(r[0] / (r[0] + 5 / 40 + 1e-7)) - sum(math.log((5 / 40) / (q + 5 / 40 + 1e-7)) for q in r[1:])
           for r in p.tolist()]
    torch.testing.assert_close(nce(p, 40), torch.tensor(ref, dtype=F64))


@pytest.mark.parametrize("seed", [0, 1])
def test_loss_matches_the_naive_loop_on_a_small_bank(seed):
    m = memory(seed=seed)
    f_s, f_t = features(seed=seed + 10)
    index = torch.tensor([0, 4, 7, 11])
    idx = seeded_draw(m, index)
    mem_s, mem_t = m.memory_s.clone(), m.memory_t.clone()
    ref, (z_s, z_t) = ref_crd(m, f_s, f_t, idx, mem_s, mem_t)
    per = crd(f_s, f_t, module=m, batch={"index": index}, reduction="none")
    torch.testing.assert_close(per, ref)
    torch.testing.assert_close(m.z, torch.tensor([z_s, z_t], dtype=F64))
    assert per.shape == (4,) and torch.isclose(crd(f_s, f_t, module=memory(seed=seed), batch={"index": index}),
                                               ref.mean())


def test_memory_update_is_the_momentum_mix_renormalised_and_z_stays():
    m = memory()
    f_s, f_t = features()
    index = torch.tensor([2, 3, 9, 5])
    before_s, before_t = m.memory_s.clone(), m.memory_t.clone()
    v_s, v_t = ref_embed(m.embed_s, f_s), ref_embed(m.embed_t, f_t)
    crd(f_s, f_t, module=m, batch={"index": index})
    z = m.z.clone()
    for row, i in enumerate(index.tolist()):
        expect_s = unit([0.5 * a + 0.5 * b for a, b in zip(before_s[i].tolist(), v_s[row])])
        expect_t = unit([0.5 * a + 0.5 * b for a, b in zip(before_t[i].tolist(), v_t[row])])
        torch.testing.assert_close(m.memory_s[i], torch.tensor(expect_s, dtype=F64))
        torch.testing.assert_close(m.memory_t[i], torch.tensor(expect_t, dtype=F64))
    rest = [i for i in range(N) if i not in index.tolist()]
    assert torch.equal(m.memory_s[rest], before_s[rest]) and torch.equal(m.memory_t[rest], before_t[rest])
    crd(*features(seed=5), module=m, batch={"index": torch.tensor([0, 1, 2, 3])})
    assert torch.equal(m.z, z) and (z > 0).all()  # set once, on the first batch


def test_momentum_zero_stores_the_embeddings_and_one_keeps_the_memory():
    f_s, f_t = features()
    index = torch.tensor([1, 6, 8, 10])
    m0, m1 = memory(momentum=0.0), memory(momentum=1.0)
    before = m1.memory_s.clone()
    v_s = torch.tensor(ref_embed(m0.embed_s, f_s), dtype=F64)
    crd(f_s, f_t, module=m0, batch={"index": index})
    crd(f_s, f_t, module=m1, batch={"index": index})
    torch.testing.assert_close(m0.memory_s[index], v_s)
    torch.testing.assert_close(m1.memory_s[index], torch.nn.functional.normalize(before[index], dim=1))


def test_negatives_are_distinct_items_of_other_classes_after_the_positive():
    m = memory(k=7)  # 8 items of another class than each anchor's: without replacement
    index = torch.tensor([0, 1, 2, 5, 9])
    for _ in range(20):
        idx = m.draw(index)
        assert idx.shape == (5, 8) and torch.equal(idx[:, 0], index)
        for row, i in zip(idx[:, 1:].tolist(), index.tolist()):
            assert len(set(row)) == 7 and all(j % C != i % C for j in row)
    seen = torch.stack([m.draw(index)[:, 1:] for _ in range(100)])  # [draws, anchors, K]
    for a, i in enumerate(index.tolist()):
        assert set(seen[:, a].flatten().tolist()) == {j for j in range(N) if j % C != i % C}  # all of them reached


def test_with_fewer_candidates_than_k_they_are_drawn_with_replacement_and_unlabelled_anchors_take_any():
    m = memory(k=20)
    m.labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, -1])
    draws = torch.stack([m.draw(torch.tensor([0, 11])) for _ in range(10)])
    assert draws.shape == (10, 2, 21) and (m.labels[draws[:, 0, 1:]] != 0).all()  # the 8 of other classes
    assert set(draws[:, 0, 1:].flatten().tolist()) == set(range(4, 12))
    assert set(draws[:, 1, 1:].flatten().tolist()) == set(range(N))  # unlabelled: any item, itself included
    m.labels = torch.zeros(N, dtype=torch.long)
    with pytest.raises(ValueError, match="no training item of another class than 0.*negatives: uniform"):
        m.draw(torch.tensor([3]))


def test_uniform_negatives_and_the_generator_is_seeded_by_the_module():
    a, b = memory(k=30, negatives="uniform"), memory(k=30, negatives="uniform")
    a.labels = b.labels = None  # not needed
    index = torch.tensor([3, 4])
    da, db = a.draw(index), b.draw(index)
    assert torch.equal(da, db) and da.shape == (2, 31) and 0 <= int(da.min()) and int(da.max()) < N
    assert not torch.equal(a.draw(index), da)  # the generator moved on
    assert not torch.equal(memory(k=30, negatives="uniform", seed=3).draw(index), da)


def test_gradcheck_float64_wrt_the_embeddings_and_the_features():
    m = memory(k=5)
    f_s, f_t = features()
    index = torch.tensor([0, 4, 7, 11])
    idx = m.draw(index)
    v_s, v_t = m.embed(f_s, f_t)
    m.contrast(v_s.detach(), v_t.detach(), idx)  # sets Z, which is a constant after

    def loss_of_embeddings(a, b):
        return sum(nce(p, N) for p in m.contrast(a, b, idx)).mean()

    def loss_of_features(a, b):
        return sum(nce(p, N) for p in m.contrast(*m.embed(a, b), idx)).mean()

    emb = (torch.nn.functional.normalize(torch.randn(4, 4, dtype=F64), dim=1).requires_grad_(),
           torch.nn.functional.normalize(torch.randn(4, 4, dtype=F64), dim=1).requires_grad_())
    assert torch.autograd.gradcheck(loss_of_embeddings, emb)
    assert torch.autograd.gradcheck(loss_of_features, (f_s.requires_grad_(), f_t.requires_grad_()))


def test_the_banks_take_no_gradient_and_the_heads_do():
    m = memory()
    f_s, f_t = features()
    crd(f_s, f_t, module=m, batch={"index": torch.tensor([0, 1, 2, 3])}).backward()
    assert m.embed_s.weight.grad.abs().sum() > 0 and m.embed_t.weight.grad.abs().sum() > 0
    assert not m.memory_s.requires_grad and not m.memory_t.requires_grad


def test_autocast_changes_nothing():
    torch.manual_seed(0)
    a = CRDMemory((DS,), (DT,), N, dim=4, k=4)
    a.labels = torch.arange(N) % C
    b = CRDMemory((DS,), (DT,), N, dim=4, k=4)
    b.load_state_dict(a.state_dict())
    b.labels = a.labels
    f_s, f_t = (f.float() for f in features())
    batch = {"index": torch.tensor([0, 4, 7, 11])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = crd(f_s.bfloat16(), f_t.bfloat16(), module=a, batch=batch, reduction="none")
    full = crd(f_s.bfloat16().float(), f_t.bfloat16().float(), module=b, batch=batch, reduction="none")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full)


def test_errors_are_one_line_and_name_the_fix():
    m = memory()
    f_s, f_t = features()
    with pytest.raises(ValueError, match="no 'index' entry.*it has: image, label"):
        crd(f_s, f_t, module=m, batch={"image": f_s, "label": torch.zeros(4)})
    with pytest.raises(ValueError, match="no 'index' entry.*none given"):
        crd(f_s, f_t, module=m)
    with pytest.raises(ValueError, match=r"Term\('crd'"):
        crd(f_s, f_t, batch={"index": torch.arange(4)})
    with pytest.raises(ValueError, match="batch index 12 is not a position in the 12 training items"):
        crd(f_s, f_t, module=m, batch={"index": torch.tensor([0, 1, 2, 12])})
    with pytest.raises(ValueError, match="batch index -1 is not a position"):
        crd(f_s, f_t, module=m, batch={"index": torch.tensor([0, -1, 2, 3])})
    m.labels = None
    with pytest.raises(ValueError, match="no item labels"):
        crd(f_s, f_t, module=m, batch={"index": torch.arange(4)})
    with pytest.raises(ValueError, match="negatives='hard'; choose from: other_classes, uniform"):
        CRDMemory((DS,), (DT,), N, negatives="hard")
    with pytest.raises(ValueError, match="no teacher"):
        CRDMemory((DS,), None, N)
    with pytest.raises(ValueError, match="one feature per side"):
        CRDMemory([(DS,), (DS,)], [(DT,)], N)


# ---------------------------------------------------------------- in a fit
D = 6


class Embed(nn.Module):
    """A linear embedding then a classifier; ``emb`` is the feature CRD reads."""

    def __init__(self, width):
        super().__init__()
        self.emb, self.fc = nn.Linear(D, width), nn.Linear(width, C)

    def forward(self, x):
        return self.fc(torch.relu(self.emb(x)))


def dataset(n=32):
    g = torch.Generator().manual_seed(0)
    return TensorDictDataset("crd", x=torch.randn(n, D, generator=g), label=torch.arange(n) % C)


def distiller(data, seed=0, teachers=1, k=8):
    torch.manual_seed(seed)
    term = Term("crd", 0.8, {"k": k, "dim": 8}, student="features.emb", teacher="features.emb",
                sizes={"student_shape": (5,), "teacher_shape": (7,), "num_items": len(data)})
    return Distiller(Net(Embed(5), ("x",), ["emb"]), [Teacher(Embed(7), ("x",), ["emb"]) for _ in range(teachers)],
                     [Term("ce"), term], ConstantRouter())


def fit(run_dir, module, data, callbacks=(), resume=False, epochs=4):
    return Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=8, lr=0.1, keep="last", resume=resume,
                   tensorboard=False, progress="off").fit(module, data, data, callbacks=list(callbacks))


def test_the_module_trains_with_the_student_and_its_banks_are_saved(tmp_path):
    data = dataset()
    d = distiller(data)
    m = d.loss_modules["crd"]
    assert m is d.terms[1].module and m in d.callbacks() and d.terms[1].args == {} and m.k == 8
    head = m.embed_s.weight.detach().clone()
    res = fit(tmp_path, d, data, epochs=2)
    assert torch.equal(m.labels, data.tensors["label"])  # read when the fit started
    assert not torch.equal(m.embed_s.weight.detach(), head) and (m.z > 0).all()
    assert torch.allclose(m.memory_s.norm(dim=1), torch.ones(32))  # every item visited: unit rows
    assert all(math.isfinite(h["train/crd"]) and h["train/crd"] > 0 for h in res.history)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "CRDMemory" not in last["callbacks"]  # saved once, with the model
    saved = last["model"]
    for k in ("memory_s", "memory_t", "z", "embed_t.weight"):
        assert torch.equal(saved[f"loss_modules.crd.{k}"], getattr(m, k) if k != "embed_t.weight" else m.embed_t.weight)
    assert torch.equal(saved["loss_modules.crd._extra_state"]["rng"], m.rng.get_state())


def test_resume_continues_exactly(tmp_path):
    """4 epochs straight and 2 + a resume to 4: the same losses, banks, Z, negatives' generator and weights."""
    data = dataset()
    full_mod = distiller(data)
    full = fit(tmp_path / "full", full_mod, data)
    with pytest.raises(Crash):
        fit(tmp_path / "cut", distiller(data), data, [CrashAtEpoch(2)])
    resumed_mod = distiller(data, seed=5)  # other weights, banks and generator seed: all restored
    resumed = fit(tmp_path / "cut", resumed_mod, data, resume=True)
    assert [h["train/crd"] for h in resumed.history] == [h["train/crd"] for h in full.history]
    a, b = full_mod.state_dict(), resumed_mod.state_dict()
    assert set(a) == set(b)
    for k, v in a.items():
        if k.endswith("_extra_state"):
            assert v["seed"] == b[k]["seed"] and torch.equal(v["rng"], b[k]["rng"]), k
        else:
            assert torch.equal(v, b[k]), k


def test_a_fit_checks_one_teacher_one_process_the_item_count_and_readable_labels(tmp_path):
    data = dataset()
    with pytest.raises(ValueError, match="one teacher fills its memory; the Distiller has 2"):
        fit(tmp_path / "a", distiller(data, teachers=2), data, epochs=1)
    with pytest.raises(ValueError, match="the memory holds 32 items, the training set has 24"):
        fit(tmp_path / "b", distiller(data), dataset(24), epochs=1)
    d = distiller(data)
    with pytest.raises(ValueError, match="each process would move its own memory banks \\(2 processes\\)"):
        d.loss_modules["crd"].on_fit_start(SimpleNamespace(world=2, train_data=data), d)

    class Items(torch.utils.data.Dataset):  # no label tensor to read
        def __len__(self):
            return 32

    with pytest.raises(ValueError, match="cannot read the labels of the training set \\(Items\\).*negatives: uniform"):
        d.loss_modules["crd"].on_fit_start(SimpleNamespace(world=1, train_data=Items()), d)
    d.loss_modules["crd"].negatives = "uniform"  # needs no labels
    d.loss_modules["crd"].on_fit_start(SimpleNamespace(world=1, train_data=Items()), d)
    assert d.loss_modules["crd"].labels is None


def test_a_generator_saved_on_cuda_needs_cuda_to_resume(monkeypatch):
    m = memory()
    state = m.state_dict()
    state["_extra_state"] = {"seed": 1, "device": "cuda:0", "rng": torch.zeros(16, dtype=torch.uint8)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="saved on cuda:0; resume on a machine with CUDA"):
        m.load_state_dict(state)


def test_the_shipped_experiment_composes_with_the_official_weights():
    from mmkd.cli import compose

    cfg = compose(["experiment=cifar10_crd"])
    assert {k: v.weight for k, v in cfg.losses.items()} == {"ce": 1.0, "crd": 0.8}  # no KD (-a 0 -b 0.8)
    t = cfg.losses.crd
    assert (t.student, t.teacher) == ("features.pool", "features.pool")
    assert dict(t.args) == {"dim": 128, "k": 16384, "temperature": 0.07, "momentum": 0.5, "negatives": "other_classes"}
    assert list(cfg.student.features) == list(cfg.teachers.resnet.features) == ["pool"]
    assert (cfg.student.name, cfg.teachers.resnet.name) == ("resnet20", "resnet56")
    assert (cfg.trainer.lr, cfg.trainer.batch_size, cfg.trainer.max_epochs) == (0.05, 64, 240)


@pytest.mark.slow
@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_config_trains_one_epoch_on_real_cifar10(run_experiment):
    run_dir, results = run_experiment("cifar10_crd", *TINY_CIFAR10)
    assert 0.0 <= results["student"]["test_acc"] <= 1.0
    (last,) = run_dir.rglob("student/last.pt")
    state = torch.load(last, weights_only=True)
    assert state["model"]["loss_modules.crd.memory_s"].shape == (20, 128)  # 30 images less 10 for validation
    assert state["model"]["loss_modules.crd.embed_t.weight"].shape == (128, 64)
    assert (state["model"]["loss_modules.crd.z"] > 0).all()
    assert math.isfinite(state["history"][0]["train/crd"]) and state["history"][0]["train/crd"] > 0
