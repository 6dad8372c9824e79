"""Tests for the mixture-of-teachers core (Distiller), the routers, and Net/Teacher."""
import copy
import math

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term
from mmkd.losses import dist as dist_loss
from mmkd.losses import kd as kd_loss
from mmkd.routers import ConfidenceRouter, ConstantRouter, Router

B, C = 5, 4


def ref_kd(s, t, T=4.0):
    """Per-instance T^2 KL(softmax(t/T) || softmax(s/T)), in float64 with python loops."""
    out = []
    for srow, trow in zip(s.double().tolist(), t.double().tolist()):
        ps = [math.exp(v / T) for v in srow]
        pt = [math.exp(v / T) for v in trow]
        zs, zt = sum(ps), sum(pt)
        out.append(T * T * sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt)))
    return torch.tensor(out, dtype=torch.float64)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return {"s": torch.randn(B, C, generator=g) * 2, "t1": torch.randn(B, C, generator=g) * 2,
            "t2": torch.randn(B, C, generator=g) * 2, "label": torch.randint(0, C, (B,), generator=g)}


def passthrough(key, cls=Net, **kw):
    """A Net/Teacher whose logits are the batch entry ``key`` itself."""
    return cls(nn.Identity(), keys=(key,), **kw)


class FixedRouter(Router):
    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, student, teachers, batch):
        return self.w


# ---------------------------------------------------------------- mixture math
def test_constant_router_mixes_kd_by_normalised_weights(batch):
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher), passthrough("t2", Teacher)],
                  [Term("kd")], router=ConstantRouter([1, 3]))
    out = d(batch)
    expect = 0.25 * ref_kd(batch["s"], batch["t1"]).mean() + 0.75 * ref_kd(batch["s"], batch["t2"]).mean()
    assert out["kd"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(expect.item(), rel=1e-5)
    # and the same against the library's kd
    lib = 0.25 * kd_loss(batch["s"], batch["t1"]) + 0.75 * kd_loss(batch["s"], batch["t2"])
    torch.testing.assert_close(out["kd"], lib)


def test_per_instance_router_weights_give_weighted_mean(batch):
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher), passthrough("t2", Teacher)],
                  [Term("kd", 2.0, {"temperature": 2.0}), Term("ce", 0.5)], router=FixedRouter(w))
    out = d(batch)
    k1, k2 = ref_kd(batch["s"], batch["t1"], 2.0), ref_kd(batch["s"], batch["t2"], 2.0)
    expect_kd = 2.0 * sum(w[b, 0] * k1[b] + w[b, 1] * k2[b] for b in range(B)).item() / B
    logp = batch["s"].double().log_softmax(1)
    expect_ce = 0.5 * -logp[torch.arange(B), batch["label"]].mean().item()
    assert out["kd"].item() == pytest.approx(expect_kd, rel=1e-5)
    assert out["ce"].item() == pytest.approx(expect_ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(expect_kd + expect_ce, rel=1e-5)
    # not the same as weighting by the mean weight (which is what a batch-level loss gets)
    wm = w.mean(0)
    assert abs(expect_kd - 2.0 * (wm[0] * k1.mean() + wm[1] * k2.mean()).item()) > 1e-3


def test_batch_level_loss_weighted_by_mean_router_weight(batch):
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher), passthrough("t2", Teacher)],
                  [Term("dist")], router=FixedRouter(w))
    out = d(batch)
    d1, d2 = dist_loss(batch["s"], batch["t1"]), dist_loss(batch["s"], batch["t2"])
    expect = (w[:, 0].mean() * d1 + w[:, 1].mean() * d2).item()  # 0.52 * d1 + 0.48 * d2
    assert out["dist"].item() == pytest.approx(expect, rel=1e-6)
    assert abs(d1 - d2) > 1e-3


def test_single_teacher_constant_router_is_plain_kd(batch):
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher)], [Term("kd", 3.0, {"temperature": 1.5})],
                  router=ConstantRouter())
    out = d(batch)
    torch.testing.assert_close(out["kd"], 3.0 * kd_loss(batch["s"], batch["t1"], temperature=1.5))
    assert out["kd"].item() == pytest.approx(3.0 * ref_kd(batch["s"], batch["t1"], 1.5).mean().item(), rel=1e-5)


