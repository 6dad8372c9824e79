"""Next-token divergences (mmkd.losses.tokens): each against a naive loop over tokens and vocabulary,
their end points and invariants, token masks, masked vocabularies and float64 gradients."""
import math

import pytest
import torch

from mmkd.losses import fkl, gjsd, kd, rkl, skew_fkl, skew_rkl, tvd

LOSSES = {"fkl": fkl, "rkl": rkl, "gjsd": gjsd, "skew_fkl": skew_fkl, "skew_rkl": skew_rkl, "tvd": tvd}


def make(shape=(2, 3, 5), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype) * 2, torch.randn(*shape, generator=g, dtype=dtype) * 2


def softmax(row, T=1.0):
    e = [math.exp(z / T) for z in row]
    return [x / sum(e) for x in e]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def naive(name, s_row, t_row, T=1.0, **kw):
    """The per-token value by the paper's formula, in plain Python over the vocabulary."""
    q, p = softmax(s_row, T), softmax(t_row, T)
    if name == "fkl":
        return kl(p, q)
    if name == "rkl":
        return kl(q, p)
    if name == "gjsd":
        b = kw.get("beta", 0.5)
        m = [b * x + (1 - b) * y for x, y in zip(p, q)]
        return b * kl(p, m) + (1 - b) * kl(q, m)
    if name == "skew_fkl":
        a = kw.get("alpha", 0.1)
        return kl(p, [a * x + (1 - a) * y for x, y in zip(p, q)])
    if name == "skew_rkl":
        a = kw.get("alpha", 0.1)
        return kl(q, [(1 - a) * x + a * y for x, y in zip(p, q)])
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q))


@pytest.mark.parametrize("name,kw", [("fkl", {}), ("rkl", {}), ("gjsd", {}), ("gjsd", {"beta": 0.2}),
                                     ("skew_fkl", {}), ("skew_fkl", {"alpha": 0.5}), ("skew_rkl", {}),
                                     ("skew_rkl", {"alpha": 0.3}), ("tvd", {}), ("fkl", {"temperature": 2.0})])
def test_matches_the_naive_loop_per_token(name, kw):
    s, t = make()
    got = LOSSES[name](s, t, reduction="none", **kw)
    T = kw.pop("temperature", 1.0)
    want = [naive(name, s[i, j].tolist(), t[i, j].tolist(), T, **kw) for i in range(2) for j in range(3)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(LOSSES[name](s, t, **({"temperature": T} if T != 1 else {}), **kw),
                               torch.tensor(want, dtype=torch.float64).mean())


@pytest.mark.parametrize("name", LOSSES)
def test_zero_at_equal_distributions_and_shift_invariant(name):
    s, t = make()
    assert LOSSES[name](s, s + 3.0, reduction="none").abs().max() < 1e-12  # logits shifted per row: same p
    assert LOSSES[name](s, t).item() > 0


def test_gjsd_end_points_are_the_kls_and_fkl_is_kd_without_t_squared():
    s, t = make()
    torch.testing.assert_close(gjsd(s, t, beta=0.0), fkl(s, t))
    torch.testing.assert_close(gjsd(s, t, beta=1.0), rkl(s, t))
    torch.testing.assert_close(skew_fkl(s, t, alpha=0.0), fkl(s, t))
    torch.testing.assert_close(skew_rkl(s, t, alpha=0.0), rkl(s, t))
    flat_s, flat_t = s.reshape(-1, 5), t.reshape(-1, 5)
    torch.testing.assert_close(fkl(flat_s, flat_t, temperature=4.0), kd(flat_s, flat_t, temperature=4.0) / 16)


def test_skew_kl_is_bounded_by_minus_log_alpha():
    s = torch.tensor([[30.0, -30.0, 0.0]], dtype=torch.float64)  # nearly disjoint supports
    t = torch.tensor([[-30.0, 30.0, 0.0]], dtype=torch.float64)
    assert fkl(s, t) > 50 and skew_fkl(s, t, alpha=0.1) <= -math.log(0.1) + 1e-9
    assert skew_rkl(s, t, alpha=0.1) <= -math.log(0.1) + 1e-9


@pytest.mark.parametrize("name", LOSSES)
def test_masked_tokens_count_for_nothing(name):
    s, t = make()
    mask = torch.tensor([[True, False, True], [False, False, True]])
    per = LOSSES[name](s, t, mask=mask, reduction="none")
    full = LOSSES[name](s, t, reduction="none")
    torch.testing.assert_close(per, torch.where(mask.reshape(-1), full, torch.zeros_like(full)))
    torch.testing.assert_close(LOSSES[name](s, t, mask=mask), full[mask.reshape(-1)].mean())
    s2 = s.clone()
    s2[~mask] = 1e3  # whatever sits at a padded position
    torch.testing.assert_close(LOSSES[name](s2, t, mask=mask), LOSSES[name](s, t, mask=mask))
    with pytest.raises(ValueError, match="token mask of shape"):
        LOSSES[name](s, t, mask=mask.reshape(-1))


@pytest.mark.parametrize("name", LOSSES)
def test_a_masked_vocabulary_entry_is_left_out(name):
    s, t = make((4, 5))
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, -1] = t_inf[:, -1] = -math.inf
    got = LOSSES[name](s_inf, t_inf, reduction="none")
    want = LOSSES[name](s[:, :-1], t[:, :-1], reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck_float64(name):
    s, t = make((3, 4))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: LOSSES[name](x, t, reduction="none"), (s,))


def test_half_precision_logits_compute_in_float32_and_shapes_must_match():
    s, t = make((3, 4), dtype=torch.float16)
    assert fkl(s, t).dtype == torch.float32
    with pytest.raises(ValueError, match="same tokens and the same vocabulary"):
        tvd(s, t[:, :3])
