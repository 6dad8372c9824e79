"""CTKD (mmkd.losses.adaptive.ctkd): KD at the learned temperature, the reversed and curriculum-scaled gradient
of the temperature, and a loss term's learned module training with the student."""
import math

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses import ctkd, kd
from mmkd.losses.adaptive.ctkd import CurriculumTemperature
from mmkd.routers import ConstantRouter
from tests.reference import Crash, CrashAtEpoch


def make(b=5, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=torch.float64), torch.randn(b, c, generator=g, dtype=torch.float64)


def test_value_is_kd_at_the_modules_temperature():
    s, t = make()
    m = CurriculumTemperature().double()
    tau = 1 + 20 / (1 + math.exp(-1))  # theta starts at 1
    assert float(m().detach()) == pytest.approx(tau)
    torch.testing.assert_close(ctkd(s, t, module=m, reduction="none"), kd(s, t, temperature=tau, reduction="none"))


@pytest.mark.parametrize("lam", [0.0, -0.3, -1.0, 0.5])
def test_the_temperatures_gradient_is_reversed_and_scaled_by_lambda(lam):
    s, t = make()
    m = CurriculumTemperature().double()
    m.lam = lam
    ctkd(s, t, module=m).backward()
    theta = torch.ones(1, dtype=torch.float64, requires_grad=True)  # the same temperature without the reversal
    kd(s, t, temperature=(1 + 20 * torch.sigmoid(theta)).squeeze()).backward()
    torch.testing.assert_close(m.theta.grad, -lam * theta.grad)


def test_curriculum_is_the_official_cosine_over_1_based_epochs():
    m = CurriculumTemperature()
    official = [(math.cos(i * math.pi / 10) + 1) / 2 * (0 - (-1)) + (-1) for i in range(1, 11)]  # CosineDecay
    assert [m.curriculum(e) for e in range(10)] == pytest.approx(official)
    assert m.curriculum(0) == pytest.approx(-0.0244717, abs=1e-6) and m.curriculum(9) == pytest.approx(-1.0)
    assert m.curriculum(30) == pytest.approx(-1.0)


def test_the_terms_module_takes_its_arguments_and_trains_with_the_student(tmp_path):
    term = Term("ctkd", args={"loops": 4, "t_range": 10.0})
    assert term.module.loops == 4 and term.module.t_range == 10.0 and term.args == {}
    g = torch.Generator().manual_seed(0)
    data = TensorDictDataset("c", x=torch.randn(32, 6, generator=g), label=torch.randint(0, 3, (32,), generator=g))
    torch.manual_seed(0)
    distiller = Distiller(Net(nn.Linear(6, 3), ("x",)), [Teacher(nn.Linear(6, 3), ("x",))], [Term("ce"), term],
                          ConstantRouter())
    assert distiller.loss_modules["ctkd"] is term.module and term.module in distiller.callbacks()
    res = Trainer(run_dir=tmp_path, max_epochs=3, batch_size=8, lr=0.5, keep="last", tensorboard=False,
                  progress="off").fit(distiller, data, data)
    assert term.module.lam == pytest.approx(term.module.curriculum(2))  # set at the last epoch's start
    assert float(term.module.theta.detach()) != 1.0  # trained (lambda < 0 from the first epoch)
    assert [h["ctkd/t"] for h in res.history][-1] == pytest.approx(1 + 10 * float(torch.sigmoid(term.module.theta.detach())))
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert torch.equal(saved["loss_modules.ctkd.theta"], term.module.theta.detach())


def test_without_a_module_it_says_how_to_get_one():
    s, t = make()
    with pytest.raises(ValueError, match="Term\\('ctkd'\\)"):
        ctkd(s, t)


def test_resume_continues_exactly(tmp_path):
    """4 epochs straight and 2 + a resume to 4: the same temperature history and the same weights."""
    g = torch.Generator().manual_seed(0)
    data = TensorDictDataset("c", x=torch.randn(32, 6, generator=g), label=torch.randint(0, 3, (32,), generator=g))

    def fresh(seed=0):
        torch.manual_seed(seed)
        return Distiller(Net(nn.Linear(6, 3), ("x",)), [Teacher(nn.Linear(6, 3), ("x",))],
                         [Term("ce"), Term("ctkd", args={"loops": 3})], ConstantRouter())

    def fit(run_dir, module, callbacks=(), resume=False):
        return Trainer(run_dir=run_dir, max_epochs=4, batch_size=8, lr=0.5, keep="last", resume=resume,
                       tensorboard=False, progress="off").fit(module, data, data, callbacks=list(callbacks))

    full_mod = fresh()
    full = fit(tmp_path / "full", full_mod)
    with pytest.raises(Crash):
        fit(tmp_path / "cut", fresh(), [CrashAtEpoch(2)])
    resumed_mod = fresh(seed=5)
    resumed = fit(tmp_path / "cut", resumed_mod, resume=True)
    assert [h["ctkd/t"] for h in resumed.history] == [h["ctkd/t"] for h in full.history]
    assert resumed_mod.loss_modules["ctkd"].lam == full_mod.loss_modules["ctkd"].lam
    for k, v in full_mod.state_dict().items():
        assert torch.equal(v, resumed_mod.state_dict()[k]), k
