"""SinKD at the official code's scale: a naive loop copy of 2018cx/SinKD's ``Sinkhorn.sinkhorn_loss``
(loss.py), the 1/B-marginal plan it is B times, and hand cases."""
import inspect
import math

import pytest
import torch

from mmkd.losses.sinkd import sinkd


def softmax(row, t):
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def official_sinkhorn_loss(S, T_, temperature=2.0, epsilon=0.1, n_iters=20, mass=1.0):
    """``Sinkhorn.sinkhorn_loss(softmax(s / T), softmax(t / T))`` of the official loss.py, in loops:
    ``x = K``, then ``n_iters`` times ``x /= x.sum(1)`` (rows) and ``x /= x.sum(0)`` (columns);
    ``sum(x * Wxy)`` (without the 0.001 its ``forward`` multiplies by). ``mass=1 / B``: the same
    iterations with marginals 1/B (a plan of total mass 1)."""
    ps = [softmax(s, temperature) for s in S]
    pt = [softmax(t, temperature) for t in T_]
    B = len(ps)
    w = [[sum(abs(a - b) for a, b in zip(ps[i], pt[j])) for j in range(B)] for i in range(B)]
    x = [[math.exp(-w[i][j] / epsilon) for j in range(B)] for i in range(B)]
    for _ in range(n_iters):
        x = [[x[i][j] / sum(x[i]) * mass for j in range(B)] for i in range(B)]
        col = [sum(x[i][j] for i in range(B)) for j in range(B)]
        x = [[x[i][j] / col[j] * mass for j in range(B)] for i in range(B)]
    return sum(x[i][j] * w[i][j] for i in range(B) for j in range(B))


def logits(b, c, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, c, generator=g, dtype=torch.float64),
            scale * torch.randn(b, c, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("b,c,kwargs", [
    (4, 3, {}), (7, 5, {}), (16, 10, {}),
    (6, 4, {"temperature": 1.0, "epsilon": 0.5, "iterations": 5}),
    (5, 3, {"temperature": 4.0, "epsilon": 0.05, "iterations": 50}),
])
def test_matches_the_official_sinkhorn_loss(b, c, kwargs):
    s, t = logits(b, c, seed=b * 10 + c)
    want = official_sinkhorn_loss(s.tolist(), t.tolist(), kwargs.get("temperature", 2.0),
                                  kwargs.get("epsilon", 0.1), kwargs.get("iterations", 20))
    assert sinkd(s, t, **kwargs).item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_is_batch_size_times_the_unit_mass_plan(b):
    s, t = logits(b, 4, seed=b)
    got = sinkd(s, t).item()
    assert got == pytest.approx(b * official_sinkhorn_loss(s.tolist(), t.tolist(), mass=1 / b), rel=1e-9, abs=1e-12)


def test_defaults_are_the_official_ones():
    params = inspect.signature(sinkd).parameters
    assert (params["temperature"].default, params["epsilon"].default, params["iterations"].default) == (2.0, 0.1, 20)


def test_hand_cases():
    # one row: the plan is the single cell 1: |[1/2, 1/2] - [3/4, 1/4]|_1 = 1/2
    s = torch.zeros(1, 2, dtype=torch.float64)
    t = torch.tensor([[2 * math.log(3.0), 0.0]], dtype=torch.float64)
    assert sinkd(s, t).item() == pytest.approx(0.5, abs=1e-12)
    # B copies of that pair: every cost is 1/2 and every plan row sums to 1, so the value is B / 2
    assert sinkd(s.expand(5, 2), t.expand(5, 2)).item() == pytest.approx(2.5, abs=1e-12)
    # identical rows everywhere: zero cost, zero loss
    assert sinkd(t.expand(4, 2), t.expand(4, 2)).item() == pytest.approx(0.0, abs=1e-15)


def test_float32_finite_and_differentiable_at_a_sharp_epsilon():
    s, t = (x.float() for x in logits(32, 10, seed=3, scale=8.0))
    s.requires_grad_(True)
    loss = sinkd(s, t, epsilon=0.01, iterations=50)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
