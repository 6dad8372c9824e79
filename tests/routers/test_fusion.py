"""Dynamic logit fusion: the fused logits, the objective and its search against naive references."""
import itertools
import math

import pytest
import torch

from mmkd.net import Output
from mmkd.routers.fusion import DynamicFusion, Fused, fuse, objective, solve


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def naive_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))


def softmax(z):
    e = [math.exp(v - max(z)) for v in z]
    return [v / sum(e) for v in e]


def test_fuse_against_a_loop():
    large, base, experts, alpha = logits(4, 5), logits(4, 5, seed=1), logits(4, 3, 5, seed=2), logits(4, 3, seed=3)
    want = large.clone()
    for i in range(4):
        for k in range(3):
            want[i] += alpha[i, k] * (experts[i, k] - base[i])
    assert torch.allclose(fuse(large, base, experts, alpha), want, atol=1e-6)


def test_objective_against_a_naive_computation():
    large, base, experts, alpha = logits(3, 6), logits(3, 6, seed=1), logits(3, 2, 6, seed=2), logits(3, 2, seed=3)
    got = objective(large, base, experts, alpha)
    for i in range(3):
        p_l, p_s = softmax(large[i].tolist()), softmax(base[i].tolist())
        z = [large[i, v] + sum(alpha[i, k] * (experts[i, k, v] - base[i, v]) for k in range(2)) for v in range(6)]
        p_f = softmax([float(x) for x in z])
        want = 0.0
        for k in range(2):
            p_e = softmax(experts[i, k].tolist())
            want += (naive_kl(p_f, p_l) - naive_kl(p_e, p_s)) ** 2 + (naive_kl(p_f, p_e) - naive_kl(p_l, p_s)) ** 2
        assert got[i].item() == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_a_large_model_equal_to_the_base_takes_the_experts_shift_whole():
    """L = S: alpha = 1 makes the fused model the expert, with objective 0; the search finds it."""
    base, experts = logits(8, 7), logits(8, 1, 7, seed=1)
    grid = torch.linspace(0, 2, 21)
    assert torch.allclose(objective(base, base, experts, torch.ones(8, 1)), torch.zeros(8), atol=1e-6)
    alpha = solve(base, base, experts, grid)
    assert torch.allclose(alpha, torch.ones(8, 1))
    assert torch.allclose(fuse(base, base, experts, alpha).softmax(-1), experts[:, 0].softmax(-1), atol=1e-6)


def test_one_expert_is_the_grid_argmin_of_each_row():
    large, base, experts = logits(6, 5), logits(6, 5, seed=1), logits(6, 1, 5, seed=2)
    grid = torch.linspace(-1, 3, 17)
    alpha = solve(large, base, experts, grid, chunk=4)  # two chunks
    for i in range(6):
        scores = [objective(large[i:i + 1], base[i:i + 1], experts[i:i + 1], g.view(1, 1)).item() for g in grid]
        assert alpha[i, 0].item() == grid[min(range(len(grid)), key=scores.__getitem__)].item()


def test_several_experts_end_at_a_coordinate_minimum_of_the_grid():
    large, base, experts = logits(5, 6), logits(5, 6, seed=1), 2 * logits(5, 3, 6, seed=2)
    grid = torch.linspace(0, 2, 11)
    alpha = solve(large, base, experts, grid, sweeps=20)
    best = objective(large, base, experts, alpha)
    assert (best <= objective(large, base, experts, torch.zeros(5, 3)) + 1e-7).all()
    for k, g in itertools.product(range(3), grid):
        moved = alpha.clone()
        moved[:, k] = g
        assert (best <= objective(large, base, experts, moved) + 1e-6).all()


def test_static_weights_and_the_fused_model():
    """alpha = 0.5 with two experts: weights (1, -1, 0.5, 0.5), logits z_L + 0.5 (z_1 - z_S) + 0.5 (z_2 - z_S)."""
    torch.manual_seed(0)
    models = [torch.nn.Embedding(9, 9) for _ in range(4)]
    ids = torch.randint(0, 9, (2, 5))
    router = DynamicFusion(alpha=0.5)
    z = [m(ids) for m in models]
    w = router(None, [Output(x.reshape(10, 9)) for x in z], {})
    assert torch.equal(w, torch.tensor([[1.0, -1.0, 0.5, 0.5]]).expand(10, 4))
    want = z[0] + 0.5 * (z[2] - z[1]) + 0.5 * (z[3] - z[1])
    assert torch.allclose(Fused(models[0], models[1], models[2:], router)(ids), want, atol=1e-6)


def test_the_fused_model_searches_per_token():
    torch.manual_seed(1)
    models = [torch.nn.Embedding(7, 7) for _ in range(3)]
    ids = torch.randint(0, 7, (3, 4))
    fused = Fused(models[0], models[1], models[2:])
    out = fused(ids)
    z = [m(ids).reshape(12, 7) for m in models]
    alpha = solve(z[0], z[1], z[2][:, None], torch.linspace(0, 2, 21))
    assert out.shape == (3, 4, 7)
    assert torch.allclose(out.reshape(12, 7), fuse(z[0], z[1], z[2][:, None], alpha), atol=1e-5)
    assert torch.equal(fused.router.last, alpha)
    assert out.requires_grad  # the models' gradients flow; the weights are constants


@pytest.mark.parametrize("make, match", [
    (lambda: DynamicFusion(grid=[]), "fusion grid"),
    (lambda: DynamicFusion(grid=[0, float("nan")]), "fusion grid"),
    (lambda: DynamicFusion(sweeps=0), "sweeps=0"),
    (lambda: Fused(torch.nn.Identity(), torch.nn.Identity(), []), "at least one expert"),
    (lambda: DynamicFusion()(None, [Output(torch.zeros(2, 3))] * 2, {}), "at least 3, got 2"),
])
def test_bad_fusion_arguments_are_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)
