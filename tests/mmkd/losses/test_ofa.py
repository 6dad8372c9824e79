"""OFA-KD (mmkd.losses.heads.ofa): the OFA loss against a naive loop, its eps = 1 form (KD at T = 1 plus the
teacher's entropy), gradients, the stage branches (their shapes and official structure), a learned
term training with the student, and the shipped cifar10_ofa config on real CIFAR-10."""
import csv
import math
import os

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses import kd, ofa, ofa_branches
from mmkd.losses.heads.ofa import OFABranches, PatchMerging, SepConv
from mmkd.routers import ConstantRouter
from tests.reference import TINY_CIFAR10

F64 = torch.float64


def make(b=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=F64) * 2, torch.randn(b, c, generator=g, dtype=F64) * 2,
            torch.randint(0, c, (b,), generator=g))


def softmax(z, T):
    e = [math.exp(v / T) for v in z]
    return [v / sum(e) for v in e]


def ref_ofa(S, T_, Y, eps, temp):
    """Per instance: - sum_c w_c log p^s_c with w_y = (1 + p^t_y)^eps - 1, w_c = (p^t_c)^eps elsewhere."""
    out = []
    for s, t, y in zip(S.tolist(), T_.tolist(), Y.tolist()):
        ps, pt = softmax(s, temp), softmax(t, temp)
        out.append(-sum(((1 + pt[c]) ** eps - 1 if c == y else pt[c] ** eps) * math.log(ps[c]) for c in range(len(s))))
    return torch.tensor(out, dtype=F64)


@pytest.mark.parametrize("seed,eps,temp", [(0, 1.0, 1.0), (1, 1.5, 1.0), (2, 2.3, 1.0), (3, 1.5, 3.0), (4, 0.7, 2.0)])
def test_matches_the_naive_reference(seed, eps, temp):
    s, t, y = make(seed=seed)
    ref = ref_ofa(s, t, y, eps, temp)
    torch.testing.assert_close(ofa(s, t, y, eps=eps, temperature=temp, reduction="none"), ref)
    torch.testing.assert_close(ofa(s, t, y, eps=eps, temperature=temp), ref.mean())
    torch.testing.assert_close(ofa(s, t, y, eps=eps, temperature=temp, reduction="sum"), ref.sum())


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_at_eps_1_it_is_kd_plus_the_teachers_entropy(temp):
    """eps = 1: -sum_c p^t_c log p^s_c = KL(p^t || p^s) + H(p^t), the label plays no part; KD carries T^2."""
    s, t, y = make(seed=7)
    p_t = torch.softmax(t / temp, 1)
    entropy = -(p_t * p_t.log()).sum(1)
    got = ofa(s, t, y, eps=1.0, temperature=temp, reduction="none")
    torch.testing.assert_close(got, kd(s, t, temperature=temp, reduction="none") / temp**2 + entropy)
    torch.testing.assert_close(got, ofa(s, t, (y + 1) % 5, eps=1.0, temperature=temp, reduction="none"))
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ofa(a, t, y).backward()
    kd(b, t, temperature=1.0).backward()
    torch.testing.assert_close(a.grad, b.grad)  # the same gradient as KD at T = 1


def test_eps_above_1_weighs_the_target_class_more_for_a_confident_teacher():
    """With a one-hot student on the target, only the non-target weights (p^t_c)^eps remain: they shrink
    with eps; moving the student's mass off the target costs (1 + p^t_y)^eps - 1, which grows with eps."""
    t = torch.tensor([[4.0, 0.0, 0.0]], dtype=F64)
    y = torch.tensor([0])
    off = torch.tensor([[0.0, 3.0, 0.0]], dtype=F64)  # a student that prefers a wrong class
    gap = [float(ofa(off, t, y, eps=e) - ofa(t, t, y, eps=e)) for e in (1.0, 1.5, 2.0)]
    assert gap[0] < gap[1] < gap[2]


def test_unlabelled_rows_are_left_out_and_labels_are_required():
    s, t, y = make()
    y2 = y.clone()
    y2[0] = -1
    per = ofa(s, t, y2, eps=1.5, reduction="none")
    assert per[0] == 0 and float(ofa(s, t, y2, eps=1.5)) == pytest.approx(float(per[1:].mean()))
    torch.testing.assert_close(per[1:], ofa(s[1:], t[1:], y[1:], eps=1.5, reduction="none"))
    with pytest.raises(ValueError, match="labels"):
        ofa(s, t, None)


