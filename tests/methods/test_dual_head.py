"""Dual-head students (DHO, Dual-Head KD): binary KL, gradient alignment (ours on the features; the
official all-parameter rule is in tests/mmkd/test_gradients.py), the non-linear auxiliary head, the DHO
inference rule, its alpha/beta search after every epoch and the checkpoint it keeps, export of the
combined prediction, label thinning, and the heads' losses in the core."""
import itertools
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmkd.callbacks import Callback
from mmkd.cli import compose
from mmkd.data import TensorDictDataset, keep_labels, semi
from mmkd.distiller import Distiller, Term
from mmkd.export import export_onnx, export_program
from mmkd.losses import bkl
from mmkd.methods.dual_head.dho import ALPHAS, BETAS, calibrate, combine, search_alpha_beta
from mmkd.methods.dual_head.model import DualHead, dual_head
from mmkd.methods.dual_head.kd import align_gradients
from mmkd.net import Net, Teacher
from mmkd.registry import DATASETS, LOSSES, MODELS
from mmkd.routers import ConstantRouter
from mmkd.trainer import Trainer

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


def test_bkl_zero_at_teacher_and_matches_loops():
    torch.manual_seed(0)
    z = torch.randn(4, 5)
    assert torch.allclose(bkl(z, z, reduction="none"), torch.zeros(4), atol=1e-6)
    s, t, temp = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), 2.0
    want = []
    for n in range(3):
        total = 0.0
        for c in range(4):
            q = 1 / (1 + math.exp(-(s[n, c] - t[n, c]).item() / temp))
            total += 0.5 * math.log(0.5 / q) + 0.5 * math.log(0.5 / (1 - q))
        want.append(temp**2 * total)
    assert torch.allclose(bkl(s, t, temperature=temp, reduction="none"), torch.tensor(want, dtype=torch.float64))
    assert torch.isclose(bkl(s, t, temperature=temp), torch.tensor(sum(want) / 3, dtype=torch.float64))
    # the official default temperature (BinaryKLNorm(temperature=2)): the default equals T = 2 given
    assert torch.equal(bkl(s, t, reduction="none"), bkl(s, t, temperature=2.0, reduction="none"))
    meta = LOSSES.meta("bkl")
    assert {k: meta[k] for k in ("teacher", "per_sample", "batch")} == {"teacher": True, "per_sample": True, "batch": False}
    assert not meta["ranges"]["temperature"].contains(0) and meta["ranges"]["temperature"].contains(2.0)


def test_bkl_gradcheck_and_large_gaps():
    s = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: bkl(x, t, temperature=1.5), (s,))
    assert torch.isfinite(bkl(torch.full((1, 2), 1e4), torch.zeros(1, 2)))


def _grad_through_align(g_ce, g_kd):
    h = torch.zeros(len(g_ce), requires_grad=True)
    a, b = align_gradients(h)
    ((a * torch.tensor(g_ce)).sum() + (b * torch.tensor(g_kd)).sum()).backward()
    return h.grad.tolist()


def test_gradient_alignment_hand_examples():
    # conflict: <[-1, 1], [1, 0]> = -1 < 0 -> g_kd becomes [-1, 1] - (-1 / 1) * [1, 0] = [0, 1]
    assert _grad_through_align([1.0, 0.0], [-1.0, 1.0]) == [1.0, 1.0]
    # g_ce = [2, 0], g_kd = [-1, 3]: projection removes -1 * ... -> g_kd = [0, 3]; total [2, 3]
    assert _grad_through_align([2.0, 0.0], [-1.0, 3.0]) == pytest.approx([2.0, 3.0])
    # no conflict: the gradients add unchanged
    assert _grad_through_align([1.0, 0.0], [1.0, 1.0]) == [2.0, 1.0]
    # one branch unused: the other's gradient passes
    h = torch.zeros(2, requires_grad=True)
    a, _ = align_gradients(h)
    (a * torch.tensor([3.0, 4.0])).sum().backward()
    assert h.grad.tolist() == [3.0, 4.0]


