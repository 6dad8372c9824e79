"""VID (mmkd.losses.features.vid): the Gaussian negative log-likelihood against a loop, the regressor and
variance as a term's module (sized from the features, the variance learned or held), gradients, exact
resume, and the shipped config on a tiny real subset."""
import math
import os
from pathlib import Path

import pytest
import torch

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses.features import vid
from mmkd.losses.features.vid import Regressor
from mmkd.registry import MODELS
from mmkd.routers import ConstantRouter
from tests.reference import TINY_CIFAR10, Crash, CrashAtEpoch

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
F64 = torch.float64


def ref_vid(mu, T, alpha, eps):
    """Per instance: the mean over channels and positions of 1/2 [(t - mu)^2 / var + log var],
    var = log(1 + exp(alpha)) + eps, in python floats."""
    var = [math.log(1 + math.exp(a)) + eps for a in alpha.tolist()]
    out = []
    for m_i, t_i in zip(mu.tolist(), T.tolist()):
        terms = [0.5 * ((t - m) ** 2 / v + math.log(v))
                 for m_c, t_c, v in zip(m_i, t_i, var) for m_row, t_row in zip(m_c, t_c) for m, t in zip(m_row, t_row)]
        out.append(sum(terms) / len(terms))
    return torch.tensor(out, dtype=F64)


def regressor(c_s=3, c_t=4, seed=0, **kw):
    torch.manual_seed(seed)
    m = Regressor((c_s, 4, 4), (c_t, 4, 4), **kw).double()
    with torch.no_grad():
        m.log_scale.uniform_(-2, 2)
    return m


def maps(b=3, c_s=3, c_t=4, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c_s, hw, hw, generator=g, dtype=F64), torch.randn(b, c_t, hw, hw, generator=g, dtype=F64)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_loop(seed):
    m = regressor(seed=seed)
    s, t = maps(seed=seed)
    ref = ref_vid(m(s), t, m.log_scale, 1e-5)
    torch.testing.assert_close(vid(s, t, module=m, reduction="none"), ref)
    torch.testing.assert_close(vid(s, t, module=m), ref.mean())  # mdistiller: torch.mean over everything


def test_regressor_is_three_1x1_convolutions_with_relus():
    m = regressor(c_s=3, c_t=5)
    convs = [l for l in m.mean if isinstance(l, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == \
        [(3, 5, (1, 1), None), (5, 5, (1, 1), None), (5, 5, (1, 1), None)]
    x = torch.randn(2, 3, 4, 4, dtype=F64)
    a, b, c = (l.weight[:, :, 0, 0] for l in convs)
    def conv(w, h):
        return torch.einsum("oc,bchw->bohw", w, h)

    by_hand = conv(c, torch.relu(conv(b, torch.relu(conv(a, x)))))
    torch.testing.assert_close(m(x), by_hand)


def test_variance_starts_at_init_var_and_trains_unless_held():
    m = Regressor((3, 4, 4), (6, 4, 4))
    torch.testing.assert_close(m.variance(), torch.full((6,), 5.0))
    assert m.log_scale.requires_grad
    held = Regressor((3, 4, 4), (6, 4, 4), init_var=2.0, eps=1e-3, learn_var=False)
    torch.testing.assert_close(held.variance(), torch.full((6,), 2.0))
    assert not held.log_scale.requires_grad
    term = Term("vid", args={"init_var": 3.0, "learn_var": False}, sizes={"student_shape": (3, 4, 4),
                                                                        "teacher_shape": (6, 4, 4)})
    assert term.args == {} and not term.module.log_scale.requires_grad
    torch.testing.assert_close(term.module.variance(), torch.full((6,), 3.0))


def test_a_perfect_mean_leaves_the_log_variance():
    m = regressor()
    s, _ = maps()
    with torch.no_grad():
        t = m(s)
    expect = 0.5 * torch.log(torch.nn.functional.softplus(m.log_scale) + 1e-5).mean()
    torch.testing.assert_close(vid(s, t, module=m, reduction="none"), expect.expand(3))


def test_larger_maps_are_pooled_to_the_smaller():
    m = regressor()
    s, t = maps(hw=8)
    small_s, small_t = maps(hw=4)
    pool = torch.nn.functional.avg_pool2d
    torch.testing.assert_close(vid(s, small_t, module=m), vid(pool(s, 2), small_t, module=m))
    torch.testing.assert_close(vid(small_s, t, module=m), vid(small_s, pool(t, 2), module=m))


def test_gradcheck_float64():
    m = regressor()
    s, t = maps()
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: vid(a, t, module=m), (s,))
    names = [n for n, _ in m.named_parameters()]  # the regressor's weights and the log-scale
    assert names[0] == "log_scale" and len(names) == 4
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    assert torch.autograd.gradcheck(lambda *q: vid(s.detach(), t, module=Swapped(m, dict(zip(names, q)))), params)


class Swapped(torch.nn.Module):
    """``m`` with its parameters given as tensors (for gradcheck); the variance by its formula."""

    def __init__(self, m, params):
        super().__init__()
        self.m, self.params = m, params

    def forward(self, x):
        return torch.func.functional_call(self.m, self.params, (x,))

    def variance(self):
        return torch.log1p(torch.exp(self.params["log_scale"])) + self.m.eps


def test_errors_are_one_line():
    s, t = maps()
    with pytest.raises(ValueError, match=r"Term\('vid'"):
        vid(s, t)
    with pytest.raises(ValueError, match="feature maps"):
        Regressor((16,), (16,))
    with pytest.raises(ValueError, match="init_var=1e-06 must exceed eps"):
        Regressor((3, 4, 4), (4, 4, 4), init_var=1e-6)
    with pytest.raises(ValueError, match="4 channels"):
        vid(s, maps(c_t=5)[1], module=regressor())


# ---------------------------------------------------------------- as a loss term: training, resume
N = 16


def setup(seed=0):
    g = torch.Generator().manual_seed(0)
    data = TensorDictDataset("vid", image=torch.randn(N, 3, 8, 8, generator=g), label=torch.arange(N) % 4)
    torch.manual_seed(seed)  # the models' initialisation
    paths = ["layer1", "layer2"]
    terms = [Term("ce"), *[Term("vid", name=f"vid_{p}", student=f"features.{p}", teacher=f"features.{p}",
                                sizes={"student_shape": (c, s, s), "teacher_shape": (4 * c, s, s)})
                           for p, c, s in (("layer1", 16, 8), ("layer2", 32, 4))]]
    return data, Distiller(Net(MODELS["resnet8"](4, (3, 8, 8)), ["image"], paths),
                           [Teacher(MODELS["resnet8x4"](4, (3, 8, 8)), ["image"], paths)], terms, ConstantRouter())


def fit(run_dir, module, data, callbacks=(), resume=False, epochs=2):
    return Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=8, lr=0.05, keep="last", resume=resume,
                   tensorboard=False, progress="off").fit(module, data, data, callbacks=list(callbacks))


