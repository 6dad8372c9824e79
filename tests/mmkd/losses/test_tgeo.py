"""TGeo-KD (mmkd.losses.adaptive.tgeo): the geometry by hand, the fused loss against a naive loop, alpha's
range and limits, gradients into the ratio network and the student, the teacher's class means computed
once at the start of a fit, exact resume, and the shipped experiment."""
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses import ce, kd, tgeo
from mmkd.losses.adaptive.tgeo import TrilateralRatio, trilateral
from mmkd.routers import ConstantRouter
from tests.reference import TINY_CIFAR10, Crash, CrashAtEpoch

F64 = torch.float64
DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


def make(b=6, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=F64) * 2, torch.randn(b, c, generator=g, dtype=F64) * 2,
            torch.randint(0, c, (b,), generator=g))


def ratio(c=4, means="train", seed=0, hidden=8):
    """A float64 ratio network with seeded weights; ``means="train"`` gets seeded class means."""
    torch.manual_seed(seed)
    m = TrilateralRatio(c, hidden=hidden, means=means).double()
    if means == "train":
        m.class_means.copy_(torch.softmax(torch.randn(c, c, dtype=F64), 1))
        m.counts.fill_(3)
    return m


def softmax_row(z, T=1.0):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def ref_tgeo(S, T, Y, m, tau, tbar):
    """The fused loss per instance with python loops; the ratio network evaluated from its weights."""
    (w1, b1), (w2, b2) = [(l.weight.tolist(), l.bias.tolist()) for l in (m.net[0], m.net[2])]
    out = []
    for i, (s, t, y) in enumerate(zip(S.tolist(), T.tolist(), Y.tolist())):
        ps, pt, tb = softmax_row(s), softmax_row(t), tbar[i]
        gt = [1.0 if c == y else 0.0 for c in range(len(s))]
        x = (ps + pt + tb + gt + [abs(a - b) for a, b in zip(ps, gt)] + [abs(a - b) for a, b in zip(ps, pt)]
             + [abs(a - b) for a, b in zip(ps, tb)] + [(g - b) * (g - a) for a, b, g in zip(ps, tb, gt)]
             + [(g - b) * (g - a) for a, b, g in zip(ps, pt, gt)])
        h = [max(0.0, sum(w * v for w, v in zip(row, x)) + bias) for row, bias in zip(w1, b1)]
        alpha = 1 / (1 + math.exp(-(sum(w * v for w, v in zip(w2[0], h)) + b2[0])))
        qs, qt = softmax_row(s, tau), softmax_row(t, tau)
        kd_i = tau * tau * sum(b * math.log(b / a) for a, b in zip(qs, qt))
        ce_i = -math.log(ps[y])
        out.append(alpha * kd_i + (1 - alpha) * ce_i)
    return torch.tensor(out, dtype=F64)


