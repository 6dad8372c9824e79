"""Tests for the loss library: each loss against an independent loop-based reference, plus the
properties every loss must have (reductions, translation invariance, minima, gradients)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmkd.losses.ce import ce
from mmkd.losses.dist import dist
from mmkd.losses.dkd import dkd
from mmkd.losses.kd import kd
from mmkd.losses.nkd import nkd
from mmkd.losses.pld import pld
from mmkd.losses.sinkd import sinkd
from mmkd.registry import LOSSES

PER_SAMPLE = {"ce": ce, "kd": kd, "dkd": dkd, "nkd": nkd, "pld": pld}
BATCH = {"dist": dist, "sinkd": sinkd}
ALL = {**PER_SAMPLE, **BATCH}
TEACHER = [n for n in ALL if n != "ce"]


def make(b, c, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=dtype) * 2
    t = torch.randn(b, c, generator=g, dtype=dtype) * 2
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


# ---------------------------------------------------------------- naive references (python loops)
def softmax(row, T=1.0):
    m = max(row)
    e = [math.exp((x - m) / T) for x in row]
    z = sum(e)
    return [v / z for v in e]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def renorm_without(p, y):  # softmax over the non-target classes == p_c / (1 - p_y)
    rest = [p[c] for c in range(len(p)) if c != y]
    z = sum(rest)
    return [v / z for v in rest]


def ref_ce(S, T_, Y, label_smoothing=0.0):
    out = []
    for s, y in zip(S, Y):
        C = len(s)
        p = softmax(s)
        out.append(-sum(((1 - label_smoothing) * (c == y) + label_smoothing / C) * math.log(p[c])
                        for c in range(C)))
    return out


def ref_kd(S, T_, Y, temperature=4.0):
    return [temperature**2 * kl(softmax(t, temperature), softmax(s, temperature))
            for s, t in zip(S, T_)]


def ref_dkd(S, T_, Y, alpha=1.0, beta=8.0, temperature=4.0):
    out = []
    for s, t, y in zip(S, T_, Y):
        ps, pt = softmax(s, temperature), softmax(t, temperature)
        tckd = kl([pt[y], 1 - pt[y]], [ps[y], 1 - ps[y]])
        nckd = kl(renorm_without(pt, y), renorm_without(ps, y))
        out.append(temperature**2 * (alpha * tckd + beta * nckd))
    return out


def ref_nkd(S, T_, Y, temperature=1.0, gamma=1.5):
    out = []
    for s, t, y in zip(S, T_, Y):
        first = -softmax(t)[y] * math.log(softmax(s)[y])
        ns = renorm_without(softmax(s, temperature), y)
        nt = renorm_without(softmax(t, temperature), y)
        out.append(first - gamma * temperature**2 * sum(a * math.log(b) for a, b in zip(nt, ns)))
    return out


def ref_dist(S, T_, Y, beta=1.0, gamma=1.0, tau=1.0, eps=1e-8):
    ys = [softmax(s, tau) for s in S]
    yt = [softmax(t, tau) for t in T_]
    B, C = len(ys), len(ys[0])

    def pearson(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        num = sum((x - ma) * (z - mb) for x, z in zip(a, b))
        na = math.sqrt(sum((x - ma) ** 2 for x in a))
        nb = math.sqrt(sum((z - mb) ** 2 for z in b))
        return num / (na * nb + eps)

    inter = 1 - sum(pearson(ys[i], yt[i]) for i in range(B)) / B
    intra = 1 - sum(pearson([ys[i][j] for i in range(B)], [yt[i][j] for i in range(B)])
                    for j in range(C)) / C
    return tau**2 * (beta * inter + gamma * intra)


def ref_pld(S, T_, Y, tau=1.0):
    out = []
    for s, t, y in zip(S, T_, Y):
        pi = [y] + sorted((c for c in range(len(s)) if c != y), key=lambda c: -t[c])
        w = softmax(t, tau)
        total = 0.0
        for k in range(len(pi)):
            total += w[pi[k]] * (-s[pi[k]] + math.log(sum(math.exp(s[pi[l]]) for l in range(k, len(pi)))))
        out.append(total)
    return out


def ref_sinkd(S, T_, Y, temperature=2.0, epsilon=0.1, iterations=20):
    ps = [softmax(s, temperature) for s in S]
    pt = [softmax(t, temperature) for t in T_]
    B = len(ps)
    cost = [[sum(abs(a - b) for a, b in zip(ps[i], pt[j])) for j in range(B)] for i in range(B)]
    K = [[math.exp(-cost[i][j] / epsilon) for j in range(B)] for i in range(B)]
    u, v = [1.0] * B, [1.0] * B
    for _ in range(iterations):
        u = [1 / sum(K[i][j] * v[j] for j in range(B)) for i in range(B)]  # rows, then columns, to 1
        v = [1 / sum(u[i] * K[i][j] for i in range(B)) for j in range(B)]
    return sum(u[i] * K[i][j] * v[j] * cost[i][j] for i in range(B) for j in range(B))


REFS = {"ce": ref_ce, "kd": ref_kd, "dkd": ref_dkd, "nkd": ref_nkd, "dist": ref_dist,
        "pld": ref_pld, "sinkd": ref_sinkd}
HPARAMS = [
    ("ce", {}), ("ce", {"label_smoothing": 0.1}),
    ("kd", {}), ("kd", {"temperature": 1.5}),
    ("dkd", {}), ("dkd", {"alpha": 0.5, "beta": 2.0, "temperature": 1.5}),
    ("nkd", {}), ("nkd", {"temperature": 2.0, "gamma": 0.7}),
    ("dist", {}), ("dist", {"beta": 2.0, "gamma": 0.5, "tau": 3.0}),
    ("pld", {}), ("pld", {"tau": 2.0}),
    ("sinkd", {}), ("sinkd", {"temperature": 1.0, "epsilon": 0.5, "iterations": 5}),
]


# ------------------------------------------------------------------------------------ the tests
def test_registry_meta():
    for name, fn in ALL.items():
        assert LOSSES[name] is fn
        assert {"teacher": name != "ce", "per_sample": name in PER_SAMPLE, "batch": False}.items() <= LOSSES.meta(name).items()


@pytest.mark.parametrize("b,c", [(1, 2), (1, 7), (5, 2), (5, 7)])
@pytest.mark.parametrize("name,hp", HPARAMS)
def test_matches_naive_reference(name, hp, b, c):
    s, t, y = make(b, c, seed=b * 10 + c)
    expected = REFS[name](s.tolist(), t.tolist(), y.tolist(), **hp)
    if name in PER_SAMPLE:
        got = ALL[name](s, t, y, reduction="none", **hp)
        assert got.dtype == torch.float64 and got.shape == (b,)
    else:
        got = ALL[name](s, t, y, **hp)
        assert got.dtype == torch.float64 and got.shape == ()
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_reductions(name):
    s, t, y = make(5, 7, seed=1)
    fn = PER_SAMPLE[name]
    none = fn(s, t, y, reduction="none")
    assert none.shape == (5,)
    assert torch.allclose(fn(s, t, y), none.mean(), rtol=0, atol=1e-12)
    assert torch.allclose(fn(s, t, y, reduction="sum"), none.sum(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        fn(s, t, y, reduction="max")


@pytest.mark.parametrize("name", BATCH)
def test_batch_losses_are_scalars_without_reduction(name):
    s, t, y = make(5, 7, seed=2)
    assert BATCH[name](s, t, y).shape == ()
    with pytest.raises(TypeError):
        BATCH[name](s, t, y, reduction="none")


@settings(max_examples=8, deadline=None)
@given(shift=st.lists(st.floats(-30, 30), min_size=4, max_size=4), which=st.sampled_from("st"))
def test_translation_invariance(shift, which):
    s, t, y = make(4, 6, seed=3)
    delta = torch.tensor(shift, dtype=torch.float64)[:, None]
    for name, fn in ALL.items():
        if which == "t" and name == "ce":
            continue
        s2, t2 = (s + delta, t) if which == "s" else (s, t + delta)
        assert torch.allclose(fn(s2, t2, y), fn(s, t, y), rtol=1e-9, atol=1e-10), name


def test_not_invariant_to_scaling():
    # guards the invariance test above against losses that ignore their input altogether
    s, t, y = make(4, 6, seed=4)
    for name, fn in ALL.items():
        assert not torch.allclose(fn(2 * s, t, y), fn(s, t, y)), name


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_zero_minimum_at_teacher(name):
    _, t, y = make(5, 7, seed=5)
    s = t.clone().requires_grad_(True)
    loss = ALL[name](s, t, y)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-14)
    assert s.grad.abs().max().item() < 1e-14
    for seed in range(3):  # any genuine perturbation costs something
        d = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert ALL[name](t + 0.1 * d, t, y).item() > 1e-6


def test_dist_minimum_at_teacher():
    # with the eps in the Pearson denominator the value at s == t is O(eps / |y - mean y|^2), not 0
    _, t, y = make(5, 7, seed=6)
    s = t.clone().requires_grad_(True)
    loss = dist(s, t)
    loss.backward()
    assert 0 <= loss.item() < 1e-5
    assert s.grad.abs().max().item() < 1e-5
    for seed in range(3):
        d = torch.randn(5, 7, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert dist(t + 0.1 * d, t).item() > loss.item() + 1e-4


def test_sinkd_properties():
    s, t, y = make(5, 7, seed=7)
    # batch-level: relabelling the student rows only permutes the cost matrix, the plan follows
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(sinkd(s[perm], t), sinkd(s, t), rtol=1e-12, atol=1e-12)
    # identical rows everywhere: zero cost matrix, zero loss
    row = t[:1].expand(5, 7)
    assert sinkd(row, row).item() == pytest.approx(0.0, abs=1e-15)
    # s == t with distinct rows is NOT zero: the entropic plan puts mass off the diagonal
    assert sinkd(t, t).item() > 1e-3
    # ... and a sharper (smaller epsilon) plan moves it towards the diagonal
    assert sinkd(t, t, epsilon=0.02, iterations=200).item() < sinkd(t, t).item()


def test_hand_computed_ce():
    # softmax([ln 3, 0]) = [3/4, 1/4]
    s = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    assert ce(s, target=y, reduction="none").tolist() == pytest.approx([math.log(4 / 3), math.log(4)])
    # smoothing 0.2 over 2 classes: q = [0.9, 0.1] for y = 0
    got = ce(s[:1], target=y[:1], label_smoothing=0.2).item()
    assert got == pytest.approx(0.9 * math.log(4 / 3) + 0.1 * math.log(4), abs=1e-12)


def test_hand_computed_kd():
    # T = 2: softmax([2 ln 3, 0] / 2) = [3/4, 1/4], softmax([0, 0]) = [1/2, 1/2]
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln 3 - ln 2;  times T^2 = 4  ->  3 ln 3 - 4 ln 2
    s = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[2 * math.log(3.0), 0.0]], dtype=torch.float64)
    assert kd(s, t, temperature=2.0).item() == pytest.approx(3 * math.log(3) - 4 * math.log(2), abs=1e-12)
    # with one sample the plan is the single cell: SinKD = |[1/2, 1/2] - [3/4, 1/4]|_1 = 1/2
    assert sinkd(s, t, temperature=2.0).item() == pytest.approx(0.5, abs=1e-12)


def test_dkd_two_classes_is_alpha_kd():
    # with 2 classes the binary split is the whole distribution and NCKD vanishes
    s, t, y = make(5, 2, seed=8)
    assert torch.allclose(dkd(s, t, y, alpha=0.3, beta=5.0), 0.3 * kd(s, t), rtol=1e-12)


def test_nkd_target_prob_is_detached():
    s, t, y = make(5, 7, seed=9)
    t.requires_grad_(True)
    nkd(s, t, y, gamma=0.0).backward()
    assert t.grad is None or t.grad.abs().max().item() == 0.0
    nkd(s, t, y).backward()  # the normalized non-target part does depend on the teacher
    assert t.grad.abs().max().item() > 1e-6


@pytest.mark.parametrize("name", ALL)
def test_gradcheck(name):
    s, t, y = make(3, 5, seed=10)
    fn = ALL[name]
    s.requires_grad_(True)
    differentiable_teacher = name not in ("ce", "nkd")  # nkd detaches t_y by design
    if differentiable_teacher:
        t.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, y), (s, t))
    else:
        assert torch.autograd.gradcheck(lambda a: fn(a, t, y), (s,))


def test_large_logits_stay_finite():
    s, t, y = make(4, 6, seed=11, dtype=torch.float32)
    s, t = (s * 500).requires_grad_(True), t * 500
    for name, fn in ALL.items():
        loss = fn(s, t, y)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name


def test_ce_ignores_unlabelled():
    """Negative labels are unlabelled: CE equals CE over the labelled rows alone."""
    torch.manual_seed(0)
    s = torch.randn(6, 4, dtype=torch.float64)
    y = torch.tensor([2, -1, 0, -1, 3, 1])
    keep = y >= 0
    want = -torch.log_softmax(s[keep], 1).gather(1, y[keep].view(-1, 1)).mean()
    assert torch.allclose(ce(s, None, y), want)
    per = ce(s, None, y, reduction="none")
    assert torch.all(per[~keep] == 0) and torch.allclose(per[keep].mean(), want)


def test_fitnet_against_a_loop_and_shape_check():
    from mmkd.losses import fitnet

    torch.manual_seed(1)
    s, t = torch.randn(3, 2, 4, dtype=torch.float64), torch.randn(3, 2, 4, dtype=torch.float64)
    per = [sum((s[i].flatten()[d] - t[i].flatten()[d]) ** 2 for d in range(8)) / 8 for i in range(3)]
    assert torch.allclose(fitnet(s, t, reduction="none"), torch.stack(per))
    assert torch.allclose(fitnet(s, t), torch.stack(per).mean())
    assert fitnet(s, s) == 0
    with pytest.raises(ValueError, match="give the term an adapter"):
        fitnet(torch.randn(3, 5), torch.randn(3, 4))
