"""Data policies (mmkd.policies): the disagreement score against a naive per-item computation, the
subset `hardest` trains on, and an exact resume with a policy's state."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.policies import Hardest, RandomSubset, disagreement
from mmkd.routers import ConstantRouter

N, D, C = 40, 4, 3


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(f"d{seed}", x=torch.randn(N, D, generator=g), label=torch.randint(0, C, (N,), generator=g))


def kd(seed=0):
    torch.manual_seed(seed)
    teachers = [Teacher(nn.Linear(D, C), ("x",)), Teacher(nn.Linear(D, C), ("x",))]
    return Distiller(Net(nn.Linear(D, C), ("x",)), teachers, [Term("ce"), Term("kd")], ConstantRouter())


def naive_kl(mod, ds):
    out = []
    with torch.no_grad():
        for i in range(len(ds)):
            x = ds.tensors["x"][i:i + 1].double()
            s = torch.log_softmax(x @ mod.student.model.weight.double().T + mod.student.model.bias.double(), 1)
            p = sum(torch.softmax(x @ t.model.weight.double().T + t.model.bias.double(), 1) for t in mod.teachers) / 2
            out.append(float((p * (p.log() - s)).sum()))
    return torch.tensor(out, dtype=torch.float64)


def test_disagreement_is_the_kl_of_the_teachers_mean_from_the_student():
    mod, ds = kd(), data()
    assert torch.allclose(disagreement(mod, ds, torch.device("cpu"), batch_size=7).double(), naive_kl(mod, ds), atol=1e-5)
    assert mod.training  # its mode is restored


class Trainer_:
    epoch = 0
    device = torch.device("cpu")


def test_hardest_keeps_the_largest_disagreements():
    mod, ds = kd(), data()
    policy, t = Hardest(fraction=0.25, start=1), Trainer_()
    assert policy.select(t, mod, ds) is ds  # before `start`: all of it
    t.epoch = 1
    subset = policy.select(t, mod, ds)
    scores = naive_kl(mod, ds)
    assert sorted(subset.indices) == sorted(scores.argsort(descending=True)[:10].tolist())
    assert torch.equal(subset[0]["index"], torch.tensor(subset.indices[0]))  # items keep their index (cache lookups)


def test_epochs_train_on_the_selection_and_resume_exactly(tmp_path):
    def fit(run_dir, resume=False, crash=False, seed=0):
        steps = []
        mod = kd(seed)
        mod.student.register_forward_pre_hook(lambda m, a: steps.append(len(a[0]["x"])) if m.training else None)
        policy = Hardest(fraction=0.5, start=1, every=2)
        if crash:
            policy.select = lambda t, m, d, real=policy.select: (_ for _ in ()).throw(KeyboardInterrupt) \
                if t.epoch == 2 else real(t, m, d)
        t = Trainer(run_dir=run_dir, max_epochs=4, batch_size=8, tensorboard=False, progress="off",
                    device="cpu", resume=resume)
        return t.fit(mod, data(), data(1), callbacks=[policy]), mod, steps

    res, full, steps = fit(tmp_path / "full")
    assert sum(steps) == N + 3 * N // 2  # epoch 1 on everything, then half
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", crash=True)
    again, resumed, _ = fit(tmp_path / "cut", resume=True, seed=7)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    strip = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in res.history]
    assert strip == [{k: v for k, v in r.items() if not k.startswith("time/")} for r in again.history]


def test_random_keeps_a_seeded_fraction_in_index_order():
    mod, ds, t = kd(), data(), Trainer_()
    t.cfg = SimpleNamespace(seed=3)
    subset = RandomSubset(fraction=0.3).select(t, mod, ds)
    want = torch.randperm(len(ds), generator=torch.Generator().manual_seed(3))[:int(0.3 * len(ds))].sort().values
    assert subset.indices == want.tolist() and len(subset) == int(0.3 * N)
    policy = RandomSubset(fraction=0.3)
    policy.load_state_dict({"indices": torch.tensor([4, 1])})  # a resumed run keeps its selection
    assert policy.select(t, mod, ds).indices == [4, 1]
    t.cfg.seed = 4
    assert RandomSubset(fraction=0.3).select(t, mod, ds).indices != subset.indices
