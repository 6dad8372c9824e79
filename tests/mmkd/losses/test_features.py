"""Tests for the feature and relation losses of ``mmkd.losses.features`` (at, nst, pkt, sp, rkd): each
against a naive loop-based reference in float64, plus zeros, reductions, invariances, gradients and
the one-line errors on mismatched shapes."""
import math

import pytest
import torch

from mmkd.losses import at, nst, pkt, rkd, sp
from mmkd.registry import LOSSES

F64 = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- naive references (python loops)
def unit(v, eps=1e-12):
    n = math.sqrt(sum(x * x for x in v))
    return [x / max(n, eps) for x in v]


def dot(a, b):
    return sum(x * y for x, y in zip(a, b))


def block_pool(fmap, h, w):
    """Average ``[C][H][W]`` over equal blocks down to ``[C][h][w]`` (adaptive pooling when it divides)."""
    H, W = len(fmap[0]), len(fmap[0][0])
    fh, fw = H // h, W // w
    return [[[sum(ch[i * fh + a][j * fw + b] for a in range(fh) for b in range(fw)) / (fh * fw)
              for j in range(w)] for i in range(h)] for ch in fmap]


def ref_at(S, T, p=2.0):
    out = []
    for s, t in zip(S.tolist(), T.tolist()):
        (Hs, Ws), (Ht, Wt) = (len(s[0]), len(s[0][0])), (len(t[0]), len(t[0][0]))
        if Hs > Ht:
            s = block_pool(s, Ht, Wt)
        elif Hs < Ht:
            t = block_pool(t, Hs, Ws)

        def attention(fmap):
            C, H, W = len(fmap), len(fmap[0]), len(fmap[0][0])
            return unit([sum(fmap[c][i][j] ** p for c in range(C)) / C for i in range(H) for j in range(W)])
        a_s, a_t = attention(s), attention(t)
        out.append(sum((x - y) ** 2 for x, y in zip(a_s, a_t)) / len(a_s))
    return out


def ref_nst(S, T):
    out = []
    for s, t in zip(S.tolist(), T.tolist()):
        s = [unit([x for row in ch for x in row]) for ch in s]  # each channel's responses, unit norm
        t = [unit([x for row in ch for x in row]) for ch in t]

        def kmean(a, b):
            return sum(dot(x, y) ** 2 for x in a for y in b) / (len(a) * len(b))
        out.append(kmean(t, t) + kmean(s, s) - 2 * kmean(s, t))
    return out


def ref_pkt(S, T, eps=1e-7):
    def conditional(X):
        X = [[x / (math.sqrt(sum(v * v for v in row)) + eps) for x in row] for row in X]
        K = [[(dot(a, b) + 1) / 2 for b in X] for a in X]
        return [[k / sum(row) for k in row] for row in K]
    q, p = conditional(S.flatten(1).tolist()), conditional(T.flatten(1).tolist())
    B = len(p)
    return sum(p[i][j] * math.log((p[i][j] + eps) / (q[i][j] + eps)) for i in range(B) for j in range(B)) / B**2


def ref_sp(S, T):
    def gram(X):
        return [unit([dot(a, b) for b in X]) for a in X]
    gs, gt = gram(S.flatten(1).tolist()), gram(T.flatten(1).tolist())
    B = len(gs)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(B) for j in range(B)) / B**2


def huber(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def ref_rkd(S, T, distance_weight=25.0, angle_weight=50.0, squared=False, eps=1e-12):
    def distances(X):
        B = len(X)
        d = [[0.0 if i == j else max(sum((a - b) ** 2 for a, b in zip(X[i], X[j])), eps) ** (1 if squared else 0.5)
              for j in range(B)] for i in range(B)]
        mu = sum(d[i][j] for i in range(B) for j in range(B) if i != j) / (B * (B - 1))
        return [[v / mu for v in row] for row in d]

    def angles(X):
        B = len(X)

        def n(i, j):  # unit vector from e_i to e_j, 0 for i == j
            v = [b - a for a, b in zip(X[i], X[j])]
            return [0.0] * len(v) if i == j else unit(v)
        return [[[dot(n(i, j), n(i, k)) for k in range(B)] for j in range(B)] for i in range(B)]

    s, t = S.flatten(1).tolist(), T.flatten(1).tolist()
    B = len(s)
    ds, dt = distances(s), distances(t)
    loss_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(B) for j in range(B)) / B**2
    as_, at_ = angles(s), angles(t)
    loss_a = sum(huber(as_[i][j][k] - at_[i][j][k]) for i in range(B) for j in range(B) for k in range(B)) / B**3
    return distance_weight * loss_d + angle_weight * loss_a


# ------------------------------------------------------------------------------------ the tests
def test_registry_meta():
    for name, fn, per_sample in [("at", at, True), ("nst", nst, True), ("pkt", pkt, False), ("sp", sp, False),
                                 ("rkd", rkd, False)]:
        assert LOSSES[name] is fn
        assert {"teacher": True, "per_sample": per_sample, "batch": False}.items() <= LOSSES.meta(name).items()