def test_term_names_and_label_only_training(batch):
    d = Distiller(passthrough("s"), [], [Term("ce", name="xent"), Term("ce", 2.0, {"label_smoothing": 0.1})])
    out = d(batch)
    assert set(out) == {"xent", "ce", "loss"}
    ce0 = nn.functional.cross_entropy(batch["s"], batch["label"])
    ce1 = nn.functional.cross_entropy(batch["s"], batch["label"], label_smoothing=0.1)
    torch.testing.assert_close(out["xent"], ce0)
    torch.testing.assert_close(out["ce"], 2.0 * ce1)
    torch.testing.assert_close(out["loss"], ce0 + 2.0 * ce1)
    torch.testing.assert_close(d.predict(batch), batch["s"])


class SoftmaxRouter(Router):
    """A learned constant router: w = softmax(a), the same for every instance."""

    def __init__(self, n):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3, -0.2][:n]))

    def forward(self, student, teachers, batch):
        return self.a.softmax(0).expand(student.logits.shape[0], -1)


def test_learned_router_receives_gradient_through_weights(batch):
    router = SoftmaxRouter(2)
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher), passthrough("t2", Teacher)],
                  [Term("kd")], router=router)
    d(batch)["loss"].backward()
    # d/da sum_t softmax(a)_t K_t = w * (K - sum_t w_t K_t)
    K = torch.stack([ref_kd(batch["s"], batch["t1"]).mean(), ref_kd(batch["s"], batch["t2"]).mean()])
    w = torch.tensor([0.3, -0.2], dtype=torch.float64).softmax(0)
    expect = w * (K - (w * K).sum())
    assert router.a.grad.abs().min() > 1e-4
    torch.testing.assert_close(router.a.grad.double(), expect, rtol=1e-4, atol=1e-6)


def test_router_reading_the_student_gets_gradient(batch):
    class StudentRouter(Router):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(C, 2)

        def forward(self, student, teachers, batch):
            return self.lin(student.logits).softmax(1)

    torch.manual_seed(0)
    router = StudentRouter()
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher), passthrough("t2", Teacher)],
                  [Term("kd")], router=router)
    d(batch)["loss"].backward()
    assert router.lin.weight.grad is not None and router.lin.weight.grad.abs().sum() > 0


def test_distiller_errors():
    with pytest.raises(ValueError, match="router"):
        Distiller(passthrough("s"), [passthrough("t1", Teacher)], [Term("kd")])
    with pytest.raises(ValueError, match="kd"):
        Distiller(passthrough("s"), [], [Term("ce"), Term("kd")])
    with pytest.raises(ValueError, match="at least one loss term"):
        Distiller(passthrough("s"), [], [])


# ---------------------------------------------------------------- routers
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


# ---------------------------------------------------------------- Net / Teacher
class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
        self.head = nn.Linear(5 + 2, C)

    def forward(self, a, b):
        return self.head(torch.cat([self.block(a), b], 1))


def two_input_batch():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(B, 3, generator=g), "b": torch.randn(B, 2, generator=g), "label": torch.zeros(B)}


def test_net_features_by_module_path():
    torch.manual_seed(0)
    m = Model()
    net = Net(m, keys=("a", "b"), features=("block.0", "block", "head"))
    batch = two_input_batch()
    out = net(batch)
    pre = batch["a"] @ m.block[0].weight.T + m.block[0].bias
    logits = torch.cat([pre.relu(), batch["b"]], 1) @ m.head.weight.T + m.head.bias
    assert list(out.features) == ["block.0", "block", "head"]
    torch.testing.assert_close(out.features["block.0"], pre)
    torch.testing.assert_close(out.features["block"], pre.relu())
    torch.testing.assert_close(out.features["head"], logits)
    torch.testing.assert_close(out.logits, logits)
    assert (pre < 0).any()  # so block.0 and block really differ
    assert not m._forward_hooks and not m.block[0]._forward_hooks  # hooks removed after the call


def test_net_errors_early():
    with pytest.raises(AttributeError):
        Net(Model(), keys=("a", "b"), features=("block.7",))
    with pytest.raises(AttributeError):
        Net(Model(), keys=("a", "b"), features=("body",))
    net = Net(Model(), keys=("a", "missing"))
    with pytest.raises(KeyError, match="missing.*a, b, label"):
        net(two_input_batch())