def test_gradcheck_float64():
    s, t, y = make()
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: ofa(a, t, y, eps=1.5, temperature=2.0), (s,))
    torch.manual_seed(0)
    m = OFABranches([(4,), (3, 6)], num_classes=5, dim=8, heads=2).double()
    f1 = torch.randn(6, 4, dtype=F64, requires_grad=True)
    f2 = torch.randn(6, 3, 6, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ofa_branches([a, b], t, y, module=m, eps=1.5), (f1, f2))


# ---------------------------------------------------------------- the branches
def count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


def test_map_branches_follow_the_official_stages():
    """Four CNN stages (ResNet-18's at 1/4 scale): 3, 2, 1 separable convolutions, then a 1x1 convolution
    for the last; each ends at dim channels on the last stage's 4x4 grid, then the classifier."""
    shapes = [(8, 32, 32), (16, 16, 16), (32, 8, 8), (64, 4, 4)]
    m = OFABranches(shapes, num_classes=7, dim=96)
    assert [count(b, SepConv) for b in m.branches] == [3, 2, 1, 0]
    assert isinstance(m.branches[3][0], nn.Conv2d) and m.branches[3][0].kernel_size == (1, 1)
    feats = [torch.randn(2, *s) for s in shapes]
    for b, f in zip(m.branches, feats):
        assert b[:-3](f).shape == (2, 96, 4, 4)
    assert [tuple(z.shape) for z in m(feats)] == [(2, 7)] * 4
    sep = m.branches[0][0].op  # channels double, the last block to dim
    assert [m.branches[0][k].op[5].out_channels for k in range(3)] == [16, 32, 96] and sep[0].stride == (2, 2)


def test_token_branches_merge_to_the_grid_and_stack_blocks():
    """1 class token + a 16x16 grid: int(log2(16 / 7)) = 1 merge, to 8x8 (the official rule, final grid 7),
    then max(n - 1 - i, 1) transformer blocks."""
    shapes = [(257, 32)] * 4
    m = OFABranches(shapes, num_classes=10, dim=48, heads=4)
    b = m.branches[0]
    assert b.tokens == 1 and count(b, PatchMerging) == 1
    assert [count(x, nn.TransformerEncoderLayer) for x in m.branches] == [3, 2, 1, 1]
    x = torch.randn(3, 257, 32)
    assert b.merge(x[:, 1:]).shape == (3, 64, 48) and b.lift(x[:, :1]).shape == (3, 1, 48)
    assert [tuple(z.shape) for z in m([x] * 4)] == [(3, 10)] * 4
    vit = OFABranches([(65, 24), (65, 24)], num_classes=3, heads=4)  # a 32x32 ViT with patch 4: 8x8, no merge
    assert count(vit, PatchMerging) == 0 and vit.branches[0].tokens == 1
    assert isinstance(vit.branches[0].lift, nn.Identity)
    assert vit.branches[0].fc.in_features == 24  # dim defaults to the widest stage
    wide = OFABranches([(65, 24)], num_classes=3, dim=32)  # nothing merges: one linear map of every token to dim
    assert wide.branches[0].merge is None and wide.branches[0].lift.weight.shape == (32, 24)
    assert wide([torch.randn(2, 65, 24)])[0].shape == (2, 3)
    plain = OFABranches([(196, 16)], num_classes=3, dim=16)  # no class token: 14x14 merge once, mean token
    assert plain.branches[0].tokens == 0 and count(plain, PatchMerging) == 1
    assert plain([torch.randn(2, 196, 16)])[0].shape == (2, 3)


def test_patch_merging_concatenates_each_2x2_neighbourhood():
    pm = PatchMerging(grid=4, dim=1, out=4, act=False)
    pm.norm, pm.reduction = nn.Identity(), nn.Identity()
    x = torch.arange(16.0).view(1, 16, 1)  # the token at (row r, column c) holds 4 r + c
    got = pm(x)
    assert got.shape == (1, 4, 4)
    assert got[0, 0].tolist() == [0.0, 4.0, 1.0, 5.0] and got[0, 3].tolist() == [10.0, 14.0, 11.0, 15.0]


def test_vector_branches_and_bad_stages():
    m = OFABranches([(20,), (12,), (12,)], num_classes=4)
    assert [count(b, nn.Linear) for b in m.branches] == [3, 2, 2]  # max(n - 1 - i, 1) layers + the classifier
    assert m.branches[0][0].in_features == 20 and m.branches[0][-1].in_features == 20
    assert [z.shape for z in m([torch.randn(2, 20), torch.randn(2, 12), torch.randn(2, 12)])] == [(2, 4)] * 3
    with pytest.raises(ValueError, match=r"stage 0 has shape \(2, 3, 4, 5\)"):
        OFABranches([(2, 3, 4, 5)], num_classes=4)
    with pytest.raises(ValueError, match="heads=4"):
        OFABranches([(65, 30)], num_classes=4)
    with pytest.raises(ValueError, match="args.tokens"):
        OFABranches([(300, 8)], num_classes=4, dim=8, tokens=0)  # 300 tokens are no square grid
    with pytest.raises(ValueError, match="2 features for 3 branches"):
        m([torch.randn(2, 20), torch.randn(2, 12)])
    s, t, y = make()
    with pytest.raises(ValueError, match="Term\\('ofa_branches'"):
        ofa_branches([s], t, y)


