"""KD-SVD (mmkd.losses.features.kdsvd): the loss against a loop over instances, stages, singular vectors
and kernel entries (both matrix layouts), its invariants, gradients through the SVD, a training step
on CIFAR ResNets, and the shipped config on a tiny real subset."""
import math
import os
from pathlib import Path

import pytest
import torch

from mmkd import Distiller, Net, Teacher, Term
from mmkd.losses.features import kdsvd
from mmkd.losses.features.kdsvd import align
from mmkd.registry import MODELS
from mmkd.routers import ConstantRouter
from tests.reference import TINY_CIFAR10

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
F64 = torch.float64


def matrix(fmap, layout):
    """One instance's ``[C][H][W]`` map as a list of rows: positions x channels, or mdistiller's
    ``(c, h)`` x ``w``."""
    C, H, W = len(fmap), len(fmap[0]), len(fmap[0][0])
    if layout == "channels":
        return [[fmap[c][h][w] for c in range(C)] for h in range(H) for w in range(W)]
    return [[fmap[c][h][w] for w in range(W)] for c in range(C) for h in range(H)]


def right_vectors(rows, n):
    """The top ``n`` singular values and right singular vectors (as lists) of one matrix."""
    _, s, vh = torch.linalg.svd(torch.tensor(rows, dtype=F64), full_matrices=False)
    return s[:n].tolist(), vh[:n].tolist()


def ref_kdsvd(S, T, k=1, layout="channels"):
    out = []
    for b in range(len(S[0])):
        prev, total = None, 0.0
        for f_s, f_t in zip(S, T):
            sig, v_t = right_vectors(matrix(f_t[b].tolist(), layout), k)
            _, v_s = right_vectors(matrix(f_s[b].tolist(), layout), k + 3)
            norm = math.sqrt(sum(x * x for x in sig))
            sig = [x / norm for x in sig]
            aligned = []
            for ref in v_t:
                cos = [sum(a * r for a, r in zip(cand, ref)) for cand in v_s]
                best = max(range(len(cos)), key=lambda i: abs(cos[i]))
                aligned.append([math.copysign(1, cos[best]) * a for a in v_s[best]])
            now_s = [[x * sig[n] for x in aligned[n]] for n in range(k)]  # [n][d]
            now_t = [[x * sig[n] for x in v_t[n]] for n in range(k)]
            if prev is not None:
                for n in range(k):
                    for i in range(len(now_s[n])):
                        for j in range(len(prev[0][n])):
                            g_s = math.exp(-(now_s[n][i] - prev[0][n][j]) ** 2 / 8)
                            g_t = math.exp(-(now_t[n][i] - prev[1][n][j]) ** 2 / 8)
                            total += (g_s - g_t) ** 2
            prev = now_s, now_t
        out.append(total)
    return torch.tensor(out, dtype=F64)


def stages(b=3, shapes=((4, 5, 5), (6, 3, 3), (8, 2, 2)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, *s, generator=g, dtype=F64) for s in shapes]


@pytest.mark.parametrize("k,layout,seed", [(1, "channels", 0), (2, "channels", 1), (1, "mdistiller", 2),
                                           (2, "mdistiller", 3)])
def test_matches_the_loop(k, layout, seed):
    shapes = ((5, 4, 6), (7, 3, 6), (9, 2, 6)) if layout == "mdistiller" else ((5, 4, 4), (7, 3, 3), (9, 2, 2))
    s, t = stages(shapes=shapes, seed=seed), stages(shapes=shapes, seed=seed + 10)
    if layout == "channels":  # teacher maps of other sizes: the singular vectors run over the channels
        t = [torch.nn.functional.interpolate(f, scale_factor=2) for f in t]
    ref = ref_kdsvd(s, t, k, layout)
    assert (ref > 0).all()
    torch.testing.assert_close(kdsvd(s, t, k=k, layout=layout, reduction="none"), ref)
    torch.testing.assert_close(kdsvd(s, t, k=k, layout=layout), ref.mean())  # mdistiller: the sum over bsz