def test_combine_is_the_mixture():
    torch.manual_seed(1)
    z_ce, z_kd = torch.randn(3, 4), torch.randn(3, 4)
    want = 0.3 * F.softmax(z_ce, 1) + 0.7 * F.softmax(z_kd / 2.0, 1)
    assert torch.allclose(combine(z_ce, z_kd, 0.7, 2.0).exp(), want, atol=1e-6)
    assert torch.allclose(combine(z_ce, z_kd, 0.0, 2.0), F.log_softmax(z_ce, 1), atol=1e-6)
    assert torch.allclose(combine(z_ce, z_kd, 1.0, 1.0), F.log_softmax(z_kd, 1), atol=1e-6)


def test_search_picks_the_best_on_constructed_cases():
    assert len(ALPHAS) == 21 and ALPHAS[1] == 0.05 and BETAS == (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)
    y = torch.arange(6) % 3
    right, wrong = 3 * F.one_hot(y, 3).float(), 3 * F.one_hot((y + 1) % 3, 3).float()
    # the KD head is right, the CE head wrong: all of the KD head, sharpened as much as the grid allows
    assert search_alpha_beta(wrong, right, y) == (1.0, 0.5, 1.0)
    # the CE head is right: alpha = 0 (every beta is then the same; the first wins)
    assert search_alpha_beta(right, wrong, y) == (0.0, 0.5, 1.0)
    # each head right on half the instances, with the CE head confident and the KD head weak where
    # right: only a mixture leaning to the CE head is right everywhere; unlabelled rows are ignored
    z_ce = torch.tensor([[4.0, 0, 0], [0, 4, 0], [0, 0.4, 0]])
    z_kd = torch.tensor([[0, 0.4, 0], [0.4, 0, 0], [0, 0, 4.0]])
    labels = torch.tensor([0, 1, 2])
    alpha, beta, acc = search_alpha_beta(z_ce, z_kd, labels)
    assert acc == 1.0 and 0 < alpha < 1
    assert (combine(z_ce, z_kd, alpha, beta).argmax(1) == labels).all()
    alpha2, beta2, _ = search_alpha_beta(torch.cat([z_ce, wrong[:2]]), torch.cat([z_kd, wrong[:2]]),
                                         torch.cat([labels, torch.tensor([-1, -1])]))
    assert (alpha2, beta2) == (alpha, beta)


def test_search_matches_brute_force():
    torch.manual_seed(2)
    z_ce, z_kd, y = torch.randn(40, 5), torch.randn(40, 5), torch.randint(0, 5, (40,))
    best = None
    for a, b in itertools.product(ALPHAS, BETAS):
        p = (1 - a) * F.softmax(z_ce.double(), 1) + a * F.softmax(z_kd.double() / b, 1)
        key = ((p.argmax(1) == y).double().mean().item(), -F.nll_loss(p.log(), y).item())
        if best is None or key > best[0]:
            best = (key, a, b)
    alpha, beta, acc = search_alpha_beta(z_ce, z_kd, y)
    assert (alpha, beta) == (best[1], best[2]) and acc == best[0][0]


