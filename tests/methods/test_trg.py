"""TRG token graphs and losses: hand examples, naive loop references, sampling, schedule, Distiller use."""
import math
import os

import pytest
import torch

from mmkd.distiller import Distiller, Term
from mmkd.net import Net, Teacher
from mmkd.registry import LOSSES
from mmkd.routers import ConstantRouter
from mmkd.schedules import Anneal
from mmkd.methods.trg import (TokenProjector, as_tokens, knn_graph, neighbour_log_probs, neighbours,
                              paired_tokens, trg_context, trg_global, trg_local)


def test_registered():
    for name in ("trg_local", "trg_global", "trg_context"):
        assert {"teacher": True, "per_sample": True, "batch": True}.items() <= LOSSES.meta(name).items()  # batch: the mask


def test_feature_map_tokens_are_positions():
    x = torch.randn(2, 3, 2, 4)
    tok = as_tokens(x)
    assert tok.shape == (2, 8, 3)
    assert torch.equal(tok[1, 1 * 4 + 2], x[1, :, 1, 2])  # row-major position (1, 2)
    assert as_tokens(torch.randn(2, 5, 3), skip=1).shape == (2, 4, 3)


def test_paired_tokens_read_the_same_positions():
    torch.manual_seed(0)
    s = torch.randn(3, 10, 4)
    s_tok, t_tok = paired_tokens(s, 2 * s, num_tokens=5)
    assert s_tok.shape == t_tok.shape == (3, 5, 4)
    assert torch.equal(2 * s_tok, t_tok)
    assert len({tuple(r) for r in s_tok[:, :, 0].tolist()}) == 3  # drawn per instance
    assert all(len(set(r)) == 5 for r in s_tok[:, :, 0].tolist())  # without replacement


def test_paired_tokens_draw_real_tokens_before_padding():
    t = torch.arange(8.0).view(1, 8, 1).expand(3, 8, 2).clone()  # token p holds the value p
    valid = torch.tensor([[1, 0, 1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 0]])
    for _ in range(5):
        s_tok, t_tok = paired_tokens(t.clone(), t, num_tokens=3, valid=valid)
        assert torch.equal(s_tok, t_tok)
        drawn = [set(t_tok[b, :, 0].long().tolist()) for b in range(3)]
        assert drawn[0] == {0, 2, 4}  # exactly the three real tokens
        assert len(drawn[1]) == 3  # any three distinct positions
        assert 6 in drawn[2] and len(drawn[2]) == 3  # the only real token, then padding
    with pytest.raises(ValueError, match="mask of shape"):
        paired_tokens(t, t, num_tokens=3, valid=valid[:, :5])
    with pytest.raises(KeyError, match="mask='attention_mask' is not an entry of the batch"):
        trg_context(t, t, num_tokens=3, mask="attention_mask", batch={"input_ids": t})
    loss = trg_context(t + torch.randn_like(t), t, num_tokens=3, mask="m", batch={"m": valid})
    assert torch.isfinite(loss)


def test_paired_tokens_map_counts_proportionally_and_pool_maps():
    s = torch.arange(4.0).view(1, 4, 1)
    t = torch.arange(8.0).view(1, 8, 1)
    s_tok, t_tok = paired_tokens(s, t)
    assert s_tok.flatten().tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert t_tok.flatten().tolist() == list(range(8))
    s_map, t_map = torch.randn(2, 3, 2, 2), torch.randn(2, 5, 4, 4)
    s_tok, t_tok = paired_tokens(s_map, t_map)
    assert s_tok.shape == (2, 4, 3) and t_tok.shape == (2, 4, 5)
    assert torch.allclose(t_tok[:, 0], t_map[:, :, :2, :2].mean(dim=(2, 3)))  # pooled to the 2x2 grid


