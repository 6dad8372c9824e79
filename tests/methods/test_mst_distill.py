"""MST-Distill (mmkd.methods.mst_distill): MaskNets (per-channel masks by self-attention over channel
tokens), their hooks and specialised teachers; co-training losses, mask training, routed distillation,
the routing report and the three stages chained through run directories by ``mmkd run``."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.cache import teacher_hash
from mmkd.callbacks import Callback
from mmkd.cli import compose, main
from mmkd.build import build_model, build_router, build_terms
from mmkd.data import DataSplits, TensorDictDataset
from mmkd.models import CNN, MLP
from mmkd.methods.mst_distill import CoTraining, MaskedModel, MaskNet, specialized_teachers
from mmkd.methods.mst_distill.pipeline import MaskFit, routing_report
from mmkd.routers import LinearRouter, top_k_mask
from mmkd.schedules import StepDecay

# ---------------------------------------------------------------- MaskNets and specialised teachers
B = 5


def naive_mask(net: MaskNet, z: torch.Tensor) -> torch.Tensor:
    """The mask from a pooled ``[B, C]`` input, with attention written out head by head."""
    attn, d = net.attn, net.lift_weight.shape[1]
    heads, dh = attn.num_heads, d // attn.num_heads
    e = z.unsqueeze(-1) * net.lift_weight + net.lift_bias  # [B, C, d]
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q, k, v = e @ wq.T + bq, e @ wk.T + bk, e @ wv.T + bv
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        a = (q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)).softmax(-1)
        out.append(a @ v[..., sl])
    mixed = torch.cat(out, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    return torch.sigmoid(mixed @ net.out.weight.T + net.out.bias).squeeze(-1)


def all_ones(net: MaskNet) -> MaskNet:
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(100.0)  # sigmoid(100) == 1.0 in float32
    return net


@pytest.mark.parametrize("shape", [(8,), (8, 6), (8, 4, 4)])
def test_mask_shape_range_and_formula(shape):
    torch.manual_seed(0)
    net = MaskNet(shape, dim=8, heads=2).eval()
    x = torch.randn(B, *shape)
    m = net(x)
    assert m.shape == (B, 8) and ((m > 0) & (m < 1)).all()
    z = x if len(shape) == 1 else net.reduce(x)
    torch.testing.assert_close(m, naive_mask(net, z), rtol=1e-5, atol=1e-6)
    y = net.masked(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x * m.view(B, 8, *[1] * (len(shape) - 1)))
    assert m.std(1).min() > 1e-4  # channels get different mask values


def test_spatial_maps_are_reduced_by_conv_and_global_pooling():
    torch.manual_seed(0)
    net = MaskNet((8, 4, 4), dim=8, heads=2).eval()
    x = torch.randn(B, 8, 4, 4)
    dw, pw, bn = net.reduce[0], net.reduce[1], net.reduce[2]
    ref = torch.relu(bn(pw(nn.functional.conv2d(x, dw.weight, stride=2, padding=1, groups=8)))).mean((2, 3))
    torch.testing.assert_close(net.reduce(x), ref)


def teacher_mlp():
    torch.manual_seed(0)
    return Teacher(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), ["x"])


def test_hook_masks_the_layer_and_detaches_cleanly():
    teacher, x = teacher_mlp(), torch.randn(B, 6)
    model = teacher.model
    before = model(x)
    net = MaskNet((8,), dim=8, heads=2).eval()
    handle = net.attach(model, "1")
    with pytest.raises(RuntimeError, match="already attached"):
        net.attach(model, "1")
    with torch.no_grad():
        masked = model(x)
        h = torch.relu(model[0](x))
        torch.testing.assert_close(masked, model[2](h * net(h)))
    assert not torch.allclose(masked, before)
    net.detach()
    assert not model[1]._forward_hooks and not handle.hooks_dict_ref()
    assert torch.equal(model(x), before)  # unchanged after detaching
    all_ones(net).attach(model, "1")
    assert torch.equal(model(x), before)  # unchanged with an all-ones mask
    net.detach()


def test_wrong_feature_shape_is_a_clear_error():
    teacher = teacher_mlp()
    net = MaskNet((5,), dim=8, heads=2)
    net.attach(teacher.model, "1")
    with pytest.raises(ValueError, match=r"built for features \(5,\) got \(8,\)"):
        teacher.model(torch.randn(B, 6))
    net.detach()


def test_mask_gradient_reaches_the_masknet_only():
    teacher = teacher_mlp()
    net = MaskNet((8,), dim=8, heads=2)
    masked = Teacher(MaskedModel(teacher.model, "1", net), ["x"], frozen=False)
    masked.train()
    assert not teacher.model.training and net.training  # the backbone stays in eval mode
    masked({"x": torch.randn(B, 6)}).logits.pow(2).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert {id(p) for p in masked.parameters() if p.requires_grad} == {id(p) for p in net.parameters()}


def test_specialized_teachers_share_the_backbone_and_mask_only_their_own_forward():
    torch.manual_seed(0)
    mlp = Teacher(MLP(4, (1, 4, 4), hidden=(8,)), ["image"], features=["body.2"])
    cnn = Teacher(CNN(4, (1, 4, 4), channels=(4, 6)), ["image"])
    batch = {"image": torch.rand(B, 1, 4, 4)}
    plain = [mlp(batch).logits, cnn(batch).logits]
    special = specialized_teachers([mlp, cnn], [["body.2"], ["features.2", "pool"]], batch, dim=8, heads=2)
    assert len(special) == 3 and all(isinstance(t, Teacher) and not t.frozen for t in special)
    assert special[0].model.model is mlp.model and special[1].model.model is special[2].model.model is cnn.model
    assert [t.model.masknet.shape for t in special] == [(8,), (4, 4, 4), (6,)]
    for t in special:
        t.eval()
    outs = [t(batch) for t in special]
    for t, out in zip(special, outs):  # each equals its own backbone with its own mask hooked in by hand
        t.model.masknet.attach(t.model.model, t.model.path)
        torch.testing.assert_close(out.logits, t.model.model(batch["image"]))
        t.model.masknet.detach()
    assert not torch.allclose(outs[1].logits, outs[2].logits)
    hooks = [m._forward_hooks for backbone in (mlp.model, cnn.model) for m in backbone.modules()]
    assert not any(hooks)  # no mask stays attached after a forward
    assert torch.equal(mlp(batch).logits, plain[0]) and torch.equal(cnn(batch).logits, plain[1])
    # the feature at the masked layer is the masked one (the mask hook runs first)
    torch.testing.assert_close(outs[0].features["body.2"], special[0].model.masknet.masked(mlp(batch).features["body.2"]))


def test_frozen_specialized_teachers_cache_apart(tmp_path):
    torch.manual_seed(0)
    base = Teacher(MLP(3, (4,), hidden=(8,)), ["x"])
    data = TensorDictDataset("toy", x=torch.randn(10, 4), label=torch.zeros(10, dtype=torch.long))
    batch = data.__getitems__(range(4))
    a, b = (Teacher(t.model, t.keys, frozen=True) for t in specialized_teachers([base], [["body.1", "body.1"]], batch))
    assert teacher_hash(a) != teacher_hash(b)
    ca, cb = cache_teacher(a, data, tmp_path), cache_teacher(b, data, tmp_path)
    assert ca.path != cb.path
    full = data.__getitems__(range(10))
    torch.testing.assert_close(ca(full).logits, a(full).logits)
    torch.testing.assert_close(cb(full).logits, b(full).logits)
    assert not torch.allclose(ca(full).logits, cb(full).logits)
    assert not any(p.requires_grad for p in a.parameters())


def test_specialized_teachers_errors():
    teacher, batch = teacher_mlp(), {"x": torch.randn(2, 6)}
    with pytest.raises(ValueError, match="1 teachers but 2 lists"):
        specialized_teachers([teacher], [["1"], ["1"]], batch)
    with pytest.raises(AttributeError):
        specialized_teachers([teacher], [["nope"]], batch)
    with pytest.raises(ValueError, match="expected"):
        MaskNet((2, 3, 4, 5))


# ---------------------------------------------------------------- co-training, the stages, the pipeline
DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
T = 4.0


def naive_kl(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_c p_t (log p_t - log p_s)``, written out."""
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean()


