"""Schedules of loss arguments, term weights and a router's balance weight: hand-computed values,
config parsing and its errors, and the values the Trainer uses step by step and epoch by epoch,
across a resume."""
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Term, Trainer
from mmkd.losses import register_loss
from mmkd.schedules import Anneal, Schedule, StepDecay, Warmup

SEEN: list[float] = []
CRASH_AT = [None]  # raise at this call index (simulates a killed run)


@register_loss("_record_temperature", teacher=False)
def _record_temperature(student_logits, teacher_logits=None, target=None, *, temperature, reduction="mean"):
    if CRASH_AT[0] is not None and len(SEEN) == CRASH_AT[0]:
        raise KeyboardInterrupt
    SEEN.append(float(temperature))
    return student_logits.sum() * 0.0


def test_values_by_hand():
    cos, lin = Anneal(1.0, 0.1), Anneal(1.0, 0.1, "linear")
    assert cos(0.0) == pytest.approx(1.0) and cos(0.5) == pytest.approx(0.55) and cos(1.0) == pytest.approx(0.1)
    assert cos(0.25) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert lin(0.25) == pytest.approx(0.775) and lin(2.0) == pytest.approx(0.1) and lin(-1.0) == pytest.approx(1.0)
    warm, share = Warmup(epochs=20), Warmup(fraction=0.1, end=2.0)
    # mdistiller's DKD: min(epoch / 20, 1) with epochs counted from 1, i.e. our 0-based epoch + 1
    assert [warm(0.0, e) for e in (0, 9, 10, 18, 19, 30)] == pytest.approx([0.05, 0.5, 0.55, 0.95, 1.0, 1.0])
    assert [share(p) for p in (0.0, 0.05, 0.1, 0.7)] == pytest.approx([0.0, 1.0, 2.0, 2.0])
    step = StepDecay(every=30, gamma=0.5)  # multiplied at the end of epochs 0, 30, 60
    assert [step(0.0, e) for e in (0, 1, 29, 30, 31, 60, 61)] == pytest.approx([1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.125])
    assert [StepDecay(10, 0.9, start=2.0)(0.0, e) for e in (0, 1, 10, 11, 21)] == pytest.approx(
        [2.0, 1.8, 1.8, 1.62, 2 * 0.9 ** 3])
    for p, e in ((0.0, 0), (0.3, 7), (0.9, 31)):  # tensors (the Distiller's buffers) give the same values
        tp, te = torch.tensor(p), torch.tensor(float(e))
        for sched in (cos, lin, warm, share, step):
            assert sched(tp, te).item() == pytest.approx(sched(p, e))


def test_parse():
    assert Schedule.parse({"schedule": "linear", "start": 2, "end": 1}) == Anneal(2.0, 1.0, "linear")
    assert Schedule.parse({"schedule": "warmup", "epochs": 20}) == Warmup(epochs=20.0)
    assert Schedule.parse({"schedule": "step", "every": 30, "gamma": 0.5}) == StepDecay(30.0, 0.5)
    assert Schedule.parse(0.5) == 0.5 and Schedule.parse({"k": 1}) == {"k": 1}
    assert StepDecay(30, 0.5).describe() == "{schedule: step, every: 30, gamma: 0.5, start: 1}"
    for bad, msg in (({"schedule": "exp", "start": 1, "end": 0}, "x: unknown schedule 'exp'; choose from: cosine, "
                                                                 "linear, warmup, step"),
                     ({"schedule": "cosine", "start": 1}, "x: a cosine schedule takes the keys start, end; missing: end"),
                     ({"schedule": "cosine", "start": 1, "end": 0, "steps": 3}, "unknown: steps"),
                     ({"schedule": "warmup"}, "x: a warmup schedule takes one of epochs"),
                     ({"schedule": "warmup", "epochs": 2.5}, "x: warmup epochs=2.5; give a whole number >= 1"),
                     ({"schedule": "warmup", "fraction": 1.5}, r"fraction of training in \(0, 1\]"),
                     ({"schedule": "step", "every": 30}, "missing: gamma"),
                     ({"schedule": "step", "every": 0, "gamma": 0.5}, "x: step every=0; give a whole number"),
                     ({"schedule": "step", "every": 3, "gamma": "half"}, "x: the values of a schedule are numbers")):
        with pytest.raises(ValueError, match=msg):
            Schedule.parse(bad, "x")


@register_loss("_one", teacher=False)
def _one(student_logits, teacher_logits=None, target=None, reduction="mean"):
    """1, whatever the input (so a term's logged value is its weight)."""
    if CRASH_AT[0] is not None and len(SEEN) == CRASH_AT[0]:
        raise KeyboardInterrupt
    SEEN.append(0.0)
    return student_logits.sum() * 0.0 + 1.0