def test_knn_graph_hand_example():
    x = torch.tensor([[[0.0], [1.0], [3.0]]])  # squared distances: (0,1)=1, (0,2)=9, (1,2)=4
    a, mask = knn_graph(x, k=1, sigma=1.0)
    want = torch.zeros(3, 3)
    want[0, 1] = want[1, 0] = math.exp(-0.5)
    want[2, 1] = math.exp(-2.0)
    assert torch.allclose(a[0], want)
    assert mask[0].tolist() == [[False, True, False], [True, False, False], [False, True, False]]
    a2, mask2 = knn_graph(x, k=2, sigma=2.0)
    assert mask2[0].tolist() == [[False, True, True], [True, False, True], [True, True, False]]
    assert torch.isclose(a2[0, 0, 2], torch.tensor(math.exp(-9 / 4)))
    with pytest.raises(ValueError, match="k=3"):
        knn_graph(x, k=3)


def _naive_local(s, t, k, sigma, normalize):
    total = []
    for b in range(len(s)):
        xs, xt = s[b].tolist(), t[b].tolist()
        if normalize:
            xs = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in xs]
            xt = [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in xt]
        n, loss = len(xt), 0.0
        d = lambda x, i, j: sum((x[i][c] - x[j][c]) ** 2 for c in range(len(x[i])))  # noqa: E731
        for i in range(n):
            nb = sorted((j for j in range(n) if j != i), key=lambda j: (d(xt, i, j), j))[:k]
            ws = [math.exp(-d(xs, i, j) / (2 * sigma)) for j in nb]  # the kernel weights A_ij on i's edges
            wt = [math.exp(-d(xt, i, j) / (2 * sigma)) for j in nb]
            ps = [w / sum(ws) for w in ws]  # normalised over i's neighbours
            pt = [w / sum(wt) for w in wt]
            loss += sum(p * (math.log(p) - math.log(q)) for p, q in zip(ps, pt))
        total.append(loss)
    return torch.tensor(total, dtype=torch.float64)


@pytest.mark.parametrize("normalize", [True, False])
def test_local_matches_loops(normalize):
    torch.manual_seed(1)
    s, t = torch.randn(3, 6, 4, dtype=torch.float64), torch.randn(3, 6, 5, dtype=torch.float64)
    got = trg_local(s, t, k=2, sigma=0.7 if normalize else 4.0, num_tokens=None, normalize=normalize,
                    reduction="none")
    want = _naive_local(s, t, 2, 0.7 if normalize else 4.0, normalize)
    assert torch.allclose(got, want, atol=1e-10)
    assert trg_local(s, s, k=2, num_tokens=None) == 0


def test_neighbour_distribution_hand_example():
    x = torch.tensor([[[0.0], [1.0], [3.0]]], dtype=torch.float64)  # squared distances 1, 9, 4
    nb = neighbours(x, 2)
    assert nb[0].tolist() == [[1, 2], [0, 2], [1, 0]]
    p = neighbour_log_probs(x, nb, sigma=0.5).exp()[0]
    # token 0: weights exp(-1), exp(-9) normalised; token 2: exp(-4), exp(-9)
    assert torch.allclose(p[0], torch.tensor([1, math.exp(-8)], dtype=torch.float64) / (1 + math.exp(-8)))
    assert torch.allclose(p[2], torch.tensor([1, math.exp(-5)], dtype=torch.float64) / (1 + math.exp(-5)))


def _clustered_tokens(g, batch=4, clusters=4, per=4, width=8):
    """Tokens in tight clusters of ``per`` around random centres, their spread growing within a cluster."""
    centres = torch.randn(batch, clusters, 1, width, generator=g, dtype=torch.float64)
    spread = torch.linspace(0.1, 0.5, per, dtype=torch.float64).view(1, 1, per, 1)
    noise = torch.randn(batch, clusters, per, width, generator=g, dtype=torch.float64)
    return (centres + spread * noise).reshape(batch, clusters * per, width)