def cotraining_case(detach: bool):
    torch.manual_seed(0)
    nets = {n: Net(nn.Linear(6, 4), ["x"]) for n in ("fusion", "cross", "student")}
    batch = {"x": torch.randn(8, 6), "label": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])}
    return nets, batch, CoTraining(nets, temperature=T, kd_weight=0.5, detach=detach)


def naive_cotraining(weights: dict, batch: dict, detach: bool) -> dict[str, torch.Tensor]:
    """The co-training losses of linear members ``name -> (W, b)``, written out."""
    z = {n: batch["x"] @ w.T + b for n, (w, b) in weights.items()}
    out = {}
    for m in weights:
        out[f"{m}/ce"] = -z[m].log_softmax(1)[torch.arange(8), batch["label"]].mean()
        for o in weights:
            if o != m:
                zo = z[o].detach() if detach else z[o]
                out[f"{m}/kd_{o}"] = 0.5 * T**2 * naive_kl((zo / T).softmax(1), (z[m] / T).softmax(1))
    return out


@pytest.mark.parametrize("detach", [False, True])
def test_cotraining_losses_and_gradients_match_a_hand_computation(detach):
    nets, batch, co = cotraining_case(detach)
    assert CoTraining(nets).detach is False  # the official form is the default
    losses = co(batch)
    weights = {n: (net.model.weight.detach().clone().requires_grad_(), net.model.bias.detach().clone().requires_grad_())
               for n, net in nets.items()}
    expected = naive_cotraining(weights, batch, detach)
    assert set(losses) == set(expected) | {"loss"}
    for k, v in expected.items():
        torch.testing.assert_close(losses[k], v)
    torch.testing.assert_close(losses["loss"], sum(expected.values()))
    # one KL term: official (undetached), it trains both members; detached, only the learning one
    losses["student/kd_fusion"].backward(retain_graph=True)
    expected["student/kd_fusion"].backward(retain_graph=True)
    torch.testing.assert_close(nets["student"].model.weight.grad, weights["student"][0].grad)
    assert nets["student"].model.weight.grad.abs().sum() > 0
    assert nets["cross"].model.weight.grad is None
    if detach:
        assert nets["fusion"].model.weight.grad is None
    else:
        torch.testing.assert_close(nets["fusion"].model.weight.grad, weights["fusion"][0].grad)
        torch.testing.assert_close(nets["fusion"].model.bias.grad, weights["fusion"][1].grad)
        assert nets["fusion"].model.weight.grad.abs().sum() > 0
    # the total: every member's gradient equals the naive one's
    co.zero_grad()
    for w, b in weights.values():
        w.grad = b.grad = None
    losses["loss"].backward()
    sum(expected.values()).backward()
    for n, net in nets.items():
        torch.testing.assert_close(net.model.weight.grad, weights[n][0].grad)
        torch.testing.assert_close(net.model.bias.grad, weights[n][1].grad)
    torch.testing.assert_close(co.predict(batch), (batch["x"] @ weights["student"][0].T + weights["student"][1]).detach())