class _Body(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _model(**kw):
    torch.manual_seed(3)
    body = _Body()
    body.head = torch.nn.Identity()
    return DualHead(body, 8, 3, **kw)


def test_forward_modes():
    m, x = _model(alpha=0.25, beta=2.0), torch.randn(5, 6)
    z_ce, z_kd = m.heads(x)
    assert torch.equal(m.train()(x), z_ce)
    want = 0.75 * F.softmax(z_ce, 1) + 0.25 * F.softmax(z_kd / 2, 1)
    assert torch.allclose(m.eval()(x).exp(), want, atol=1e-6)
    assert torch.equal(_model(inference="ce").eval()(x), _model().heads(x)[0])
    assert {"alpha", "beta"} <= set(m.state_dict())
    with pytest.raises(ValueError, match="inference"):
        _model(inference="mean")
    with pytest.raises(ValueError, match=r"^dual_head.align=True; choose from: none, features$"):
        _model(align=True)


def test_nonlinear_aux_head_is_the_official_classifier():
    torch.manual_seed(4)
    m, x = _model(aux_head="nonlinear", inference="ce"), torch.randn(5, 6)
    kinds = [type(layer) for layer in m.kd_head]
    assert kinds == [torch.nn.Linear, torch.nn.Dropout, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]
    first, drop, norm, _, last = m.kd_head
    sizes = (first.in_features, first.out_features, drop.p, norm.num_features, last.out_features)
    assert sizes == (8, 200, 0.1, 200, 3)
    assert isinstance(m.ce_head, torch.nn.Linear)
    m.eval()
    with torch.no_grad():
        h = m.backbone(x)
        a = h @ first.weight.T + first.bias
        a = (a - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + norm.bias
        want = a.clamp(min=0) @ last.weight.T + last.bias
        assert torch.allclose(m.heads(x)[1], want, atol=1e-6)
    with pytest.raises(ValueError, match="aux_head='mlp'; choose from: linear, nonlinear"):
        _model(aux_head="mlp")


def test_export_returns_the_combined_prediction(tmp_path):
    m, x = _model(alpha=0.4, beta=1.5).eval(), torch.randn(4, 6)
    with torch.no_grad():
        z_ce, z_kd = m.heads(x)
    want = (0.6 * F.softmax(z_ce, 1) + 0.4 * F.softmax(z_kd / 1.5, 1)).log()
    export_onnx(m, [x], tmp_path / "m.onnx", ["x"])  # checks onnxruntime against m(x)
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"x": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-5)
    program = torch.export.load(export_program(m, [x], tmp_path / "m.pt2"))
    assert torch.allclose(program.module()(x), want, atol=1e-5)


def test_heads_get_their_own_losses_through_the_core():
    m = _model()
    teacher = Teacher(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)), ["x"])
    terms = [Term("ce"), Term("kd", 1.0, {"temperature": 2.0}, student="features.kd_head")]
    d = Distiller(Net(m, ["x"], ["kd_head"]), [teacher], terms, ConstantRouter())
    x = torch.randn(4, 6)
    losses = d({"x": x, "label": torch.full((4,), -1)})  # unlabelled: only the KD head learns
    losses["loss"].backward()
    assert losses["ce"] == 0 and losses["kd"] > 0
    assert m.ce_head.weight.grad.abs().sum() == 0 and m.kd_head.weight.grad.abs().sum() > 0
    z_ce, z_kd = m.heads(x)
    want = F.kl_div(F.log_softmax(z_kd / 2, 1), F.log_softmax(teacher({"x": x}).logits / 2, 1),
                    log_target=True, reduction="batchmean") * 4  # KL(p_t || p_s) * T^2 on the KD head
    assert torch.isclose(losses["kd"], want, atol=1e-5)
    m.zero_grad(set_to_none=True)
    d({"x": x, "label": torch.tensor([0, 1, 2, 0])})["ce"].backward()
    assert m.ce_head.weight.grad.abs().sum() > 0 and m.kd_head.weight.grad is None


def test_dho_config_loss_is_the_official_two_batch_loss():
    """dho_digits' terms on one paired step with 3 labelled and 5 unlabelled rows (the last, short
    labelled batch of an epoch) give train_others.py's 0.5 * CE(L) + 0.5 * (KD(L) + KD(U)), each KD a
    batchmean over its own batch: not 0.5 * CE + mean over the 8 rows."""
    cfg = compose(["experiment=dho_digits"])
    terms = [Term(t.loss or k, t.weight, dict(t.args), name=k, student=t.student, group=t.group)
             for k, t in cfg.losses.items()]
    m = _model()
    teacher = Teacher(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)), ["x"])
    d = Distiller(Net(m, ["x"], ["kd_head"]), [teacher], terms, ConstantRouter())
    torch.manual_seed(0)
    x, labels = torch.randn(8, 6), torch.tensor([0, 2, 1, -1, -1, -1, -1, -1])
    got = d({"x": x, "label": labels, "labelled": labels >= 0})["loss"]
    z_ce, z_kd = m.heads(x)
    z_t = teacher({"x": x}).logits

    def kd(rows):
        return F.kl_div(F.log_softmax(z_kd[rows] / 2, 1), F.softmax(z_t[rows] / 2, 1), reduction="batchmean") * 4

    want = 0.5 * F.cross_entropy(z_ce[:3], labels[:3]) + 0.5 * (kd(slice(0, 3)) + kd(slice(3, 8)))
    assert torch.isclose(got, want, atol=1e-5)
    assert not torch.isclose(got, 0.5 * F.cross_entropy(z_ce[:3], labels[:3]) + kd(slice(0, 8)), atol=1e-3)


