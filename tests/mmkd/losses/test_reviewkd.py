"""ReviewKD (mmkd.losses.features.reviewkd): HCL against a naive loop, the ABF fusion against a
hand-written reference, its zero, gradients, the fusion training with the student (and resuming
exactly), the warm-up of the shipped config, and that config training one step on real CIFAR-10."""
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses.features.reviewkd import ReviewFusion, hcl, reviewkd
from mmkd.routers import ConstantRouter
from mmkd.schedules import Schedule
from tests.reference import TINY_CIFAR10, Crash, CrashAtEpoch

F64 = torch.float64
DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- HCL
def ref_hcl(S, T):
    """Per instance, python loops: for each stage the full-size mean squared error plus the block
    means at 4x4, 2x2, 1x1 (those smaller than the map) weighted 1/2, 1/4, 1/8 in turn, over the
    sum of the weights used."""
    out = []
    for b in range(len(S[0])):
        total = 0.0
        for s, t in zip(S, T):
            s, t = s[b].tolist(), t[b].tolist()
            c, h, w = len(s), len(s[0]), len(s[0][0])
            terms = [(1.0, [[[s[i][y][x] - t[i][y][x] for x in range(w)] for y in range(h)] for i in range(c)])]
            weight = 1.0
            for k in (4, 2, 1):
                if k >= h:
                    continue
                weight /= 2
                bh, bw = h // k, w // k
                diff = [[[sum(s[i][y][x] - t[i][y][x] for y in range(p * bh, (p + 1) * bh)
                              for x in range(q * bw, (q + 1) * bw)) / (bh * bw) for q in range(k)]
                         for p in range(k)] for i in range(c)]
                terms.append((weight, diff))
            value = sum(wt * sum(v * v for ch in d for row in ch for v in row) / (len(d) * len(d[0]) * len(d[0][0]))
                        for wt, d in terms)
            total += value / sum(wt for wt, _ in terms)
        out.append(total)
    return torch.tensor(out, dtype=F64)


def stages(seed=0, b=3):
    sizes = [(2, 8, 8), (3, 4, 4), (2, 2, 2), (4, 1, 1)]
    return [rand(b, *sz, seed=seed + i) for i, sz in enumerate(sizes)]


@pytest.mark.parametrize("seed", [0, 1])
def test_hcl_matches_the_naive_loop(seed):
    s, t = stages(seed), stages(seed + 10)
    ref = ref_hcl(s, t)
    torch.testing.assert_close(hcl(s, t, reduction="none"), ref)
    torch.testing.assert_close(hcl(s, t), ref.mean())
    # the 8x8 stage alone: (mse + mse4 / 2 + mse2 / 4 + mse1 / 8) / 1.875, by the same loop
    torch.testing.assert_close(hcl(s[:1], t[:1], reduction="sum"), ref_hcl(s[:1], t[:1]).sum())


def test_hcl_is_zero_only_on_equal_maps_and_refuses_mismatches():
    t = stages()
    assert torch.equal(hcl(t, [x.clone() for x in t], reduction="none"), torch.zeros(3, dtype=F64))
    moved = [x.clone() for x in t]
    moved[2][1] += 0.1
    per = hcl(moved, t, reduction="none")
    assert per[1] > 0 and per[0] == 0 and per[2] == 0
    with pytest.raises(ValueError, match="stage 1"):
        hcl(t, [t[0], t[1][:, :2], t[2], t[3]])
    with pytest.raises(ValueError, match="one per stage"):
        hcl(t, t[:3])


# ---------------------------------------------------------------- ABF fusion
S_SHAPE = [(2, 4, 4), (3, 2, 2), (3,)]   # two maps, then a pooled feature
T_SHAPE = [(2, 4, 4), (4, 4, 4), (5,)]   # the middle stage larger than the student's: resized


def fusion(seed=0):
    torch.manual_seed(seed)
    m = ReviewFusion(S_SHAPE, T_SHAPE).double()
    for bn in (x for x in m.modules() if isinstance(x, nn.BatchNorm2d)):
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    return m


def student_features(b=4, seed=3):
    return [rand(b, *sz, seed=seed + i) for i, sz in enumerate(S_SHAPE)]


def ref_bn(x, bn):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)  # biased, as BatchNorm in training
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


def ref_conv1x1(x, w, bias=None):
    y = torch.einsum("oi,bihw->bohw", w[:, :, 0, 0], x)
    return y if bias is None else y + bias[None, :, None, None]


def ref_conv3x3(x, w):
    pad = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 2, x.shape[3] + 2, dtype=x.dtype)
    pad[:, :, 1:-1, 1:-1] = x
    h, wd = x.shape[2:]
    return sum(torch.einsum("oi,bihw->bohw", w[:, :, dy, dx], pad[:, :, dy:dy + h, dx:dx + wd])
               for dy in range(3) for dx in range(3))


