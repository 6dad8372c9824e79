"""Callbacks (mmkd.callbacks): the order the trainer calls the hooks in, the state a resumed fit
hands back, the comparison that picks the best epoch, and the clock of scheduled loss arguments."""
import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Term, Trainer
from mmkd.callbacks import Callback, better

D, C, N, BATCH = 4, 3, 24, 8  # 3 steps per epoch


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(f"d{seed}", x=torch.randn(N, D, generator=g), label=torch.randint(0, C, (N,), generator=g))


def module(seed=0):
    torch.manual_seed(seed)
    return Distiller(Net(nn.Linear(D, C), ("x",)), [], [Term("ce")])


def trainer(run_dir, **kw):
    return Trainer(run_dir=run_dir, **{"max_epochs": 2, "batch_size": BATCH, "tensorboard": False,
                                       "progress": "off", "device": "cpu", **kw})


class Recorder(Callback):
    def __init__(self):
        self.calls = []

    def _rec(self, name, trainer):
        self.calls.append((name, trainer.epoch, trainer.global_step))

    def on_fit_start(self, trainer, module):
        self._rec("fit_start", trainer)

    def on_epoch_start(self, trainer, module):
        self._rec("epoch_start", trainer)

    def on_step_start(self, trainer, module, batch):
        self._rec("step_start", trainer)

    def on_step_end(self, trainer, module, losses):
        assert "loss" in losses
        self._rec("step_end", trainer)

    def on_epoch_end(self, trainer, module, metrics):
        assert set(metrics) >= {"epoch", "train/loss", "val/acc", "val/loss", "lr"}
        self._rec("epoch_end", trainer)

    def on_fit_end(self, trainer, module, result):
        self._rec("fit_end", trainer)

    def teardown(self, trainer):
        self._rec("teardown", trainer)


def expected_calls(epochs, steps):
    calls, g = [("fit_start", 0, 0)], 0
    for e in range(epochs):
        calls.append(("epoch_start", e, g))
        for _ in range(steps):
            calls += [("step_start", e, g), ("step_end", e, g + 1)]
            g += 1
        calls.append(("epoch_end", e, g))
    return calls + [("fit_end", epochs, g), ("teardown", epochs, g)]


def test_hooks_run_in_order(tmp_path):
    rec = Recorder()
    trainer(tmp_path).fit(module(), data(), data(1), callbacks=[rec])
    assert rec.calls == expected_calls(2, N // BATCH)


def test_teardown_runs_when_the_fit_raises(tmp_path):
    class Boom(Callback):
        def on_step_start(self, trainer, module, batch):
            raise RuntimeError("boom")

    rec = Recorder()
    with pytest.raises(RuntimeError, match="boom"):
        trainer(tmp_path).fit(module(), data(), data(1), callbacks=[rec, Boom()])
    assert [c[0] for c in rec.calls] == ["fit_start", "epoch_start", "step_start", "teardown"]


class StepCounter(Callback):
    """Stateful: the steps seen, which a resumed fit must continue from."""

    def __init__(self, crash_at=None):
        self.steps, self.crash_at = 0, crash_at

    def on_epoch_start(self, trainer, module):
        if trainer.epoch == self.crash_at:
            raise KeyboardInterrupt

    def on_step_end(self, trainer, module, losses):
        self.steps += 1

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_state_resumes_exactly(tmp_path):
    full = StepCounter()
    trainer(tmp_path / "full", max_epochs=3).fit(module(), data(), data(1), callbacks=[full])
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path / "cut", max_epochs=3).fit(module(), data(), data(1), callbacks=[StepCounter(crash_at=2)])
    resumed = StepCounter()
    trainer(tmp_path / "cut", max_epochs=3, resume=True).fit(module(), data(), data(1), callbacks=[resumed])
    assert full.steps == resumed.steps == 3 * (N // BATCH)


def test_resume_with_other_stateful_callbacks_is_refused(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        trainer(tmp_path, max_epochs=3).fit(module(), data(), data(1), callbacks=[StepCounter(crash_at=1)])
    with pytest.raises(ValueError, match=r"callbacks \['ModelCheckpoint', 'StepCounter'\], this fit has "
                                         r"\['ModelCheckpoint'\]: resume with the same settings"):
        trainer(tmp_path, max_epochs=3, resume=True).fit(module(), data(), data(1))


def test_better():
    assert better(1.0, None, "max", "first") and better(0.5, 0.4, "max", "first")
    assert not better(0.4, 0.4, "max", "first") and better(0.4, 0.4, "max", "last")
    assert better(0.3, 0.4, "min", "first") and not better(0.5, 0.4, "min", "last")


def test_the_clock_sets_progress_before_each_step(tmp_path):
    mod = module()
    seen = []
    mod.student.register_forward_pre_hook(lambda m, args: seen.append(float(mod.progress)))
    trainer(tmp_path, max_epochs=2).fit(mod, data(), data(1))
    steps = 2 * (N // BATCH)
    train_calls = seen[:N // BATCH] + seen[N // BATCH + 1:2 * (N // BATCH) + 1]  # evaluation calls in between
    assert train_calls == [pytest.approx(i / steps) for i in range(steps)]


def test_a_callback_may_stop_the_fit(tmp_path):
    class StopAfterOne(Callback):
        def on_epoch_end(self, trainer, module, metrics):
            trainer.should_stop = True

    res = trainer(tmp_path, max_epochs=5).fit(module(), data(), data(1), callbacks=[StopAfterOne()])
    assert len(res.history) == 1
    assert torch.load(tmp_path / "last.pt", weights_only=True)["done"]


def test_grad_norm_is_the_full_batch_gradient_norm(tmp_path):
    """One full-batch step per epoch and lr -> 0 (weights fixed): the logged norm is that of the CE
    gradient at the initial weights, (softmax(xW^T + b) - onehot(y))^T [x, 1] / N."""
    from mmkd.callbacks import GradNorm

    mod, ds = module(), data()
    W, b = mod.student.model.weight.detach().double(), mod.student.model.bias.detach().double()
    x, y = ds.tensors["x"].double(), ds.tensors["label"]
    r = (torch.softmax(x @ W.T + b, 1) - nn.functional.one_hot(y, C).double()) / N
    expected = float(torch.cat([(r.T @ x).flatten(), r.sum(0)]).norm())
    res = trainer(tmp_path, batch_size=N, lr=1e-12, scheduler="none").fit(mod, ds, data(1), callbacks=[GradNorm()])
    assert [row["train/grad_norm"] for row in res.history] == [pytest.approx(expected, rel=1e-5)] * 2