def toy_data(n: int = 48, classes: int = 3, seed: int = 0) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 6, generator=g) + 2 * F.one_hot(y, 6).float()
    return TensorDictDataset(f"toy{seed}", x=x, label=y)


def mask_case():
    """Three specialised teachers (two on one MLP teacher, one on another), a frozen student, toy data."""
    torch.manual_seed(0)
    data = toy_data()
    teachers = [Teacher(MLP(3, (6,), hidden=[16, 8]), ["x"]), Teacher(MLP(3, (6,), hidden=[8]), ["x"])]
    student = Teacher(MLP(3, (6,), hidden=[4]), ["x"], frozen=True)
    spec = specialized_teachers(teachers, [["body.1", "body.2"], ["body.1"]], data[[0, 1]], dim=8, heads=2)
    module = MaskFit(spec, ["a1", "a2", "b1"], ["a", "a", "b"], student, student, temperature=T)
    return data, teachers, student, spec, module


def test_stage2_loss_is_the_kl_to_the_student_and_trains_only_the_masknets(tmp_path):
    data, teachers, student, spec, module = mask_case()
    backbones = [{k: v.clone() for k, v in t.model.state_dict().items()} for t in teachers]
    masks_before = [{k: v.clone() for k, v in t.model.masknet.state_dict().items()} for t in spec]
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for t in spec for p in t.model.masknet.parameters()}
    # each mask's loss is T^2 KL(p_student || p_masked teacher), the batch mean; the total their sum
    batch = data[list(range(8))]
    losses = module(batch)
    p_s = (student(batch).logits / T).softmax(1)
    for name, t in zip(["a1", "a2", "b1"], spec):
        torch.testing.assert_close(losses[f"kd/{name}"], T**2 * naive_kl(p_s, (t(batch).logits / T).softmax(1)))
    torch.testing.assert_close(losses["loss"], losses["kd/a1"] + losses["kd/a2"] + losses["kd/b1"])
    Trainer(run_dir=tmp_path, max_epochs=2, batch_size=16, lr=1e-2, device="cpu", tensorboard=False,
            progress="off", monitor="val/kd", mode="min").fit(module, data, toy_data(seed=1))
    for t, before in zip(teachers, backbones):
        assert all(torch.equal(v, before[k]) for k, v in t.model.state_dict().items())
    for t, before in zip(spec, masks_before):
        assert any(not torch.equal(v, before[k]) for k, v in t.model.masknet.state_dict().items())


