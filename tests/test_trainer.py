"""Tests for the Trainer: exact resume, atomic checkpoints, early stopping, NaN detection,
logging, gradient clipping and evaluation, on tiny models and random data."""
import csv
import io as _pyio
import math

import pytest
import torch
from torch import nn

import mmkd.io
from mmkd import Distiller, Net, TensorDictDataset, Term, Trainer
from mmkd.trainer import NonFiniteLoss

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
    full_last = torch.load(tmp_path / "full" / "last.pt", weights_only=False)

    # interrupted run: dies right after epoch 2's checkpoint was written
    real_log = Trainer._log

    def log_then_crash(self, metrics, history, writer, **kwargs):
        real_log(self, metrics, history, writer, **kwargs)
        if metrics["epoch"] == 2:
            raise Crash("killed after epoch 2")

    monkeypatch.setattr(Trainer, "_log", log_then_crash)
    with pytest.raises(Crash):
        trainer(tmp_path / "cut").fit(make_module(), train, val)
    monkeypatch.undo()
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
    assert state["epoch"] == 1 and not state["done"] and len(state["history"]) == 2

    # resume on a freshly built module (different init, different global RNG)
    fresh = make_module(seed=123)
    torch.manual_seed(999)
    steps = []
    fresh.register_forward_pre_hook(lambda m, args: steps.append(len(args[0]["x"])))
    res = trainer(tmp_path / "cut", resume=True).fit(fresh, train, val)

    assert sum(steps) == 2 * len(train)  # only epochs 3 and 4 were trained again
    assert_same_state(clone_state(fresh), clone_state(full_mod))  # best weights after fit
    cut_last = torch.load(tmp_path / "cut" / "last.pt", weights_only=False)
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
    train, val = data
    real_save = torch.save
    partial = []

    def failing_save(obj, f, *a, **kw):
        if isinstance(obj, dict) and "optimizer" in obj and obj["epoch"] == 1:  # last.pt of epoch 2
            buf = _pyio.BytesIO()
            real_save(obj, buf, *a, **kw)
            data_ = buf.getvalue()
            with open(f, "wb") as fh:
                fh.write(data_[: len(data_) // 2])
            partial.append(str(f))
            raise OSError("No space left on device")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(mmkd.io.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space"):
        trainer(tmp_path, max_epochs=3).fit(make_module(), train, val)
    monkeypatch.undo()

    assert len(partial) == 1  # the failure really happened mid-write of a file
    state = torch.load(tmp_path / "last.pt", weights_only=False)
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
def test_early_stop_when_lr_zero(tmp_path, data):
    train, val = data
    mod = make_module()
    before = clone_state(mod)
    res = trainer(tmp_path, max_epochs=20, lr=0.0, patience=2).fit(mod, train, val)
    assert len(res.history) == 3  # best at epoch 1, then 2 epochs without improvement
    assert res.best_epoch == 1
    assert torch.load(tmp_path / "best.pt", weights_only=False)["epoch"] == 1
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    assert last["done"] and last["bad_epochs"] == 2
    assert_same_state(clone_state(mod), before)


@pytest.mark.parametrize("monitor,mode,values,stop,best", [
    # best at epoch 2; ties do not count as improvement; 3 epochs without improvement -> stop at 5
    ("val/acc", "max", [0.5, 0.7, 0.6, 0.65, 0.7, 0.99, 0.99], 5, 2),
    ("val/loss", "min", [2.0, 1.5, 1.2, 1.3, 1.25, 1.2, 0.1, 0.1], 6, 3),
])
def test_early_stop_on_chosen_metric(tmp_path, data, monkeypatch, monitor, mode, values, stop, best):
    train, val = data
    snapshots = []

    def scripted_evaluate(self, module, dataset):
        snapshots.append(clone_state(module))
        v = values[len(snapshots) - 1]
        return {"acc": v, "loss": v}

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    mod = make_module()
    res = trainer(tmp_path, max_epochs=len(values), monitor=monitor, mode=mode, patience=3).fit(mod, train, val)

    assert len(res.history) == stop
    assert res.best_epoch == best and res.best_score == values[best - 1]
    saved = torch.load(tmp_path / "best.pt", weights_only=False)
    assert saved["epoch"] == best and saved["metrics"][monitor] == values[best - 1]
    assert_same_state(saved["model"], snapshots[best - 1])
    assert_same_state(clone_state(mod), snapshots[best - 1])  # module holds the best weights
    assert not torch.equal(snapshots[best - 1]["student.model.0.weight"],
                           snapshots[-1]["student.model.0.weight"])


def test_ties_last_keeps_the_later_of_equal_epochs(tmp_path, data, monkeypatch):
    train, val = data
    values = [0.5, 0.7, 0.6, 0.7, 0.65, 0.6, 0.6, 0.99]  # tie at epoch 4 resets patience; stop after 7
    snapshots = []

    def scripted_evaluate(self, module, dataset):
        snapshots.append(clone_state(module))
        return {"acc": values[len(snapshots) - 1], "loss": 0.0}

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    mod = make_module()
    res = trainer(tmp_path, max_epochs=len(values), patience=3, ties="last").fit(mod, train, val)
    assert len(res.history) == 7 and res.best_epoch == 4
    assert_same_state(clone_state(mod), snapshots[3])
    with pytest.raises(ValueError, match="ties"):
        trainer(tmp_path, max_epochs=1, ties="middle").fit(make_module(), train, val)


def test_unknown_monitor_and_mode_fail(tmp_path, data):
    train, val = data
    with pytest.raises(KeyError, match="val/f1"):
        trainer(tmp_path, max_epochs=1, monitor="val/f1").fit(make_module(), train, val)
    with pytest.raises(ValueError, match="mode"):
        trainer(tmp_path, max_epochs=1, mode="best").fit(make_module(), train, val)


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
    train, val = data  # 192 samples / 32 = 6 steps per epoch; call 8 = epoch 2, step 1
    torch.manual_seed(0)
    poison = Poison(nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C)), at=8, value=value)
    mod = make_module(model=poison)
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 1\b"):
        trainer(tmp_path).fit(mod, train, val)
    assert poison.calls == 8  # stopped at once, no further steps
    assert all(torch.isfinite(p).all() for p in mod.parameters())  # the bad step was not applied
    assert torch.load(tmp_path / "last.pt", weights_only=False)["epoch"] == 0


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