def up(x, k):
    """Nearest upsampling by the whole factor ``k``."""
    return x.repeat_interleave(k, 2).repeat_interleave(k, 3)


def test_fusion_matches_a_hand_written_reference():
    m = fusion()
    assert [a.conv1[0].out_channels for a in m.abfs] == [3, 3, 3]  # mid = min(512, deepest student channels)
    assert [a.conv2[0].out_channels for a in m.abfs] == [2, 4, 5] and m.abfs[-1].att is None
    x = student_features()
    got = m(x)
    a0, a1, a2 = m.abfs
    # deepest: the pooled feature as a 1x1 map, no fusion
    r2 = ref_bn(ref_conv1x1(x[2][:, :, None, None], a2.conv1[0].weight), a2.conv1[1])
    o2 = ref_bn(ref_conv3x3(r2, a2.conv2[0].weight), a2.conv2[1])
    # middle: fuse with the 1x1 residual brought to 2x2, then resized to the teacher's 4x4
    c1 = ref_bn(ref_conv1x1(x[1], a1.conv1[0].weight), a1.conv1[1])
    y1 = up(r2, 2)
    z1 = torch.sigmoid(ref_conv1x1(torch.cat([c1, y1], 1), a1.att[0].weight, a1.att[0].bias))
    assert not torch.allclose(z1[:, 0] + z1[:, 1], torch.ones_like(z1[:, 0]))  # two sigmoids, not a softmax
    r1 = up(c1 * z1[:, :1] + y1 * z1[:, 1:], 2)
    o1 = ref_bn(ref_conv3x3(r1, a1.conv2[0].weight), a1.conv2[1])
    # shallowest: fuse with the (already 4x4) residual
    c0 = ref_bn(ref_conv1x1(x[0], a0.conv1[0].weight), a0.conv1[1])
    z0 = torch.sigmoid(ref_conv1x1(torch.cat([c0, r1], 1), a0.att[0].weight, a0.att[0].bias))
    o0 = ref_bn(ref_conv3x3(c0 * z0[:, :1] + r1 * z0[:, 1:], a0.conv2[0].weight), a0.conv2[1])
    for g, r, shape in zip(got, (o0, o1, o2), T_SHAPE):
        assert g.shape[1:] == (shape if len(shape) == 3 else (*shape, 1, 1))
        torch.testing.assert_close(g, r)


def test_loss_is_hcl_of_the_fused_features_and_zero_on_them():
    m = fusion()
    x = student_features()
    t = [rand(4, *sz, seed=20 + i) for i, sz in enumerate(T_SHAPE)]
    expect = ref_hcl(m(x), [t[0], t[1], t[2][:, :, None, None]])
    torch.testing.assert_close(reviewkd(x, t, module=m, reduction="none"), expect)
    fused = [o.detach() for o in m(x)]  # BatchNorm in training mode: the same output on the same batch
    same = [fused[0], fused[1], fused[2].flatten(1)]  # the teacher's pooled feature as [B, C]
    assert torch.equal(reviewkd(x, same, module=m, reduction="none"), torch.zeros(4, dtype=F64))
    same[1] = same[1] + 0.01
    assert reviewkd(x, same, module=m) > 0


def test_gradcheck_float64():
    m = fusion()
    x = [f.requires_grad_(True) for f in student_features(b=2)]
    t = [rand(2, *sz, seed=30 + i) for i, sz in enumerate(T_SHAPE)]
    assert torch.autograd.gradcheck(lambda *a: reviewkd(list(a), t, module=m), tuple(x))
    both = [f.requires_grad_(True) for f in (*stages(b=2), *stages(5, b=2))]
    assert torch.autograd.gradcheck(lambda *a: hcl(list(a[:4]), list(a[4:]), reduction="none"), tuple(both))


def test_one_line_errors_say_how_to_use_it():
    x = student_features()
    with pytest.raises(ValueError, match="Term\\('reviewkd'"):
        reviewkd(x, x)
    with pytest.raises(ValueError, match="student: features"):
        reviewkd(x[0], x[0], module=fusion())
    with pytest.raises(ValueError, match="no teacher"):
        ReviewFusion(S_SHAPE, None)
    with pytest.raises(ValueError, match="list the same stages"):
        ReviewFusion(S_SHAPE, T_SHAPE[:2])
    with pytest.raises(ValueError, match="student: features"):
        ReviewFusion((2, 4, 4), (2, 4, 4))
    with pytest.raises(ValueError, match="teacher's stages .* shallow to deep"):  # e.g. sorted by name: pool first
        ReviewFusion(S_SHAPE, [T_SHAPE[2], T_SHAPE[0], T_SHAPE[1]])


