"""The load-balancing losses of mmkd.routers.gating: MST-Distill's ``kl`` and ``cv`` (its reference
code's ``load_balancing_loss``) and the variants ``kl_sum`` and ``cv2``, on hand-computed cases; the
learned routers' choice among them and their default ``k``."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmkd.net import Output
from mmkd.routers import LinearRouter, cv2_balance, cv_balance, kl_balance, kl_sum_balance
from mmkd.routers.gating import BALANCES

TWO = torch.tensor([[0.9, 0.1], [0.5, 0.5]])  # m = [0.7, 0.3]
THREE = torch.tensor([[1 / 2, 1 / 4, 1 / 4], [1 / 6, 1 / 2, 1 / 3]])
KL_THREE = sum(1 / 3 * math.log((1 / 3) / m) for m in [(1 / 2 + 1 / 6) / 2, (1 / 4 + 1 / 2) / 2, (1 / 4 + 1 / 3) / 2])


def test_kl_balance_is_the_kl_from_uniform_divided_by_the_number_of_teachers():
    # KL(u || m) = 0.5 log(0.5 / 0.7) + 0.5 log(0.5 / 0.3) = 0.5 log(25 / 21); official: / T = / 2
    assert kl_balance(TWO).item() == pytest.approx(0.25 * math.log(25 / 21), rel=1e-6)
    assert kl_sum_balance(TWO).item() == pytest.approx(0.5 * math.log(25 / 21), rel=1e-6)
    assert kl_balance(THREE).item() == pytest.approx(KL_THREE / 3, rel=1e-5)
    assert kl_sum_balance(THREE).item() == pytest.approx(KL_THREE, rel=1e-5)
    for f in (kl_balance, kl_sum_balance):
        assert f(torch.tensor([[0.8, 0.2], [0.2, 0.8]])).item() == pytest.approx(0.0, abs=1e-7)
        assert math.isinf(f(torch.tensor([[1.0, 0.0], [1.0, 0.0]])).item())


def test_kl_balance_equals_the_reference_codes_expression():
    # MST-Distill's load_balancing_loss(mode="KL"): KLDivLoss(reduction="batchmean") on the [T] vector
    p = torch.randn(7, 5, generator=torch.Generator().manual_seed(0)).softmax(1)
    m = p.mean(0)
    ref = nn.KLDivLoss(reduction="batchmean")(m.log(), torch.full((5,), 1 / 5))
    assert kl_balance(p).item() == pytest.approx(ref.item(), rel=1e-6)


def test_cv_balance_is_the_unbiased_cv_and_cv2_the_squared_population_cv():
    # importance I = [2.1, 0.9]: mean 1.5; unbiased std sqrt(0.72 / 1); population variance 0.36
    p = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.7, 0.3]])
    assert cv_balance(p).item() == pytest.approx(math.sqrt(0.72) / 1.5, rel=1e-6)
    assert cv2_balance(p).item() == pytest.approx(0.36 / 1.5**2, rel=1e-5)
    # I = [2, 1, 0]: mean 1; unbiased variance (1 + 0 + 1) / 2 = 1, population variance 2 / 3
    p = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert cv_balance(p).item() == pytest.approx(1.0, rel=1e-6)
    assert cv2_balance(p).item() == pytest.approx(2 / 3, rel=1e-6)
    # I = [2, 0]: unbiased std sqrt(2), population variance 1, mean 1
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert cv_balance(p).item() == pytest.approx(math.sqrt(2), rel=1e-6)
    assert cv2_balance(p).item() == pytest.approx(1.0, rel=1e-6)
    for f in (cv_balance, cv2_balance):
        assert f(torch.full((3, 4), 0.25)).item() == pytest.approx(0.0, abs=1e-12)
    assert cv_balance(torch.ones(4, 1)).item() == 0.0  # one teacher: no spread to measure


def test_learned_router_uses_the_named_balance_and_routes_one_teacher_by_default():
    torch.manual_seed(0)
    x = torch.randn(6, 3)
    for name, f in BALANCES.items():
        router = LinearRouter(num_teachers=4, num_classes=3, mode="hard", balance=name, balance_weight=0.5)
        assert router.k == 1
        w = router(Output(x), [Output(x)] * 4, {})
        assert torch.equal(w.sum(1), torch.ones(6)) and torch.equal((w > 0).sum(1), torch.ones(6, dtype=torch.long))
        want = 0.5 * f(router.gate(x).softmax(1))
        torch.testing.assert_close(router.aux_losses["balance"], want)
    with pytest.raises(ValueError, match="choose from: kl, kl_sum, cv, cv2"):
        LinearRouter(num_teachers=4, num_classes=3, balance="l2")
