"""OFD (mmkd.losses.features.ofd): the partial L2 against mdistiller's three masks in a loop, the margin
against the expected negative response, gradients, the connector and margin as a term's module (the
margin read from the teacher's BatchNorm when the fit starts, exact resume), the CIFAR ResNets'
pre-ReLU feature paths, and the shipped config on a tiny real subset."""
import math
import os
from pathlib import Path

import pytest
import torch

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses.features import ofd
from mmkd.losses.features.ofd import Connector, bn_margin, find_module, partial_l2
from mmkd.registry import MODELS
from mmkd.routers import ConstantRouter
from tests.reference import TINY_CIFAR10, Crash, CrashAtEpoch

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
F64 = torch.float64


def ref_partial_l2(S, T, M):
    """mdistiller's ``feat_loss`` element by element (three masks), summed per instance."""
    out = []
    for s_i, t_i in zip(S.tolist(), T.tolist()):
        total = 0.0
        for s_c, t_c, m in zip(s_i, t_i, M.tolist()):
            for s_row, t_row in zip(s_c, t_c):
                for s, t in zip(s_row, t_row):
                    total += (s - m) ** 2 * (s > m and t <= m) + (s - t) ** 2 * (s > t and m < t <= 0) \
                        + (s - t) ** 2 * (t > 0)
        out.append(total)
    return torch.tensor(out, dtype=F64)


def connector(c_s=3, c_t=4, seed=0):
    torch.manual_seed(seed)
    m = Connector((c_s, 5, 5), (c_t, 5, 5)).double()
    m.margin.copy_(-torch.rand(c_t, dtype=F64) - 0.1)
    return m


def maps(b=3, c_s=3, c_t=4, hw=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c_s, hw, hw, generator=g, dtype=F64), torch.randn(b, c_t, hw, hw, generator=g, dtype=F64)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_mdistillers_three_masks(seed):
    m = connector(seed=seed)
    s, t = maps(seed=seed)
    ref = ref_partial_l2(m(s), t, m.margin)
    torch.testing.assert_close(ofd(s, t, module=m, reduction="none"), ref)
    torch.testing.assert_close(ofd(s, t, module=m), ref.mean())  # mdistiller: loss.mean(dim=0).sum()


def test_only_informative_differences_count():
    margin = torch.tensor([-1.0], dtype=F64)
    t = torch.tensor([-3.0, -3.0, -0.5, -0.5, 2.0, 2.0], dtype=F64).view(1, 1, 1, 6)  # off, off, ..., on, on
    s = torch.tensor([-2.0, 0.5, -0.8, -0.2, 1.0, 3.0], dtype=F64).view(1, 1, 1, 6)
    # below the margin where the teacher is off: 0; above: distance to the margin; a negative teacher
    # response counts only where the student is above it; a positive one always
    expect = 0 + 1.5 ** 2 + 0 + 0.3 ** 2 + 1.0 + 1.0
    assert float(partial_l2(s, t, margin)) == pytest.approx(expect)
    assert float(partial_l2(torch.maximum(t, margin.view(1, -1, 1, 1)), t, margin)) == 0.0


def ref_margin(gamma, beta):
    """E[x | x < 0] of N(beta, gamma^2) by the trapezoid rule on a fine grid, or -3|gamma| when
    P(x < 0) <= 0.001, the official rule."""
    s = abs(gamma)
    below = 0.5 * (1 + math.erf(-beta / s / math.sqrt(2)))
    if below <= 0.001:
        return -3 * s
    x = torch.linspace(beta - 12 * s, 0.0, 200001, dtype=F64)
    pdf = torch.exp(-((x - beta) / s) ** 2 / 2)
    return float(torch.trapezoid(x * pdf, x) / torch.trapezoid(pdf, x))


def test_margin_is_the_expected_negative_response():
    gamma = torch.tensor([1.0, 0.5, -2.0, 0.3, 1.0, 0.1])
    beta = torch.tensor([0.0, -1.0, 0.7, 0.6, 3.2, 0.5])  # the last two: P(x < 0) below 0.001
    expect = torch.tensor([ref_margin(g, b) for g, b in zip(gamma.tolist(), beta.tolist())])
    torch.testing.assert_close(bn_margin(gamma, beta), expect, rtol=1e-5, atol=1e-6)
    assert bn_margin(gamma, beta)[0] == pytest.approx(-math.sqrt(2 / math.pi))  # the half-normal mean
    assert expect[4] == -3.0 and expect[5] == pytest.approx(-0.3)


def test_gradcheck_float64():
    m = connector()
    s, t = maps()
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ofd(a, t, module=m), (s,))
    params = [m.conv.weight, m.norm.weight, m.norm.bias]
    assert torch.autograd.gradcheck(
        lambda *p: ofd(s.detach(), t, module=Functional(m, p)), params)


