"""GLD against independent references: a naive loop copy of the whole loss, and an exact
Gromov-Wasserstein discrepancy for graphs of up to 5 nodes.

The exact GW is a brute force over the n! permutation couplings. That is the true minimum over all
couplings (not only permutations) for these graphs: a co-activation graph is a Gram matrix, so with
A, B positive semi-definite the objective sum (A_ik - B_jl)^2 pi_ij pi_kl = |A|^2/n^2 + |B|^2/n^2 -
2 vec(pi)^T (B kron A) vec(pi) is concave in pi, and a concave function on the Birkhoff polytope
attains its minimum at a vertex, a permutation matrix / n (Birkhoff-von Neumann).
``test_brute_force_is_the_minimum_over_all_couplings`` checks this against random doubly
stochastic couplings.
"""
import itertools
import math
import random

import pytest
import torch

from mmkd.checks import check_args
from mmkd.losses.gld import coactivation_graph, gld
from mmkd.registry import LOSSES


# ---------------------------------------------------------------- naive references (python loops)
def softmax(row, t):
    m = max(row)
    e = [math.exp((v - m) / t) for v in row]
    return [v / sum(e) for v in e]


def graph(rows, temperature=1.0, top_k=None):
    """(1/B) sum_b p~_b p~_b^T, p~ the top-k of softmax(z / T) (ties by class index)."""
    c = len(rows[0])
    a = [[0.0] * c for _ in range(c)]
    for row in rows:
        p = softmax(row, temperature)
        keep = sorted(range(c), key=lambda j: -p[j])[:c if top_k is None else top_k]
        q = [p[j] if j in keep else 0.0 for j in range(c)]
        for i in range(c):
            for j in range(c):
                a[i][j] += q[i] * q[j] / len(rows)
    return a


def by_strength(a):
    return sorted(range(len(a)), key=lambda i: sum(a[i]))  # ascending, stable


def gw_at_permutation(a, b, perm):
    """The GW objective at the coupling pi_{i, perm[i]} = 1/n."""
    n = len(a)
    return sum((a[i][k] - b[perm[i]][perm[k]]) ** 2 for i in range(n) for k in range(n)) / n**2


def naive_gld(S, T_, temperature=1.0, top_k=None):
    a, b = graph(S, temperature, top_k), graph(T_, temperature, top_k)
    sa, sb = by_strength(a), by_strength(b)
    perm = [0] * len(a)
    for r in range(len(a)):
        perm[sa[r]] = sb[r]  # the r-th weakest student node goes to the r-th weakest teacher node
    return gw_at_permutation(a, b, perm)


def exact_gw(a, b):
    """min over all couplings; a brute force over permutations (exact for PSD graphs, see above)."""
    return min(gw_at_permutation(a, b, perm) for perm in itertools.permutations(range(len(a))))


def first_lower_bound(a, b):
    """Memoli's first lower bound: W_2^2 of the node eccentricities e(i) = sqrt(sum_k A_ik^2 / n),
    a sort in 1-D. For fixed i, j, |f - g|_{L2(pi)} >= | |f| - |g| | with f = A_i., g = B_j.; then the
    outer sum is a 1-D transport of e^A to e^B, solved by the monotone matching."""
    n = len(a)
    ea = sorted(math.sqrt(sum(v * v for v in row) / n) for row in a)
    eb = sorted(math.sqrt(sum(v * v for v in row) / n) for row in b)
    return sum((x - y) ** 2 for x, y in zip(ea, eb)) / n


def gw_at_coupling(a, b, pi):
    """sum_{ijkl} (A_ik - B_jl)^2 pi_ij pi_kl, the four indices written out (torch, float64); ``pi``:
    one coupling [n, n] or a stack of them [m, n, n]."""
    diff = (a[:, None, :, None] - b[None, :, None, :]) ** 2
    return torch.einsum("ijkl,...ij,...kl->...", diff, pi, pi)


def logits(b, c, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g, dtype=torch.float64),
            scale * torch.randn(b, c, generator=g, dtype=torch.float64))


def as_lists(s, t, temperature=1.0, top_k=None):
    return graph(s.tolist(), temperature, top_k), graph(t.tolist(), temperature, top_k)


