"""LELP (mmkd.losses.heads.lelp): the per-class projections against a naive computation, the pseudo-subclass
targets by hand, the loss against python loops, gradients, the head's projections computed from the
teacher at the fit's start and kept exactly on resume, and the AG News configs."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses import lelp
from mmkd.losses.heads.lelp import PseudoClassHead, affine_fit, class_directions, pseudo_targets
from mmkd.routers import ConstantRouter
from tests.reference import Crash, CrashAtEpoch

F64 = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def teacher_data(n=60, d=7, c=3, seed=0):
    g = gen(seed)
    h = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64)
    return h, torch.arange(n) % c, torch.randn(c, d, generator=g, dtype=F64), torch.randn(c, generator=g, dtype=F64)


def head(c=3, s=2, ds=5, dt=7):
    return PseudoClassHead((ds,), (dt,), c, subclasses=s).double()


# ---------------------------------------------------------------- the projections


def naive_projectors(h, y, c, s, weight):
    """Per class, numpy and python loops: the class mean and the projector onto the top-s principal
    subspace of the class's centred embeddings, projected onto the null space of ``weight`` first."""
    h, y = h.numpy(), y.tolist()
    d = h.shape[1]
    if weight is None:
        p = np.eye(d)
    else:
        w = weight.numpy()
        p = np.eye(d) - w.T @ np.linalg.inv(w @ w.T) @ w
    means, projectors = [], []
    for k in range(c):
        rows = [h[i] for i in range(len(y)) if y[i] == k]
        mean = [sum(r[j] for r in rows) / len(rows) for j in range(d)]
        x = np.array([[r[j] - mean[j] for j in range(d)] for r in rows]) @ p
        _, vectors = np.linalg.eigh(x.T @ x / len(rows))
        top = vectors[:, -s:]
        means.append(mean)
        projectors.append(top @ top.T)
    return torch.tensor(means, dtype=F64), torch.tensor(np.array(projectors), dtype=F64)


