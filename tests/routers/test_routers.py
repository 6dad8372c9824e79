"""The constant and confidence routers, learned routers, routing helpers (the load-balancing losses
are in test_gating.py), the Distiller's router losses, the run's router factory arguments, config
``imports`` and the custom-router example."""
from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Output, Teacher, Term
from mmkd.config import ConfigError
from mmkd.routers import (ConfidenceRouter, ConstantRouter, LinearRouter, MLPRouter, NoisyTopKRouter, Router,
                          hard_top_k, kl_balance, top_k_gates, top_k_mask)
from tests.reference import ref_kd

REPO = Path(__file__).resolve().parents[2]
B, C, T = 6, 4, 3


def kl_rows(s, t, temp=4.0):
    """Per-instance temp^2 KL(softmax(t/temp) || softmax(s/temp)), in float64."""
    ls, lt = (s.double() / temp).log_softmax(1), (t.double() / temp).log_softmax(1)
    return temp**2 * (lt.exp() * (lt - ls)).sum(1)


def passthrough(key, cls=Net):
    return cls(nn.Identity(), keys=(key,))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"s": torch.randn(B, C, generator=g) * 2, **{f"t{i}": torch.randn(B, C, generator=g) * 2 for i in range(T)}}


def mixture(router, terms=None, student=None):
    return Distiller(student or passthrough("s"), [passthrough(f"t{i}", Teacher) for i in range(T)],
                     terms or [Term("kd")], router)


# ---------------------------------------------------------------- parameter-free routers
def outs(*logits):
    from mmkd.net import Output

    return [Output(torch.as_tensor(l, dtype=torch.float32)) for l in logits]


def test_constant_router():
    s = outs(torch.zeros(3, C))[0]
    w = ConstantRouter([1, 3])(s, outs(torch.zeros(3, C), torch.zeros(3, C)), {})
    assert w.shape == (3, 2)
    torch.testing.assert_close(w, torch.tensor([[0.25, 0.75]] * 3))
    w = ConstantRouter()(s, outs(*[torch.zeros(3, C)] * 4), {})
    torch.testing.assert_close(w, torch.full((3, 4), 0.25))
    w = ConstantRouter([0, 2])(s, outs(torch.zeros(3, C), torch.zeros(3, C)), {})
    torch.testing.assert_close(w, torch.tensor([[0.0, 1.0]] * 3))
    for bad in ([-1, 2], [0, 0], [[1, 2]]):
        with pytest.raises(ValueError):
            ConstantRouter(bad)
    with pytest.raises(ValueError, match="3 teachers"):
        ConstantRouter([1, 1])(s, outs(*[torch.zeros(3, C)] * 3), {})


# two teachers, two instances; probabilities chosen by hand
P1 = [[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]]
P2 = [[0.4, 0.4, 0.2], [0.1, 0.8, 0.1]]


def conf_outputs():
    return outs(torch.tensor(P1).log() + 3.0, torch.tensor(P2).log() - 1.0)  # shifts do not matter


@pytest.mark.parametrize("by,tau,expect", [
    ("max", 1.0, [[0.7 / 1.1, 0.4 / 1.1], [0.5 / 1.3, 0.8 / 1.3]]),
    ("max", 0.5, [[0.49 / 0.65, 0.16 / 0.65], [0.25 / 0.89, 0.64 / 0.89]]),
    ("target", 1.0, [[0.2 / 0.6, 0.4 / 0.6], [0.5 / 0.6, 0.1 / 0.6]]),  # labels 1, 0
    ("target", 2.0, [[math.sqrt(.2) / (math.sqrt(.2) + math.sqrt(.4)), math.sqrt(.4) / (math.sqrt(.2) + math.sqrt(.4))],
                     [math.sqrt(.5) / (math.sqrt(.5) + math.sqrt(.1)), math.sqrt(.1) / (math.sqrt(.5) + math.sqrt(.1))]]),
])
def test_confidence_router_hand_values(by, tau, expect):
    t = conf_outputs()
    w = ConfidenceRouter(by=by, temperature=tau)(outs(torch.zeros(2, 3))[0], t, {"label": torch.tensor([1, 0])})
    assert w.shape == (2, 2)
    torch.testing.assert_close(w, torch.tensor(expect), rtol=1e-5, atol=1e-6)