def test_regressor_and_variance_train_with_the_student(tmp_path):
    data, distiller = setup()
    m = distiller.loss_modules["vid_layer2"]
    assert m.mean[0].in_channels == 32 and m.mean[0].out_channels == 128  # resnet8 -> resnet8x4
    before = m.log_scale.detach().clone(), m.mean[0].weight.detach().clone()
    res = fit(tmp_path, distiller, data, epochs=1)
    assert not torch.equal(m.log_scale.detach(), before[0]) and not torch.equal(m.mean[0].weight.detach(), before[1])
    assert all(math.isfinite(res.history[0][f"train/vid_{p}"]) for p in ("layer1", "layer2"))


def test_resume_continues_exactly(tmp_path):
    """2 epochs straight and 1 + a resume to 2: the same student, regressors and variances."""
    data, full_mod = setup()
    fit(tmp_path / "full", full_mod, data)
    data, cut = setup()
    with pytest.raises(Crash):
        fit(tmp_path / "cut", cut, data, [CrashAtEpoch(1)])
    data, resumed = setup(seed=3)  # other initial weights: everything must come from last.pt
    fit(tmp_path / "cut", resumed, data, resume=True)
    full, again = full_mod.state_dict(), resumed.state_dict()
    assert full.keys() == again.keys() and "loss_modules.vid_layer1.log_scale" in full
    for k, v in full.items():
        assert torch.equal(v, again[k]), k


# ---------------------------------------------------------------- the shipped config
def test_shipped_config_is_mdistillers_setting():
    from mmkd.cli import compose

    cfg = compose(["experiment=cifar10_vid"])
    assert (cfg.teachers.resnet.name, cfg.student.name, cfg.losses.ce.weight) == ("resnet56", "resnet20", 1.0)
    terms = {k: (t.weight, t.student, t.teacher, dict(t.args)) for k, t in cfg.losses.items() if t.loss == "vid"}
    assert terms == {f"vid_layer{i}": (1.0, f"features.layer{i}", f"features.layer{i}", {}) for i in (1, 2, 3)}


@pytest.mark.slow
@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_config_trains_one_step_on_a_tiny_real_subset(run_experiment):
    run_dir, results = run_experiment("cifar10_vid", *TINY_CIFAR10)
    assert 0.0 <= results["student"]["test_acc"] <= 1.0
    state = torch.load(run_dir / "student" / "last.pt", weights_only=True)
    (epoch,) = state["history"]
    assert state["step"] == 1 and all(math.isfinite(epoch[f"train/vid_layer{i}"]) for i in (1, 2, 3))
    assert state["model"]["loss_modules.vid_layer3.mean.0.weight"].shape == (64, 64, 1, 1)