@pytest.mark.parametrize("null_space", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_pca_directions_span_the_naive_per_class_principal_subspace(null_space, seed):
    h, y, w, _ = teacher_data(seed=seed)
    weight = w if null_space else None
    means, dirs = class_directions(h, y, 3, 2, weight, "pca", seed=seed)
    want_means, want_proj = naive_projectors(h, y, 3, 2, weight)
    torch.testing.assert_close(means, want_means)
    assert dirs.shape == (3, 2, 7)
    for k in range(3):
        torch.testing.assert_close(dirs[k] @ dirs[k].T, torch.eye(2, dtype=F64))  # orthonormal
        torch.testing.assert_close(dirs[k].T @ dirs[k], want_proj[k])  # the same subspace
        if null_space:  # nothing the logits already say
            torch.testing.assert_close(w @ dirs[k].T, torch.zeros(3, 2, dtype=F64))


def test_pca_directions_are_rotated_away_from_the_components():
    """Each class's components are turned by a random rotation: the directions' variances are not the
    sorted eigenvalues (and the rotation is drawn from the seed)."""
    h, y, w, _ = teacher_data()
    _, dirs = class_directions(h, y, 3, 2, w, "pca", seed=0)
    x = h[y == 0] - h[y == 0].mean(0)
    coords = x @ dirs[0].T
    cov = coords.T @ coords / len(x)  # diagonal for the principal components themselves
    assert float(cov[0, 1].abs()) > 1e-2 * float(cov.diagonal().max())
    eig = torch.linalg.eigvalsh(cov)
    assert not torch.allclose(cov.diagonal().sort().values, eig, rtol=1e-3)
    torch.testing.assert_close(class_directions(h, y, 3, 2, w, "pca", seed=0)[1], dirs)
    assert not torch.allclose(class_directions(h, y, 3, 2, w, "pca", seed=1)[1], dirs)


def test_random_directions_are_orthonormal_in_the_null_space_and_seeded():
    h, y, w, _ = teacher_data()
    _, dirs = class_directions(h, y, 3, 3, w, "random", seed=4)
    for k in range(3):
        torch.testing.assert_close(dirs[k] @ dirs[k].T, torch.eye(3, dtype=F64))
        torch.testing.assert_close(w @ dirs[k].T, torch.zeros(3, 3, dtype=F64))
    assert not torch.allclose(dirs[0], dirs[1])
    torch.testing.assert_close(class_directions(h, y, 3, 3, w, "random", seed=4)[1], dirs)


def test_affine_fit_recovers_the_linear_head():
    h, _, w, b = teacher_data()
    weight, bias = affine_fit(h, h @ w.T + b)
    torch.testing.assert_close(weight, w)
    torch.testing.assert_close(bias, b)


def test_bad_arguments_are_one_line():
    h, y, w, _ = teacher_data()
    with pytest.raises(ValueError, match="subclasses=5 directions, but the embedding has only 4"):
        class_directions(h, y, 3, 5, w)
    with pytest.raises(ValueError, match="directions='kmeans'; choose from: pca, random"):
        PseudoClassHead((5,), (7,), 3, directions="kmeans")
    with pytest.raises(ValueError, match="teacher: features"):
        PseudoClassHead((5,), None, 3)


# ---------------------------------------------------------------- the targets and the loss


def test_pseudo_targets_by_hand():
    """C = S = 2, D = 2: q_{c,s} = softmax(z / T)_c * softmax_s(<v_{c,s}, h - mu_c> / beta)_s."""
    h = torch.tensor([[1.0, 2.0]], dtype=F64)
    weight, bias = torch.eye(2, dtype=F64), torch.tensor([0.0, 0.5], dtype=F64)  # z = [1, 2.5]
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    dirs = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-0.8, 0.6]]], dtype=F64)
    got = pseudo_targets(h, weight, bias, mean, dirs, temperature=2.0, beta=0.5).exp()
    p0 = 1 / (1 + math.exp(0.75))  # softmax([0.5, 1.25])
    # class 0: coordinates [1, 2] / 0.5 = [2, 4]; class 1: h - mu = [0, 1] -> [0.8, 0.6] / 0.5 = [1.6, 1.2]
    want = [p0 / (1 + math.exp(2)), p0 / (1 + math.exp(-2)),
            (1 - p0) / (1 + math.exp(-0.4)), (1 - p0) / (1 + math.exp(0.4))]
    torch.testing.assert_close(got, torch.tensor([want], dtype=F64))


def test_subclasses_sum_to_the_teachers_class_probabilities():
    h, y, w, b = teacher_data()
    means, dirs = class_directions(h, y, 3, 4, w)
    q = pseudo_targets(h, w, b, means, dirs, temperature=3.0, beta=0.7).exp().view(-1, 3, 4)
    torch.testing.assert_close(q.sum(2), torch.softmax((h @ w.T + b) / 3.0, dim=1))


def fitted_head(seed=0, c=3, s=2, ds=5, dt=7):
    h, y, w, b = teacher_data(d=dt, c=c, seed=seed)
    m = head(c, s, ds, dt)
    m.fit_projections(h, h @ w.T + b, y)
    return m