# ---------------------------------------------------------------- training with the student
class Tiny(nn.Module):
    """Two conv stages (4x4, then 2x2), the pooled feature and a classifier."""

    def __init__(self, c1, c2, classes=3):
        super().__init__()
        self.stage1 = nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c2, classes)

    def forward(self, x):
        return self.fc(self.pool(self.stage2(self.stage1(x))))


PATHS = ["stage1", "stage2", "pool"]


def tiny_data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    return TensorDictDataset("reviewkd", x=x, label=y)


def tiny_distiller(seed=0):
    torch.manual_seed(seed)
    term = Term("reviewkd", student="features", teacher="features",
                sizes={"student_shape": [(2, 4, 4), (3, 2, 2), (3,)], "teacher_shape": [(4, 4, 4), (5, 2, 2), (5,)]})
    student, teacher = Net(Tiny(2, 3), ("x",), PATHS), Teacher(Tiny(4, 5), ("x",), PATHS)
    return Distiller(student, [teacher], [Term("ce"), term], ConstantRouter()), term


def fit(run_dir, module, epochs=2, callbacks=(), resume=False):
    return Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=8, lr=0.1, keep="last", resume=resume,
                   tensorboard=False, progress="off").fit(module, tiny_data(), tiny_data(), callbacks=list(callbacks))


def test_the_fusion_trains_with_the_student(tmp_path):
    distiller, term = tiny_distiller()
    assert distiller.loss_modules["reviewkd"] is term.module and isinstance(term.module, ReviewFusion)
    before = {k: v.clone() for k, v in term.module.state_dict().items()}
    student_before = distiller.student.model.stage1[0].weight.clone()
    res = fit(tmp_path, distiller)
    assert all(torch.isfinite(torch.tensor(h["train/reviewkd"])) for h in res.history)
    after = term.module.state_dict()
    for k in ("abfs.0.conv1.0.weight", "abfs.0.att.0.bias", "abfs.2.conv2.0.weight", "abfs.1.conv2.1.running_mean"):
        assert not torch.equal(before[k], after[k]), k
    assert not torch.equal(student_before, distiller.student.model.stage1[0].weight)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert torch.equal(saved["loss_modules.reviewkd.abfs.0.conv1.0.weight"], after["abfs.0.conv1.0.weight"])


def test_resume_continues_exactly(tmp_path):
    """4 epochs straight and 2 + a resume to 4: the same weights, fusion and BatchNorm statistics included."""
    full, _ = tiny_distiller()
    fit(tmp_path / "full", full, epochs=4)
    with pytest.raises(Crash):
        fit(tmp_path / "cut", tiny_distiller()[0], epochs=4, callbacks=[CrashAtEpoch(2)])
    resumed, _ = tiny_distiller(seed=5)
    fit(tmp_path / "cut", resumed, epochs=4, resume=True)
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


# ---------------------------------------------------------------- the shipped config
def test_config_warms_the_weight_up_as_mdistiller():
    from mmkd.cli import compose

    cfg = compose(["experiment=cifar10_reviewkd"])
    term = cfg.losses.reviewkd
    assert (term.student, term.teacher) == ("features", "features")
    assert list(cfg.student.features) == ["layer1", "layer2", "layer3", "pool"]  # after the ReLU
    assert list(cfg.teachers.resnet.features) == ["preact1", "preact2", "preact3", "pool"]  # before the last ReLU
    assert cfg.teachers.resnet.args.preact is True and cfg.teachers.resnet.cache is True  # stages cached, in order
    w = Schedule.parse(term.weight)
    # mdistiller: 0.6 * min(epoch / 20, 1) in its 1-based epoch (the 0-based e + 1): 0.03 in the first epoch
    assert [w(0.0, e) for e in (0, 9, 18, 19, 100)] == pytest.approx([0.03, 0.3, 0.57, 0.6, 0.6])
    assert (cfg.trainer.lr, cfg.trainer.nesterov, cfg.trainer.batch_size) == (0.1, True, 128)


@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_config_trains_one_step_on_real_cifar10(run_experiment):
    run_dir, results = run_experiment("cifar10_reviewkd", *TINY_CIFAR10)
    assert 0.0 <= results["student"]["test_acc"] <= 1.0
    (last,) = run_dir.rglob("student/last.pt")
    state = torch.load(last, weights_only=True)
    assert state["model"]["loss_modules.reviewkd.abfs.0.conv2.0.weight"].shape == (16, 64, 3, 3)
    assert state["history"][0]["train/reviewkd"] > 0
