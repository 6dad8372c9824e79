"""In-memory data sets, stratified splits and the digits data set."""
from __future__ import annotations

import pytest
import torch

from mmkd.data import EpochSampler, TensorDictDataset, digits, loader, stratified_split


def test_stratified_split_keeps_class_balance_and_partitions():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    parts = stratified_split(labels, [0.6, 0.2, 0.2], seed=3)
    allidx = torch.cat(parts).sort().values
    assert torch.equal(allidx, torch.arange(100))  # a partition: no overlap, nothing lost
    for part, frac in zip(parts, [0.6, 0.2, 0.2]):
        counts = torch.bincount(labels[part], minlength=3)
        assert counts.tolist() == [round(50 * frac), round(30 * frac), round(20 * frac)]
    assert all(torch.equal(a, b) for a, b in zip(parts, stratified_split(labels, [0.6, 0.2, 0.2], seed=3)))
    assert not torch.equal(parts[1], stratified_split(labels, [0.6, 0.2, 0.2], seed=4)[1])


def test_digits_is_the_real_data_set_with_a_fixed_split():
    d = digits()
    assert (len(d.train), len(d.val), len(d.test)) == (1078, 360, 359)
    assert d.num_classes == 10 and d.shapes == {"image": (1, 8, 8)}
    item = d.train[0]
    assert item["image"].shape == (1, 8, 8) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert d.train.fingerprint == digits().train.fingerprint != d.val.fingerprint


def test_batches_are_gathered_with_their_indices():
    ds = TensorDictDataset("t", x=torch.arange(10).float().view(10, 1), label=torch.arange(10))
    sampler = EpochSampler(10, seed=0)
    batches = list(loader(ds, 4, sampler))
    assert [len(b["index"]) for b in batches] == [4, 4, 2]
    for b in batches:
        assert torch.equal(b["label"], b["index"]) and torch.equal(b["x"][:, 0].long(), b["index"])
    order0 = torch.cat([b["index"] for b in batches])
    sampler.set_epoch(1)
    order1 = torch.cat([b["index"] for b in loader(ds, 4, sampler)])
    assert sorted(order0.tolist()) == list(range(10)) and not torch.equal(order0, order1)


def test_fingerprint_follows_contents():
    a = TensorDictDataset("t", x=torch.zeros(3, 2))
    b = TensorDictDataset("t", x=torch.zeros(3, 2))
    c = TensorDictDataset("t", x=torch.tensor([[0.0, 0], [0, 1], [0, 0]]))
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert TensorDictDataset("u", x=torch.zeros(3, 2)).fingerprint != a.fingerprint


def test_tensors_of_different_length_are_refused():
    with pytest.raises(ValueError, match="differ in length"):
        TensorDictDataset("t", x=torch.zeros(3), y=torch.zeros(4))