def ref_lelp(student, teacher, m, T, beta):
    """Per instance, python loops: q from the class and subclass softmaxes, the student's head by hand,
    T^2 sum q log(q / p)."""
    C, S = m.num_classes, m.subclasses
    W, b, mu, V = m.weight.tolist(), m.bias.tolist(), m.mean.tolist(), m.directions.tolist()
    A, a0 = m.head.weight.tolist(), m.head.bias.tolist()
    out = []
    for s, h in zip(student.tolist(), teacher.tolist()):
        z = [sum(wi * hi for wi, hi in zip(W[c], h)) + b[c] for c in range(C)]
        ez = [math.exp(v / T) for v in z]
        q = []
        for c in range(C):
            coords = [sum(v * (hi - mi) for v, hi, mi in zip(V[c][k], h, mu[c])) for k in range(S)]
            e = [math.exp(a / beta) for a in coords]
            q += [ez[c] / sum(ez) * e[k] / sum(e) for k in range(S)]
        u = [sum(ai * si for ai, si in zip(A[j], s)) + a0[j] for j in range(C * S)]
        eu = [math.exp(v / T) for v in u]
        out.append(T * T * sum(qj * math.log(qj / (ej / sum(eu))) for qj, ej in zip(q, eu)))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_the_naive_reference(seed):
    m = fitted_head(seed)
    g = gen(10 + seed)
    s, t = torch.randn(6, 5, generator=g, dtype=F64), torch.randn(6, 7, generator=g, dtype=F64)
    ref = ref_lelp(s, t, m, 2.0, 0.8)
    torch.testing.assert_close(lelp(s, t, module=m, temperature=2.0, beta=0.8, reduction="none"), ref)
    torch.testing.assert_close(lelp(s, t, module=m, temperature=2.0, beta=0.8), ref.mean())


def test_zero_when_the_students_head_gives_the_targets():
    m = fitted_head(c=3, s=2, ds=6)
    with torch.no_grad():
        m.head.weight.copy_(torch.eye(6, dtype=F64))
        m.head.bias.zero_()
    t = torch.randn(4, 7, generator=gen(3), dtype=F64)
    s = 2.0 * pseudo_targets(t, m.weight, m.bias, m.mean, m.directions, 2.0, 0.5)  # u / T = log q
    torch.testing.assert_close(lelp(s, t, module=m, temperature=2.0, beta=0.5, reduction="none"),
                               torch.zeros(4, dtype=F64))
    moved = s + 0.3 * torch.randn(4, 6, generator=gen(4), dtype=F64)
    assert float(lelp(moved, t, module=m, temperature=2.0, beta=0.5).detach()) > 1e-3


def test_gradcheck_float64_and_no_gradient_into_the_teacher():
    m = fitted_head()
    g = gen(5)
    s = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    t = torch.randn(4, 7, generator=g, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: lelp(a, t, module=m, temperature=1.5, beta=0.6), (s,))
    lelp(s, t, module=m).backward()
    assert t.grad is None and m.head.weight.grad is not None


def test_the_loss_refuses_missing_projections():
    s, t = torch.randn(2, 5, dtype=F64), torch.randn(2, 7, dtype=F64)
    with pytest.raises(ValueError, match="Term\\('lelp'"):
        lelp(s, t)
    with pytest.raises(ValueError, match="not computed yet"):
        lelp(s, t, module=head())


# ---------------------------------------------------------------- the head in a fit
D, C, N, S = 6, 3, 30, 2


class Embed(nn.Module):
    """A linear embedding then a classifier; ``emb`` is the feature LELP reads."""

    def __init__(self, act=False):
        super().__init__()
        self.emb, self.fc, self.act = nn.Linear(D, D), nn.Linear(D, C), act

    def forward(self, x):
        e = self.emb(x)
        return self.fc(torch.tanh(e) if self.act else e)


def setup(seed=0, teacher_act=False):
    data = TensorDictDataset("lelp", x=torch.randn(N, D, generator=gen(0)), label=torch.arange(N) % C)
    torch.manual_seed(0)
    teacher = Embed(teacher_act)
    torch.manual_seed(seed)
    term = Term("lelp", student="features.emb", teacher="features.emb", args={"subclasses": S, "beta": 0.5},
                sizes={"student_shape": (D,), "teacher_shape": (D,), "num_classes": C})
    distiller = Distiller(Net(Embed(), ("x",), ["emb"]), [Teacher(teacher, ("x",), ["emb"])], [Term("ce"), term],
                          ConstantRouter())
    return data, teacher, distiller


def fit(run_dir, module, data, epochs=4, callbacks=(), resume=False):
    return Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=8, lr=0.1, keep="last", resume=resume,
                   tensorboard=False, progress="off").fit(module, data, data, callbacks=list(callbacks))


