"""Tests for the teacher-output cache: exact reuse of stored outputs, invalidation on any change to
the teacher or the data, refusals, and that training with a cached teacher runs no teacher forward."""
import pytest
import torch
from torch import nn

import mmkd.cache
import mmkd.io
from mmkd import CachedTeacher, Distiller, Net, Teacher, TensorDictDataset, Term, Trainer, cache_teacher
from mmkd.data import EpochSampler, loader
from mmkd.routers import ConstantRouter

D, C = 6, 4


def make_data(n=200, seed=0, name="train", deterministic=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = torch.randint(0, C, (n,), generator=g)
    return TensorDictDataset(name, deterministic=deterministic, x=x, label=y)


def make_teacher(seed=0, frozen=True):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))
    return Teacher(model, keys=("x",), features=("1",), frozen=frozen)


class Counter:
    """Counts forward calls of a module (and the instances they saw)."""

    def __init__(self, module):
        self.calls, self.items = 0, 0
        module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.calls += 1
        self.items += len(args[0])


def shuffled_batches(ds, batch_size=32, seed=3):
    return list(loader(ds, batch_size, EpochSampler(len(ds), seed)))


def test_cached_outputs_equal_live_outputs_per_index(tmp_path):
    ds, teacher = make_data(), make_teacher()
    cached = cache_teacher(teacher, ds, tmp_path, batch_size=64)
    assert isinstance(cached, CachedTeacher) and cached.path.parent == tmp_path and cached.path.exists()
    assert cached.logits.shape == (len(ds), C) and cached.features["1"].shape == (len(ds), 16)
    batches = shuffled_batches(ds)
    assert not torch.equal(batches[0]["index"], torch.arange(32))  # really shuffled
    for batch in batches:
        live, stored = teacher(batch), cached(batch)
        torch.testing.assert_close(stored.logits, live.logits, rtol=0, atol=0)
        torch.testing.assert_close(stored.features["1"], live.features["1"], rtol=0, atol=0)
    # and against a per-instance computation by hand
    with torch.no_grad():
        h = torch.tanh(teacher.model[0](ds.tensors["x"][5]))
        torch.testing.assert_close(cached.logits[5], teacher.model[2](h), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cached.features["1"][5], h, rtol=1e-6, atol=1e-6)


def test_second_call_reuses_the_file_without_teacher_forward(tmp_path, monkeypatch):
    ds, teacher = make_data(), make_teacher()
    counter = Counter(teacher.model)
    first = cache_teacher(teacher, ds, tmp_path, batch_size=64)
    assert counter.calls == 4 and counter.items == len(ds)  # 200 / 64 -> 4 batches, each item once
    mtime = first.path.stat().st_mtime_ns

    saves = []
    monkeypatch.setattr(mmkd.io, "save", lambda *a, **k: saves.append(a))
    loads = []
    real_load = torch.load
    monkeypatch.setattr(mmkd.cache.torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    second = cache_teacher(teacher, ds, tmp_path, batch_size=64)
    assert counter.calls == 4  # no teacher forward
    assert saves == [] and loads == [first.path]
    assert second.path == first.path and second.path.stat().st_mtime_ns == mtime
    assert torch.equal(second.logits, first.logits)
    assert torch.equal(second.features["1"], first.features["1"])
    # the entry and its checksum index, no temporaries
    assert sorted(tmp_path.iterdir()) == sorted([first.path, mmkd.io.index_path(first.path)])


def test_hits_and_misses_are_logged(tmp_path, caplog):
    ds, teacher = make_data(), make_teacher()
    with caplog.at_level("INFO", logger="mmkd"):
        first = cache_teacher(teacher, ds, tmp_path)
        cache_teacher(teacher, ds, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "teacher cache" in r.getMessage()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("teacher cache miss: computing ") and str(first.path) in lines[0]
    assert lines[1] == f"teacher cache hit: {first.path} ({len(ds)} items of {ds.name})"


def test_changing_one_teacher_weight_invalidates(tmp_path):
    ds, teacher = make_data(), make_teacher()
    counter = Counter(teacher.model)
    old = cache_teacher(teacher, ds, tmp_path)
    calls = counter.calls
    with torch.no_grad():
        teacher.model[2].bias[1] += 0.5
    new = cache_teacher(teacher, ds, tmp_path)
    assert new.path != old.path and new.path.exists() and old.path.exists()
    assert counter.calls > calls  # recomputed
    # new values: class 1 logit moved by exactly the bias change, the rest (and the features) did not
    torch.testing.assert_close(new.logits[:, 1], old.logits[:, 1] + 0.5)
    assert torch.equal(new.logits[:, [0, 2, 3]], old.logits[:, [0, 2, 3]])
    assert torch.equal(new.features["1"], old.features["1"])
    full = loader(ds, len(ds))
    assert torch.equal(new.logits, teacher(next(iter(full))).logits)


def test_teacher_feature_paths_and_keys_are_part_of_the_key(tmp_path):
    ds, teacher = make_data(), make_teacher()
    a = cache_teacher(teacher, ds, tmp_path)
    other = Teacher(teacher.model, keys=("x",), features=("0",))
    b = cache_teacher(other, ds, tmp_path)
    assert b.path != a.path and set(b.features) == {"0"}


def test_architecture_change_without_new_parameters_changes_the_key(tmp_path):
    ds, teacher = make_data(), make_teacher()
    a = cache_teacher(teacher, ds, tmp_path)
    relu = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))  # same state_dict keys and shapes
    relu.load_state_dict(teacher.model.state_dict())
    other = Teacher(relu, keys=("x",), features=("1",))
    b = cache_teacher(other, ds, tmp_path)
    assert b.path != a.path
    live = other(next(iter(loader(ds, len(ds)))))
    assert torch.equal(b.logits, live.logits) and not torch.equal(b.logits, a.logits)