# ---------------------------------------------------------------- the geometry by hand
S2 = [[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]
T2 = [[0.7, 0.2, 0.1], [0.3, 0.4, 0.3]]
# both of class 0: Tbar = the mean of the two teacher rows = [0.5, 0.3, 0.2]
SAME = [[0.5, 0.3, 0.2, 0.7, 0.2, 0.1, 0.5, 0.3, 0.2, 1, 0, 0,  # S, T, Tbar, G
         0.5, 0.3, 0.2, 0.2, 0.1, 0.1, 0.0, 0.0, 0.0,  # |S - G|, |S - T|, |S - Tbar|
         0.25, 0.09, 0.04, 0.15, 0.06, 0.02],  # (G - Tbar)(G - S), (G - T)(G - S)
        [0.2, 0.2, 0.6, 0.3, 0.4, 0.3, 0.5, 0.3, 0.2, 1, 0, 0,
         0.8, 0.2, 0.6, 0.1, 0.2, 0.3, 0.3, 0.1, 0.4,
         0.4, 0.06, 0.12, 0.56, 0.08, 0.18]]


def test_the_geometry_of_two_instances_by_hand():
    s, t, y = torch.tensor(S2, dtype=F64), torch.tensor(T2, dtype=F64), torch.tensor([0, 0])
    g = torch.nn.functional.one_hot(y, 3).to(F64)
    tbar = TrilateralRatio(3, means="batch").anchor(t, y)
    torch.testing.assert_close(tbar, torch.tensor([[0.5, 0.3, 0.2]] * 2, dtype=F64))
    torch.testing.assert_close(trilateral(s, t, g, tbar), torch.tensor(SAME, dtype=F64))
    # of classes 0 and 2, each is its class's only instance: Tbar_i = T_i, |S_i - Tbar_i| = |S_i - T_i|
    y = torch.tensor([0, 2])
    torch.testing.assert_close(TrilateralRatio(3, means="batch").anchor(t, y), t)
    x = trilateral(s, t, torch.nn.functional.one_hot(y, 3).to(F64), t)
    torch.testing.assert_close(x[1, 18:21], torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    torch.testing.assert_close(x[1, 24:27], torch.tensor([0.3 * 0.2, 0.4 * 0.2, 0.7 * 0.4], dtype=F64))


@pytest.mark.parametrize("means", ["batch", "train"])
def test_the_loss_feeds_the_network_this_geometry(means):
    """Logits log(p) give the probabilities p; the network's input is the hand-computed geometry."""
    m = TrilateralRatio(3, means=means).double()
    if means == "train":  # the training set's class means: row 0 as the batch's
        m.class_means.copy_(torch.tensor([[0.5, 0.3, 0.2], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64))
        m.counts.fill_(1)
    seen = []
    m.net.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach()))
    tgeo(torch.tensor(S2, dtype=F64).log(), torch.tensor(T2, dtype=F64).log(), torch.tensor([0, 0]), module=m)
    torch.testing.assert_close(seen[0], torch.tensor(SAME, dtype=F64))


# ---------------------------------------------------------------- the loss
@pytest.mark.parametrize("seed, tau", [(0, 1.0), (1, 4.0), (2, 2.5)])
def test_matches_the_naive_loop_with_the_training_sets_class_means(seed, tau):
    s, t, y = make(seed=seed)
    m = ratio(seed=seed)
    ref = ref_tgeo(s, t, y, m, tau, m.class_means[y].tolist())
    torch.testing.assert_close(tgeo(s, t, y, module=m, temperature=tau, reduction="none"), ref)
    torch.testing.assert_close(tgeo(s, t, y, module=m, temperature=tau), ref.mean())
    torch.testing.assert_close(tgeo(s, t, y, module=m, temperature=tau, reduction="sum"), ref.sum())


def test_matches_the_naive_loop_with_the_batchs_class_means():
    s, t, y = make(b=8, seed=3)
    m = ratio(means="batch", seed=3)
    pt = [softmax_row(row) for row in t.tolist()]
    tbar = [[sum(pt[j][c] for j in range(8) if y[j] == y[i]) / int((y == y[i]).sum()) for c in range(4)]
            for i in range(8)]
    torch.testing.assert_close(tgeo(s, t, y, module=m, temperature=2.0, reduction="none"),
                               ref_tgeo(s, t, y, m, 2.0, tbar))


def test_alpha_lies_in_the_unit_interval_and_its_limits_are_kd_and_ce():
    s, t, y = make(b=16, seed=4)
    m = ratio(seed=4)
    with torch.no_grad():
        for layer in (m.net[0], m.net[2]):
            layer.weight.mul_(30)  # saturating
    alpha = m(trilateral(torch.softmax(s, 1), torch.softmax(t, 1), torch.nn.functional.one_hot(y, 4).to(F64),
                         m.anchor(torch.softmax(t, 1), y)))
    assert alpha.shape == (16,) and bool(((alpha >= 0) & (alpha <= 1)).all())
    assert alpha.min() < 0.01 and alpha.max() > 0.99  # both ends reached, none beyond
    with torch.no_grad():
        m.net[2].weight.zero_()
        m.net[2].bias.fill_(60.0)  # alpha = 1: all from the teacher
    torch.testing.assert_close(tgeo(s, t, y, module=m, temperature=3.0, reduction="none"),
                               kd(s, t, temperature=3.0, reduction="none"))
    with torch.no_grad():
        m.net[2].bias.fill_(-60.0)  # alpha = 0: all from the label
    torch.testing.assert_close(tgeo(s, t, y, module=m, temperature=3.0, reduction="none"),
                               ce(s, None, y, reduction="none"))


def test_gradients_reach_the_ratio_network_and_the_student_through_alpha():
    s, t, y = make(seed=5)
    m = ratio(seed=5)
    s.requires_grad_(True)
    tgeo(s, t, y, module=m, temperature=2.0).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    # dL/db2 = mean_i (KD_i - CE_i) alpha_i (1 - alpha_i): alpha is pushed towards the smaller of the two
    with torch.no_grad():
        sp, tp = torch.softmax(s, 1), torch.softmax(t, 1)
        alpha = m(trilateral(sp, tp, torch.nn.functional.one_hot(y, 4).to(F64), m.class_means[y]))
        gap = kd(s, t, temperature=2.0, reduction="none") - ce(s, None, y, reduction="none")
    torch.testing.assert_close(m.net[2].bias.grad, (gap * alpha * (1 - alpha)).mean().reshape(1))
    # the student's gradient includes the path through alpha (its softmax is not detached, as officially)
    fused = s.grad.clone()
    s2 = s.detach().clone().requires_grad_(True)
    fixed = alpha * kd(s2, t, temperature=2.0, reduction="none") + (1 - alpha) * ce(s2, None, y, reduction="none")
    fixed.mean().backward()
    assert s2.grad.abs().sum() > 0 and not torch.allclose(fused, s2.grad)


@pytest.mark.parametrize("means", ["train", "batch"])
def test_gradcheck_float64(means):
    s, t, y = make(b=5, seed=6)
    m = ratio(means=means, seed=6)
    s.requires_grad_(True)
    t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: tgeo(a, b, y, module=m, temperature=2.0, reduction="none"), (s, t))
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())

    def by_params(*ps):
        alpha_net = _Bound(m, dict(zip(names, ps)))
        return tgeo(s.detach(), t.detach(), y, module=alpha_net, temperature=2.0, reduction="none")
    assert torch.autograd.gradcheck(by_params, params)