class Replay(Callback):
    """Puts ``states[e]`` into the MaskNets after every step of epoch ``e``: they end it, and are
    validated, in that state."""

    def __init__(self, spec, states):
        self.spec, self.states = spec, states

    def on_step_end(self, trainer, module, losses):
        for t, state in zip(self.spec, self.states[trainer.epoch]):
            t.model.masknet.load_state_dict(state)


def test_stage2_keeps_the_epoch_of_the_lowest_validation_kl(tmp_path):
    data, _, student, spec, module = mask_case()
    val = toy_data(seed=1)
    batch = val[list(range(len(val)))]
    p_s = (student(batch).logits / T).softmax(1)

    @torch.no_grad()
    def criterion() -> float:  # mean of teacher a's two masks' KL + teacher b's KL, over all val items
        for t in spec:
            t.eval()
        kl = [float(T**2 * naive_kl(p_s, (t(batch).logits / T).softmax(1))) for t in spec]
        return (kl[0] + kl[1]) / 2 + kl[2]

    candidates = []
    for seed in range(3):  # three sets of MaskNet states
        torch.manual_seed(seed + 10)
        for t in spec:
            for p in t.model.masknet.parameters():
                p.data = torch.randn_like(p) * 2
        candidates.append(([{k: v.clone() for k, v in t.model.masknet.state_dict().items()} for t in spec], criterion()))
    candidates.sort(key=lambda c: c[1])
    order = [candidates[1], candidates[0], candidates[2]]  # the lowest criterion at epoch 1 of 0..2
    result = Trainer(run_dir=tmp_path, max_epochs=3, batch_size=16, lr=1e-3, device="cpu", tensorboard=False,
                     progress="off", monitor="val/kd", mode="min").fit(module, data, val, [Replay(spec, [c[0] for c in order])])
    assert [h["val/kd"] for h in result.history] == pytest.approx([c[1] for c in order], rel=1e-5)
    assert result.best_epoch == 2  # counted from 1
    for t, state in zip(spec, order[1][0]):
        for k, v in t.model.masknet.state_dict().items():
            torch.testing.assert_close(v, state[k])
    assert criterion() == pytest.approx(candidates[0][1], rel=1e-5)


