"""Tests for the Trainer: exact resume, atomic checkpoints, early stopping, NaN detection,
logging, gradient clipping, evaluation, device and precision selection, learning-rate schedules,
optimizers, the progress bar and torch.compile, on tiny models and random data."""
import csv
import errno
import io as _pyio
import logging
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mmkd.io
from mmkd import Distiller, Net, TensorDictDataset, Term, Trainer
from mmkd.callbacks import Callback
from mmkd.trainer import NonFiniteLoss, TrainerConfig, check_config, resolved

D, C = 8, 3


def make_data(n, seed, name):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    w = torch.randn(D, C, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, C, generator=g)).argmax(1)
    return TensorDictDataset(name, x=x, label=y)


@pytest.fixture
def data():
    return make_data(192, 0, "train"), make_data(96, 1, "val")


def make_module(seed=0, dropout=0.3, model=None):
    torch.manual_seed(seed)
    model = model or nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, C))
    return Distiller(Net(model, keys=("x",)), [], [Term("ce")])


def trainer(run_dir, **kw):
    opts = dict(max_epochs=4, batch_size=32, lr=1e-2, tensorboard=False, progress="off", device="cpu")
    opts.update(kw)
    return Trainer(run_dir=run_dir, **opts)


def clone_state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def strip_time(history):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


class Crash(RuntimeError):
    pass


# ---------------------------------------------------------------- resume
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, data, monkeypatch):
    train, val = data
    full_mod = make_module()
    full = trainer(tmp_path / "full").fit(full_mod, train, val)
    full_last = torch.load(tmp_path / "full" / "last.pt", weights_only=True)

    # interrupted run: dies right after epoch 2's checkpoint was written
    class CrashAtEpoch3(Callback):
        def on_epoch_start(self, trainer, module):
            if trainer.epoch == 2:
                raise Crash("killed after epoch 2")

    with pytest.raises(Crash):
        trainer(tmp_path / "cut").fit(make_module(), train, val, callbacks=[CrashAtEpoch3()])
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["epoch"] == 1 and not state["done"] and len(state["history"]) == 2

    # resume on a freshly built module (different init, different global RNG)
    fresh = make_module(seed=123)
    torch.manual_seed(999)
    steps = []
    fresh.register_forward_pre_hook(lambda m, args: steps.append(len(args[0]["x"])))
    res = trainer(tmp_path / "cut", resume=True).fit(fresh, train, val)

    assert sum(steps) == 2 * len(train)  # only epochs 3 and 4 were trained again
    assert_same_state(clone_state(fresh), clone_state(full_mod))  # best weights after fit
    cut_last = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert_same_state(cut_last["model"], full_last["model"])  # weights after the final epoch
    assert strip_time(res.history) == strip_time(full.history)
    assert len(res.history) == 4
    assert (res.best_epoch, res.best_score) == (full.best_epoch, full.best_score)
    assert strip_time([res.metrics]) == strip_time([full.metrics])
    with open(tmp_path / "cut" / "metrics.csv") as f:
        assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4]


def test_resume_of_finished_run_trains_nothing(tmp_path, data):
    train, val = data
    mod = make_module()
    first = trainer(tmp_path, max_epochs=2).fit(mod, train, val)
    again = make_module(seed=5)
    calls = []
    again.register_forward_pre_hook(lambda m, args: calls.append(1))
    res = trainer(tmp_path, max_epochs=2, resume=True).fit(again, train, val)
    assert calls == []
    assert strip_time(res.history) == strip_time(first.history)
    assert_same_state(clone_state(again), clone_state(mod))


@pytest.fixture
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def test_resumed_run_keeps_deterministic_algorithms(tmp_path, data, restore_determinism):
    train, val = data
    trainer(tmp_path, max_epochs=1, deterministic=True).fit(make_module(), train, val)
    assert torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)  # as in a new process
    trainer(tmp_path, max_epochs=2, deterministic=True, resume=True).fit(make_module(), train, val)
    assert torch.are_deterministic_algorithms_enabled()


