"""MaskNets (per-channel masks by self-attention over channel tokens), their hooks, and specialised teachers."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmkd import Teacher, cache_teacher
from mmkd.cache import teacher_hash
from mmkd.data import TensorDictDataset
from mmkd.models import CNN, MLP
from mmkd.methods.mst_distill import MaskedModel, MaskNet, specialized_teachers

B = 5


def naive_mask(net: MaskNet, z: torch.Tensor) -> torch.Tensor:
    """The mask from a pooled ``[B, C]`` input, with attention written out head by head."""
    attn, d = net.attn, net.lift_weight.shape[1]
    heads, dh = attn.num_heads, d // attn.num_heads
    e = z.unsqueeze(-1) * net.lift_weight + net.lift_bias  # [B, C, d]
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q, k, v = e @ wq.T + bq, e @ wk.T + bk, e @ wv.T + bv
    out = []
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        a = (q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(dh)).softmax(-1)
        out.append(a @ v[..., sl])
    mixed = torch.cat(out, -1) @ attn.out_proj.weight.T + attn.out_proj.bias
    return torch.sigmoid(mixed @ net.out.weight.T + net.out.bias).squeeze(-1)


def all_ones(net: MaskNet) -> MaskNet:
    with torch.no_grad():
        net.out.weight.zero_()
        net.out.bias.fill_(100.0)  # sigmoid(100) == 1.0 in float32
    return net


@pytest.mark.parametrize("shape", [(8,), (8, 6), (8, 4, 4)])
def test_mask_shape_range_and_formula(shape):
    torch.manual_seed(0)
    net = MaskNet(shape, dim=8, heads=2).eval()
    x = torch.randn(B, *shape)
    m = net(x)
    assert m.shape == (B, 8) and ((m > 0) & (m < 1)).all()
    z = x if len(shape) == 1 else net.reduce(x)
    torch.testing.assert_close(m, naive_mask(net, z), rtol=1e-5, atol=1e-6)
    y = net.masked(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y, x * m.view(B, 8, *[1] * (len(shape) - 1)))
    assert m.std(1).min() > 1e-4  # channels get different mask values


def test_spatial_maps_are_reduced_by_conv_and_global_pooling():
    torch.manual_seed(0)
    net = MaskNet((8, 4, 4), dim=8, heads=2).eval()
    x = torch.randn(B, 8, 4, 4)
    dw, pw, bn = net.reduce[0], net.reduce[1], net.reduce[2]
    ref = torch.relu(bn(pw(nn.functional.conv2d(x, dw.weight, stride=2, padding=1, groups=8)))).mean((2, 3))
    torch.testing.assert_close(net.reduce(x), ref)


def teacher_mlp():
    torch.manual_seed(0)
    return Teacher(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), ["x"])


def test_hook_masks_the_layer_and_detaches_cleanly():
    teacher, x = teacher_mlp(), torch.randn(B, 6)
    model = teacher.model
    before = model(x)
    net = MaskNet((8,), dim=8, heads=2).eval()
    handle = net.attach(model, "1")
    with pytest.raises(RuntimeError, match="already attached"):
        net.attach(model, "1")
    with torch.no_grad():
        masked = model(x)
        h = torch.relu(model[0](x))
        torch.testing.assert_close(masked, model[2](h * net(h)))
    assert not torch.allclose(masked, before)
    net.detach()
    assert not model[1]._forward_hooks and not handle.hooks_dict_ref()
    assert torch.equal(model(x), before)  # unchanged after detaching
    all_ones(net).attach(model, "1")
    assert torch.equal(model(x), before)  # unchanged with an all-ones mask
    net.detach()


def test_wrong_feature_shape_is_a_clear_error():
    teacher = teacher_mlp()
    net = MaskNet((5,), dim=8, heads=2)
    net.attach(teacher.model, "1")
    with pytest.raises(ValueError, match=r"built for features \(5,\) got \(8,\)"):
        teacher.model(torch.randn(B, 6))
    net.detach()


def test_mask_gradient_reaches_the_masknet_only():
    teacher = teacher_mlp()
    net = MaskNet((8,), dim=8, heads=2)
    masked = Teacher(MaskedModel(teacher.model, "1", net), ["x"], frozen=False)
    masked.train()
    assert not teacher.model.training and net.training  # the backbone stays in eval mode
    masked({"x": torch.randn(B, 6)}).logits.pow(2).sum().backward()
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert {id(p) for p in masked.parameters() if p.requires_grad} == {id(p) for p in net.parameters()}


def test_specialized_teachers_share_the_backbone_and_mask_only_their_own_forward():
    torch.manual_seed(0)
    mlp = Teacher(MLP(4, (1, 4, 4), hidden=(8,)), ["image"], features=["body.2"])
    cnn = Teacher(CNN(4, (1, 4, 4), channels=(4, 6)), ["image"])
    batch = {"image": torch.rand(B, 1, 4, 4)}
    plain = [mlp(batch).logits, cnn(batch).logits]
    special = specialized_teachers([mlp, cnn], [["body.2"], ["features.2", "pool"]], batch, dim=8, heads=2)
    assert len(special) == 3 and all(isinstance(t, Teacher) and not t.frozen for t in special)
    assert special[0].model.model is mlp.model and special[1].model.model is special[2].model.model is cnn.model
    assert [t.model.masknet.shape for t in special] == [(8,), (4, 4, 4), (6,)]
    for t in special:
        t.eval()
    outs = [t(batch) for t in special]
    for t, out in zip(special, outs):  # each equals its own backbone with its own mask hooked in by hand
        t.model.masknet.attach(t.model.model, t.model.path)
        torch.testing.assert_close(out.logits, t.model.model(batch["image"]))
        t.model.masknet.detach()
    assert not torch.allclose(outs[1].logits, outs[2].logits)
    hooks = [m._forward_hooks for backbone in (mlp.model, cnn.model) for m in backbone.modules()]
    assert not any(hooks)  # no mask stays attached after a forward
    assert torch.equal(mlp(batch).logits, plain[0]) and torch.equal(cnn(batch).logits, plain[1])
    # the feature at the masked layer is the masked one (the mask hook runs first)
    torch.testing.assert_close(outs[0].features["body.2"], special[0].model.masknet.masked(mlp(batch).features["body.2"]))


def test_frozen_specialized_teachers_cache_apart(tmp_path):
    torch.manual_seed(0)
    base = Teacher(MLP(3, (4,), hidden=(8,)), ["x"])
    data = TensorDictDataset("toy", x=torch.randn(10, 4), label=torch.zeros(10, dtype=torch.long))
    batch = data.__getitems__(range(4))
    a, b = (Teacher(t.model, t.keys, frozen=True) for t in specialized_teachers([base], [["body.1", "body.1"]], batch))
    assert teacher_hash(a) != teacher_hash(b)
    ca, cb = cache_teacher(a, data, tmp_path), cache_teacher(b, data, tmp_path)
    assert ca.path != cb.path
    full = data.__getitems__(range(10))
    torch.testing.assert_close(ca(full).logits, a(full).logits)
    torch.testing.assert_close(cb(full).logits, b(full).logits)
    assert not torch.allclose(ca(full).logits, cb(full).logits)
    assert not any(p.requires_grad for p in a.parameters())


def test_specialized_teachers_errors():
    teacher, batch = teacher_mlp(), {"x": torch.randn(2, 6)}
    with pytest.raises(ValueError, match="1 teachers but 2 lists"):
        specialized_teachers([teacher], [["1"], ["1"]], batch)
    with pytest.raises(AttributeError):
        specialized_teachers([teacher], [["nope"]], batch)
    with pytest.raises(ValueError, match="expected"):
        MaskNet((2, 3, 4, 5))