class _Bound:
    """``m`` evaluated at the parameters ``params`` (for a gradcheck with respect to them)."""

    def __init__(self, m, params):
        self.m, self.params, self.num_classes = m, params, m.num_classes

    def __call__(self, x):
        return torch.func.functional_call(self.m, self.params, (x,))

    def anchor(self, t, target):
        return self.m.anchor(t, target)


def test_errors_are_one_line_and_name_the_fix():
    s, t, y = make()
    with pytest.raises(ValueError, match=r"Term\('tgeo'\)"):
        tgeo(s, t, y)
    with pytest.raises(ValueError, match="needs its label"):
        tgeo(s, t, torch.tensor([0, 1, -1, 0, 1, 2]), module=ratio())
    with pytest.raises(ValueError, match="made for 3 \\(num_classes\\)"):
        tgeo(s, t, y, module=ratio(c=3))
    with pytest.raises(ValueError, match="means='mean'; choose from: train"):
        TrilateralRatio(4, means="mean")
    with pytest.raises(ValueError, match="not computed; they are at the start of a Distiller fit"):
        tgeo(s, t, y, module=TrilateralRatio(4).double())


# ---------------------------------------------------------------- in a fit
N, D, C = 24, 5, 3


def setup(seed=0, means="train", teachers=1):
    g = torch.Generator().manual_seed(seed)
    data = TensorDictDataset("tg", x=torch.randn(N, D, generator=g), label=torch.arange(N) % C)
    torch.manual_seed(seed)
    teacher_models = [nn.Linear(D, C) for _ in range(teachers)]
    term = Term("tgeo", args={"hidden": 16, "means": means, "temperature": 2.0}, sizes={"num_classes": C})
    distiller = Distiller(Net(nn.Linear(D, C), ("x",)), [Teacher(m, ("x",)) for m in teacher_models], [term],
                          ConstantRouter())
    return data, teacher_models, distiller, term


