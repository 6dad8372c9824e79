"""DAC-KL (mmkd.losses.tokens.dac_kl): the clipped teacher against a naive per-row loop and a hand-computed
case, forward KL at the full region, gradients to the sub-network and to the region's limits, masks, a sparse
teacher, and the term's module."""
import math

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term
from mmkd.losses import dac_kl, fkl
from mmkd.losses.tokens.dac_kl import ClipRegion
from mmkd.routers import ConstantRouter
from mmkd.sparse import SparseLogits


def make(n=5, v=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 2,
            torch.randn(n, v, generator=g, dtype=torch.float64) * 2)


def fixed(cuts):
    """A stand-in sub-network that always predicts ``cuts`` ``[N, 2]`` (head mass, tail mass)."""
    return lambda sorted_probs: cuts


def softmax(row, T=1.0):
    e = [math.exp(z / T) for z in row]
    return [x / sum(e) for x in e]


def naive(s_row, t_row, h, t, keep, T=1.0):
    """The per-token DAC-KL by the module docstring's formula, in plain Python."""
    p, q = softmax(t_row, T), softmax(s_row, T)
    order = sorted(range(len(p)), key=lambda v: -p[v])
    kept = {}
    for r, v in enumerate(order):
        above = sum(p[u] for u in order[:r])
        below = sum(p[u] for u in order[r + 1:])
        kept[v] = max(0.0, p[v] - min(p[v], max(0.0, h - above)) - min(p[v], max(0.0, t - below)))
    z = sum(kept.values())
    return sum(k / z * math.log(k / z / q[v]) for v, k in kept.items() if k > 0) - keep * math.log(1 - h - t)


@pytest.mark.parametrize("T,keep", [(1.0, 0.1), (2.0, 0.0), (0.5, 1.0)])
def test_matches_the_naive_per_row_loop(T, keep):
    s, t = make()
    g = torch.Generator().manual_seed(1)
    cuts = torch.rand(5, 2, generator=g, dtype=torch.float64) * 0.4  # limits inside classes, h + t < 0.8
    got = dac_kl(s, t, module=fixed(cuts), keep=keep, temperature=T, reduction="none")
    want = [naive(s[i].tolist(), t[i].tolist(), *cuts[i].tolist(), keep, T) for i in range(5)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(dac_kl(s, t, module=fixed(cuts), keep=keep, temperature=T),
                               torch.tensor(want, dtype=torch.float64).mean())


def test_a_region_inside_the_top_class_is_its_cross_entropy_and_cuts_are_exact():
    s = torch.tensor([[0.5, 0.0, -1.0]], dtype=torch.float64)
    t = torch.tensor([[0.2, 0.5, 0.3]], dtype=torch.float64).log()
    # region [0.1, 0.4] of the cumulative mass lies inside the top class (mass 0.5): p~ = delta at class 1
    got = dac_kl(s, t, module=fixed(torch.tensor([[0.1, 0.6]], dtype=torch.float64)), keep=0.0)
    torch.testing.assert_close(got, -s.log_softmax(-1)[0, 1])
    # cut 0.1 from the head (of class 1) and 0.25 from the tail (all of class 0, 0.05 of class 2):
    # p~ = (0, 0.4, 0.25) / 0.65 in class order
    got = dac_kl(s, t, module=fixed(torch.tensor([[0.1, 0.25]], dtype=torch.float64)), keep=0.0)
    log_q = s.log_softmax(-1)[0]
    want = 0.4 / 0.65 * (math.log(0.4 / 0.65) - log_q[1]) + 0.25 / 0.65 * (math.log(0.25 / 0.65) - log_q[2])
    torch.testing.assert_close(got, want)


def test_the_full_region_is_forward_kl():
    s, t = make()
    mask = torch.tensor([True, False, True, True, False])
    everything = fixed(torch.zeros(5, 2, dtype=torch.float64))
    for kw in ({"reduction": "none"}, {"temperature": 3.0}, {"mask": mask}, {"mask": mask, "reduction": "none"}):
        torch.testing.assert_close(dac_kl(s, t, module=everything, **kw), fkl(s, t, **kw))
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, -1] = t_inf[:, -1] = -math.inf  # a masked vocabulary entry is left out, as in fkl
    torch.testing.assert_close(dac_kl(s_inf, t_inf, module=everything, reduction="none"),
                               fkl(s[:, :-1], t[:, :-1], reduction="none"))