# ---------------------------------------------------------------- atomic checkpoints
def test_checkpoint_is_never_half_written(tmp_path, data, monkeypatch):
    """The disk fills up half-way through writing epoch 2's last.pt: a one-line NoSpace error names
    the folder, and epoch 1's last.pt is intact."""
    train, val = data
    real_write = Path.write_bytes
    partial = []

    def failing_write(self, data_):
        if self.name.startswith(".last.") and len(partial) == 0 and (tmp_path / "last.pt").exists():
            with open(self, "wb") as fh:
                fh.write(bytes(data_)[: len(data_) // 2])
            partial.append(str(self))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data_)

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    with pytest.raises(mmkd.io.NoSpace, match=f"^no space left on {tmp_path} \\(writing last.pt: ") as e:
        trainer(tmp_path, max_epochs=3).fit(make_module(), train, val)
    monkeypatch.undo()
    assert "\n" not in str(e.value)

    assert len(partial) == 1  # the failure really happened mid-write of a file
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and len(state["history"]) == 1  # still epoch 1, intact
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best.pt", "last.pt", "metrics.csv"], names  # no temporary files left
    # and the intact checkpoint resumes
    res = trainer(tmp_path, max_epochs=3, resume=True).fit(make_module(seed=7), train, val)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]


def test_run_files_get_the_usual_permissions(tmp_path, data):
    import os
    import stat

    train, val = data
    old = os.umask(0o022)
    os.umask(old)
    trainer(tmp_path, max_epochs=1).fit(make_module(), train, val)
    for name in ("last.pt", "best.pt", "metrics.csv"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~old, name  # not mkstemp's 0600


# ---------------------------------------------------------------- early stopping
def test_early_stop_when_lr_zero(tmp_path, data, monkeypatch):
    train, val = data
    mod = make_module()
    before = clone_state(mod)
    # an optimizer that never moves the weights, set directly (trainer.lr may be required to be positive)
    monkeypatch.setattr(Trainer, "_optimizer", lambda self, params: torch.optim.SGD(params, lr=0.0))
    res = trainer(tmp_path, max_epochs=20, patience=2).fit(mod, train, val)
    assert len(res.history) == 3  # best at epoch 1, then 2 epochs without improvement
    assert res.best_epoch == 1
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 1
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["done"] and last["callbacks"]["EarlyStopping"]["bad"] == 2
    assert_same_state(clone_state(mod), before)


def scripted_scores(monkeypatch, values, keys=("acc",)) -> list:
    """Make ``Trainer.evaluate`` score epoch ``e`` with ``values[e - 1]`` under each metric of ``keys``
    (0 under the other) and record the module's state at each evaluation; returns those snapshots."""
    snapshots = []

    def scripted_evaluate(self, module, dataset):
        snapshots.append(clone_state(module))
        v = values[len(snapshots) - 1]
        return {"acc": v if "acc" in keys else 0.0, "loss": v if "loss" in keys else 0.0}

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    return snapshots


@pytest.mark.parametrize("monitor,mode,values,stop,best", [
    # best at epoch 2; ties do not count as improvement; 3 epochs without improvement -> stop at 5
    ("val/acc", "max", [0.5, 0.7, 0.6, 0.65, 0.7, 0.99, 0.99], 5, 2),
    ("val/loss", "min", [2.0, 1.5, 1.2, 1.3, 1.25, 1.2, 0.1, 0.1], 6, 3),
])
def test_early_stop_on_chosen_metric(tmp_path, data, monkeypatch, monitor, mode, values, stop, best):
    train, val = data
    snapshots = scripted_scores(monkeypatch, values, ("acc", "loss"))
    mod = make_module()
    res = trainer(tmp_path, max_epochs=len(values), monitor=monitor, mode=mode, patience=3).fit(mod, train, val)

    assert len(res.history) == stop
    assert res.best_epoch == best and res.best_score == values[best - 1]
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == best and saved["metrics"][monitor] == values[best - 1]
    assert_same_state(saved["model"], snapshots[best - 1])
    assert_same_state(clone_state(mod), snapshots[best - 1])  # module holds the best weights
    assert not torch.equal(snapshots[best - 1]["student.model.0.weight"],
                           snapshots[-1]["student.model.0.weight"])


def test_ties_last_keeps_the_later_of_equal_epochs(tmp_path, data, monkeypatch):
    train, val = data
    values = [0.5, 0.7, 0.6, 0.7, 0.65, 0.6, 0.6, 0.99]  # tie at epoch 4 resets patience; stop after 7
    snapshots = scripted_scores(monkeypatch, values)
    mod = make_module()
    res = trainer(tmp_path, max_epochs=len(values), patience=3, ties="last").fit(mod, train, val)
    assert len(res.history) == 7 and res.best_epoch == 4
    assert_same_state(clone_state(mod), snapshots[3])
    with pytest.raises(ValueError, match="ties"):
        trainer(tmp_path, max_epochs=1, ties="middle").fit(make_module(), train, val)


def test_keep_last_ends_with_the_last_epoch_whatever_its_score(tmp_path, data, monkeypatch):
    train, val = data
    values = [0.5, 0.9, 0.6, 0.4]  # best at epoch 2, last at 4
    snapshots = scripted_scores(monkeypatch, values)
    mod = make_module()
    res = trainer(tmp_path, max_epochs=len(values), keep="last").fit(mod, train, val)
    assert (res.best_epoch, res.best_score) == (4, 0.4)
    assert torch.load(tmp_path / "best.pt", weights_only=True)["epoch"] == 4
    assert_same_state(clone_state(mod), snapshots[3])
    assert not torch.equal(snapshots[1]["student.model.0.weight"], snapshots[3]["student.model.0.weight"])


@pytest.mark.parametrize("ties,stop,best", [
    ("first", 6, 3),  # the tie at epoch 5 is no improvement: epochs 4-6 are bad -> stop after 6
    ("last", 8, 5),  # the tie at epoch 5 becomes the best and resets patience -> stop after 8
])
def test_ties_on_a_minimised_loss(tmp_path, data, monkeypatch, ties, stop, best):
    train, val = data
    values = [2.0, 1.5, 1.2, 1.3, 1.2, 1.25, 1.3, 1.4, 0.1]
    snapshots = scripted_scores(monkeypatch, values, ("loss",))
    mod = make_module()
    res = trainer(tmp_path, max_epochs=len(values), monitor="val/loss", mode="min", patience=3,
                  ties=ties).fit(mod, train, val)
    assert len(res.history) == stop
    assert res.best_epoch == best and res.best_score == 1.2
    saved = torch.load(tmp_path / "best.pt", weights_only=True)
    assert saved["epoch"] == best
    assert_same_state(clone_state(mod), snapshots[best - 1])
    assert not torch.equal(snapshots[2]["student.model.0.weight"], snapshots[4]["student.model.0.weight"])
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["done"] and last["callbacks"]["EarlyStopping"]["bad"] == 3
    assert last["callbacks"]["ModelCheckpoint"]["best_epoch"] == best


def test_a_monitored_metric_joins_the_set_and_an_unknown_one_fails(tmp_path, data):
    train, val = data
    fitted = trainer(tmp_path, max_epochs=1, metrics=["acc"], monitor="val/f1").fit(make_module(), train, val)
    assert {"val/acc", "val/f1"} <= set(fitted.metrics) and "val/loss" not in fitted.metrics
    assert fitted.best_score == fitted.metrics["val/f1"]
    with pytest.raises(KeyError, match="val/nope"):  # neither a registered metric nor one the module reports
        trainer(tmp_path, max_epochs=1, monitor="val/nope").fit(make_module(), train, val)


def test_automatic_monitor_and_mode_follow_the_metric_set():
    assert (resolved(TrainerConfig()).metrics, resolved(TrainerConfig()).monitor) == (["acc", "loss"], "val/acc")
    c = resolved(TrainerConfig(), metrics=["auroc", "acc", "loss"])
    assert (c.metrics, c.monitor, c.mode) == (["auroc", "acc", "loss"], "val/auroc", "max")
    c = resolved(TrainerConfig(metrics=["loss", "acc"]), metrics=["f1"])  # the config's set wins
    assert (c.metrics, c.monitor, c.mode) == (["loss", "acc"], "val/loss", "min")
    assert resolved(TrainerConfig(monitor="train/loss")).mode == "min"
    assert resolved(TrainerConfig(monitor="val/loss", mode="max")).mode == "max"  # an explicit mode stays


@pytest.mark.parametrize("key,value,message", [
    ("mode", "best", "trainer.mode='best'; choose from: max, min, auto"),
    ("scheduler", "poly", "trainer.scheduler='poly'; choose from: cosine, linear, step, none"),
    ("optimizer", "lamb", "trainer.optimizer='lamb'; choose from: adamw, adam, sgd"),
    ("ties", "middle", "trainer.ties='middle'; choose from: first, last"),
    ("keep", "first", "trainer.keep='first'; choose from: best, last"),
    ("device", "gpu", "trainer.device='gpu'; choose from: auto, cpu, cuda, cuda:N"),
    ("batch_size", 0, "trainer.batch_size=0; it must be at least 1"),
    ("grad_clip", -1.0, "trainer.grad_clip=-1.0; it must be a positive finite number"),
])
def test_unusable_settings_fail_when_the_trainer_is_built(tmp_path, key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer(tmp_path, max_epochs=1, **{key: value})


# ---------------------------------------------------------------- non-finite loss
class Poison(nn.Module):
    """Wraps a model; its training output on the ``at``-th training call is multiplied by ``value``."""

    def __init__(self, inner, at, value):
        super().__init__()
        self.inner, self.at, self.value, self.calls = inner, at, value, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = out * self.value
        return out


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_loss_raises_with_epoch_and_step(tmp_path, data, value):
    train, val = data  # 192 samples / 32 = 6 steps per epoch; call 8 = epoch 2, its second step
    torch.manual_seed(0)
    poison = Poison(nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)), at=8, value=value)
    mod = make_module(model=poison)
    with pytest.raises(NonFiniteLoss, match=r"^teachers/x: non-finite loss at epoch 2, step 2 \(ce=(nan|inf)\); "
                                            r"training diverged: lower trainer.lr or set trainer.grad_clip$"):
        trainer(tmp_path, stage="teachers/x").fit(mod, train, val)
    assert poison.calls == 8  # stopped at once, no further steps
    assert all(torch.isfinite(p).all() for p in mod.parameters())  # the bad step was not applied
    assert torch.load(tmp_path / "last.pt", weights_only=True)["epoch"] == 0


