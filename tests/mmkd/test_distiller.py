"""Tests for the mixture-of-teachers core (Distiller): router-weighted mixtures of loss terms, its errors,
feature terms with adapters and batch-reading losses. The routers are tested in tests/routers/, Net and
Teacher in test_net.py."""
import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term
from mmkd.losses import dist as dist_loss
from mmkd.losses import kd as kd_loss
from mmkd.routers import ConstantRouter, Router
from tests.reference import ref_kd

B, C = 5, 4


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
    with pytest.raises(ValueError, match="neither 'logits', 'features' nor 'features.<path>'"):
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


# ---------------------------------------------------------------- grouped means
def test_grouped_term_sums_the_mean_of_each_group():
    """DHO's 0.5 * (KD(labelled) + KD(unlabelled)) on batches of unequal size: 2 labelled rows, 5 not."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(7, C, generator=g), torch.randn(7, C, generator=g)
    labelled = torch.tensor([True, True, False, False, False, False, False])
    batch = {"s": s, "t1": t, "labelled": labelled}
    grouped = Distiller(passthrough("s"), [passthrough("t1", Teacher)],
                        [Term("kd", 0.5, {"temperature": 2.0}, group="labelled")], ConstantRouter())
    per_row = ref_kd(s, t, 2.0)
    expect = 0.5 * (per_row[:2].mean() + per_row[2:].mean())
    assert grouped(batch)["kd"].item() == pytest.approx(expect.item(), rel=1e-5)
    flat = Distiller(passthrough("s"), [passthrough("t1", Teacher)],
                     [Term("kd", 0.5, {"temperature": 2.0})], ConstantRouter())
    assert flat(batch)["kd"].item() == pytest.approx(0.5 * per_row.mean().item(), rel=1e-5)
    # one group: the plain mean
    assert grouped({**batch, "labelled": torch.ones(7, dtype=torch.bool)})["kd"].item() == pytest.approx(
        flat(batch)["kd"].item(), rel=1e-6)


def test_grouped_term_weighs_rows_by_the_router_and_groups_any_values(batch):
    w = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    domain = torch.tensor([2, 0, 2, 2, 7])
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher), passthrough("t2", Teacher)],
                  [Term("kd", group="domain")], router=FixedRouter(w))
    k = torch.stack([ref_kd(batch["s"], batch["t1"]), ref_kd(batch["s"], batch["t2"])], 1)
    rows = (w * k).sum(1)
    expect = rows[[0, 2, 3]].mean() + rows[1] + rows[4]
    assert d({**batch, "domain": domain})["kd"].item() == pytest.approx(expect.item(), rel=1e-5)


def test_grouped_term_errors(batch):
    with pytest.raises(ValueError, match="group='labelled' needs a per-instance loss"):
        Term("dist", group="labelled")
    d = Distiller(passthrough("s"), [passthrough("t1", Teacher)], [Term("kd", group="labelled")], ConstantRouter())
    with pytest.raises(KeyError, match="group='labelled' is not a batch entry; the batch has: label, s, t1, t2"):
        d(batch)


class ShapeModule(nn.Module):
    """A loss's learned part sized from what build_terms gives it (mmkd.distiller.SIZES)."""

    def __init__(self, student_shape, teacher_shape, num_items, num_classes, scale=1.0):
        super().__init__()
        self.sizes = student_shape, teacher_shape, num_items, num_classes
        self.proj = nn.ModuleList(nn.Linear(s[0], t[0], bias=False) for s, t in zip(student_shape, teacher_shape))
        self.scale = scale


def test_all_features_term_and_a_module_sized_by_build_terms():
    """``student="features"`` hands the loss the list of every feature; a module factory that takes
    shapes, item and class counts gets them from one forward pass (ReviewKD's, CRD's learned parts)."""
    from omegaconf import OmegaConf

    from mmkd.build import build_terms
    from mmkd.config import TermConfig
    from mmkd.data import DataSplits, TensorDictDataset
    from mmkd.losses import register_loss
    from mmkd.registry import LOSSES

    if "test_all_features" not in LOSSES._items:
        @register_loss("test_all_features", per_sample=False, module=ShapeModule)
        def all_features(s, t, target=None, *, module):
            return module.scale * sum((p(a) - b).pow(2).mean() for p, a, b in zip(module.proj, s, t))

    torch.manual_seed(0)
    s_model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    t_model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    student = Net(s_model, ["x"], features=["0", "2"])
    teacher = Teacher(t_model, ["x"], features=["0", "2"])
    data = TensorDictDataset("toy", x=torch.randn(10, 4), label=torch.randint(0, 2, (10,)))
    splits = DataSplits(data, data, data, 2, {"x": (4,)})
    cfg = OmegaConf.create({"losses": {"all": OmegaConf.structured(TermConfig(
        loss="test_all_features", student="features", teacher="features", args={"scale": 2.0}))}})
    (term,) = build_terms(cfg, student, [teacher], splits)
    assert term.module.sizes == ([(3,), (2,)], [(5,), (2,)], 10, 2) and term.module.scale == 2.0 and term.args == {}
    d = Distiller(student, [teacher], [term], ConstantRouter())
    x = torch.randn(6, 4)
    got = d({"x": x})["all"]
    p0, p1 = term.module.proj
    want = 2.0 * ((p0(s_model[0](x)) - t_model[0](x)).pow(2).mean() + (p1(s_model(x)) - t_model(x)).pow(2).mean())
    torch.testing.assert_close(got, want)
    with pytest.raises(KeyError, match="exposes none"):
        Distiller(Net(nn.Linear(4, 2), ["x"]), [teacher], [Term("kd", student="features")], ConstantRouter())(
            {"x": x})