def test_branches_loss_is_the_sum_of_ofa_over_the_branches():
    torch.manual_seed(0)
    m = OFABranches([(4, 8, 8), (6,)], num_classes=5, dim=8)
    _, t, y = make()
    feats = [torch.randn(6, 4, 8, 8), torch.randn(6, 6)]
    z = m(feats)
    expect = ofa(z[0], t.float(), y, eps=1.5, reduction="none") + ofa(z[1], t.float(), y, eps=1.5, reduction="none")
    torch.testing.assert_close(ofa_branches(feats, t.float(), y, module=m, eps=1.5, reduction="none"), expect)
    one = OFABranches((6,), num_classes=5)  # a single features.<path> stage
    torch.testing.assert_close(ofa_branches(feats[1], t.float(), y, module=one),
                               ofa(one([feats[1]])[0], t.float(), y))


# ---------------------------------------------------------------- in training
class Tiny(nn.Module):
    """A conv stage and a hidden vector, then a classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.hidden = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 12), nn.ReLU())
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(self.hidden(self.conv(x)))


def test_the_terms_branches_are_made_from_the_shapes_and_train_with_the_student(tmp_path):
    term = Term("ofa_branches", args={"dim": 16, "eps": 1.5}, student="features",
                sizes={"student_shape": [(4, 8, 8), (12,)], "num_classes": 3})
    assert term.args == {"eps": 1.5} and [b[-1].in_features for b in term.module.branches] == [16, 16]
    g = torch.Generator().manual_seed(0)
    data = TensorDictDataset("c", x=torch.randn(24, 1, 8, 8, generator=g),
                             label=torch.randint(0, 3, (24,), generator=g))
    torch.manual_seed(0)
    distiller = Distiller(Net(Tiny(), ("x",), ["conv", "hidden"]), [Teacher(Tiny(), ("x",))],
                          [Term("ce"), Term("ofa", args={"eps": 1.5}), term], ConstantRouter())
    before = {k: v.clone() for k, v in term.module.state_dict().items()}
    res = Trainer(run_dir=tmp_path, max_epochs=2, batch_size=8, lr=1e-2, keep="last", tensorboard=False,
                  progress="off").fit(distiller, data, data)
    assert all(math.isfinite(h["train/ofa_branches"]) and math.isfinite(h["train/ofa"]) for h in res.history)
    changed = [k for k, v in term.module.state_dict().items()
               if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert "branches.1.2.weight" in changed and "branches.0.0.op.0.weight" in changed
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert torch.equal(saved["loss_modules.ofa_branches.branches.1.2.weight"],
                       term.module.branches[1][2].weight.detach())


@pytest.mark.slow
def test_the_shipped_config_trains_one_step_on_real_cifar10(run_experiment):
    if "MMKD_DATA" not in os.environ:
        pytest.skip("set MMKD_DATA to the data root (for example ../shared/data)")
    from omegaconf import OmegaConf

    run_dir, results = run_experiment("cifar10_ofa", *TINY_CIFAR10, "trainer.warmup_epochs=0")
    cfg = OmegaConf.load(run_dir / "config.yaml")  # the shipped settings, beside the overrides above
    assert cfg.student.name == "vit_tiny" and list(cfg.student.features) == ["blocks.1", "blocks.3", "blocks.5"]
    trainer = cfg.trainer
    assert (trainer.optimizer, trainer.lr, trainer.weight_decay, trainer.grad_clip) == ("adamw", 5e-4, 0.05, 5.0)
    assert cfg.teachers.resnet.trainer.optimizer == "sgd" and cfg.losses.ofa_branches.student == "features"
    assert cfg.losses.ofa.args.eps == cfg.losses.ofa_branches.args.eps == 1.0
    assert 0.0 <= results["student"]["test_acc"] <= 1.0
    with open(run_dir / "student" / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    parts = [float(row[f"train/{k}"]) for k in ("ce", "ofa", "ofa_branches")]
    assert all(math.isfinite(v) and v > 0 for v in parts)
    assert float(row["train/loss"]) == pytest.approx(sum(parts), rel=1e-5)