def test_fitnet_still_importable_from_the_library():
    from mmkd.losses import fitnet
    from mmkd.losses.features import fitnet as same

    assert fitnet is same and LOSSES["fitnet"] is fitnet


@pytest.mark.parametrize("s_shape,t_shape", [
    ((3, 4, 4, 4), (3, 6, 4, 4)),   # same size, different channel counts
    ((3, 4, 8, 8), (3, 6, 4, 4)),   # the student's map is pooled
    ((3, 4, 2, 2), (3, 5, 4, 4)),   # the teacher's map is pooled
])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_at_against_a_loop(s_shape, t_shape, p):
    s, t = rand(*s_shape, seed=1), rand(*t_shape, seed=2)
    per = at(s, t, p=p, reduction="none")
    assert per.shape == (3,)
    assert torch.allclose(per, torch.tensor(ref_at(s, t, p), dtype=F64))
    assert torch.allclose(at(s, t, p=p), per.mean()) and torch.allclose(at(s, t, p=p, reduction="sum"), per.sum())


def test_at_batch_mean_is_the_official_batch_value():
    """mdistiller: ``(at(f_s) - at(f_t)).pow(2).mean()`` over the whole [batch, H * W] matrix."""
    s, t = rand(5, 3, 4, 4, seed=3), rand(5, 7, 4, 4, seed=4)

    def official(f):
        return torch.nn.functional.normalize(f.pow(2).mean(1).reshape(f.size(0), -1))
    assert torch.allclose(at(s, t), (official(s) - official(t)).pow(2).mean())


def test_at_non_square_maps_are_pooled_to_the_smaller():
    s, t = rand(2, 3, 4, 6, seed=5), rand(2, 2, 2, 3, seed=6)
    assert torch.allclose(at(s, t, reduction="none"), torch.tensor(ref_at(s, t), dtype=F64))


@pytest.mark.parametrize("s_shape,t_shape", [((3, 4, 3, 3), (3, 6, 3, 3)), ((3, 2, 4, 4), (3, 3, 2, 2)),
                                             ((3, 5, 2, 2), (3, 3, 4, 4))])
def test_nst_against_a_loop(s_shape, t_shape):
    s, t = rand(*s_shape, seed=7), rand(*t_shape, seed=8)
    if s_shape[2] > t_shape[2]:
        want = ref_nst(torch.nn.functional.avg_pool2d(s, 2), t)  # equal blocks: adaptive == plain pooling
    elif s_shape[2] < t_shape[2]:
        want = ref_nst(s, torch.nn.functional.avg_pool2d(t, 2))
    else:
        want = ref_nst(s, t)
    per = nst(s, t, reduction="none")
    assert per.shape == (3,) and torch.allclose(per, torch.tensor(want, dtype=F64))
    assert torch.allclose(nst(s, t), per.mean())
    assert (per >= -1e-12).all()  # a squared MMD


@pytest.mark.parametrize("b,ds,dt", [(2, 3, 3), (5, 4, 7), (6, 8, 2)])
def test_pkt_sp_rkd_against_loops(b, ds, dt):
    s, t = rand(b, ds, seed=9), rand(b, dt, seed=10)
    assert torch.allclose(pkt(s, t), torch.tensor(ref_pkt(s, t), dtype=F64))
    assert torch.allclose(pkt(s, t, eps=1e-3), torch.tensor(ref_pkt(s, t, eps=1e-3), dtype=F64))
    assert torch.allclose(sp(s, t), torch.tensor(ref_sp(s, t), dtype=F64))
    assert torch.allclose(rkd(s, t), torch.tensor(ref_rkd(s, t), dtype=F64))
    hp = {"distance_weight": 2.0, "angle_weight": 0.5, "squared": True}
    assert torch.allclose(rkd(s, t, **hp), torch.tensor(ref_rkd(s, t, **hp), dtype=F64))
    for fn in (pkt, sp, rkd):
        assert fn(s, t).shape == ()


def test_relation_losses_flatten_feature_maps():
    s, t = rand(4, 2, 3, 3, seed=11), rand(4, 5, 2, 2, seed=12)
    assert torch.allclose(sp(s, t), torch.tensor(ref_sp(s, t), dtype=F64))
    assert torch.allclose(pkt(s, t), torch.tensor(ref_pkt(s, t), dtype=F64))
    assert torch.allclose(rkd(s, t), torch.tensor(ref_rkd(s, t), dtype=F64))


def test_rkd_terms_separately_and_batch_of_one():
    s, t = rand(5, 4, seed=13), rand(5, 4, seed=14)
    d, a = rkd(s, t, distance_weight=1.0, angle_weight=0.0), rkd(s, t, distance_weight=0.0, angle_weight=1.0)
    assert torch.allclose(rkd(s, t), 25 * d + 50 * a)
    assert torch.allclose(d, torch.tensor(ref_rkd(s, t, 1.0, 0.0), dtype=F64))
    one = rand(1, 4, seed=15).requires_grad_()
    loss = rkd(one, rand(1, 4, seed=16))
    assert loss == 0
    loss.backward()
    assert (one.grad == 0).all()