def test_calibrate_stores_the_search_result():
    m = _model()
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    ds = TensorDictDataset("val", x=x, label=y)
    got = calibrate(m, ds, ["x"], batch_size=7)
    with torch.no_grad():
        z_ce, z_kd = m.eval().heads(x)
    assert (got["alpha"], got["beta"], got["acc"]) == search_alpha_beta(z_ce, z_kd, y)
    assert m.alpha.item() == pytest.approx(got["alpha"]) and m.beta.item() == got["beta"]
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    assert m2.alpha.item() == pytest.approx(got["alpha"])


def _states():
    """Two weight states of a DualHead on the identity backbone (width 6, 3 classes) for the 6 one-hot
    validation items ``x_i = e_i``, ``y = [0, 1, 2, 0, 1, 2]``, whose heads' logits are the weights' columns:

    * A: the KD head right but weak (margin 1), the CE head confidently wrong (10 on class y + 1): at
      alpha = 0.5, beta = 1 every item is wrong (0.5 + 0.5 * 0.21 on the wrong class against 0.5 * 0.58),
      but alpha = 1 is right everywhere: searched accuracy 1;
    * B: both heads right on items 0-3, both wrong on 4 and 5: 4/6 for every alpha and beta.

    Unsearched (alpha = 0.5, beta = 1) B beats A (4/6 against 0); searched, A beats B."""
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    right, wrong = F.one_hot(y, 3).float(), F.one_hot((y + 1) % 3, 3).float()
    b = torch.cat([right[:4], wrong[4:]]) * 2
    return y, [{"ce_head.weight": 10 * wrong.T, "kd_head.weight": right.T},
               {"ce_head.weight": b.T, "kd_head.weight": b.T}]


class _SetWeights(Callback):
    """After every step, the weights of epoch ``trainer.epoch`` (what the epoch "learnt")."""

    def __init__(self, model, states):
        self.model, self.states = model, states

    def on_step_end(self, trainer, module, losses):
        with torch.no_grad():
            for k, v in self.states[trainer.epoch].items():
                self.model.get_parameter(k).copy_(v)
            self.model.ce_head.bias.zero_()
            self.model.kd_head.bias.zero_()


def _fit(tmp_path, search, max_epochs=2, resume=False, extra=()):
    y, states = _states()
    torch.manual_seed(0)
    model = DualHead(torch.nn.Identity(), 6, 3, search=search)
    data = TensorDictDataset("v", x=torch.eye(6), label=y)
    module = Distiller(Net(model, ["x"]), [], [Term("ce")])
    trainer = Trainer(max_epochs=max_epochs, batch_size=6, tensorboard=False, progress="off", run_dir=tmp_path,
                      resume=resume)
    return model, trainer.fit(module, data, data, callbacks=[_SetWeights(model, states), *extra])


def test_per_epoch_search_keeps_the_epoch_with_the_best_searched_accuracy(tmp_path):
    model, result = _fit(tmp_path / "epoch", "epoch")
    first, second = result.history
    assert (first["dho/searched_acc"], second["dho/searched_acc"]) == (1.0, pytest.approx(4 / 6))
    assert (first["val/acc"], second["val/acc"]) == (1.0, pytest.approx(4 / 6))  # re-evaluated with the picks
    assert result.best_epoch == 1 and result.metrics["val/acc"] == 1.0
    # the kept model is epoch 1's with its own pick (alpha = 1: the KD head alone)
    assert torch.equal(model.ce_head.weight, _states()[1][0]["ce_head.weight"]) and model.alpha.item() == 1.0
    assert (model.eval()(torch.eye(6)).argmax(1) == _states()[0]).all()
    # our variant: checkpoint on the unsearched val/acc (epoch 2), one search at the end on its weights
    model, result = _fit(tmp_path / "end", "end")
    assert result.best_epoch == 2 and result.history[0]["val/acc"] == 0.0 and "dho/alpha" not in result.history[0]
    assert result.metrics["val/acc"] == pytest.approx(4 / 6)