def fit(run_dir, module, data, epochs=2, callbacks=(), resume=False):
    return Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=8, lr=0.1, keep="last", resume=resume,
                   tensorboard=False, progress="off").fit(module, data, data, callbacks=list(callbacks))


def test_the_term_computes_the_teachers_class_means_once_and_trains_the_ratio_network(tmp_path):
    data, (teacher,), distiller, term = setup()
    assert isinstance(term.module, TrilateralRatio) and term.module.net[0].out_features == 16
    assert term.args == {"temperature": 2.0} and term.module in distiller.callbacks()
    with torch.no_grad():
        p = torch.softmax(teacher(data.tensors["x"]), 1)
    expect = torch.stack([p[data.tensors["label"] == k].mean(0) for k in range(C)])
    before = [q.detach().clone() for q in term.module.parameters()]
    res = fit(tmp_path, distiller, data)
    torch.testing.assert_close(term.module.class_means, expect)
    assert term.module.counts.tolist() == [8.0] * 3
    assert all(not torch.equal(a, b) for a, b in zip(before, term.module.parameters()))  # trained with the student
    assert all(0 < h["tgeo/alpha"] < 1 and math.isfinite(h["train/tgeo"]) for h in res.history)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    torch.testing.assert_close(saved["loss_modules.tgeo.class_means"], expect)


def test_the_class_means_need_one_teacher_unless_taken_per_batch(tmp_path):
    data, _, distiller, _ = setup(teachers=2)
    with pytest.raises(ValueError, match="the fit has 2 teachers \\(or set means: batch\\)"):
        fit(tmp_path / "a", distiller, data, epochs=1)
    data, _, distiller, term = setup(teachers=2, means="batch")
    res = fit(tmp_path / "b", distiller, data, epochs=1)
    assert not term.module.counts.any() and 0 < res.history[0]["tgeo/alpha"] < 1


def test_resume_continues_exactly_without_recomputing_the_class_means(tmp_path, monkeypatch):
    """4 epochs straight and 2 + a resume to 4: the same history and the same weights, bit for bit."""
    data, _, full_mod, _ = setup()
    full = fit(tmp_path / "full", full_mod, data, epochs=4)
    with pytest.raises(Crash):
        fit(tmp_path / "cut", setup()[2], data, epochs=4, callbacks=[CrashAtEpoch(2)])
    resumed_mod = setup(seed=5)[2]

    def fail(*args):
        raise AssertionError("the class means were computed again")
    monkeypatch.setattr(TrilateralRatio, "estimate", fail)
    resumed = fit(tmp_path / "cut", resumed_mod, data, epochs=4, resume=True)
    assert [h["tgeo/alpha"] for h in resumed.history] == [h["tgeo/alpha"] for h in full.history]
    assert [h["train/loss"] for h in resumed.history] == [h["train/loss"] for h in full.history]
    for k, v in full_mod.state_dict().items():
        assert torch.equal(v, resumed_mod.state_dict()[k]), k


# ---------------------------------------------------------------- the shipped experiment
def test_the_shipped_experiment_composes_with_only_the_tgeo_term():
    from mmkd.cli import compose

    cfg = compose(["experiment=cifar10_tgeo"])
    assert {k: v.weight for k, v in cfg.losses.items()} == {"ce": 0.0, "tgeo": 1.0}  # CE is inside tgeo
    assert dict(cfg.losses.tgeo.args) == {"temperature": 1.0, "hidden": 128, "means": "train"}
    assert (cfg.teachers.resnet.name, cfg.student.name, cfg.trainer.batch_size) == ("resnet56", "resnet20", 64)


@pytest.mark.slow
@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_the_shipped_experiment_trains_one_step_on_a_tiny_cifar10(run_experiment):
    run_dir, results = run_experiment("cifar10_tgeo", *TINY_CIFAR10)
    header, row = (run_dir / "student" / "metrics.csv").read_text().splitlines()[:2]
    metrics = dict(zip(header.split(","), row.split(",")))
    assert math.isfinite(float(metrics["train/tgeo"])) and 0 < float(metrics["tgeo/alpha"]) < 1
    assert 0.0 <= results["student"]["test_acc"] <= 1.0