class Functional(torch.nn.Module):
    """The connector with its parameters given as inputs (for gradcheck)."""

    def __init__(self, m, params):
        super().__init__()
        self.m, self.params, self.margin = m, params, m.margin

    def forward(self, x):
        w, g, b = self.params
        y = torch.nn.functional.conv2d(x, w)
        return torch.nn.functional.batch_norm(y, None, None, g, b, training=True)


def test_connector_is_a_conv_and_batchnorm_initialised_as_officially():
    torch.manual_seed(0)
    m = Connector((64, 4, 4), (256, 4, 4))
    assert m.conv.weight.shape == (256, 64, 1, 1) and m.conv.bias is None
    assert m.conv.weight.std().item() == pytest.approx(math.sqrt(2 / 256), rel=0.03)
    assert torch.equal(m.norm.weight, torch.ones(256)) and torch.equal(m.norm.bias, torch.zeros(256))
    assert torch.isnan(m.margin).all()
    x = torch.randn(2, 64, 4, 4)
    torch.testing.assert_close(m(x), m.norm(m.conv(x)))


def test_teacher_maps_are_pooled_to_the_students_size():
    m = connector()
    s, _ = maps()
    _, t = maps(hw=10)
    pooled = torch.nn.functional.avg_pool2d(t, 2)
    torch.testing.assert_close(ofd(s, t, module=m, reduction="none"), ofd(s, pooled, module=m, reduction="none"))


def test_errors_are_one_line():
    s, t = maps()
    with pytest.raises(ValueError, match=r"Term\('ofd'"):
        ofd(s, t)
    with pytest.raises(ValueError, match="feature maps"):
        Connector((16,), (16,))
    with pytest.raises(ValueError, match="4 channels"):
        ofd(s, t[:, :2], module=connector())
    with pytest.raises(ValueError, match=r"\(3, 3, 25\) .*feature maps"):
        ofd(s.flatten(2), t, module=connector())
    with pytest.raises(ValueError, match="different batch sizes"):
        ofd(s[:2], t, module=connector())
    model = MODELS["resnet8"](10, (3, 8, 8))
    with pytest.raises(ValueError, match="layer4.-1.bn2"):
        find_module(model, "layer4.-1.bn2")
    bad = Connector((16, 8, 8), (16, 8, 8), teacher_bn="layer1.-1.conv2")
    with pytest.raises(ValueError, match="affine BatchNorm"):
        bad.set_margin(find_module(model, bad.teacher_bn))


# ---------------------------------------------------------------- the CIFAR ResNets' pre-ReLU features
@pytest.mark.parametrize("name,blocks", [("resnet8", 1), ("resnet20", 3)])
def test_preact_paths_are_the_sums_before_the_last_relu(name, blocks):
    torch.manual_seed(0)
    plain = MODELS[name](10, (3, 16, 16)).eval()
    torch.manual_seed(0)
    model = MODELS[name](10, (3, 16, 16), preact=True).eval()
    assert model.state_dict().keys() == plain.state_dict().keys() and "preact" not in repr(plain)
    x = torch.randn(2, 3, 16, 16)
    out = Net(model, ["image"], ["preact1", "preact2", "preact3", "layer1", "layer2", "layer3"])({"image": x})
    torch.testing.assert_close(out.logits, plain(x))
    h = model.stem(x)
    for i in (1, 2, 3):
        stage = getattr(model, f"layer{i}")
        for block in stage[:-1]:
            h = block(h)
        last = stage[-1]
        pre = last.bn2(last.conv2(torch.relu(last.bn1(last.conv1(h))))) + last.shortcut(h)
        torch.testing.assert_close(out.features[f"preact{i}"], pre)
        torch.testing.assert_close(out.features[f"layer{i}"], torch.relu(pre))
        assert find_module(model, f"layer{i}.-1.bn2") is stage[blocks - 1].bn2
        h = torch.relu(pre)
    assert (out.features["preact3"] < 0).any()


# ---------------------------------------------------------------- the margin at fit start, resume
N = 16