def test_align_takes_the_most_parallel_candidate_with_its_sign():
    cand = torch.tensor([[[0.6, 0.0], [0.8, 0.0], [0.0, 1.0]]], dtype=F64)  # [1, D=3, 2 candidates]
    ref = torch.tensor([[[0.1, 0.5], [0.1, 0.7], [-0.98, 0.1]]], dtype=F64)  # [1, 3, 2 references]
    torch.testing.assert_close(align(cand, ref), torch.tensor([[[0.0, 0.6], [0.0, 0.8], [-1.0, 0.0]]], dtype=F64))


def test_zero_when_the_student_is_the_teacher_and_blind_to_scale():
    s, t = stages(), stages(seed=5)
    assert float(kdsvd(t, t).abs().max()) < 1e-12
    torch.testing.assert_close(kdsvd([3.0 * f for f in s], t, reduction="none"), kdsvd(s, t, reduction="none"))
    assert kdsvd(s, t).item() > 0


def test_gradcheck_float64():
    shapes = ((4, 3, 3), (5, 2, 3))
    s, t = stages(b=2, shapes=shapes), stages(b=2, shapes=shapes, seed=5)
    for f in s:
        f.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *fs: kdsvd(list(fs), t), tuple(s))


def test_errors_are_one_line():
    s, t = stages(), stages(seed=1)
    with pytest.raises(ValueError, match="at least two stage maps"):
        kdsvd(s[0], t[0])
    with pytest.raises(ValueError, match="at least two stage maps"):
        kdsvd(s[:2], t)
    with pytest.raises(ValueError, match="layout='rows'; choose from: channels, mdistiller"):
        kdsvd(s, t, layout="rows")
    with pytest.raises(ValueError, match="stage 2: .* differ in dimension 1"):
        kdsvd(s, [t[0], t[0], t[2]])
    with pytest.raises(ValueError, match="stage 1: .*feature maps"):
        kdsvd([f.flatten(2) for f in s], [f.flatten(2) for f in t])


def test_trains_a_cifar_resnet_student():
    """One step of a term that reads all the stage maps: a finite loss, gradients into the first stage."""
    torch.manual_seed(0)
    paths = ["layer1", "layer2", "layer3"]
    student = Net(MODELS["resnet8"](10, (3, 16, 16)), ["image"], paths)
    teacher = Teacher(MODELS["resnet14"](10, (3, 16, 16)), ["image"], paths)
    d = Distiller(student, [teacher], [Term("ce"), Term("kdsvd", student="features", teacher="features")],
                  ConstantRouter())
    losses = d({"image": torch.randn(4, 3, 16, 16), "label": torch.randint(0, 10, (4,))})
    assert torch.isfinite(losses["kdsvd"]) and losses["kdsvd"] > 0
    losses["loss"].backward()
    assert student.model.layer1[0].conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the shipped config
def test_shipped_config_is_mdistillers_setting():
    from mmkd.cli import compose

    cfg = compose(["experiment=cifar10_kdsvd"])
    assert (cfg.teachers.resnet.name, cfg.student.name, cfg.losses.ce.weight) == ("resnet56", "resnet20", 1.0)
    assert list(cfg.teachers.resnet.features) == list(cfg.student.features) == ["layer1", "layer2", "layer3"]
    t = cfg.losses.kdsvd
    assert (t.weight, t.student, t.teacher, dict(t.args)) == (1.0, "features", "features", {"k": 1})


@pytest.mark.slow
@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_config_trains_one_step_on_a_tiny_real_subset(run_experiment):
    run_dir, results = run_experiment("cifar10_kdsvd", *TINY_CIFAR10)
    assert 0.0 <= results["student"]["test_acc"] <= 1.0
    state = torch.load(run_dir / "student" / "last.pt", weights_only=True)
    (epoch,) = state["history"]
    assert state["step"] == 1 and epoch["train/kdsvd"] > 0 and math.isfinite(epoch["train/kdsvd"])


def test_repeated_singular_values_give_a_finite_gradient():
    """Where singular values repeat the SVD's gradient is infinite; those entries count as 0, so a
    step never turns the student's weights non-finite (the teacher's maps are not differentiated)."""
    g = torch.Generator().manual_seed(0)
    s = [torch.ones(2, 4, 3, 3, requires_grad=True), torch.ones(2, 4, 2, 2, requires_grad=True)]  # rank 1: zeros repeat
    t = [torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 2, 2, generator=g)]
    kdsvd(s, t).backward()
    assert all(torch.isfinite(x.grad).all() for x in s)