def test_the_sub_network_receives_the_sorted_teacher_probabilities_and_gradients():
    s, t = make()
    seen = []
    dac_kl(s, t, module=lambda x: seen.append(x) or torch.zeros(5, 2), temperature=2.0)
    torch.testing.assert_close(seen[0], (t / 2).softmax(-1).sort(-1, descending=True).values)
    torch.manual_seed(0)
    region = ClipRegion(num_classes=6, hidden=8)
    cuts = region(seen[0])
    assert cuts.shape == (5, 2) and (cuts > 0).all() and (cuts.sum(-1) < 1).all()
    assert (cuts.sum(-1) < 1e-3).all()  # it starts near the full region (forward KL)
    s.requires_grad_(True)
    dac_kl(s, t, module=region).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in region.parameters())
    assert s.grad.abs().max() > 0


def test_gradcheck_in_the_limits_and_the_student_logits():
    s, t = make(n=3, v=5)
    cuts = torch.tensor([[0.13, 0.21], [0.05, 0.4], [0.3, 0.02]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: dac_kl(s, t, module=fixed(c), reduction="none"), (cuts,))
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dac_kl(x, t, module=fixed(cuts.detach()), reduction="none"), (s,))


def test_a_sparse_teacher_is_its_dense_reconstruction():
    s, t = make()
    sp, cuts = SparseLogits.topk(t, 3), torch.tensor([[0.05, 0.1]] * 5, dtype=torch.float64)
    torch.testing.assert_close(dac_kl(s, sp, module=fixed(cuts)), dac_kl(s, sp.dense().double(), module=fixed(cuts)))


def test_the_terms_module_is_made_from_its_arguments_and_errors_are_one_line():
    term = Term("dac_kl", args={"hidden": 8, "keep": 0.5}, sizes={"num_classes": 6})
    assert isinstance(term.module, ClipRegion) and term.module.net[0].out_features == 8 and term.args == {"keep": 0.5}
    assert term.module.inputs == 6 and ClipRegion(num_classes=6, inputs=4).net[0].in_features == 4
    s, t = make()
    assert torch.isfinite(term.fn(s.float(), t.float(), module=term.module, **term.args))
    with pytest.raises(ValueError, match="no sub-network"):
        dac_kl(s, t)
    with pytest.raises(ValueError, match="inputs=9 exceeds"):
        ClipRegion(num_classes=6, inputs=9)
    with pytest.raises(ValueError, match="same tokens and the same vocabulary"):
        dac_kl(s, t[:, :4], module=fixed(torch.zeros(5, 2)))


def test_the_sub_network_trains_with_the_student_in_a_distiller():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    ids = torch.randint(0, 6, mask.shape)
    student, teacher = (nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 6)) for _ in range(2))
    term = Term("dac_kl", args={"hidden": 8}, sizes={"num_classes": 6})
    distiller = Distiller(Net(student, ("ids",), tokens="mask"), [Teacher(teacher, ("ids",), tokens="mask")], [term],
                          ConstantRouter())
    assert distiller.loss_modules["dac_kl"] is term.module
    losses = distiller({"ids": ids, "mask": mask})
    with torch.no_grad():
        want = dac_kl(student(ids)[mask], teacher(ids)[mask], module=term.module)
    torch.testing.assert_close(losses["dac_kl"], want)
    losses["loss"].backward()
    assert student[1].weight.grad.abs().max() > 0 and term.module.net[0].weight.grad.abs().max() > 0