def test_changing_the_data_changes_the_key(tmp_path):
    ds, teacher = make_data(), make_teacher()
    counter = Counter(teacher.model)
    a = cache_teacher(teacher, ds, tmp_path)
    x = ds.tensors["x"].clone()
    x[17, 2] += 1.0
    ds2 = TensorDictDataset(ds.name, x=x, label=ds.tensors["label"])
    calls = counter.calls
    b = cache_teacher(teacher, ds2, tmp_path)
    assert ds2.fingerprint != ds.fingerprint and b.path != a.path
    assert counter.calls > calls
    changed = (b.logits != a.logits).any(1)
    assert changed.nonzero().flatten().tolist() == [17]  # only the changed instance differs
    # identical contents under the same name share the key
    ds3 = TensorDictDataset(ds.name, x=ds.tensors["x"].clone(), label=ds.tensors["label"].clone())
    assert cache_teacher(teacher, ds3, tmp_path).path == a.path


def test_refuses_unfrozen_teacher_and_nondeterministic_data(tmp_path):
    with pytest.raises(ValueError, match="frozen"):
        cache_teacher(make_teacher(frozen=False), make_data(), tmp_path)
    with pytest.raises(ValueError, match="deterministic"):
        cache_teacher(make_teacher(), make_data(deterministic=False), tmp_path)
    plain = torch.utils.data.TensorDataset(torch.randn(4, D))
    with pytest.raises(ValueError, match="deterministic"):
        cache_teacher(make_teacher(), plain, tmp_path)
    assert not any(tmp_path.iterdir())


def make_distiller(teacher):
    torch.manual_seed(1)
    student = Net(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C)), keys=("x",))
    return Distiller(student, [teacher], [Term("ce"), Term("kd", 2.0, {"temperature": 2.0}), Term("dist", 0.5)],
                     router=ConstantRouter())


def test_distiller_loss_identical_with_cached_teacher(tmp_path):
    ds, teacher = make_data(), make_teacher()
    cached = cache_teacher(teacher, ds, tmp_path)
    live_d, cached_d = make_distiller(teacher), make_distiller(cached)
    live_d.student.load_state_dict(cached_d.student.state_dict())
    for batch in shuffled_batches(ds, 50, seed=9):
        a, b = live_d(batch), cached_d(batch)
        assert a.keys() == b.keys() == {"ce", "kd", "dist", "loss"}
        for k in a:
            assert torch.equal(a[k], b[k]), k
        assert a["kd"] > 0


def test_training_epoch_with_cached_teacher_runs_no_teacher_forward(tmp_path):
    ds, val, teacher = make_data(), make_data(60, 1, "val"), make_teacher()
    cached = cache_teacher(teacher, ds, tmp_path / "cache")
    counter = Counter(teacher.model)
    module = make_distiller(cached)
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0]["index"]))
    res = Trainer(run_dir=tmp_path / "run", max_epochs=2, batch_size=32, tensorboard=False,
                  progress="off", device="cpu").fit(module, ds, val)
    assert counter.calls == 0
    assert sorted(torch.cat(seen).tolist()) == sorted(list(range(len(ds))) * 2)  # it did train
    assert len(res.history) == 2

    # the same training with the live teacher does run it, once per instance per epoch
    live = make_distiller(teacher)
    Trainer(run_dir=tmp_path / "run2", max_epochs=2, batch_size=32, tensorboard=False,
            progress="off", device="cpu").fit(live, ds, val)
    assert counter.items == 2 * len(ds)