@pytest.mark.parametrize("fn,shape", [(at, (3, 4, 3, 3)), (nst, (3, 4, 3, 3)), (pkt, (5, 6)), (sp, (5, 6)),
                                      (rkd, (5, 6))])
def test_zero_when_the_student_is_the_teacher(fn, shape):
    x = rand(*shape, seed=17)
    assert abs(float(fn(x, x.clone()))) < 1e-12


def test_scale_invariances():
    """Each loss normalises its features: scaling the student's changes nothing."""
    fm_s, fm_t = rand(3, 4, 3, 3, seed=18), rand(3, 5, 3, 3, seed=19)
    assert torch.allclose(at(3.0 * fm_s, fm_t, reduction="none"), at(fm_s, fm_t, reduction="none"))
    assert torch.allclose(nst(3.0 * fm_s, fm_t, reduction="none"), nst(fm_s, fm_t, reduction="none"))
    s, t = rand(5, 6, seed=20), rand(5, 3, seed=21)
    assert torch.allclose(sp(3.0 * s, t), sp(s, t))
    assert torch.allclose(rkd(3.0 * s, t), rkd(s, t))
    assert torch.allclose(pkt(3.0 * s, t), pkt(s, t), atol=1e-6)  # up to eps


@pytest.mark.parametrize("fn,s_shape,t_shape", [
    (at, (2, 3, 4, 4), (2, 2, 2, 2)), (nst, (2, 3, 2, 2), (2, 2, 2, 2)), (pkt, (4, 3), (4, 5)),
    (sp, (4, 3), (4, 5)), (rkd, (4, 3), (4, 5))])
def test_gradcheck(fn, s_shape, t_shape):
    s, t = rand(*s_shape, seed=22).requires_grad_(), rand(*t_shape, seed=23).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b), (s, t))


@pytest.mark.parametrize("fn", [at, nst, pkt, sp, rkd])
def test_different_batch_sizes_are_a_clear_error(fn):
    with pytest.raises(ValueError, match=r"\(3, 2, 4, 4\).*\(4, 2, 4, 4\) have different batch sizes"):
        fn(torch.randn(3, 2, 4, 4), torch.randn(4, 2, 4, 4))


@pytest.mark.parametrize("fn", [at, nst])
def test_map_losses_need_feature_maps_of_nested_sizes(fn):
    with pytest.raises(ValueError, match=r"\(3, 8\).*\(3, 8\); it needs feature maps \[batch, channels, height, width\]"):
        fn(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 8\).*\(2, 3, 8, 4\).*the larger is average-pooled"):
        fn(torch.randn(2, 3, 4, 8), torch.randn(2, 3, 8, 4))


@pytest.mark.parametrize("fn", [pkt, sp, rkd])
def test_relation_losses_need_batched_features(fn):
    with pytest.raises(ValueError, match=r"\(4,\).*at least 2 dimensions \(read a hidden layer"):
        fn(torch.randn(4), torch.randn(4))


def test_ranges_refuse_bad_arguments():
    from mmkd.checks import check_args

    with pytest.raises(ValueError, match="losses.at.args.p=0"):
        check_args("losses.at.args", LOSSES.meta("at")["ranges"], {"p": 0})
    with pytest.raises(ValueError, match="angle_weight=-1"):
        check_args("losses.rkd.args", LOSSES.meta("rkd")["ranges"], {"angle_weight": -1})
    with pytest.raises(ValueError, match="eps=0"):
        check_args("losses.pkt.args", LOSSES.meta("pkt")["ranges"], {"eps": 0})


def test_feature_terms_train_a_cifar_resnet_student():
    """One step of every loss on the stage outputs and pooled embeddings of two CIFAR ResNets."""
    from mmkd.distiller import Distiller, Term
    from mmkd.net import Net, Teacher
    from mmkd.registry import MODELS
    from mmkd.routers import ConstantRouter

    torch.manual_seed(0)
    paths = ["layer1", "layer2", "layer3", "pool"]
    student = Net(MODELS["resnet8"](10, (3, 16, 16)), ["image"], paths)
    teacher = Teacher(MODELS["resnet8x4"](10, (3, 16, 16)), ["image"], paths)
    terms = [Term("ce"), *[Term("at", 1000.0, name=f"at_{p}", student=f"features.{p}", teacher=f"features.{p}")
                           for p in paths[:3]],
             Term("nst", 50.0, student="features.layer2", teacher="features.layer2"),
             Term("sp", 3000.0, student="features.layer3", teacher="features.layer3"),
             Term("pkt", 30000.0, student="features.pool", teacher="features.pool"),
             Term("rkd", 1.0, student="features.pool", teacher="features.pool")]
    d = Distiller(student, [teacher], terms, ConstantRouter())
    losses = d({"image": torch.randn(6, 3, 16, 16), "label": torch.randint(0, 10, (6,))})
    assert {"at_layer1", "at_layer2", "at_layer3", "nst", "sp", "pkt", "rkd"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert student.model.layer1[0].conv1.weight.grad.abs().sum() > 0