def test_deepcopy_of_net_records_its_own_features():
    torch.manual_seed(0)
    net = Net(Model(), keys=("a", "b"), features=("block",))
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.model.block[0].weight.mul_(-1.0)
    batch = two_input_batch()
    mine, theirs = net(batch), twin(batch)
    torch.testing.assert_close(mine.features["block"], net.model.block(batch["a"]))
    torch.testing.assert_close(theirs.features["block"], twin.model.block(batch["a"]))
    assert not torch.equal(mine.features["block"], theirs.features["block"])


def test_frozen_teacher_stays_frozen():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, C))
    teacher = Teacher(m, keys=("a",))
    teacher.train()
    assert not any(mod.training for mod in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(B, 3, requires_grad=True)
    out1, out2 = teacher({"a": x}), teacher({"a": x})
    assert not out1.logits.requires_grad
    assert torch.equal(out1.logits, out2.logits)  # dropout off, BN uses running stats
    assert torch.equal(m[2].running_mean, torch.zeros(8))  # running stats not updated

    # inside a Distiller being trained, the student trains and the frozen teacher does not
    student = Net(nn.Sequential(nn.Linear(3, C), nn.Dropout(0.1)), keys=("a",))
    d = Distiller(student, [teacher], [Term("kd")], router=ConstantRouter())
    d.train()
    assert student.training and student.model[1].training
    assert not any(mod.training for mod in teacher.modules())


def test_cotrained_teacher_trains_and_gets_gradient():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, C), nn.Dropout(0.5))
    teacher = Teacher(m, keys=("a",), frozen=False)
    teacher.train()
    assert m[1].training and all(p.requires_grad for p in teacher.parameters())
    teacher({"a": torch.randn(B, 3)}).logits.sum().backward()
    assert m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ feature terms, adapters, batch-reading losses
def test_feature_term_with_adapter_compares_projected_student_features():
    """A FitNet-style term: MSE(adapter(student hidden), teacher hidden), adapter trained with the student."""
    from mmkd.losses import reduce, register_loss
    from mmkd.registry import LOSSES

    if "test_feat_mse" not in LOSSES._items:
        @register_loss("test_feat_mse")
        def feat_mse(s, t, target=None, reduction="mean"):
            return reduce((s - t).pow(2).flatten(1).mean(1), reduction)

    torch.manual_seed(0)
    s_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    t_model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    adapter = torch.nn.Linear(3, 5)
    term = Term("test_feat_mse", student="features.1", teacher="features.1", adapter=adapter)
    d = Distiller(Net(s_model, ["x"], features=["1"]), [Teacher(t_model, ["x"], features=["1"])], [term],
                  ConstantRouter())
    x = torch.randn(6, 4)
    got = d({"x": x})["test_feat_mse"]
    want = (adapter(torch.relu(s_model[0](x))) - torch.relu(t_model[0](x))).pow(2).mean()
    assert torch.allclose(got, want)
    assert any(p is adapter.weight for p in d.parameters())  # the adapter trains with the student
    got.backward()
    assert adapter.weight.grad.abs().sum() > 0 and s_model[0].weight.grad.abs().sum() > 0


def test_missing_feature_and_bad_selector_are_clear_errors():
    with pytest.raises(ValueError, match="neither 'logits' nor 'features.<path>'"):
        Term("kd", student="hidden")
    d = Distiller(Net(torch.nn.Linear(4, 2), ["x"]), [Teacher(torch.nn.Linear(4, 2), ["x"])],
                  [Term("kd", teacher="features.0")], ConstantRouter())
    with pytest.raises(KeyError, match="no feature '0'"):
        d({"x": torch.randn(3, 4)})


def test_batch_reading_loss_receives_the_batch():
    from mmkd.losses import register_loss
    from mmkd.registry import LOSSES

    if "test_uses_batch" not in LOSSES._items:
        @register_loss("test_uses_batch", per_sample=False, batch=True)
        def uses_batch(s, t, target=None, *, batch):
            return (s * batch["scale"]).sum()

    d = Distiller(Net(torch.nn.Linear(2, 2), ["x"]), [Teacher(torch.nn.Linear(2, 2), ["x"])],
                  [Term("test_uses_batch")], ConstantRouter())
    x, scale = torch.randn(3, 2), torch.tensor(2.5)
    got = d({"x": x, "scale": scale})["test_uses_batch"]
    assert torch.allclose(got, d.student.model(x).sum() * 2.5)