def routed(mode: str):
    torch.manual_seed(0)
    student = Net(nn.Linear(6, 3), ["x"])
    teachers = [Teacher(nn.Linear(6, 3), ["x"]) for _ in range(4)]
    router = LinearRouter(num_teachers=4, num_classes=3, mode=mode, k=2, balance_weight=1.0)
    d = Distiller(student, teachers, [Term("ce"), Term("kd", args={"temperature": T})], router)
    return d, router, {"x": torch.randn(16, 6), "label": torch.arange(16) % 3}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_stage3_router_learns_from_kl_in_soft_mode_and_from_balance_only_in_hard_mode(mode):
    d, router, batch = routed(mode)
    losses = d(batch)
    # the distillation term: (1/k) sum over the top-k (hard) or sum_t P_t (soft) of T^2 KL_t
    s = d.student(batch).logits
    kls = torch.stack([T**2 * (F.softmax(t.model(batch["x"]) / T, 1) * (F.log_softmax(t.model(batch["x"]) / T, 1)
                                                                      - F.log_softmax(s / T, 1))).sum(1)
                       for t in d.teachers], 1)
    p = router.gate(s).softmax(1)
    w = top_k_mask(p, 2).float() / 2 if mode == "hard" else p
    torch.testing.assert_close(losses["kd"], (w * kls).sum(1).mean())
    losses["kd"].backward(retain_graph=True)
    grad = router.gate.weight.grad
    if mode == "soft":
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or grad.abs().sum() == 0
    router.zero_grad()
    losses["router/balance"].backward()
    assert router.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("student", ["image", "audio"])
def test_stage1_configs_co_train_undetached_and_keep_the_last_epoch(student):
    cfg = compose([f"experiment=mst_{student}_stage1"])
    assert cfg.method.detach is False and cfg.trainer.keep == "last"


@pytest.mark.parametrize("student", ["image", "audio"])
def test_stage3_configs_route_one_teacher_and_decay_the_kd_and_balance_weights_in_steps(student):
    cfg = compose([f"experiment=mst_{student}_stage3"])
    shape = (1, 4, 4)
    meta = {"num_classes": 3, "shapes": {k: shape for k in cfg.student.inputs}, "class_names": ["a", "b", "c"]}
    model = build_model(cfg.student, meta, "student")
    items = TensorDictDataset("toy", **{k: torch.rand(4, *shape) for k in cfg.student.inputs},
                              label=torch.arange(4) % 3)
    data = DataSplits(items, items, items, 3, meta["shapes"])
    router = build_router(cfg, meta, model, data, 4)
    assert (router.mode, router.k, router.balance) == ("hard", 1, "kl")
    assert router.balance_weight == StepDecay(every=10, gamma=0.9, start=1.0)
    terms = {t.name: t for t in build_terms(cfg, Net(model, cfg.student.inputs, cfg.student.features), [], data)}
    assert terms["kd"].weight == StepDecay(every=30, gamma=0.5, start=1.0) and terms["ce"].weight == 1.0
    assert terms["kd"].args == {"temperature": 4.0}
    assert (cfg.trainer.monitor, cfg.trainer.mode) == ("val/loss", "min")
    # the official loop: after epoch e (from 0), w_kl *= 0.5 if e % 30 == 0 and w_lb *= 0.9 if e % 10 == 0
    w_kl, w_lb = 1.0, 1.0
    for e in range(95):
        assert terms["kd"].weight(0.0, e) == pytest.approx(w_kl) and router.balance_weight(0.0, e) == pytest.approx(w_lb)
        w_kl, w_lb = w_kl * (0.5 if e % 30 == 0 else 1), w_lb * (0.9 if e % 10 == 0 else 1)
    assert [terms["kd"].weight(0.0, e) for e in (0, 1, 30, 31, 61)] == pytest.approx([1, 0.5, 0.5, 0.25, 0.125])