def test_non_finite_from_the_first_step_blames_the_loss_not_the_learning_rate(tmp_path, data):
    train, val = data
    torch.manual_seed(0)
    mod = make_module(model=Poison(nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)), at=1,
                                   value=float("nan")))
    with pytest.raises(NonFiniteLoss, match=r"^student: non-finite loss at epoch 1, step 1 \(ce=nan\); it is "
                                            r"non-finite from the first step, so the learning rate is not the cause"):
        trainer(tmp_path, stage="student").fit(mod, train, val)


class SqrtAt(nn.Module):
    """Adds ``sqrt(0 * w)`` to its training output on the ``at``-th call: a finite value (0) whose
    gradient is infinite."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at, self.calls = inner, at, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = out + (0 * self.inner[0].weight).sqrt().sum()
        return out


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_non_finite_gradient_of_a_finite_loss_stops_before_the_step(tmp_path, data, grad_clip):
    train, val = data
    torch.manual_seed(0)
    model = SqrtAt(nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)), at=3)
    mod = make_module(model=model)
    with pytest.raises(NonFiniteLoss, match=r"^student: non-finite gradient at epoch 1, step 3, the loss being finite"):
        trainer(tmp_path, stage="student", grad_clip=grad_clip).fit(mod, train, val)
    assert model.calls == 3 and all(torch.isfinite(p).all() for p in mod.parameters())  # not stepped


def test_non_finite_inputs_are_named(tmp_path, data):
    train, val = data
    x = train.tensors["x"].clone()
    x[40, 3] = float("nan")  # in the second batch of the first epoch (order shuffled: any batch)
    bad = TensorDictDataset("nan", x=x, label=train.tensors["label"])
    with pytest.raises(NonFiniteLoss, match=r"the batch's x hold NaN or infinite values: clean the input data$"):
        trainer(tmp_path).fit(make_module(), bad, val)


# ---------------------------------------------------------------- logging
def test_metrics_csv_and_tensorboard(tmp_path, data):
    train, val = data
    lr = 0.05
    mod = make_module(dropout=0.0)
    res = trainer(tmp_path, max_epochs=2, lr=lr, tensorboard=True, scheduler="cosine").fit(mod, train, val)

    with open(tmp_path / "metrics.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        columns = reader.fieldnames
    assert len(rows) == 2
    assert {"epoch", "train/loss", "train/ce", "val/acc", "val/loss", "lr", "time/epoch_s"} <= set(columns)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # cosine over 2 epochs, stepped per batch: half-way after epoch 1, zero at the end
    assert float(rows[0]["lr"]) == pytest.approx(lr * 0.5, abs=1e-12)
    assert float(rows[1]["lr"]) == pytest.approx(0.0, abs=1e-12)
    for r in rows:
        assert float(r["train/loss"]) == pytest.approx(float(r["train/ce"]), rel=1e-6)
        assert 0.0 <= float(r["val/acc"]) <= 1.0
    # the best epoch's val metrics match a hand computation on the weights the module now holds
    with torch.no_grad():
        logits = mod.student.model(val.tensors["x"])
    acc = (logits.argmax(1) == val.tensors["label"]).double().mean().item()
    loss = nn.functional.cross_entropy(logits.double(), val.tensors["label"]).item()
    best_row = rows[res.best_epoch - 1]
    assert float(best_row["val/acc"]) == pytest.approx(acc, abs=1e-12)
    assert float(best_row["val/loss"]) == pytest.approx(loss, rel=1e-5)

    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc_ev = EventAccumulator(str(tmp_path / "tb"))
    acc_ev.Reload()
    scalars = acc_ev.Scalars("val/acc")
    assert [s.step for s in scalars] == [1, 2]
    assert [s.value for s in scalars] == pytest.approx([float(r["val/acc"]) for r in rows])


def test_no_tensorboard_when_disabled(tmp_path, data):
    train, val = data
    trainer(tmp_path, max_epochs=1, tensorboard=False).fit(make_module(), train, val)
    assert not (tmp_path / "tb").exists()


# ---------------------------------------------------------------- gradient clipping
@pytest.mark.parametrize("clip", [1e-3, None])
def test_grad_clip_bounds_the_update(tmp_path, data, clip):
    train, val = data
    mod = make_module(dropout=0.0)
    before = clone_state(mod)
    # the full-batch gradient, computed by hand on the initial weights
    ref = make_module(dropout=0.0)
    loss = nn.functional.cross_entropy(ref.student.model(train.tensors["x"]), train.tensors["label"])
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    gnorm = torch.cat([g.flatten() for g in grads]).norm().item()
    assert gnorm > 1e-2  # so a clip of 1e-3 really bites

    trainer(tmp_path, max_epochs=1, batch_size=len(train), optimizer="sgd", momentum=0.0, lr=1.0,
            scheduler="none", grad_clip=clip).fit(mod, train, val)
    names = [n for n, _ in ref.named_parameters()]
    delta = [mod.state_dict()[n] - before[n] for n in names]
    dnorm = torch.cat([d.flatten() for d in delta]).norm().item()
    if clip is None:
        assert dnorm == pytest.approx(gnorm, rel=1e-4)
    else:
        assert dnorm <= 1.0 * clip * (1 + 1e-5)
        assert dnorm == pytest.approx(clip, rel=1e-3)
        scale = clip / (gnorm + 1e-6)  # clip_grad_norm_'s formula
        for d, g in zip(delta, grads):
            torch.testing.assert_close(d, -scale * g, rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- evaluation
def test_evaluate_matches_hand_computation(tmp_path):
    n, correct = 300, 210  # > 256, so evaluation runs over two batches
    pred = torch.arange(n) % C
    x = nn.functional.one_hot(pred, C).float() * 5.0
    y = torch.where(torch.arange(n) < correct, pred, (pred + 1) % C)
    ds = TensorDictDataset("eval", x=x, label=y)
    lin = nn.Linear(C, C)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(C))
        lin.bias.zero_()
    mod = Distiller(Net(lin, keys=("x",)), [], [Term("ce")])

    out = trainer(tmp_path, batch_size=16).evaluate(mod, ds)
    # logits are (5, 0, 0) up to order: CE is log(1 + 2 e^-5) when right, 5 + that when wrong
    base = math.log(1 + 2 * math.exp(-5))
    expect_loss = (correct * base + (n - correct) * (5 + base)) / n
    assert out["acc"] == pytest.approx(correct / n, abs=1e-12)
    assert out["loss"] == pytest.approx(expect_loss, rel=1e-6)
    assert not mod.training


def test_evaluate_uses_module_label_key(tmp_path):
    ds = TensorDictDataset("eval2", x=torch.eye(C) * 3, target=torch.tensor([0, 1, 0]))
    lin = nn.Linear(C, C)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(C))
        lin.bias.zero_()
    mod = Distiller(Net(lin, keys=("x",)), [], [Term("ce")], label_key="target")
    assert trainer(tmp_path).evaluate(mod, ds)["acc"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------- device and precision
@pytest.fixture
def single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def test_auto_device_and_precision_without_cuda(tmp_path, monkeypatch, single_process):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    t = Trainer(run_dir=tmp_path, device="auto", precision="auto")
    assert t.device == torch.device("cpu")
    assert t.bf16 is False
    assert Trainer(run_dir=tmp_path, device="auto", precision="bf16").bf16 is True  # asked for explicitly


def test_auto_device_and_precision_with_cuda(tmp_path, monkeypatch, single_process):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: selected.append(d))
    t = Trainer(run_dir=tmp_path, device="auto", precision="auto")
    assert t.device.type == "cuda"
    assert t.bf16 is True
    assert [torch.device(d).type for d in selected] == ["cuda"]  # the process is bound to it
    assert Trainer(run_dir=tmp_path, device="auto", precision="fp32").bf16 is False


class AutocastProbe(nn.Module):
    """A 2-layer MLP that records, at every call, whether CPU autocast is on, its dtype, and the
    dtype its first layer computes in."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
        self.seen = []

    def forward(self, x):
        h = self.net[0](x)
        self.seen.append((self.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), h.dtype))
        return self.net[2](self.net[1](h)).float()


