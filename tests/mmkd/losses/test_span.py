"""Span-level correlation consistency (mmkd.losses.tokens.span): against a naive loop over sequences and spans,
fixed-length and given spans, zero at equal distributions, masked positions and rows never counted, errors,
a sparse teacher and float64 gradients."""
import math

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term
from mmkd.losses import span_corr
from mmkd.routers import ConstantRouter
from mmkd.sparse import SparseLogits

MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 0, 1, 1],
                     [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)


def make(n=int(MASK.sum()), v=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g, dtype=torch.float64) * 2,
            torch.randn(n, v, generator=g, dtype=torch.float64) * 2)


def softmax(row, T=1.0):
    e = [math.exp(z / T) for z in row]
    return [x / sum(e) for x in e]


def naive(s, t, mask, span_of, T=1.0):
    """{row: value of the pair (row, next row)} by the formula, looping over sequences and positions."""
    rows, r = {}, 0
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[b, i]:
                rows[b, i], r = r, r + 1
    out = {}
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1] - 1):
            if (b, i) in rows and (b, i + 1) in rows and span_of(b, i) == span_of(b, i + 1) and span_of(b, i) >= 0:
                a, c = rows[b, i], rows[b, i + 1]
                qa, qc = softmax(s[a].tolist(), T), softmax(s[c].tolist(), T)
                pa, pc = softmax(t[a].tolist(), T), softmax(t[c].tolist(), T)
                out[a] = sum((x * y - u * w) ** 2 for x, y, u, w in zip(qa, qc, pa, pc))
    return out


@pytest.mark.parametrize("length,T", [(3, 1.0), (2, 2.0), (7, 1.0)])
def test_fixed_length_spans_match_the_naive_loop(length, T):
    s, t = make()
    want = naive(s, t, MASK, lambda b, i: i // length, T)
    batch = {"mask": MASK}
    got = span_corr(s, t, batch=batch, length=length, temperature=T, reduction="none")
    torch.testing.assert_close(got, torch.tensor([want.get(r, 0.0) for r in range(len(s))], dtype=torch.float64))
    torch.testing.assert_close(span_corr(s, t, batch=batch, length=length, temperature=T),
                               torch.tensor(sum(want.values()) / len(want), dtype=torch.float64))
    torch.testing.assert_close(span_corr(s, t, batch=batch, length=length, temperature=T, reduction="sum"),
                               torch.tensor(sum(want.values()), dtype=torch.float64))


def test_spans_from_a_batch_entry_and_another_mask_key():
    s, t = make()
    ids = torch.tensor([[0, 0, 1, 1, 1, -1, -1], [5, 5, 5, 5, 5, 6, 6], [2, 3, 3, 3, 3, 3, 3]])
    want = naive(s, t, MASK, lambda b, i: int(ids[b, i]))
    batch = {"keep": MASK, "phrases": ids}
    got = span_corr(s, t, batch=batch, tokens="keep", spans="phrases", reduction="none")
    torch.testing.assert_close(got, torch.tensor([want.get(r, 0.0) for r in range(len(s))], dtype=torch.float64))
    assert sorted(want) == [0, 2, 3, 7, 9, 12]  # pairs (row, row + 1); none across a masked position or -1 span


def test_zero_when_student_equals_teacher_and_positive_otherwise():
    s, t = make()
    batch = {"mask": MASK}
    assert span_corr(s, s + 2.0, batch=batch, reduction="none").abs().max() < 1e-15
    assert span_corr(s, t, batch=batch) > 0
    assert span_corr(s, t, batch=batch, length=1) == 0  # spans of one token hold no pair


def test_masked_positions_and_rows_are_never_counted():
    s, t = make()
    batch = {"mask": MASK}
    rows = torch.ones(len(s), dtype=torch.bool)
    rows[3] = False  # sequence 0, position 3: its pairs (2, 3) and (3, 4) drop out
    got = span_corr(s, t, batch=batch, length=7, mask=rows, reduction="none")
    full = span_corr(s, t, batch=batch, length=7, reduction="none")
    want = full.clone()
    want[[2, 3]] = 0
    torch.testing.assert_close(got, want)
    s2 = s.clone()
    s2[3] = 1e3  # whatever the masked row holds
    torch.testing.assert_close(span_corr(s2, t, batch=batch, length=7, mask=rows),
                               span_corr(s, t, batch=batch, length=7, mask=rows))
    pairs = int((full != 0).sum())
    torch.testing.assert_close(span_corr(s, t, batch=batch, length=7, mask=rows), got.sum() / (pairs - 2))


def test_errors_name_the_fix():
    s, t = make()
    with pytest.raises(ValueError, match="no batch"):
        span_corr(s, t)
    with pytest.raises(ValueError, match="tokens='mask' is not a batch entry"):
        span_corr(s, t, batch={"keep": MASK})
    with pytest.raises(ValueError, match="keeps 14 positions for 13 logits rows"):
        span_corr(s[:13], t[:13], batch={"mask": MASK})
    with pytest.raises(ValueError, match="spans='ids' must be a batch entry"):
        span_corr(s, t, batch={"mask": MASK}, spans="ids")
    with pytest.raises(ValueError, match="token mask of shape"):
        span_corr(s, t, batch={"mask": MASK}, mask=MASK)


def test_a_sparse_teacher_is_its_dense_reconstruction():
    s, t = make()
    sp = SparseLogits.topk(t, 2)
    torch.testing.assert_close(span_corr(s, sp, batch={"mask": MASK}),
                               span_corr(s, sp.dense().double(), batch={"mask": MASK}))


def test_gradcheck_float64():
    s, t = make()
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: span_corr(x, t, batch={"mask": MASK}, reduction="none"), (s,))


def test_a_distiller_term_reads_the_batchs_token_mask():
    torch.manual_seed(0)
    ids = torch.randint(0, 5, MASK.shape)
    student, teacher = (nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5)) for _ in range(2))
    distiller = Distiller(Net(student, ("ids",), tokens="mask"), [Teacher(teacher, ("ids",), tokens="mask")],
                          [Term("span_corr", args={"length": 3})], ConstantRouter())
    batch = {"ids": ids, "mask": MASK}
    losses = distiller(batch)
    with torch.no_grad():
        want = span_corr(student(ids)[MASK], teacher(ids)[MASK], batch=batch, length=3, reduction="none").mean()
    torch.testing.assert_close(losses["span_corr"], want)
    losses["loss"].backward()
    assert student[1].weight.grad.abs().max() > 0