def toy_report(mode: str, tmp_path) -> tuple[dict, dict, torch.Tensor]:
    """The routing report of a ``mode`` router over 4 teachers on 30 toy items; the items and the gate
    probabilities."""
    d, router, _ = routed(mode)
    data = toy_data(30)
    report = routing_report(router, d.student, list(d.teachers), ["a", "b", "c", "d"], data, ["c0", "c1", "c2"],
                            tmp_path)
    batch = data[list(range(30))]
    return report, batch, router.gate(d.student(batch).logits).softmax(1)


def test_routing_report_counts_top_k_picks_per_class_and_writes_a_png(tmp_path):
    report, batch, p = toy_report("hard", tmp_path)
    picks = top_k_mask(p, 2).float()
    want = torch.stack([picks[batch["label"] == c].sum(0) for c in range(3)])
    torch.testing.assert_close(torch.tensor(report["counts"]), want)
    torch.testing.assert_close(torch.tensor(report["fraction"]), want / 10)
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "routing.json").read_text())["teachers"] == ["a", "b", "c", "d"]
    torch.testing.assert_close(torch.tensor(report["overall"]["fraction"]), want.sum(0) / 30)


def test_routing_report_of_a_soft_router_gives_mean_weights_per_class(tmp_path):
    report, batch, p = toy_report("soft", tmp_path)
    want = torch.stack([p[batch["label"] == c].mean(0) for c in range(3)])
    assert report["mode"] == "soft"
    torch.testing.assert_close(torch.tensor(report["mean_weight"]), want)
    torch.testing.assert_close(torch.tensor(report["overall"]["mean_weight"]), p.mean(0))


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    return code, capsys.readouterr().err.strip()


