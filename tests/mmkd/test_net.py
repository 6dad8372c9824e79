"""Net and Teacher (mmkd.net): features by module path, early errors, deep copies, and frozen and
co-trained teachers."""
import copy

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term
from mmkd.routers import ConstantRouter

B, C = 5, 4


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
        self.head = nn.Linear(5 + 2, C)

    def forward(self, a, b):
        return self.head(torch.cat([self.block(a), b], 1))


def two_input_batch():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(B, 3, generator=g), "b": torch.randn(B, 2, generator=g), "label": torch.zeros(B)}


def test_net_features_by_module_path():
    torch.manual_seed(0)
    m = Model()
    net = Net(m, keys=("a", "b"), features=("block.0", "block", "head"))
    batch = two_input_batch()
    out = net(batch)
    pre = batch["a"] @ m.block[0].weight.T + m.block[0].bias
    logits = torch.cat([pre.relu(), batch["b"]], 1) @ m.head.weight.T + m.head.bias
    assert list(out.features) == ["block.0", "block", "head"]
    torch.testing.assert_close(out.features["block.0"], pre)
    torch.testing.assert_close(out.features["block"], pre.relu())
    torch.testing.assert_close(out.features["head"], logits)
    torch.testing.assert_close(out.logits, logits)
    assert (pre < 0).any()  # so block.0 and block really differ
    assert not m._forward_hooks and not m.block[0]._forward_hooks  # hooks removed after the call


def test_net_errors_early():
    with pytest.raises(AttributeError):
        Net(Model(), keys=("a", "b"), features=("block.7",))
    with pytest.raises(AttributeError):
        Net(Model(), keys=("a", "b"), features=("body",))
    net = Net(Model(), keys=("a", "missing"))
    with pytest.raises(KeyError, match="missing.*a, b, label"):
        net(two_input_batch())


def test_deepcopy_of_net_records_its_own_features():
    torch.manual_seed(0)
    net = Net(Model(), keys=("a", "b"), features=("block",))
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.model.block[0].weight.mul_(-1.0)
    batch = two_input_batch()
    mine, theirs = net(batch), twin(batch)
    torch.testing.assert_close(mine.features["block"], net.model.block(batch["a"]))
    torch.testing.assert_close(theirs.features["block"], twin.model.block(batch["a"]))
    assert not torch.equal(mine.features["block"], theirs.features["block"])


def test_frozen_teacher_stays_frozen():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Linear(8, C))
    teacher = Teacher(m, keys=("a",))
    teacher.train()
    assert not any(mod.training for mod in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(B, 3, requires_grad=True)
    out1, out2 = teacher({"a": x}), teacher({"a": x})
    assert not out1.logits.requires_grad
    assert torch.equal(out1.logits, out2.logits)  # dropout off, BN uses running stats
    assert torch.equal(m[2].running_mean, torch.zeros(8))  # running stats not updated

    # inside a Distiller being trained, the student trains and the frozen teacher does not
    student = Net(nn.Sequential(nn.Linear(3, C), nn.Dropout(0.1)), keys=("a",))
    d = Distiller(student, [teacher], [Term("kd")], router=ConstantRouter())
    d.train()
    assert student.training and student.model[1].training
    assert not any(mod.training for mod in teacher.modules())


def test_cotrained_teacher_trains_and_gets_gradient():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, C), nn.Dropout(0.5))
    teacher = Teacher(m, keys=("a",), frozen=False)
    teacher.train()
    assert m[1].training and all(p.requires_grad for p in teacher.parameters())
    teacher({"a": torch.randn(B, 3)}).logits.sum().backward()
    assert m[0].weight.grad is not None and m[0].weight.grad.abs().sum() > 0