# ---------------------------------------------------------------- the whole loss against loops
@pytest.mark.parametrize("b,c,kwargs", [
    (4, 3, {}), (8, 5, {"top_k": 2}), (16, 10, {}), (7, 12, {"top_k": 3, "temperature": 2.0}),
    (5, 6, {"top_k": 1}), (3, 4, {"top_k": 4}), (6, 5, {"top_k": None, "temperature": 0.5}),
])
def test_matches_the_naive_loop_reference(b, c, kwargs):
    s, t = logits(b, c, seed=b * 100 + c)
    want = naive_gld(s.tolist(), t.tolist(), kwargs.get("temperature", 1.0), kwargs.get("top_k", 10))
    assert gld(s, t, **kwargs).item() == pytest.approx(want, rel=1e-12, abs=1e-18)


def test_graph_matches_the_loop_graph():
    s, _ = logits(6, 7, seed=1)
    got = coactivation_graph(s, 1.5, 3)
    assert torch.allclose(got, torch.tensor(graph(s.tolist(), 1.5, 3), dtype=torch.float64), rtol=0, atol=1e-15)
    assert torch.allclose(got, got.T) and torch.linalg.eigvalsh(got).min() > -1e-15  # symmetric, PSD


# ---------------------------------------------------------------- against the exact GW
@pytest.mark.parametrize("seed", range(6))
def test_brute_force_is_the_minimum_over_all_couplings(seed):
    s, t = logits(5, 4, seed=seed)
    a, b = (torch.tensor(m, dtype=torch.float64) for m in as_lists(s, t, top_k=3))
    best = exact_gw(a.tolist(), b.tolist())
    # random couplings with marginals 1/n: random convex combinations of the 24 permutation matrices,
    # which reach every point of the polytope (Birkhoff-von Neumann); sparse and dense weights
    perms = torch.zeros(24, 4, 4, dtype=torch.float64)
    for m, p in enumerate(itertools.permutations(range(4))):
        perms[m, range(4), list(p)] = 0.25
    torch.manual_seed(seed)
    weights = torch.cat([torch.distributions.Dirichlet(torch.full((24,), conc, dtype=torch.float64)).sample((100,))
                         for conc in (0.05, 0.3, 1.0)])
    pi = torch.einsum("mp,pij->mij", weights, perms)
    assert torch.allclose(pi.sum(2), torch.full((300, 4), 0.25, dtype=torch.float64), rtol=0, atol=1e-14)
    assert torch.allclose(pi.sum(1), torch.full((300, 4), 0.25, dtype=torch.float64), rtol=0, atol=1e-14)
    assert gw_at_coupling(a, b, pi).min().item() >= best - 1e-15
    perm = min(itertools.permutations(range(4)), key=lambda p: gw_at_permutation(a.tolist(), b.tolist(), p))
    vertex = torch.zeros(4, 4, dtype=torch.float64)
    vertex[range(4), list(perm)] = 0.25
    assert gw_at_coupling(a, b, vertex).item() == pytest.approx(best, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("c,k", [(3, None), (4, 2), (4, None), (5, 3), (5, 5), (5, 1)])
@pytest.mark.parametrize("seed", range(4))
def test_equals_the_exact_gw_for_rank_one_graphs(c, k, seed):
    # one row per side: A = a a^T, the 1-D case, where the sorted coupling is optimal
    s, t = logits(1, c, seed=seed * 10 + c)
    a, b = as_lists(s, t, top_k=k)
    assert gld(s, t, top_k=k).item() == pytest.approx(exact_gw(a, b), rel=1e-10, abs=1e-16)
    # the same row repeated: still rank one (the graph is a mean over the rows)
    s4, t4 = s.expand(4, c), t.expand(4, c)
    assert gld(s4, t4, top_k=k).item() == pytest.approx(exact_gw(*as_lists(s4, t4, top_k=k)), rel=1e-10, abs=1e-16)


@pytest.mark.parametrize("k", [None, 3, 2])
def test_is_an_upper_bound_of_the_exact_gw_above_the_first_lower_bound(k):
    gaps = []
    for seed in range(12):
        s, t = logits(6, 5, seed=seed, scale=2.5)
        a, b = as_lists(s, t, top_k=k)
        exact, approx = exact_gw(a, b), gld(s, t, top_k=k).item()
        assert first_lower_bound(a, b) <= exact + 1e-15
        assert exact <= approx + 1e-15
        gaps.append(approx - exact)
    assert max(gaps) > 1e-9  # the bound is not always tight beyond rank one: the tests above discriminate


def test_zero_for_the_same_or_a_relabelled_teacher():
    s, _ = logits(8, 5, seed=3)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert gld(s, s.clone()).item() == 0.0
    assert gld(s, s[:, perm], top_k=3).item() == pytest.approx(0.0, abs=1e-18)
    assert exact_gw(*as_lists(s, s[:, perm], top_k=3)) == pytest.approx(0.0, abs=1e-18)


# ---------------------------------------------------------------- invariances
def test_invariances():
    s, t = logits(9, 7, seed=5)
    base = gld(s, t, top_k=4).item()
    g = torch.Generator().manual_seed(0)
    shift = lambda z: z + 10 * torch.randn(z.shape[0], 1, generator=g, dtype=z.dtype)  # noqa: E731
    classes, classes2 = torch.randperm(7, generator=g), torch.randperm(7, generator=g)
    rows, rows2 = torch.randperm(9, generator=g), torch.randperm(9, generator=g)
    same = [
        gld(shift(s), shift(t), top_k=4),                    # a shift of each row's logits (softmax)
        gld(s[:, classes], t[:, classes], top_k=4),          # one relabelling of the classes on both
        gld(s[:, classes], t[:, classes2], top_k=4),         # or a different one on each side
        gld(s[rows], t[rows2], top_k=4),                     # the order of the rows, even unpaired
        gld(s.repeat(3, 1), t.repeat(3, 1), top_k=4),        # a duplicated batch (the graph is a mean)
    ]
    for v in same:
        assert v.item() == pytest.approx(base, rel=1e-10)
    assert gld(t, s, top_k=4).item() == pytest.approx(base, rel=1e-12)  # symmetric in its arguments


def test_all_classes_when_top_k_is_none_or_large():
    s, t = logits(6, 5, seed=2)
    full = gld(s, t, top_k=None).item()
    assert gld(s, t, top_k=5).item() == full and gld(s, t, top_k=50).item() == full
    assert gld(s, t, top_k=2).item() != full


# ---------------------------------------------------------------- gradients, dtypes, registration
def test_float64_gradcheck():
    s, t = logits(6, 5, seed=11)
    for k in (None, 3):
        assert torch.autograd.gradcheck(lambda a, b: gld(a, b, top_k=k, temperature=1.5),
                                        (s.clone().requires_grad_(True), t.clone().requires_grad_(True)))


def test_float32_finite_and_differentiable_at_a_realistic_size():
    s, t = (x.float() for x in logits(128, 100, seed=4, scale=5.0))
    s.requires_grad_(True)
    loss = gld(s, t)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0 and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_descends_towards_the_teacher_structure():
    s, t = logits(16, 6, seed=8)
    s.requires_grad_(True)
    opt = torch.optim.Adam([s], lr=0.05)
    first = gld(s, t, top_k=3).item()
    for _ in range(60):
        opt.zero_grad()
        gld(s, t, top_k=3).backward()
        opt.step()
    assert gld(s, t, top_k=3).item() < 0.05 * first


def test_registered_as_a_batch_level_teacher_loss_with_ranges():
    assert LOSSES["gld"] is gld
    assert {"teacher": True, "per_sample": False, "batch": False}.items() <= LOSSES.meta("gld").items()
    ranges = LOSSES.meta("gld")["ranges"]
    check_args("losses.gld.args", ranges, {"top_k": 5, "temperature": 2.0})
    for bad in ({"top_k": 0}, {"top_k": 2.5}, {"temperature": 0}):
        with pytest.raises(ValueError, match="losses.gld.args"):
            check_args("losses.gld.args", ranges, bad)


def test_refuses_logits_of_different_shapes():
    with pytest.raises(ValueError, match="one shape"):
        gld(torch.zeros(4, 5), torch.zeros(4, 6))


def test_random_relabelled_teachers_are_all_at_zero():
    rng = random.Random(0)
    s, _ = logits(5, 5, seed=21)
    for _ in range(5):
        perm = list(range(5))
        rng.shuffle(perm)
        assert gld(s, s[:, perm], top_k=None).item() == pytest.approx(0.0, abs=1e-18)