def test_local_separates_structured_from_shuffled_tokens():
    """The student's tokens as the teacher's (rotated into another width, slightly perturbed) give a
    local loss near 0; the same student tokens at shuffled positions break every neighbourhood and
    give a loss far above it, over 1 nat per token. The old form, a softmax of the kernel weights
    A_ij in (0, 1], has logits within 1 of each other, near-uniform distributions (entropy within
    0.02 of log k here) and a value bounded by 2 nats per token; the normalised kernel at the
    default sigma (a temperature 0.1 on cosine similarities) is informative."""
    g = torch.Generator().manual_seed(0)
    t = _clustered_tokens(g)
    rot, _ = torch.linalg.qr(torch.randn(12, 8, generator=g, dtype=torch.float64))  # distance-preserving
    s = t @ rot.T
    structured = trg_local(s + 0.02 * torch.randn(s.shape, generator=g, dtype=torch.float64), t, k=4,
                           num_tokens=None, reduction="none")
    shuffled = trg_local(s[:, torch.randperm(16, generator=g)], t, k=4, num_tokens=None, reduction="none")
    assert (structured < 0.002 * 16).all()
    assert (shuffled > 1.0 * 16).all()
    assert (shuffled > 500 * structured).all()
    tn = torch.nn.functional.normalize(t, dim=-1)
    log_p = neighbour_log_probs(tn, neighbours(tn, 4), sigma=0.1)
    entropy = -(log_p.exp() * log_p).sum(-1).mean()
    assert entropy < math.log(4) - 0.2  # well below uniform over the 4 neighbours
    old = torch.log_softmax(torch.exp(-torch.cdist(tn, tn).pow(2).gather(-1, neighbours(tn, 4)) / 2), -1)
    assert -(old.exp() * old).sum(-1).mean() > math.log(4) - 0.02  # the old form: near uniform


def test_global_matches_loops():
    torch.manual_seed(2)
    s, t = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    tau = 0.3
    got = trg_global(s, t, temperature=tau, num_tokens=None, reduction="none")
    nrm = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    ss = [nrm(s[b, i].tolist()) for b in range(2) for i in range(3)]
    tt = [nrm(t[b, i].tolist()) for b in range(2) for i in range(3)]
    per_token = []
    for r in range(6):
        logits = [sum(x * y for x, y in zip(ss[r], tt[c])) / tau for c in range(6)]
        per_token.append(-logits[r] + math.log(sum(math.exp(v) for v in logits)))
    want = torch.tensor([sum(per_token[:3]) / 3, sum(per_token[3:]) / 3], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-10)
    with pytest.raises(ValueError, match="adapter"):
        trg_global(s, torch.randn(2, 3, 7), num_tokens=None)


def test_context_matches_loops():
    torch.manual_seed(3)
    s, t = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 6, dtype=torch.float64)
    got = trg_context(s, t, num_tokens=None, reduction="none")
    want = []
    for b in range(2):
        ms, mt = [], []
        for x, m in ((s[b], ms), (t[b], mt)):
            d = x.shape[1]
            for i in range(4):
                row = [math.exp(float(x[i] @ x[j]) / math.sqrt(d)) for j in range(4)]
                m.append([v / sum(row) for v in row])
        want.append(sum((ms[i][j] - mt[i][j]) ** 2 for i in range(4) for j in range(4)) / 16)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), atol=1e-12)


def test_gradcheck_float64():
    torch.manual_seed(4)
    s = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 3, dtype=torch.float64)
    for fn, kw in ((trg_local, {"k": 2}), (trg_global, {"temperature": 0.5}), (trg_context, {})):
        assert torch.autograd.gradcheck(lambda x: fn(x, t, num_tokens=None, **kw), (s,))