@pytest.mark.parametrize("precision", ["bf16", "fp32", "auto"])
def test_bf16_autocast_on_cpu(tmp_path, data, precision):
    train, val = data
    torch.manual_seed(0)
    probe = AutocastProbe()
    res = trainer(tmp_path, max_epochs=1, precision=precision).fit(make_module(model=probe), train, val)
    train_calls = [s for s in probe.seen if s[0]]
    eval_calls = [s for s in probe.seen if not s[0]]
    assert len(train_calls) == len(train) // 32 and len(eval_calls) >= 1
    if precision == "bf16":
        assert all(s[1:] == (True, torch.bfloat16, torch.bfloat16) for s in probe.seen), probe.seen
    else:  # fp32, and auto on a CPU
        assert all(s[1] is False and s[3] == torch.float32 for s in probe.seen), probe.seen
    assert all(p.dtype == torch.float32 for p in probe.parameters())  # autocast, not a cast of the weights
    assert math.isfinite(res.history[0]["train/loss"])


# ---------------------------------------------------------------- learning-rate schedules
@pytest.fixture
def optimizer_steps():
    """Every optimizer step taken while the test runs: (optimizer, its first group's lr then)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: steps.append((opt, opt.param_groups[0]["lr"])))
    yield steps
    handle.remove()


SPE, EPOCHS, BASE_LR = 4, 3, 0.1  # 32 items in batches of 8: 4 steps an epoch, 12 in all


def expected_lr(scheduler, warmup_epochs, step, step_epochs=1, gamma=0.5):
    """The LR of optimizer step ``step`` (0-based), from the documented formulas."""
    w, total = int(warmup_epochs * SPE), EPOCHS * SPE
    if step < w:
        return BASE_LR * (step + 1) / w
    if scheduler == "cosine":
        return BASE_LR * 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))
    if scheduler == "linear":
        return BASE_LR * (total - step) / (total - w)
    if scheduler == "step":
        return BASE_LR * gamma ** (step // (step_epochs * SPE))
    return BASE_LR


@pytest.mark.parametrize("scheduler,warmup_epochs,step_epochs,anchors", [
    ("cosine", 0, 1, {0: 1.0, 3: 0.5 * (1 + math.cos(math.pi / 4)), 6: 0.5, 11: 0.5 * (1 + math.cos(11 * math.pi / 12))}),
    ("cosine", 1, 1, {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.5}),
    ("cosine", 0.5, 1, {0: 0.5, 1: 1.0, 2: 1.0, 7: 0.5}),
    ("linear", 0, 1, {0: 1.0, 3: 0.75, 6: 0.5, 11: 1 / 12}),
    ("linear", 1, 1, {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.5, 11: 1 / 8}),
    ("step", 0, 1, {0: 1.0, 3: 1.0, 4: 0.5, 7: 0.5, 8: 0.25, 11: 0.25}),
    ("step", 1, 2, {0: 0.25, 2: 0.75, 4: 1.0, 7: 1.0, 8: 0.5, 11: 0.5}),
    ("none", 0, 1, {0: 1.0, 5: 1.0, 11: 1.0}),
    ("none", 1, 1, {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 11: 1.0}),
])
def test_lr_schedule_step_by_step(tmp_path, optimizer_steps, scheduler, warmup_epochs, step_epochs, anchors):
    train, val = make_data(SPE * 8, 0, "train"), make_data(16, 1, "val")
    res = trainer(tmp_path, max_epochs=EPOCHS, batch_size=8, lr=BASE_LR, scheduler=scheduler,
                  warmup_epochs=warmup_epochs, step_epochs=step_epochs, gamma=0.5).fit(make_module(), train, val)
    lrs = [lr for _, lr in optimizer_steps]
    assert len(lrs) == EPOCHS * SPE
    for step, factor in anchors.items():  # a few values worked out by hand
        assert lrs[step] == pytest.approx(BASE_LR * factor, rel=1e-12, abs=1e-15), step
    expect = [expected_lr(scheduler, warmup_epochs, s, step_epochs) for s in range(EPOCHS * SPE)]
    assert lrs == pytest.approx(expect, rel=1e-12, abs=1e-15)
    # metrics["lr"] is the LR after the epoch's last scheduler step: that of the next epoch's first step
    logged = [row["lr"] for row in res.history]
    after = [expected_lr(scheduler, warmup_epochs, (e + 1) * SPE, step_epochs) for e in range(EPOCHS)]
    assert logged == pytest.approx(after, rel=1e-12, abs=1e-15)


def test_step_milestones_match_torch_multistep(tmp_path, optimizer_steps):
    """``milestones`` decays by ``gamma`` at those epochs, as torch's MultiStepLR stepped once an epoch."""
    train, val = make_data(SPE * 8, 0, "train"), make_data(16, 1, "val")
    trainer(tmp_path, max_epochs=5, batch_size=8, lr=BASE_LR, scheduler="step", milestones=[2, 4],
            gamma=0.1).fit(make_module(), train, val)
    got = [lr for _, lr in optimizer_steps]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    expect = []
    for _ in range(5):
        expect += [opt.param_groups[0]["lr"]] * SPE
        opt.step()
        ref.step()
    assert got == pytest.approx(expect, rel=1e-12)
    assert expect[SPE * 2] == pytest.approx(BASE_LR * 0.1) and expect[-1] == pytest.approx(BASE_LR * 0.01)


