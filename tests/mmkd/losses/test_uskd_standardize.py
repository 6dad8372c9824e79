"""Tests for USKD (mmkd/losses/self/uskd.py) against a naive loop reference and hand-computed cases, and for
the logit standardisation option (``standardize=True``, mmkd.losses.kd.zscore) of kd, dkd and nkd."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkd import Distiller, Net, Term
from mmkd.config import check_loss_args
from mmkd.losses.dkd import dkd
from mmkd.losses.kd import kd, zscore
from mmkd.losses.nkd import nkd
from mmkd.losses.self.uskd import uskd, zipf_labels
from mmkd.registry import LOSSES
from tests.mmkd.losses.test_logit_losses import make, ref_dkd, ref_kd, ref_nkd, softmax


# ---------------------------------------------------------------- naive references (python loops)
def ref_uskd(S, Y, alpha=1.0, beta=0.1):
    """Per instance; rows with a negative label are 0 and outside the batch mean of s_y^2."""
    labelled = [i for i, y in enumerate(Y) if y >= 0]
    sq = {i: softmax(S[i])[Y[i]] ** 2 for i in labelled}
    mean_sq = sum(sq.values()) / max(len(labelled), 1)
    out = []
    for i, (s, y) in enumerate(zip(S, Y)):
        if y < 0:
            out.append(0.0)
            continue
        target = -(sq[i] + 1 - mean_sq) * math.log(softmax(s)[y])
        order = sorted(range(len(s)), key=lambda c: -s[c])  # every class, y too; stable: ties by index
        rank = {c: k + 1 for k, c in enumerate(order)}
        others = [c for c in range(len(s)) if c != y]
        zipf = [1 / rank[c] for c in others]
        n = softmax([s[c] for c in others])
        non = -sum(w / sum(zipf) * math.log(q) for w, q in zip(zipf, n))
        out.append(alpha * target + beta * non)
    return out


def ref_zscore(S):
    out = []
    for row in S:
        m = sum(row) / len(row)
        sd = math.sqrt(sum((v - m) ** 2 for v in row) / (len(row) - 1))
        out.append([(v - m) / (sd + 1e-7) for v in row])
    return out


USKD_HPARAMS = [{}, {"alpha": 0.1, "beta": 0.1}, {"alpha": 0.5, "beta": 2.0}]


# ------------------------------------------------------------------------------------ USKD
def test_uskd_registry_meta_and_defaults():
    assert LOSSES["uskd"] is uskd
    assert {"teacher": False, "per_sample": True, "batch": False}.items() <= LOSSES.meta("uskd").items()
    params = inspect.signature(uskd).parameters
    assert (params["alpha"].default, params["beta"].default) == (1.0, 0.1)  # the official defaults


@pytest.mark.parametrize("b,c", [(1, 2), (1, 7), (5, 2), (5, 7), (16, 10)])
@pytest.mark.parametrize("hp", USKD_HPARAMS)
def test_uskd_matches_naive_reference(b, c, hp):
    s, _, y = make(b, c, seed=b * 10 + c)
    expected = torch.tensor(ref_uskd(s.tolist(), y.tolist(), **hp), dtype=torch.float64)
    got = uskd(s, None, y, reduction="none", **hp)
    assert got.dtype == torch.float64 and got.shape == (b,)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(uskd(s, None, y, **hp), expected.mean(), rtol=1e-10, atol=1e-10)


def test_uskd_hand_computed():
    # one row, so p_y = s_y^2 + 1 - s_y^2 = 1. z = [0, ln 2, ln 3], y = 0: s = [1, 2, 3] / 6.
    # ranks (y included): class 2 -> 1, class 1 -> 2, class 0 -> 3; non-target Zipf [1/2, 1] -> q = [1/3, 2/3];
    # N(z) over classes 1, 2 = [2/5, 3/5].
    s = torch.tensor([[0.0, math.log(2), math.log(3)]], dtype=torch.float64)
    y = torch.tensor([0])
    non = -(1 / 3 * math.log(2 / 5) + 2 / 3 * math.log(3 / 5))
    assert uskd(s, None, y, alpha=1.0, beta=0.0).item() == pytest.approx(math.log(6), abs=1e-12)
    assert uskd(s, None, y, alpha=0.0, beta=1.0).item() == pytest.approx(non, abs=1e-12)
    assert uskd(s, None, y, alpha=0.7, beta=0.2).item() == pytest.approx(0.7 * math.log(6) + 0.2 * non, abs=1e-12)
    # two rows, two classes: the non-target term vanishes (one class, log N = 0) and p_y uses the batch mean.
    # row 0: z = [0, ln 3], y = 0 -> s_y = 1/4; row 1: z = [0, 0], y = 1 -> s_y = 1/2; mean s_y^2 = 5/32.
    s = torch.tensor([[0.0, math.log(3)], [0.0, 0.0]], dtype=torch.float64)
    y = torch.tensor([0, 1])
    want = [(1 / 16 + 1 - 5 / 32) * math.log(4), (1 / 4 + 1 - 5 / 32) * math.log(2)]
    assert uskd(s, None, y, reduction="none").tolist() == pytest.approx(want, abs=1e-12)


def test_zipf_label_ranks_the_target_too():
    # z = [3, 2, 1, 0], y = 1 (ranked 2nd): the non-target classes keep ranks 1, 3, 4 -> [1, 1/3, 1/4] / (19/12)
    z = torch.tensor([[3.0, 2.0, 1.0, 0.0]], dtype=torch.float64)
    got = zipf_labels(z, torch.tensor([1]))
    torch.testing.assert_close(got, torch.tensor([[12 / 19, 4 / 19, 3 / 19]], dtype=torch.float64))
    # ties are broken by class index: equal logits, y = 0 -> ranks 1..4, non-target [1/2, 1/3, 1/4]
    got = zipf_labels(torch.zeros(1, 4, dtype=torch.float64), torch.tensor([0]))
    torch.testing.assert_close(got, torch.tensor([[6 / 13, 4 / 13, 3 / 13]], dtype=torch.float64))


def test_official_ranking_score_orders_like_the_logits():
    # without the weak logits the official score is log s_c / (1 - log s_y + 1e-6): a positive rescaling
    # of each row's log-softmax, so its order is the logits' order, which is what uskd ranks by
    s, _, y = make(8, 9, seed=21)
    log_s = F.log_softmax(s, 1)
    score = log_s / (1 - log_s.gather(1, y[:, None]) + 1e-6)
    torch.testing.assert_close(zipf_labels(score, y), zipf_labels(s, y), rtol=0, atol=0)


def test_uskd_reductions():
    s, _, y = make(5, 7, seed=1)
    none = uskd(s, None, y, reduction="none")
    assert none.shape == (5,)
    torch.testing.assert_close(uskd(s, None, y), none.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(uskd(s, None, y, reduction="sum"), none.sum(), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        uskd(s, None, y, reduction="max")


def test_uskd_ignores_unlabelled_rows():
    s, _, y = make(6, 5, seed=2)
    y = y.clone()
    y[[1, 4]] = -1
    keep = y >= 0
    per = uskd(s, None, y, reduction="none")
    assert torch.all(per[~keep] == 0)
    torch.testing.assert_close(per[keep], uskd(s[keep], None, y[keep], reduction="none"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(uskd(s, None, y), uskd(s[keep], None, y[keep]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(per, torch.tensor(ref_uskd(s.tolist(), y.tolist()), dtype=torch.float64))
    s = s.clone().requires_grad_(True)
    uskd(s, None, y).backward()
    assert torch.all(s.grad[~keep] == 0)


def test_uskd_translation_invariant_not_scale_invariant():
    s, _, y = make(4, 6, seed=3)
    delta = torch.tensor([[-20.0], [3.0], [0.5], [17.0]], dtype=torch.float64)
    torch.testing.assert_close(uskd(s + delta, None, y), uskd(s, None, y), rtol=1e-9, atol=1e-10)
    assert not torch.allclose(uskd(2 * s, None, y), uskd(s, None, y))


@pytest.mark.parametrize("hp", USKD_HPARAMS)
def test_uskd_gradcheck(hp):
    s, _, y = make(4, 6, seed=10)
    # a single row has p_y = 1 and a locally constant Zipf label: nothing detached depends on the input
    for i in range(4):
        row = s[i:i + 1].clone().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a: uskd(a, None, y[i:i + 1], **hp), (row,))
    # a batch with alpha = 0: only the (locally constant) Zipf label is detached
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: uskd(a, None, y, alpha=0.0, beta=hp.get("beta", 0.1)), (x,))


def test_uskd_gradient_flows_only_where_the_official_code_keeps_it():
    s, _, y = make(6, 5, seed=4)
    x = s.clone().requires_grad_(True)
    uskd(x, None, y, alpha=0.8, beta=0.3).backward()
    # the same loss with p_y and q as constants, computed from the input beforehand
    sq = F.softmax(s, 1).gather(1, y[:, None])[:, 0] ** 2
    p_y, q = sq + 1 - sq.mean(), zipf_labels(s, y)
    other = torch.ones_like(s, dtype=torch.bool).scatter_(1, y[:, None], False)

    def frozen(a, p):
        non = F.log_softmax(a[other].view(6, 4), 1)
        return (0.8 * -p * F.log_softmax(a, 1).gather(1, y[:, None])[:, 0] - 0.3 * (q * non).sum(1)).mean()

    a = s.clone().requires_grad_(True)
    frozen(a, p_y).backward()
    torch.testing.assert_close(x.grad, a.grad, rtol=1e-12, atol=1e-14)
    # ... and it differs from the gradient through p_y, so the comparison above can tell them apart
    b = s.clone().requires_grad_(True)
    sq_b = F.softmax(b, 1).gather(1, y[:, None])[:, 0] ** 2
    frozen(b, sq_b + 1 - sq_b.mean()).backward()
    assert (b.grad - x.grad).abs().max().item() > 1e-4
    # the non-target term never touches the target logit
    z = s.clone().requires_grad_(True)
    uskd(z, None, y, alpha=0.0, beta=1.0).backward()
    assert torch.all(z.grad.gather(1, y[:, None]) == 0)


def test_uskd_large_logits_stay_finite():
    s, _, y = make(4, 6, seed=11, dtype=torch.float32)
    s = (s * 500).requires_grad_(True)
    loss = uskd(s, None, y)
    (g,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(loss) and torch.isfinite(g).all()


def test_uskd_in_a_teacherless_distiller_with_the_weak_term_as_its_own_term():
    # the official weak supervision, mu * CE_{0.1}(fc(f_mid), y), as a ce term on a feature with an adapter
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5))
    fc = nn.Linear(3, 5)
    terms = [Term("ce"), Term("uskd"), Term("ce", 0.005, {"label_smoothing": 0.1}, name="weak",
                                            student="features.1", adapter=fc)]
    d = Distiller(Net(model, ["x"], features=["1"]), [], terms)
    x, y = torch.randn(6, 4), torch.randint(0, 5, (6,))
    out = d({"x": x, "label": y})
    logits, mid = model(x), torch.relu(model[0](x))
    torch.testing.assert_close(out["uskd"], uskd(logits, None, y))
    weak = -(0.9 * F.one_hot(y, 5) + 0.1 / 5) * F.log_softmax(fc(mid), 1)
    torch.testing.assert_close(out["weak"], 0.005 * weak.sum(1).mean())
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, y) + out["uskd"] + out["weak"])


# ------------------------------------------------------------------------ logit standardisation
KL_LOSSES = {"kd": (kd, ref_kd), "dkd": (dkd, ref_dkd), "nkd": (nkd, ref_nkd)}
KL_HPARAMS = [("kd", {}), ("kd", {"temperature": 2.0}), ("dkd", {}),
              ("dkd", {"alpha": 9.0, "beta": 72.0, "temperature": 2.0}), ("nkd", {}),
              ("nkd", {"temperature": 2.0, "gamma": 0.7})]


def test_zscore_matches_a_loop():
    s, t, _ = make(5, 7, seed=30)
    for z in (s, t):
        torch.testing.assert_close(zscore(z), torch.tensor(ref_zscore(z.tolist()), dtype=torch.float64),
                                   rtol=1e-12, atol=1e-12)
    z = zscore(s)
    torch.testing.assert_close(z.mean(1), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(z.std(1), torch.ones(5, dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", KL_LOSSES)
def test_standardize_is_off_by_default(name):
    assert inspect.signature(KL_LOSSES[name][0]).parameters["standardize"].default is False
    check_loss_args(name, name, {"standardize": True})  # a config may set it


@pytest.mark.parametrize("b,c", [(1, 3), (5, 7)])
@pytest.mark.parametrize("name,hp", KL_HPARAMS)
def test_standardize_equals_the_loss_on_hand_zscored_logits(name, hp, b, c):
    fn, ref = KL_LOSSES[name]
    s, t, y = make(b, c, seed=b * 10 + c + 1)
    zs, zt = ref_zscore(s.tolist()), ref_zscore(t.tolist())
    got = fn(s, t, y, standardize=True, reduction="none", **hp)
    torch.testing.assert_close(got, fn(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64),
                                       y, reduction="none", **hp), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got, torch.tensor(ref(zs, zt, y.tolist(), **hp), dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,hp", KL_HPARAMS)
def test_standardize_off_leaves_each_loss_unchanged(name, hp):
    fn, ref = KL_LOSSES[name]
    s, t, y = make(5, 7, seed=31)
    want = torch.tensor(ref(s.tolist(), t.tolist(), y.tolist(), **hp), dtype=torch.float64)
    torch.testing.assert_close(fn(s, t, y, standardize=False, reduction="none", **hp), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fn(s, t, y, reduction="none", **hp), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("side", ["s", "t"])
@pytest.mark.parametrize("name,hp", KL_HPARAMS)
def test_standardize_is_invariant_to_per_row_affine_maps(name, hp, side):
    fn, _ = KL_LOSSES[name]
    s, t, y = make(5, 7, seed=32)
    g = torch.Generator().manual_seed(33)
    a = torch.rand(5, 1, generator=g, dtype=torch.float64) * 4.5 + 0.5  # a in [0.5, 5)
    shift = torch.randn(5, 1, generator=g, dtype=torch.float64) * 10
    s2, t2 = (a * s + shift, t) if side == "s" else (s, a * t + shift)
    base = fn(s, t, y, standardize=True, reduction="none", **hp)
    # exact up to the eps added to the std (relative effect ~ 1e-7 / std)
    torch.testing.assert_close(fn(s2, t2, y, standardize=True, reduction="none", **hp), base, rtol=1e-5, atol=1e-8)
    assert not torch.allclose(fn(s2, t2, y, reduction="none", **hp), fn(s, t, y, reduction="none", **hp))


@pytest.mark.parametrize("name", KL_LOSSES)
def test_standardize_gradcheck(name):
    fn, _ = KL_LOSSES[name]
    s, t, y = make(3, 5, seed=34)
    s.requires_grad_(True)
    if name == "nkd":  # nkd detaches the teacher's target probability by design
        assert torch.autograd.gradcheck(lambda a: fn(a, t, y, standardize=True), (s,))
    else:
        t.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a, b: fn(a, b, y, standardize=True), (s, t))


def test_standardize_large_logits_stay_finite():
    s, t, y = make(4, 6, seed=35, dtype=torch.float32)
    s, t = (s * 500).requires_grad_(True), t * 500
    for name, (fn, _) in KL_LOSSES.items():
        loss = fn(s, t, y, standardize=True)
        (g,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(loss) and torch.isfinite(g).all(), name
