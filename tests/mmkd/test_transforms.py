"""Batch transforms (mmkd.transforms): mixup's copies against the formula with the same random
draws, the Distiller applying transforms in training only, and the cached-teacher guard."""
import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, cache_teacher
from mmkd.routers import ConstantRouter
from mmkd.transforms import BatchTransform, Mixup


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, generator=g), "label": torch.randint(0, 3, (n,), generator=g),
            "index": torch.arange(n)}


def test_mixup_appends_mixed_copies_by_the_formula():
    b = batch()
    torch.manual_seed(5)
    out = Mixup(alpha=0.4)(b, None, [])
    torch.manual_seed(5)  # the same draws, in the same order: lam, then the permutation
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(6)
    assert torch.equal(out["x"][:6], b["x"]) and torch.equal(out["label"][:6], b["label"])
    assert torch.allclose(out["x"][6:], lam * b["x"] + (1 - lam) * b["x"][perm])
    assert out["label"][6:].tolist() == [-1] * 6  # label terms see only the originals
    assert torch.equal(out["index"], torch.cat([b["index"], b["index"]]))  # not mixed: an integer entry


def test_mixup_refuses_what_it_cannot_mix():
    with pytest.raises(KeyError, match="mixup.keys: the batch has no image; it has: x, label, index"):
        Mixup(keys=["image"])(batch(), None, [])
    with pytest.raises(ValueError, match="independent instances"):
        Mixup()({**batch(), "edge_index": torch.zeros(2, 1, dtype=torch.long)}, None, [])


class Double(BatchTransform):
    def forward(self, batch, student, teachers):
        assert isinstance(student, Net) and len(teachers) == 1
        return {**batch, "x": 2 * batch["x"]}


def kd(transforms, teachers=None):
    torch.manual_seed(0)
    teacher = Teacher(nn.Linear(4, 3), ("x",))
    return Distiller(Net(nn.Linear(4, 3), ("x",)), teachers or [teacher], [Term("ce"), Term("kd")],
                     ConstantRouter(), transforms=transforms)


def test_transforms_change_training_batches_not_predictions():
    plain, doubled = kd([]), kd([Double()])
    b = batch()
    assert torch.equal(doubled.predict(b), plain.predict(b))
    assert torch.equal(doubled(b)["loss"], plain({**b, "x": 2 * b["x"]})["loss"])
    assert not torch.equal(doubled(b)["loss"], plain(b)["loss"])


def test_a_transform_that_moves_inputs_refuses_a_cached_teacher(tmp_path):
    ds = TensorDictDataset("d", **{k: v for k, v in batch().items() if k != "index"})
    cached = cache_teacher(Teacher(nn.Linear(4, 3), ("x",)), ds, tmp_path)
    kd([Double()], [cached])  # keeps_inputs (the default): allowed
    with pytest.raises(ValueError, match=r"the batch transforms \['Mixup'\] change the teachers' inputs"):
        kd([Mixup()], [cached])
