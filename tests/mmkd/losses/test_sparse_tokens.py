"""Next-token divergences against a sparse (top-k) teacher (mmkd.losses.tokens with mmkd.sparse.SparseLogits):
a naive merge of the tail classes, equality with the dense value at k = V, the data-processing inequality,
the error bound of a peaked teacher, masks, and gradients against the closed form and finite differences."""
import math

import pytest
import torch

from mmkd.losses import fkl, gjsd, rkl, skew_fkl, skew_rkl, tvd
from mmkd.registry import LOSSES
from mmkd.sparse import SparseLogits

DIVERGENCES = {"fkl": fkl, "rkl": rkl, "gjsd": gjsd, "skew_fkl": skew_fkl, "skew_rkl": skew_rkl, "tvd": tvd}


def make(n=4, v=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=dtype) * 2, torch.randn(n, v, generator=g, dtype=dtype) * 2


def softmax(row, T=1.0):
    e = [math.exp(z / T) for z in row]
    return [x / sum(e) for x in e]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def divergence(name, q, p):
    """The divergence of two probability lists by its formula (p: teacher, q: student)."""
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "gjsd":
        m = [0.5 * x + 0.5 * y for x, y in zip(p, q)]
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if name == "skew_fkl":
        return kl(p, [0.1 * x + 0.9 * y for x, y in zip(p, q)])
    if name == "skew_rkl":
        return kl(q, [0.9 * x + 0.1 * y for x, y in zip(p, q)])
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_matches_a_naive_merge_of_the_tail_classes(name, T):
    s, t = make()
    sp = SparseLogits.topk(t, 3)
    got = DIVERGENCES[name](s, sp, temperature=T, reduction="none")
    want = []
    for i in range(len(s)):
        top = sp.indices[i].tolist()
        p_full, q_full = softmax(t[i].tolist()), softmax(s[i].tolist(), T)
        p = [p_full[v] for v in top] + [1 - sum(p_full[v] for v in top)]  # the stored top-k and tail
        p = [x ** (1 / T) / sum(y ** (1 / T) for y in p) for x in p]  # re-tempered, the bucket as one class
        q = [q_full[v] for v in top] + [sum(q_full[v] for v in range(s.shape[1]) if v not in top)]
        want.append(divergence(name, q, p))
    torch.testing.assert_close(got, torch.tensor(want, dtype=got.dtype), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_a_support_over_the_whole_vocabulary_gives_the_dense_value(name, T):
    s, t = make()
    mask = torch.tensor([True, False, True, True])
    sp = SparseLogits.topk(t, t.shape[1])
    for kw in ({"reduction": "none"}, {"reduction": "mean"}, {"reduction": "sum"}, {"mask": mask}):
        got, want = DIVERGENCES[name](s, sp, temperature=T, **kw), DIVERGENCES[name](s, t, temperature=T, **kw)
        torch.testing.assert_close(got, want.to(got.dtype), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_merging_classes_never_increases_the_divergence(name):
    for seed in range(5):
        s, t = make(n=16, v=9, seed=seed, dtype=torch.float32)
        dense = DIVERGENCES[name](s, t, reduction="none")
        for k in (1, 2, 5):
            sparse = DIVERGENCES[name](s, SparseLogits.topk(t, k), reduction="none")
            assert (sparse <= dense + 1e-6).all(), (seed, k, (sparse - dense).max())
            assert (dense - sparse).max() > 1e-3  # the tail is really merged


def tail_gap_bound(a, b, tail):
    """For KL(a || b) of the rows ``a``, ``b`` ``[N, V]``, merging the classes ``tail`` (a bool mask ``[N, V]``)
    lowers the value by exactly ``a(T) KL(a_T || b_T)`` (``a_T``: ``a`` within T, renormalised); as
    ``KL <= max log-ratio``, the gap is at most ``a(T) max_{v in T} log(a_T,v / b_T,v)``. Returns (gap, bound)."""
    a_t, b_t = (a * tail).sum(-1, keepdim=True), (b * tail).sum(-1, keepdim=True)
    ratio = torch.where(tail, (a / a_t).log() - (b / b_t).log(), torch.full_like(a, -math.inf))
    gap = a_t.squeeze(-1) * torch.where(tail, (a / a_t) * ratio, torch.zeros_like(a)).sum(-1)
    return gap, a_t.squeeze(-1) * ratio.max(-1).values


def test_a_peaked_teachers_error_is_below_the_derived_bounds():
    s, t = make(n=6, v=12, seed=3)
    t[:, :2] += 11.0  # two classes hold all but a tail of at most eps
    log_p = t.log_softmax(-1)  # the tail summed in float64 (topk's float32 1 - sum is off by ~1e-7 absolute)
    values, indices = log_p.topk(2, dim=-1)
    sp = SparseLogits(values, indices, log_p.scatter(-1, indices, -math.inf).logsumexp(-1).exp(), t.shape[1])
    eps = float(sp.tail.max())
    assert 0 < eps <= 1e-3
    p, q = t.softmax(-1), s.softmax(-1)
    tail = torch.ones_like(p, dtype=torch.bool).scatter(-1, sp.indices, False)
    m = 0.5 * p + 0.5 * q
    gaps = {"fkl": tail_gap_bound(p, q, tail), "rkl": tail_gap_bound(q, p, tail),
            "skew_fkl": tail_gap_bound(p, 0.1 * p + 0.9 * q, tail),
            "skew_rkl": tail_gap_bound(q, 0.9 * p + 0.1 * q, tail)}
    gp, gq = tail_gap_bound(p, m, tail), tail_gap_bound(q, m, tail)
    gaps["gjsd"] = (0.5 * gp[0] + 0.5 * gq[0], 0.5 * gp[1] + 0.5 * gq[1])
    for name, (gap, bound) in gaps.items():
        diff = DIVERGENCES[name](s, t, reduction="none") - DIVERGENCES[name](s, sp, reduction="none").double()
        torch.testing.assert_close(diff, gap, rtol=0, atol=2e-6)  # the exact gap of a merge
        assert (diff.abs() <= bound + 2e-6).all(), name
    # the teacher-weighted gaps are O(eps): eps times the largest log-ratio within the tail
    assert (gaps["fkl"][1] <= eps * 12).all() and (gaps["skew_fkl"][1] <= eps * 12).all()
    # total variation: 1/2 sum_T |p - q| - 1/2 |p(T) - q(T)| <= min(p(T), q(T)) <= eps
    diff = tvd(s, t, reduction="none") - tvd(s, sp, reduction="none").double()
    assert (diff >= -1e-6).all() and (diff <= eps + 1e-6).all()
    exact = 0.5 * ((p - q).abs() * tail).sum(-1) - 0.5 * ((p - q) * tail).sum(-1).abs()
    torch.testing.assert_close(diff, exact, rtol=0, atol=1e-6)  # 0 where the tail's p - q share a sign


@pytest.mark.parametrize("name", DIVERGENCES)
def test_masked_tokens_count_for_nothing_with_a_sparse_teacher(name):
    s, t = make()
    sp, mask = SparseLogits.topk(t, 2), torch.tensor([True, False, False, True])
    full = DIVERGENCES[name](s, sp, reduction="none")
    torch.testing.assert_close(DIVERGENCES[name](s, sp, mask=mask, reduction="none"), full * mask)
    torch.testing.assert_close(DIVERGENCES[name](s, sp, mask=mask), full[mask].mean())
    s2 = s.clone()
    s2[~mask] = 1e3
    torch.testing.assert_close(DIVERGENCES[name](s2, sp, mask=mask), DIVERGENCES[name](s, sp, mask=mask))


def test_the_forward_kl_gradient_is_the_closed_form_of_the_buckets():
    # d/dz_v sum_b p_b log(p_b / Q_b) = q_v (1 - p_b(v) / Q_b(v)), Q_b the student's mass in v's bucket
    s, t = make(n=3, v=6, seed=1)
    s.requires_grad_(True)
    sp = SparseLogits.topk(t, 2)
    fkl(s, sp, reduction="sum").backward()
    q = s.detach().softmax(-1)
    in_support = torch.zeros_like(q, dtype=torch.bool).scatter(-1, sp.indices, True)
    q_tail = (q * ~in_support).sum(-1, keepdim=True)
    p_support = torch.zeros_like(q).scatter(-1, sp.indices, sp.values.double().exp())
    want = torch.where(in_support, q - p_support, q * (1 - sp.tail.double().unsqueeze(-1) / q_tail))
    torch.testing.assert_close(s.grad, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_gradients_reach_the_student_and_match_finite_differences(name):
    s, t = make(n=2, v=5, seed=2, dtype=torch.float32)
    sp = SparseLogits.topk(t, 2)
    s.requires_grad_(True)
    DIVERGENCES[name](s, sp, temperature=1.5, reduction="sum").backward()
    assert s.grad.abs().max() > 1e-3
    h, fd = 1e-2, torch.zeros_like(s)
    with torch.no_grad():
        for i in range(s.shape[0]):
            for v in range(s.shape[1]):
                up, down = s.clone(), s.clone()
                up[i, v] += h
                down[i, v] -= h
                fd[i, v] = (DIVERGENCES[name](up, sp, temperature=1.5, reduction="sum")
                            - DIVERGENCES[name](down, sp, temperature=1.5, reduction="sum")) / (2 * h)
    torch.testing.assert_close(s.grad, fd, rtol=0, atol=1e-3)


def test_registered_sparse_and_rows_must_match():
    assert all(LOSSES.meta(name)["sparse"] for name in DIVERGENCES)
    s, t = make()
    with pytest.raises(ValueError, match="sparse teacher of 4 rows"):
        fkl(s[:3], SparseLogits.topk(t, 2))
    with pytest.raises(ValueError, match="sparse teacher"):
        tvd(s.reshape(2, 2, 7), SparseLogits.topk(t, 2))
