"""Scheduled loss arguments: hand-computed values, config parsing and its errors, and the values
the Trainer hands a loss step by step, across a resume."""
import math

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Term, Trainer
from mmkd.losses import register_loss
from mmkd.schedules import Schedule

SEEN: list[float] = []
CRASH_AT = [None]  # raise at this call index (simulates a killed run)


@register_loss("_record_temperature", teacher=False)
def _record_temperature(student_logits, teacher_logits=None, target=None, *, temperature, reduction="mean"):
    if CRASH_AT[0] is not None and len(SEEN) == CRASH_AT[0]:
        raise KeyboardInterrupt
    SEEN.append(float(temperature))
    return student_logits.sum() * 0.0


def test_values_by_hand():
    cos, lin = Schedule(1.0, 0.1), Schedule(1.0, 0.1, "linear")
    assert cos(0.0) == pytest.approx(1.0) and cos(0.5) == pytest.approx(0.55) and cos(1.0) == pytest.approx(0.1)
    assert cos(0.25) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert lin(0.25) == pytest.approx(0.775) and lin(2.0) == pytest.approx(0.1) and lin(-1.0) == pytest.approx(1.0)
    for p in (0.0, 0.3, 0.9):  # tensors (the Distiller's progress buffer) give the same values
        assert cos(torch.tensor(p)).item() == pytest.approx(cos(p)) and lin(torch.tensor(p)).item() == pytest.approx(lin(p))


def test_parse():
    assert Schedule.parse({"schedule": "linear", "start": 2, "end": 1}) == Schedule(2.0, 1.0, "linear")
    assert Schedule.parse(0.5) == 0.5 and Schedule.parse({"k": 1}) == {"k": 1}
    for bad, msg in (({"schedule": "step", "start": 1, "end": 0}, "x: schedule: unknown kind 'step'; choose from: cosine, linear"),
                     ({"schedule": "cosine", "start": 1}, "x: a schedule takes the keys schedule, start, end; missing: end"),
                     ({"schedule": "cosine", "start": 1, "end": 0, "steps": 3}, "unknown: steps")):
        with pytest.raises(ValueError, match=msg):
            Schedule.parse(bad, "x")


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
