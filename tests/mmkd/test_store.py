"""The trained-teacher store (mmkd.store): the key covers every field that decides a teacher's
weights, and a second run with an identical teacher loads it instead of training it."""
from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch
from torch import nn

from mmkd import TensorDictDataset, store
from mmkd.cli import compose
from mmkd.run import run
from mmkd.trainer import TrainerConfig

FAST = ["trainer.max_epochs=2", "teachers.cnn.epochs=2", "trainer.tensorboard=false", "trainer.progress=off",
        "export=[]", "data.args.split_seed=0"]


def sets(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return [TensorDictDataset(f"toy/{p}/{seed}", x=torch.randn(n, 4, generator=g), label=torch.arange(n) % 2)
            for p in ("train", "val")]


def test_the_key_changes_with_every_field_that_decides_the_weights():
    spec, model, trainer, data = {"name": "mlp", "args": {"hidden": [8]}, "inputs": ["x"]}, nn.Linear(4, 2), TrainerConfig(), sets()
    key = store.teacher_key(spec, model, trainer, data)
    assert key == store.teacher_key(dict(spec), nn.Linear(4, 2), TrainerConfig(), sets())  # weights are not in it
    changed = {
        "architecture (args)": store.teacher_key({**spec, "args": {"hidden": [16]}}, model, trainer, data),
        "architecture (module tree)": store.teacher_key(spec, nn.Sequential(nn.Linear(4, 2), nn.ReLU()), trainer, data),
        "inputs": store.teacher_key({**spec, "inputs": ["y"]}, model, trainer, data),
        "trainer setting": store.teacher_key(spec, model, dataclasses.replace(trainer, lr=2e-3), data),
        "epochs": store.teacher_key(spec, model, dataclasses.replace(trainer, max_epochs=21), data),
        "seed": store.teacher_key(spec, model, dataclasses.replace(trainer, seed=1), data),
        "data": store.teacher_key(spec, model, trainer, sets(seed=1)),
        "validation data": store.teacher_key(spec, model, trainer, [data[0], sets(seed=1)[1]]),
    }
    assert all(k != key for k in changed.values()), [n for n, k in changed.items() if k == key]
    assert len(set(changed.values())) == len(changed)
    for neutral in ({"progress": "on"}, {"tensorboard": False}, {"num_workers": 2}):  # cannot change the weights
        assert store.teacher_key(spec, model, dataclasses.replace(trainer, **neutral), data) == key

    class Live(torch.utils.data.Dataset):  # not a Fingerprinted data set: nothing names its contents
        def __len__(self):
            return 4

    assert store.teacher_key(spec, model, trainer, [Live(), data[1]]) is None


def runs_teacher(caplog) -> bool:
    return any("stage teachers/cnn" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_a_second_run_loads_the_identical_teacher_and_any_change_trains_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmkd")
    common = [f"cache_dir={tmp_path / 'cache'}", *FAST]
    first = run(compose([*common, f"run_dir={tmp_path / 'a'}"]))
    assert runs_teacher(caplog)
    stored = list((tmp_path / "cache" / "teachers").glob("*.pt"))
    assert len(stored) == 1 and stored[0].with_suffix(".json").is_file()  # entry and its size/SHA-256 index

    caplog.clear()
    second = run(compose([*common, f"run_dir={tmp_path / 'b'}", "name=again"]))
    assert not runs_teacher(caplog)
    assert any("loaded from the trained-teacher store" in r.getMessage() and str(stored[0]) in r.getMessage()
               for r in caplog.records)
    scores = [{k: v for k, v in r["teachers"]["cnn"].items() if k != "latency_ms"} for r in (first, second)]
    assert scores[0] == scores[1] and second["student"]["test_acc"] == first["student"]["test_acc"]
    a, b = (torch.load(tmp_path / d / "teachers" / "cnn" / "best.pt", weights_only=True)["model"] for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the run dir holds its teacher
    assert all(torch.equal(x, y) for x, y in zip(*(torch.load(tmp_path / d / "student.pt", weights_only=True).values()
                                                   for d in "ab")))

    for i, change in enumerate(["teachers.cnn.args.channels=[8,16]", "teachers.cnn.trainer.weight_decay=0.01",
                                "teachers.cnn.epochs=3", "seed=1", "data.args.split_seed=1", "teachers.cnn.reuse=false"]):
        caplog.clear()
        run(compose([*common, f"run_dir={tmp_path / f'c{i}'}", change]))
        assert runs_teacher(caplog), change
    assert len(list((tmp_path / "cache" / "teachers").glob("*.pt"))) == 6  # reuse=false stores nothing new


def test_a_damaged_entry_is_trained_again(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mmkd")
    common = [f"cache_dir={tmp_path / 'cache'}", *FAST, "trainer.max_epochs=1", "teachers.cnn.epochs=1", "baseline=false"]
    run(compose([*common, f"run_dir={tmp_path / 'a'}"]))
    (entry,) = (tmp_path / "cache" / "teachers").glob("*.pt")
    entry.write_bytes(entry.read_bytes()[:100])
    caplog.clear()
    run(compose([*common, f"run_dir={tmp_path / 'b'}"]))
    assert runs_teacher(caplog)
    assert any("damaged" in r.getMessage() or "differs" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert json.loads(entry.with_suffix(".json").read_text())["size"] == entry.stat().st_size  # stored again