@pytest.mark.parametrize("milestones", [[4, 2], [0, 3], [2, 2]])
def test_bad_milestones_are_refused(milestones):
    with pytest.raises(ValueError, match=r"trainer\.milestones"):
        check_config(TrainerConfig(scheduler="step", milestones=milestones))


# ---------------------------------------------------------------- optimizers
@pytest.mark.parametrize("name,momentum,nesterov,cls", [
    ("adamw", 0.9, True, torch.optim.AdamW),
    ("adam", 0.9, True, torch.optim.Adam),
    ("sgd", 0.9, True, torch.optim.SGD),
    ("sgd", 0.9, False, torch.optim.SGD),
    ("sgd", 0.0, True, torch.optim.SGD),
])
def test_optimizer_choice_and_its_first_step(tmp_path, data, optimizer_steps, name, momentum, nesterov, cls):
    train, val = data
    lr, wd = 0.1, 0.1
    mod = make_module(dropout=0.0)
    before = clone_state(mod)
    ref = make_module(dropout=0.0)  # the same initial weights; the full-batch gradient by hand
    loss = nn.functional.cross_entropy(ref.student.model(train.tensors["x"]), train.tensors["label"])
    names = [n for n, _ in ref.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(loss, list(ref.parameters()))))

    trainer(tmp_path, max_epochs=1, batch_size=len(train), optimizer=name, lr=lr, weight_decay=wd,
            momentum=momentum, nesterov=nesterov, scheduler="none").fit(mod, train, val)

    assert len(optimizer_steps) == 1
    opt, used_lr = optimizer_steps[0]
    assert type(opt) is cls and used_lr == lr
    group = opt.param_groups[0]
    assert group["lr"] == lr and group["weight_decay"] == wd
    if name == "sgd":
        assert group["momentum"] == momentum and group["nesterov"] is (nesterov and momentum > 0)
    eps = 1e-8  # torch's Adam default; on the first step m-hat = g and v-hat = g^2
    for n in names:
        p, g = before[n], grads[n]
        if name == "adamw":  # decoupled decay
            expect = p * (1 - lr * wd) - lr * g / (g.abs() + eps)
        elif name == "adam":  # L2 decay folded into the gradient
            g = g + wd * p
            expect = p - lr * g / (g.abs() + eps)
        else:  # first step: buf = g; nesterov updates by g + momentum * buf, heavy-ball by buf
            expect = p - lr * (1 + momentum * nesterov) * (g + wd * p)
        torch.testing.assert_close(mod.state_dict()[n], expect, rtol=1e-4, atol=1e-5, msg=n)