def fit_weights(run_dir, resume=False):
    torch.manual_seed(0)
    data = TensorDictDataset("train", x=torch.randn(12, 4), label=torch.arange(12) % 3)
    terms = [Term("ce"), Term("_one", {"schedule": "step", "every": 2, "gamma": 0.5}, name="step"),
             Term("_one", {"schedule": "warmup", "epochs": 3}, name="warm")]
    return Trainer(run_dir=run_dir, resume=resume, max_epochs=5, batch_size=4, tensorboard=False, progress="off",
                   device="cpu").fit(Distiller(Net(nn.Linear(4, 3), ["x"]), [], terms), data, data).history


def test_scheduled_weights_per_epoch_and_across_a_resume(tmp_path):
    want_step, want_warm = [1, 0.5, 0.5, 0.25, 0.25], [1 / 3, 2 / 3, 1, 1, 1]
    SEEN.clear()
    history = fit_weights(tmp_path / "a")
    assert [h["train/step"] for h in history] == pytest.approx(want_step)
    assert [h["train/warm"] for h in history] == pytest.approx(want_warm)
    SEEN.clear()
    CRASH_AT[0] = 2 * 3 * 3 + 2  # two terms x 3 steps a epoch: killed in the fourth epoch
    with pytest.raises(KeyboardInterrupt):
        fit_weights(tmp_path / "b")
    CRASH_AT[0] = None
    resumed = fit_weights(tmp_path / "b", resume=True)
    assert [h["train/step"] for h in resumed] == pytest.approx(want_step)
    assert [h["train/warm"] for h in resumed] == pytest.approx(want_warm)
    assert [h["train/loss"] for h in resumed] == [h["train/loss"] for h in history]


def test_dkd_configs_warm_up_over_20_epochs():
    """mdistiller's DKD weight min(epoch / 20, 1) (epochs from 1): the shipped DKD experiments' default."""
    from mmkd.cli import compose

    for experiment in ("av_image_dkd", "av_audio_dkd"):
        cfg = compose([f"experiment={experiment}"])
        term = Term("dkd", OmegaConf.to_container(cfg.losses.dkd.weight), dict(cfg.losses.dkd.args), name="dkd")
        assert [term.weight(0.0, e) for e in (0, 10, 20, 30)] == pytest.approx([1 / 20, 11 / 20, 1, 1]), experiment


def test_a_router_balance_weight_follows_its_schedule():
    from mmkd.net import Output
    from mmkd.routers.gating import BALANCES
    from mmkd.routers.learned import LinearRouter

    torch.manual_seed(0)
    router = LinearRouter(num_teachers=2, num_classes=3, balance_weight={"schedule": "step", "every": 10, "gamma": 0.9})
    student = Output(torch.randn(5, 3), {})
    for e, factor in ((0, 1.0), (1, 0.9), (10, 0.9), (11, 0.81)):
        router.set_progress(0.5, e)
        probs = router(student, [Output(torch.randn(5, 3), {})] * 2, {})
        got = router.pop_aux_losses()["balance"]
        want = factor * BALANCES[router.balance](torch.softmax(router.gate(student.logits), -1))
        assert got.item() == pytest.approx(want.item(), rel=1e-6) and probs.shape == (5, 2)


def fit(run_dir, resume=False):
    torch.manual_seed(0)
    data = TensorDictDataset("train", x=torch.randn(12, 4), label=torch.arange(12) % 3)
    module = Distiller(Net(nn.Linear(4, 3), ["x"]), [],
                       [Term("ce"), Term("_record_temperature", args={"temperature": {"schedule": "linear", "start": 1.0, "end": 0.0}})])
    Trainer(run_dir=run_dir, resume=resume, max_epochs=3, batch_size=4, tensorboard=False, progress="off",
            device="cpu").fit(module, data, data)


def test_trainer_hands_the_loss_the_value_at_each_step_and_resumes_it(tmp_path):
    want = [1.0 - i / 9 for i in range(9)]  # 3 epochs x 3 steps, linear from 1 to 0 over progress i / 9
    SEEN.clear()
    fit(tmp_path / "a")
    assert SEEN == pytest.approx(want)
    SEEN.clear()
    CRASH_AT[0] = 5  # killed in the second epoch; last.pt holds the first
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "b")
    CRASH_AT[0] = None
    SEEN.clear()
    fit(tmp_path / "b", resume=True)
    assert SEEN == pytest.approx(want[3:])