class _Conv(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = torch.nn.Conv2d(1, c, 3, padding=1)
        self.head = torch.nn.Linear(c, 3)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_terms_in_the_distiller_train_the_projector():
    torch.manual_seed(5)
    student, teacher = Net(_Conv(4), ["image"], ["body"]), Teacher(_Conv(6), ["image"], ["body"])
    proj = TokenProjector(4, 6)
    terms = [Term("kd"), Term("trg_local", 1.0, {"k": 3, "num_tokens": 8}, student="features.body", teacher="features.body"),
             Term("trg_global", 0.5, {"temperature": {"schedule": "cosine", "start": 1.0, "end": 0.1}}, student="features.body",
                  teacher="features.body", adapter=proj),
             Term("trg_context", 2.0, {}, student="features.body", teacher="features.body")]
    d = Distiller(student, [teacher], terms, ConstantRouter())
    batch = {"image": torch.randn(4, 1, 5, 5), "label": torch.tensor([0, 1, 2, 0])}
    losses = d(batch)
    assert set(losses) == {"kd", "trg_local", "trg_global", "trg_context", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    assert proj.proj.weight.grad is not None and proj.proj.weight.grad.abs().sum() > 0
    assert student.model.body.weight.grad.abs().sum() > 0
    assert terms[2].args["temperature"] == Anneal(1.0, 0.1)  # the config mapping, parsed (cosine)
    assert any(k.startswith("adapters.trg_global") for k in d.state_dict())


def test_token_projector_maps_and_sequences():
    p = TokenProjector(3, 5)
    x = torch.randn(2, 3, 4, 4)
    y = p(x)
    assert y.shape == (2, 5, 4, 4)
    assert torch.allclose(as_tokens(y), p(as_tokens(x)), atol=1e-6)


def test_trg_config_runs(run_experiment):
    """configs/experiment/trg_digits.yaml runs for one epoch through `mmkd run`; the conv projector trains."""
    run_dir, _ = run_experiment("trg_digits", "teachers.cnn.epochs=1")
    state = torch.load(run_dir / "student" / "best.pt")["model"]
    assert state["adapters.trg_global.0.weight"].shape == (64, 32, 1, 1)


def test_token_adapter_maps_every_token():
    from mmkd.adapters import make_adapter

    proj = make_adapter("token", (5, 3), (5, 7))
    x = torch.randn(2, 5, 3)
    y = proj(x)
    assert y.shape == (2, 5, 7)
    assert torch.allclose(y[1, 4], proj.weight @ x[1, 4] + proj.bias)


def test_last_layer_output_is_the_last_hidden_state():
    """The feature path trg_agnews reads (``encoder.encoder.layer.<last>.output``) is the encoder's output."""
    from mmkd.registry import MODELS

    model = MODELS["text_transformer"](num_classes=4, in_shape=(8,), hidden=16, layers=2, heads=2).eval()
    ids, mask = torch.randint(1, 100, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    out = Net(model, ["input_ids", "attention_mask"], ["encoder.encoder.layer.1.output"])(
        {"input_ids": ids, "attention_mask": mask})
    want = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out.features["encoder.encoder.layer.1.output"], want)


needs_data = pytest.mark.skipif("MMKD_DATA" not in os.environ,
                                reason="set MMKD_DATA to the shared data folder")


@needs_data
def test_trg_avdigits_config_runs(run_experiment):
    """configs/experiment/trg_avdigits.yaml, one epoch on a narrower teacher: every TRG term trains."""
    import csv

    run_dir, results = run_experiment("trg_avdigits", "teachers.cnn.epochs=1", "teachers.cnn.args.channels=[8,16,16]")
    assert 0 <= results["student"]["test_acc"] <= 1
    row = next(csv.DictReader((run_dir / "student" / "metrics.csv").open()))
    assert all(float(row[f"train/{k}"]) > 0 for k in ("kd", "trg_local", "trg_global", "trg_context"))
    state = torch.load(run_dir / "student" / "best.pt")["model"]
    assert state["adapters.trg_global.0.weight"].shape == (16, 32, 1, 1)


@needs_data
def test_trg_agnews_config_runs(run_experiment):
    """configs/experiment/trg_agnews.yaml on 16 sentences of 16 tokens: MiniLM fine-tunes with its own
    learning rate, the student's last hidden states are projected token by token to MiniLM's width."""
    import csv

    run_dir, results = run_experiment("trg_agnews", "data.args.limit=16", "data.args.max_length=16",
                            "student.args.hidden=32", "trainer.scheduler=none")
    assert 0 <= results["student"]["test_acc"] <= 1
    lr = {stage: float(next(csv.DictReader((run_dir / stage / "metrics.csv").open()))["lr"])
          for stage in ("teachers/minilm", "student")}
    assert lr == {"teachers/minilm": 1e-4, "student": 1e-3}
    state = torch.load(run_dir / "student" / "best.pt")["model"]
    assert state["adapters.trg_global.weight"].shape == (384, 32)