# ---------------------------------------------------------------- progress bar
class FakeStderr(_pyio.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


@pytest.fixture
def plain_terminal(monkeypatch):
    """A terminal environment that rich reads the same way everywhere."""
    for var in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "200")


BAR = "━"


@pytest.mark.parametrize("progress,tty,drawn", [
    ("auto", False, "none"),  # e.g. output piped to a file: no bar
    ("off", True, "none"),
    ("on", False, "final"),  # forced on a non-terminal: one final line, no live redraws
    ("auto", True, "live"),  # a terminal: the bar redraws, with one task per epoch
])
def test_progress_bar(data, monkeypatch, capsys, caplog, plain_terminal, progress, tty, drawn):
    train, val = data
    caplog.set_level(logging.DEBUG, logger="mmkd")
    capsys.readouterr()
    err = FakeStderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    res = trainer("r", max_epochs=2, progress=progress).fit(make_module(), train, val)  # cwd is tmp_path
    text = err.getvalue()
    out = capsys.readouterr()
    assert BAR not in out.out + out.err  # the bar goes to sys.stderr only
    final = f"r  val/acc={res.history[-1]['val/acc']:.4f}"
    if drawn == "none":
        assert text == ""
    elif drawn == "final":
        assert "\x1b" not in text and text.count("\n") == 1, repr(text)
        assert text.startswith(final) and BAR in text and " 2/2 " in text, repr(text)
        assert "epoch 1" not in text
    else:
        assert "\x1b[" in text and BAR in text, repr(text)
        assert "  epoch 1 " in text and "  epoch 2 " in text and f"0/{len(train) // 32}" in text, repr(text)
        assert final in text and "2/2" in text, repr(text)
    # the per-epoch log lines are INFO without a bar and DEBUG (out of the way) under one
    epoch_logs = [r for r in caplog.records if r.name == "mmkd" and " epoch " in r.getMessage()]
    assert len(epoch_logs) == 2
    assert {r.levelno for r in epoch_logs} == {logging.DEBUG if drawn != "none" else logging.INFO}