def test_confidence_router_temperature_limits_and_errors():
    t, s, b = conf_outputs(), outs(torch.zeros(2, 3))[0], {"label": torch.tensor([1, 0])}
    torch.testing.assert_close(ConfidenceRouter("max", 1e-3)(s, t, b), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(ConfidenceRouter("target", 1e-3)(s, t, b), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    torch.testing.assert_close(ConfidenceRouter("max", 1e5)(s, t, b), torch.full((2, 2), 0.5), rtol=0, atol=1e-4)
    with pytest.raises(ValueError):
        ConfidenceRouter(temperature=0.0)
    with pytest.raises(ValueError):
        ConfidenceRouter(by="entropy")


def test_confidence_router_in_distiller_uses_the_label_key():
    g = torch.Generator().manual_seed(1)
    batch = {"s": torch.randn(2, 3, generator=g), "t1": torch.tensor(P1).log(), "t2": torch.tensor(P2).log(),
             "y": torch.tensor([1, 0])}
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher), passthrough("t2", Teacher)],
                  [Term("kd", args={"temperature": 1.0})], router=ConfidenceRouter("target", label_key="y"),
                  label_key="y")
    w = torch.tensor([[1 / 3, 2 / 3], [5 / 6, 1 / 6]], dtype=torch.float64)
    k1, k2 = ref_kd(batch["s"], batch["t1"], 1.0), ref_kd(batch["s"], batch["t2"], 1.0)
    expect = (w[:, 0] * k1 + w[:, 1] * k2).mean().item()
    assert d(batch)["kd"].item() == pytest.approx(expect, rel=1e-5)