class _Crash(Callback):
    def on_epoch_start(self, trainer, module):
        if trainer.epoch == 1:
            raise RuntimeError("killed")


def test_per_epoch_search_resumes_exactly(tmp_path):
    _, whole = _fit(tmp_path / "whole", "epoch", max_epochs=2)
    with pytest.raises(RuntimeError, match="killed"):
        _fit(tmp_path / "cut", "epoch", extra=[_Crash()])
    model, resumed = _fit(tmp_path / "cut", "epoch", resume=True)
    assert resumed.best_epoch == whole.best_epoch == 1 and model.alpha.item() == 1.0
    drop = ("time/train_s", "time/epoch_s")
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in whole.history]


def test_dual_head_factory_strips_the_backbone_head():
    m = MODELS["dual_head"](num_classes=4, in_shape=(1, 8, 8), backbone={"name": "cnn", "args": {"channels": [4, 6]}},
                            inference="ce", align="features")
    assert isinstance(m.backbone.head, torch.nn.Identity) and m.ce_head.in_features == 6
    out = m.train()(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 4)
    out.sum().backward()
    with pytest.raises(ValueError, match="backbone"):
        dual_head(4, (1, 8, 8), backbone={"model": "cnn"})


def test_keep_labels_is_stratified_and_seeded():
    labels = torch.arange(1000) % 4
    kept = keep_labels(labels, 0.1, seed=1)
    assert torch.equal(kept, keep_labels(labels, 0.1, seed=1))
    assert not torch.equal(kept, keep_labels(labels, 0.1, seed=2))
    assert [(kept == c).sum().item() for c in range(4)] == [25] * 4
    assert ((kept == labels) | (kept == -1)).all() and (kept == -1).sum() == 900
    tiny = keep_labels(labels, 0.001, seed=0)  # 1 per class at least
    assert [(tiny == c).sum().item() for c in range(4)] == [1] * 4


def test_semi_data_set_thins_only_training_labels():
    data = semi(root="unused", name="digits", fraction=0.1, seed=0)
    train, full = data.train.tensors["label"], DATASETS["digits"](root="unused").train.tensors["label"]
    assert [(train == c).sum().item() for c in range(10)] == [round(0.1 * (full == c).sum().item()) for c in range(10)]
    assert ((train == full) | (train == -1)).all() and torch.equal(data.train.tensors["image"], DATASETS["digits"](
        root="unused").train.tensors["image"])
    assert (data.val.tensors["label"] >= 0).all() and (data.test.tensors["label"] >= 0).all()
    assert data.train.name.endswith("semi-0.1-0") and "semi" in DATASETS


def test_dho_config_runs_and_calibrates_on_validation(run_experiment):
    """configs/experiment/dho_digits.yaml runs for one epoch; `mmkd run` picks alpha/beta on the
    validation split and saves them with the student."""
    run_dir, results = run_experiment("dho_digits", "teachers.cnn.epochs=1")
    data = DATASETS["semi"](root="unused", name="digits", fraction=0.1, seed=0)
    model = dual_head(10, (1, 8, 8), backbone={"name": "mlp", "args": {"hidden": [64], "dropout": 0.1}})
    model.load_state_dict(torch.load(run_dir / "student.pt"))
    with torch.no_grad():
        z_ce, z_kd = model.eval().heads(data.val.tensors["image"])
    alpha, beta, acc = search_alpha_beta(z_ce, z_kd, data.val.tensors["label"])
    assert (model.alpha.item(), model.beta.item()) == (pytest.approx(alpha), beta)
    assert results["student"]["val_acc"] == pytest.approx(acc)
    test_pred = model(data.test.tensors["image"]).argmax(1)
    assert results["student"]["test_acc"] == pytest.approx((test_pred == data.test.tensors["label"]).float().mean().item())