def setup(seed=0):
    g = torch.Generator().manual_seed(seed)
    data = TensorDictDataset("ofd", image=torch.randn(N, 3, 8, 8, generator=g), label=torch.arange(N) % 4)
    torch.manual_seed(seed)
    teacher = MODELS["resnet8"](4, (3, 8, 8), preact=True)
    for bn in (teacher.layer1[-1].bn2, teacher.layer2[-1].bn2):  # trained-looking statistics
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.normal_(0, 1)
    student = MODELS["resnet8"](4, (3, 8, 8), preact=True)
    terms = [Term("ce"),
             *[Term("ofd", 10 ** -(3 - i), {"teacher_bn": f"layer{i}.-1.bn2"}, name=f"ofd{i}",
                    student=f"features.preact{i}", teacher=f"features.preact{i}",
                    sizes={"student_shape": (c, s, s), "teacher_shape": (c, s, s)})
               for i, c, s in ((1, 16, 8), (2, 32, 4))]]
    distiller = Distiller(Net(student, ["image"], ["preact1", "preact2"]),
                          [Teacher(teacher, ["image"], ["preact1", "preact2"])], terms, ConstantRouter())
    return data, teacher, distiller


def fit(run_dir, module, data, callbacks=(), resume=False, epochs=2):
    return Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=8, lr=0.1, keep="last", resume=resume,
                   tensorboard=False, progress="off").fit(module, data, data, callbacks=list(callbacks))


def test_the_margin_comes_from_the_teachers_batchnorm_when_the_fit_starts(tmp_path):
    data, teacher, distiller = setup()
    modules = distiller.loss_modules
    assert set(modules) == {"ofd1", "ofd2"} and all(m in distiller.callbacks() for m in modules.values())
    res = fit(tmp_path, distiller, data, epochs=1)
    for i, bn in ((1, teacher.layer1[0].bn2), (2, teacher.layer2[0].bn2)):
        torch.testing.assert_close(modules[f"ofd{i}"].margin, bn_margin(bn.weight, bn.bias))
        assert math.isfinite(res.history[0][f"train/ofd{i}"]) and res.history[0][f"train/ofd{i}"] > 0
    assert modules["ofd2"].margin.std() > 0
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert torch.equal(saved["loss_modules.ofd1.margin"], modules["ofd1"].margin)


def test_resume_continues_exactly(tmp_path):
    """2 epochs straight and 1 + a resume to 2: the same weights, connectors and margins."""
    data, _, full_mod = setup()
    fit(tmp_path / "full", full_mod, data)
    data, _, cut = setup()
    with pytest.raises(Crash):
        fit(tmp_path / "cut", cut, data, [CrashAtEpoch(1)])
    data, _, resumed = setup()
    resumed.student.model.fc.weight.data.zero_()  # everything must come from last.pt
    fit(tmp_path / "cut", resumed, data, resume=True)
    full, again = full_mod.state_dict(), resumed.state_dict()
    assert full.keys() == again.keys() and any(k.startswith("loss_modules.ofd1.conv") for k in full)
    for k, v in full.items():
        assert torch.equal(v, again[k]), k


def test_a_cached_teacher_or_a_missing_batchnorm_is_refused(tmp_path):
    from mmkd.cache import CachedTeacher

    data, teacher, distiller = setup()
    distiller.teachers[0] = CachedTeacher(distiller.teachers[0], torch.zeros(N, 4), {}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="cache=false"):
        fit(tmp_path / "a", distiller, data, epochs=1)
    data, teacher, distiller = setup()
    distiller.loss_modules["ofd1"].teacher_bn = None
    with pytest.raises(ValueError, match="args.teacher_bn"):
        fit(tmp_path / "b", distiller, data, epochs=1)


# ---------------------------------------------------------------- the shipped config
def test_shipped_config_is_mdistillers_setting():
    from mmkd.cli import compose

    cfg = compose(["experiment=cifar10_ofd"])
    assert (cfg.teachers.resnet.name, cfg.student.name) == ("resnet56", "resnet20")
    assert cfg.teachers.resnet.args.preact and cfg.student.args.preact
    weights = {k: (t.weight, t.args.teacher_bn, t.student, t.teacher) for k, t in cfg.losses.items() if t.loss == "ofd"}
    assert weights == {f"ofd_preact{i}": (0.001 / 2 ** (3 - i), f"layer{i}.-1.bn2", f"features.preact{i}",
                                          f"features.preact{i}") for i in (1, 2, 3)}
    assert cfg.losses.ce.weight == 1.0


@pytest.mark.slow
@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_config_trains_one_step_on_a_tiny_real_subset(run_experiment):
    run_dir, results = run_experiment("cifar10_ofd", *TINY_CIFAR10)
    assert 0.0 <= results["student"]["test_acc"] <= 1.0
    state = torch.load(run_dir / "student" / "last.pt", weights_only=True)
    (epoch,) = state["history"]
    assert state["step"] == 1 and all(epoch[f"train/ofd_preact{i}"] > 0 for i in (1, 2, 3))
    assert all(torch.isfinite(state["model"][f"loss_modules.ofd_preact{i}.margin"]).all() for i in (1, 2, 3))