# ---------------------------------------------------------------- torch.compile
@pytest.mark.slow  # compiling forward and backward takes ~20 s on one core with a cold inductor cache
def test_compile_gives_the_same_losses(tmp_path, monkeypatch):
    import torch._dynamo
    from torch._dynamo.utils import counters

    train, val = make_data(32, 0, "train"), make_data(32, 1, "val")
    real_compile = torch.compile
    compiled = []

    def recording_compile(model, *args, **kwargs):
        compiled.append(model)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(torch, "compile", recording_compile)

    def fit(name, compile_):
        torch.manual_seed(0)  # the same initial weights in both runs
        mod = make_module(model=nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)))
        res = trainer(tmp_path / name, max_epochs=1, batch_size=8, compile=compile_).fit(mod, train, val)
        return mod, res

    torch._dynamo.reset()
    counters.clear()
    try:
        eager_mod, eager = fit("eager", False)
        assert compiled == [] and not counters["stats"]["unique_graphs"]
        comp_mod, comp = fit("compiled", True)
        assert len(compiled) == 1 and isinstance(compiled[0], Distiller)
        assert counters["stats"]["unique_graphs"] >= 1  # dynamo really captured a graph
    finally:
        torch._dynamo.reset()
    for key in ("train/loss", "train/ce", "val/loss", "val/acc"):
        assert comp.history[0][key] == pytest.approx(eager.history[0][key], abs=1e-5), key
    for k, v in clone_state(eager_mod).items():
        torch.testing.assert_close(clone_state(comp_mod)[k], v, rtol=1e-5, atol=1e-6)


def test_evaluating_on_no_labelled_item_is_a_data_error(data):
    train, _ = data
    unlabelled = TensorDictDataset("unlabelled", x=train.tensors["x"][:5], label=torch.full((5,), -1))
    from mmkd.data import DataError

    with pytest.raises(DataError, match="^data set 'unlabelled' has no labelled item to evaluate on"):
        Trainer(device="cpu").evaluate(make_module(), unlabelled)