def test_dhkd_config_runs_and_predicts_with_the_main_head(run_experiment, monkeypatch):
    """configs/experiment/dhkd_digits.yaml runs for one epoch through `mmkd run`: every student step's
    gradients come from the backward rule align (ce primary, bkl secondary), the auxiliary head trains
    with bkl, and the reported test accuracy is the main (CE) head's."""
    import csv

    from mmkd.gradients import Align

    steps, backward = [], Align.backward
    monkeypatch.setattr(Align, "backward", lambda self, losses, params: (steps.append((self.primary, self.secondary,
                                                                                       sorted(losses))),
                                                                         backward(self, losses, params)))
    run_dir, results = run_experiment("dhkd_digits", "teachers.cnn.epochs=1")
    assert steps == [(["ce"], ["bkl"], ["bkl", "ce", "loss"])] * 17  # 1,078 training items in batches of 64
    row = next(csv.DictReader((run_dir / "student" / "metrics.csv").open()))
    assert float(row["train/bkl"]) > 0 and float(row["train/ce"]) > 0
    model = dual_head(10, (1, 8, 8), backbone={"name": "cnn", "args": {"channels": [16, 32]}}, inference="ce",
                      aux_head="nonlinear")
    model.load_state_dict(torch.load(run_dir / "student.pt"))
    test = DATASETS["digits"](root="unused").test.tensors
    with torch.no_grad():
        z_ce, _ = model.eval().heads(test["image"])
    assert results["student"]["test_acc"] == pytest.approx((z_ce.argmax(1) == test["label"]).float().mean().item())


@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_avdigits_configs_chain_on_tiny_data(tmp_path):
    """configs/experiment/dhkd_avdigits.yaml trains the teacher on every training label and
    dho_avdigits.yaml loads it (how benchmarks/dual_head.py chains them), on 2 items per class and split."""
    import json

    from mmkd.cli import main

    common = [f"data_root={DATA}", "trainer.max_epochs=1", "teachers.cnn.epochs=1", "teachers.cnn.args.channels=[4,8]",
              "trainer.tensorboard=false", "trainer.progress=off", "export=[]", f"out_dir={tmp_path}"]
    tiny = {"limit_per_class": 2, "cache_dir": str(tmp_path / "av")}
    first, dho = tmp_path / "dhkd", tmp_path / "dho"
    assert main(["run", "experiment=dhkd_avdigits", f"run_dir={first}", *common,
                 *[f"data.args.{k}={v}" for k, v in tiny.items()]]) == 0
    assert main(["run", "experiment=dho_avdigits", f"run_dir={dho}", f"teachers.cnn.checkpoint={first}", *common,
                 "data.args.fraction=0.5", *[f"data.args.args.{k}={v}" for k, v in tiny.items()]]) == 0
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (first, dho))
    t1, t2 = r1["teachers"]["cnn"], r2["teachers"]["cnn"]
    assert "baseline" in r1 and "val_acc" in t1  # trained there, with the CE baseline
    assert "val_acc" not in t2 and t2["test_acc"] == t1["test_acc"]  # loaded, not trained again
    state = torch.load(dho / "student.pt")
    assert round(state["alpha"].item(), 2) in ALPHAS and state["beta"].item() in BETAS


@pytest.mark.parametrize("override, expected", [
    ("student.args.aux_head=mlp", "student.args: dual_head.aux_head='mlp'; choose from: linear, nonlinear"),
    ("student.args.search=never", "student.args: dual_head.search='never'; choose from: epoch, end"),
    ("student.args.align=true", "student.args: dual_head.align=True; choose from: none, features"),
    ("student.args.aux_hidden=0", "student.args.aux_hidden=0; it must be an integer >= 1"),
])
def test_bad_dual_head_arguments_are_one_line_errors(override, expected):
    from mmkd.config import ConfigError

    from mmkd.build import build_model, load_data

    with pytest.raises(ConfigError) as e:
        cfg = compose(["experiment=dhkd_digits", override])
        build_model(cfg.student, load_data(cfg)[1], "student")
    assert str(e.value) == expected