def test_the_fit_start_computes_the_projections_from_the_teacher(tmp_path):
    data, teacher, distiller = setup()
    m = distiller.loss_modules["lelp"]
    assert m.subclasses == S and distiller.terms[1].args == {"beta": 0.5} and m in distiller.callbacks()
    res = fit(tmp_path, distiller, data, epochs=2)
    with torch.no_grad():
        emb = teacher.emb(data.tensors["x"]).double()
    means, dirs = class_directions(emb, data.tensors["label"], C, S, teacher.fc.weight.double())
    torch.testing.assert_close(m.weight, teacher.fc.weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.bias, teacher.fc.bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(m.mean, means.float(), rtol=1e-4, atol=1e-5)
    for k in range(C):  # the same subspace (the sign and rotation follow the fitted classifier's rounding)
        torch.testing.assert_close(m.directions[k].T @ m.directions[k], (dirs[k].T @ dirs[k]).float(),
                                   rtol=1e-3, atol=1e-4)
    assert bool(m.fitted) and all(math.isfinite(h["train/lelp"]) and h["train/lelp"] > 0 for h in res.history)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert torch.equal(saved["loss_modules.lelp.directions"], m.directions)
    assert saved["loss_modules.lelp.head.weight"].shape == (C * S, D)


def test_resume_continues_exactly_and_computes_no_projection(tmp_path, monkeypatch):
    """4 epochs straight and 2 + a resume to 4: the same weights, buffers and history, the projections
    restored from the checkpoint, not computed again."""
    data, _, full_mod = setup()
    full = fit(tmp_path / "full", full_mod, data)
    with pytest.raises(Crash):
        fit(tmp_path / "cut", setup()[2], data, callbacks=[CrashAtEpoch(2)])
    _, _, resumed_mod = setup(seed=5)

    def refuse(*args):
        raise AssertionError("the projections were computed again on resume")
    monkeypatch.setattr(PseudoClassHead, "fit_projections", refuse)
    resumed = fit(tmp_path / "cut", resumed_mod, data, resume=True)
    assert [h["train/lelp"] for h in resumed.history] == [h["train/lelp"] for h in full.history]
    for k, v in full_mod.state_dict().items():
        assert torch.equal(v, resumed_mod.state_dict()[k]), k


def test_a_teacher_whose_logits_are_not_affine_in_the_feature_is_refused(tmp_path):
    data, _, distiller = setup(teacher_act=True)
    with pytest.raises(ValueError, match="not an affine function of the feature"):
        fit(tmp_path, distiller, data, epochs=1)


# ---------------------------------------------------------------- the AG News configs
needs_data = pytest.mark.skipif("MMKD_DATA" not in os.environ, reason="set MMKD_DATA to the shared data folder")


@needs_data
@pytest.mark.parametrize("experiment", ["agnews_kd", "agnews_lelp"])
def test_agnews_configs_train_one_step(run_experiment, experiment):
    """configs/experiment/agnews_{kd,lelp}.yaml on 8 sentences of 8 tokens (one step), MiniLM as built:
    the terms train, LELP's head and projections are saved with the student."""
    import csv

    run_dir, results = run_experiment(experiment, "data.args.limit=8", "data.args.max_length=8", "trainer.batch_size=8",
                                      "student.args.hidden=16", "student.args.layers=1", "teachers.minilm.epochs=0")
    assert 0 <= results["student"]["test_acc"] <= 1
    row = next(csv.DictReader((run_dir / "student" / "metrics.csv").open()))
    term = experiment.removeprefix("agnews_")
    assert float(row[f"train/{term}"]) > 0
    state = torch.load(run_dir / "student" / "best.pt")["model"]
    if term == "lelp":
        assert state["loss_modules.lelp.head.weight"].shape == (4 * 4, 16)
        assert state["loss_modules.lelp.directions"].shape == (4, 4, 384) and bool(state["loss_modules.lelp.fitted"])