# ---------------------------------------------------------------- helpers, by hand
def test_top_k_selection_hand_example():
    p = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1]])
    assert top_k_mask(p, 2).tolist() == [[False, True, True], [True, True, False]]
    torch.testing.assert_close(top_k_gates(p.log(), 2), torch.tensor([[0, 5 / 9, 4 / 9], [2 / 3, 1 / 3, 0]]))
    torch.testing.assert_close(hard_top_k(p, 2), torch.tensor([[0, 0.5, 0.5], [0.5, 0.5, 0]]))
    torch.testing.assert_close(hard_top_k(p, 1), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    tied = torch.full((4, 5), 0.2)
    assert (top_k_mask(tied, 2).sum(1) == 2).all()  # exactly k per row, ties too
    for k in (0, 4):
        with pytest.raises(ValueError, match="k="):
            top_k_mask(p, k)


# ---------------------------------------------------------------- learned routers
def gate_logits(router, x):
    """The gate's logits recomputed from its parameters."""
    if isinstance(router, MLPRouter):
        l1, l2 = router.gate[0], router.gate[2]
        return torch.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias
    return x @ router.gate.weight.T + (router.gate.bias if router.gate.bias is not None else 0)


@pytest.mark.parametrize("cls", [LinearRouter, MLPRouter, NoisyTopKRouter])
@pytest.mark.parametrize("mode", ["soft", "topk", "hard"])
@pytest.mark.parametrize("source", ["logits", "features.h"])
def test_learned_routers_shapes_rows_and_balance(cls, mode, source):
    torch.manual_seed(0)
    s = Output(torch.randn(B, C), {"h": torch.randn(B, 2, 3)})
    teachers = [Output(torch.randn(B, C)) for _ in range(T)]
    router = cls(num_teachers=T, num_classes=C, feature_shapes={"h": (2, 3)}, source=source, mode=mode, k=2,
                 balance_weight=0.5).eval()
    if cls is NoisyTopKRouter:
        nn.init.normal_(router.gate.weight)
    w = router(s, teachers, {})
    assert w.shape == (B, T)
    torch.testing.assert_close(w.sum(1), torch.ones(B))
    assert ((w > 0).sum(1) == (T if mode == "soft" else 2)).all()
    x = s.logits if source == "logits" else s.features["h"].flatten(1)
    h = gate_logits(router, x)
    want = {"soft": h.softmax(1), "topk": top_k_gates(h, 2), "hard": hard_top_k(h, 2)}[mode]
    torch.testing.assert_close(w, want)
    torch.testing.assert_close(router.aux_losses["balance"], 0.5 * kl_balance(h.softmax(1)))


def test_soft_router_learns_from_the_kl_term(batch):
    torch.manual_seed(0)
    router = LinearRouter(num_teachers=T, in_features=C, balance_weight=0.0)
    out = mixture(router)(batch)
    assert "router/balance" not in out
    out["loss"].backward()
    # the same loss by hand: mean_b sum_t softmax(s W^T + b)_bt KL_bt
    W, b = router.gate.weight.detach().double().requires_grad_(), router.gate.bias.detach().double().requires_grad_()
    K = torch.stack([kl_rows(batch["s"], batch[f"t{i}"]) for i in range(T)], 1)
    ref = ((batch["s"].double() @ W.T + b).softmax(1) * K).sum(1).mean()
    ref.backward()
    assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-5)
    assert router.gate.weight.grad.abs().sum() > 1e-3
    torch.testing.assert_close(router.gate.weight.grad.double(), W.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(router.gate.bias.grad.double(), b.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_hard_router_is_mst_distill_top_k_and_its_gate_learns_from_balance_only(batch, k):
    grads = []
    for kd_weight in (1.0, 7.0):
        torch.manual_seed(0)
        router = LinearRouter(num_teachers=T, in_features=C, mode="hard", k=k, balance_weight=0.5)
        out = mixture(router, [Term("kd", kd_weight)])(batch)
        out["loss"].backward()
        grads.append(router.gate.weight.grad.clone())
    h = gate_logits(router, batch["s"]).detach()
    picked = h.topk(k, dim=1).indices
    K = torch.stack([kl_rows(batch["s"], batch[f"t{i}"]) for i in range(T)], 1)
    kd = 7.0 * (K.gather(1, picked).sum(1) / k).mean()  # (1/k) sum over the picked teachers, batch mean
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-5)
    W = router.gate.weight.detach().clone().requires_grad_()
    balance = 0.5 * kl_balance((batch["s"] @ W.T + router.gate.bias.detach()).softmax(1))
    balance.backward()
    assert out["router/balance"].item() == pytest.approx(balance.item(), rel=1e-6)
    assert out["loss"].item() == pytest.approx(out["kd"].item() + balance.item(), rel=1e-6)
    torch.testing.assert_close(grads[0], grads[1])  # independent of the KL term's weight
    torch.testing.assert_close(grads[1], W.grad)  # = the balance loss's gradient
    assert W.grad.abs().sum() > 1e-4


def test_router_gradient_into_the_student_unless_detached(batch):
    def student_grad(balance_weight, detach):
        torch.manual_seed(0)
        student = Net(nn.Linear(C, C), ("s",))
        router = LinearRouter(num_teachers=T, in_features=C, mode="hard", balance_weight=balance_weight, detach=detach)
        mixture(router, student=student)(batch)["loss"].backward()
        return student.model.weight.grad

    torch.testing.assert_close(student_grad(0.5, True), student_grad(2.0, True))
    assert not torch.allclose(student_grad(0.5, False), student_grad(2.0, False))


def test_noisy_top_k_is_deterministic_in_eval_and_noisy_in_training():
    torch.manual_seed(0)
    router = NoisyTopKRouter(num_teachers=4, in_features=C, k=2)
    assert not router.gate.weight.any() and not router.noise.weight.any()  # zero init, as in the paper
    nn.init.normal_(router.gate.weight)
    s, teachers = Output(torch.randn(B, C)), [Output(torch.randn(B, C)) for _ in range(4)]
    router.eval()
    w1, w2 = router(s, teachers, {}), router(s, teachers, {})
    assert torch.equal(w1, w2)
    torch.testing.assert_close(w1, top_k_gates(s.logits @ router.gate.weight.T, 2))
    router.train()
    n1, n2 = router(s, teachers, {}), router(s, teachers, {})
    assert not torch.equal(n1, n2) and not torch.equal(n1, w1)
    assert ((n1 > 0).sum(1) == 2).all()
    torch.testing.assert_close(n1.sum(1), torch.ones(B))


def test_router_argument_errors():
    for kwargs, match in [({"mode": "sparse"}, "mode 'sparse'"), ({"balance": "l2"}, "balance 'l2'"),
                          ({"mode": "hard", "balance_weight": 0.0}, "balance_weight > 0"),
                          ({"mode": "topk", "k": 4}, "k=4"), ({"source": "hidden"}, "neither 'logits'")]:
        with pytest.raises(ValueError, match=match):
            LinearRouter(num_teachers=T, in_features=C, **kwargs)
    with pytest.raises(ValueError, match="give in_features"):
        LinearRouter(num_teachers=T, source="features.h")
    with pytest.raises(ValueError, match="3 teachers but there are 2"):
        LinearRouter(num_teachers=T, in_features=C)(Output(torch.randn(2, C)), [Output(torch.randn(2, C))] * 2, {})


def test_distiller_adds_any_router_losses(batch):
    class Penalised(Router):
        def forward(self, student, teachers, batch):
            self.aux_losses = {"z": student.logits.pow(2).mean()}
            return torch.full((len(student.logits), len(teachers)), 1 / len(teachers))

    d = mixture(Penalised())
    out = d(batch)
    torch.testing.assert_close(out["router/z"], batch["s"].pow(2).mean())
    torch.testing.assert_close(out["loss"], out["kd"] + out["router/z"])
    assert d.router.aux_losses == {}  # taken: no graph is kept alive, the Distiller can be copied
    copy.deepcopy(d)


# ---------------------------------------------------------------- from a config
def test_run_gives_router_factories_the_sizes_they_ask_for():
    from mmkd.cli import compose
    from mmkd.data import digits
    from mmkd.build import build_model, build_router

    data = digits()
    meta = data.meta()

    def router(*overrides):
        cfg = compose(["teachers.cnn2={name: cnn, inputs: [image]}", *overrides])
        return build_router(cfg, meta, build_model(cfg.student, meta, "student"), data, len(cfg.teachers))

    r = router("router.name=linear")
    assert (r.gate.in_features, r.gate.out_features) == (10, 2)  # num_classes, two teachers
    r = router("router.name=mlp", "router.args.source=features.body", "student.features=[body]")
    assert (r.gate[0].in_features, r.gate[2].out_features) == (64, 2)  # the student's hidden width
    r = router("router.name=noisy_topk", "router.args.in_features=10", "router.args.num_teachers=2")
    assert r.gate.in_features == 10
    with pytest.raises(ConfigError, match=r"router.args: .*give in_features"):
        router("router.name=linear", "router.args.source=features.body")
    with pytest.raises(ConfigError, match="router.args: router mode 'x'"):
        router("router.name=linear", "router.args.mode=x")


def test_config_imports_register_custom_names(tmp_path, monkeypatch):
    from mmkd.cli import compose

    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "my_routers_for_test.py").write_text(
        "from mmkd.routers import ConstantRouter, register_router\n"
        "register_router('test_imported')(type('Imported', (ConstantRouter,), {}))\n")
    with pytest.raises(ConfigError, match="router.name: unknown router 'test_imported'"):
        compose(["router.name=test_imported"])
    cfg = compose(["imports=[my_routers_for_test]", "router.name=test_imported"])  # found in the current directory
    assert cfg.imports == ["my_routers_for_test"]
    with pytest.raises(ConfigError, match="imports: cannot import 'no_such_module_xyz'"):
        compose(["imports=[no_such_module_xyz]"])