def test_stage_chaining_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code, err = cli(capsys, "experiment=mst_image_stage2")
    assert code == 2 and err.startswith("mmkd: error: method.stage1: missing") and "\n" not in err
    code, err = cli(capsys, "experiment=mst_image_stage2", f"method.stage1={tmp_path / 'nowhere'}")
    assert code == 2 and "no such run directory" in err and "\n" not in err
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={tmp_path / 'nowhere'}")
    assert code == 2 and err.startswith("mmkd: error: method.stage2=") and "no such run directory" in err
    code, err = cli(capsys, "experiment=mst_image_stage2", "method.stage1=x", "method.epoch=3")
    assert code == 2 and "method.epoch: unknown option of pipeline mst_stage2" in err
    code, err = cli(capsys, "experiment=mst_image_stage1", f"out_dir={tmp_path}", "method.detach=maybe")
    assert code == 2 and err.startswith("mmkd: error: method.detach: 'maybe'; give true") and "\n" not in err
    # an earlier stage's run with another student, other data, or another pipeline
    for name, change in (("student", {"student": {"args": {"hidden": [32]}}}),
                         ("data", {"data": {"args": {"hop": 80}}}), ("pipeline", {"pipeline": "distill"})):
        run = tmp_path / name
        run.mkdir()
        cfg = OmegaConf.merge(compose(["experiment=mst_image_stage1"]), change)
        (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        code, err = cli(capsys, "experiment=mst_image_stage2", f"method.stage1={run}")
        assert code == 2 and "\n" not in err, err
        assert (f"that run's {name}" in err) if name != "pipeline" else "pipeline is 'distill'" in err, err
    code, err = cli(capsys, "experiment=mst_image_stage2", "pipeline=mst_stage9")
    assert code == 2 and "pipeline: unknown pipeline 'mst_stage9'" in err


@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_three_stages_chain_through_mmkd_run_on_tiny_avdigits(tmp_path, capsys):
    common = [f"data_root={DATA}", "data.args.limit_per_class=2", f"data.args.cache_dir={tmp_path / 'av'}",
              "trainer.max_epochs=1", "trainer.tensorboard=false", "trainer.progress=off", "export=[]",
              f"out_dir={tmp_path}"]
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    assert main(["run", "experiment=mst_image_stage1", f"run_dir={s1}", *common]) == 0
    assert main(["run", "experiment=mst_image_stage2", f"run_dir={s2}", f"method.stage1={s1}",
                 "method.epochs=2", "method.dim=8", "method.heads=2", *common]) == 0
    assert main(["run", "experiment=mst_image_stage3", f"run_dir={s3}", f"method.stage2={s2}", *common]) == 0
    # stage 2 keeps the masks of its epoch of the lowest validation KL: the states in its trainer's best.pt
    masks = torch.load(s2 / "masks.pt", weights_only=True)
    assert masks["names"] == ["fusion@encoders.image.pool", "fusion@encoders.audio.body", "audio@body.2", "audio@body.5"]
    best = torch.load(s2 / "masks" / "best.pt", weights_only=True)
    history = torch.load(s2 / "masks" / "last.pt", weights_only=True)["history"]
    assert best["metrics"]["val/kd"] == min(h["val/kd"] for h in history)
    for i, (name, state) in enumerate(zip(masks["names"], masks["masks"])):
        prefix = f"teachers.{i}.model.masknet."
        assert set(state) == {k.removeprefix(prefix) for k in best["model"] if k.startswith(prefix)}, name
        for k, v in state.items():
            torch.testing.assert_close(v, best["model"][prefix + k])
    for run, parts in ((s1, ["cotrain"]), (s2, ["masks"]), (s3, ["student"])):
        assert (run / "config.yaml").is_file() and (run / "results.json").is_file()
        for part in parts:
            assert all((run / part / f).is_file() for f in ("metrics.csv", "best.pt", "last.pt")), part
    assert {(s1 / "teachers" / n / "best.pt").is_file() for n in ("fusion", "audio")} == {True}
    results = json.loads((s3 / "results.json").read_text())
    assert len(results["specialized"]) == 4 and 0 <= results["student"]["test_acc"] <= 1
    routing = json.loads((s3 / "routing.json").read_text())
    assert torch.tensor(routing["counts"]).sum() == 20  # k=1 pick for each of 20 test items
    assert (routing["mode"], routing["k"]) == ("hard", 1) and results["routing"]["overall"] == routing["overall"]
    assert (s3 / "routing.png").is_file()
    # a soft router on a student feature: stage 3 gives it the feature's width
    s3f = tmp_path / "s3f"
    assert main(["run", "experiment=mst_image_stage3", f"run_dir={s3f}", f"method.stage2={s2}", "router.name=mlp",
                 "router.args.mode=soft", "router.args.source=features.body", *common]) == 0
    routing = json.loads((s3f / "routing.json").read_text())
    assert routing["mode"] == "soft"
    torch.testing.assert_close(torch.tensor(routing["mean_weight"]).sum(1), torch.ones(10))  # weights sum to 1
    capsys.readouterr()
    # masks that do not fit the stage-1 teachers' layers
    torch.save({**masks, "names": masks["names"][::-1]}, s2 / "masks.pt")
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={s2}", *common)
    err = err.splitlines()[-1]  # after the data set's log line
    assert code == 2 and err.startswith("mmkd: error: method.stage2=") and "do not match the teachers' layers" in err
    torch.save({**masks, "masks": masks["masks"][::-1]}, s2 / "masks.pt")
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={s2}", *common)
    err = err.splitlines()[-1]
    assert code == 2 and err.startswith("mmkd: error: method.stage2=") and "does not fit its teacher" in err
    # the audio student's stage 3 cannot read the image student's stage 2
    code, err = cli(capsys, "experiment=mst_audio_stage3", f"method.stage2={s2}", *common)
    assert code == 2 and "that run's student" in err and "\n" not in err
    # a stage-2 run whose stage-1 run is gone
    (s1 / "student.pt").unlink()
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={s2}", *common)
    assert code == 2 and "its method.stage1" in err and "incomplete (no student.pt)" in err