# ---------------------------------------------------------------- the example
@pytest.fixture
def example(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    import examples.custom_router

    return examples.custom_router


def test_custom_router_example_weights_and_python_run(example, tmp_path):
    sure, unsure = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.5, 0.0, 0.0]])
    w = example.TeacherEntropyRouter(temperature=2.0)(Output(sure), [Output(sure), Output(unsure)], {})
    ent = [-(p * p.log()).sum().item() for p in (sure.softmax(1), unsure.softmax(1))]
    want = torch.tensor([-ent[0] / 2, -ent[1] / 2]).softmax(0)
    torch.testing.assert_close(w[0], want)
    assert w[0, 0] > w[0, 1]
    test = example.main(run_dir=str(tmp_path / "py"), epochs=1, teacher_epochs=1)
    assert 0.0 <= test["acc"] <= 1.0 and (tmp_path / "py/student/metrics.csv").exists()


def test_custom_router_experiment_from_the_command_line(tmp_path, monkeypatch, capsys):
    from mmkd.cli import main

    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(REPO)  # `mmkd run experiment=custom_router` from the repository root
    code = main(["run", "experiment=custom_router", f"run_dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
                 "trainer.max_epochs=1", "teachers.cnn.epochs=1", "teachers.mlp.epochs=1", "trainer.tensorboard=false",
                 "baseline=false", "export=[]"])
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run/results.json").read_text())
    assert set(results["teachers"]) == {"cnn", "mlp"} and 0.0 <= results["student"]["test_acc"] <= 1.0
    from mmkd import ROUTERS

    assert ROUTERS["teacher_entropy"].__module__ == "examples.custom_router"
