"""Swing distillation (mmkd.losses.swing): KD at a temperature per row from the batch's privacy scores,
noisy soft targets (seeded, of the configured scale), and the canaries (mmkd.modalities.canaries) whose
exposure benchmarks/swing.py measures; the experiment config trains on the real AG News files."""
import math
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.losses import kd, swing
from mmkd.losses.swing import draw_noise, item_noise
from mmkd.modalities.canaries import Canary, exposure, exposures, plant
from mmkd.routers import ConstantRouter
from tests.reference import Crash, CrashAtEpoch, ref_kd

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


def make(n=6, c=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s, t = (3 * torch.randn(n, c, generator=g, dtype=dtype) for _ in range(2))
    return s, t, torch.rand(n, generator=g, dtype=dtype)


def test_equal_temperatures_without_noise_are_kd():
    s, t, scores = make()
    got = swing(s, t, batch={"private": scores}, temperature=3.0, private_temperature=3.0, noise_scale=0,
                reduction="none")
    torch.testing.assert_close(got, kd(s, t, temperature=3.0, reduction="none"))
    public = swing(s, t, batch={"private": torch.zeros(6)}, temperature=2.0, private_temperature=9.0, noise_scale=0)
    private = swing(s, t, batch={"private": torch.ones(6)}, temperature=2.0, private_temperature=9.0, noise_scale=0)
    torch.testing.assert_close(public, kd(s, t, temperature=2.0))
    torch.testing.assert_close(private, kd(s, t, temperature=9.0))


def test_each_row_is_kd_at_its_own_temperature():
    s, t, scores = make(dtype=torch.float64)
    args = dict(batch={"p": scores}, score_key="p", temperature=2.0, private_temperature=10.0, noise_scale=0)
    got = swing(s, t, **args, reduction="none")
    want = torch.cat([ref_kd(s[i:i + 1], t[i:i + 1], T=2.0 + 8.0 * scores[i].item()) for i in range(len(s))])
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, kd(s, t, temperature=2.0, reduction="none"))  # the scores matter
    torch.testing.assert_close(swing(s, t, **args), want.mean())


def test_an_instances_score_reaches_each_of_its_tokens():
    s, t, _ = make(n=12, dtype=torch.float64)  # 3 sentences x 4 tokens, rows in sentence order
    scores = torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)
    got = swing(s, t, batch={"private": scores}, temperature=1.0, private_temperature=5.0, noise_scale=0,
                reduction="none")
    want = torch.cat([ref_kd(s[i:i + 1], t[i:i + 1], T=1.0 + 4.0 * scores[i // 4].item()) for i in range(12)])
    torch.testing.assert_close(got, want)
    token_scores = scores.repeat_interleave(4).reshape(3, 4)  # a score per token, [sentences, tokens]
    torch.testing.assert_close(swing(s, t, batch={"private": token_scores}, temperature=1.0,
                                     private_temperature=5.0, noise_scale=0, reduction="none"), want)


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_noise_has_the_configured_scale(kind):
    x = draw_noise((200_000,), kind, 0.3, torch.Generator().manual_seed(0)).double()
    assert abs(x.mean().item()) < 0.005
    if kind == "gaussian":
        assert x.std().item() == pytest.approx(0.3, rel=0.01)
        assert (x.abs() < 0.3).double().mean().item() == pytest.approx(0.6827, abs=0.005)
    else:  # Laplace(0, b): E|x| = b, std sqrt(2) b, P(|x| < b) = 1 - 1/e
        assert x.abs().mean().item() == pytest.approx(0.3, rel=0.01)
        assert x.std().item() == pytest.approx(math.sqrt(2) * 0.3, rel=0.01)
        assert (x.abs() < 0.3).double().mean().item() == pytest.approx(1 - math.exp(-1), abs=0.005)


def test_the_noisy_targets_are_the_soft_targets_plus_the_items_noise_clipped_and_renormalised():
    s, t, scores = make(n=4, c=3, dtype=torch.float64)
    index = torch.tensor([7, 2, 9, 4])
    got = swing(s, t, batch={"private": scores, "index": index}, temperature=2.0, private_temperature=6.0,
                noise="gaussian", noise_scale=0.2, noise_seed=3, reduction="none")
    temps = 2.0 + 4.0 * scores
    e = item_noise(index, 1, 3, "gaussian", 0.2, 3).double()
    assert (torch.softmax(t / temps[:, None], 1) + e < 0).any()  # some probabilities are clipped
    for i in range(4):
        q = (torch.softmax(t[i] / temps[i], 0) + e[i]).clamp_min(0)
        q = q / q.sum()
        log_p = torch.log_softmax(s[i] / temps[i], 0)
        want = temps[i] ** 2 * sum(qc * (math.log(qc) - lp) for qc, lp in zip(q.tolist(), log_p.tolist()) if qc > 0)
        assert got[i].item() == pytest.approx(want.item(), rel=1e-12)


def test_fresh_noise_follows_the_global_seed():
    s, t, scores = make()
    args = dict(batch={"private": scores}, reduction="none")  # the defaults: Laplace noise, b = 0.05, fresh draws
    torch.manual_seed(1)
    a = swing(s, t, **args)
    torch.manual_seed(1)
    b = swing(s, t, **args)
    c = swing(s, t, **args)  # the generator moved on: new draws
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert not torch.allclose(a, swing(s, t, **args, noise_scale=0))


def test_seeded_noise_is_fixed_per_item_whatever_the_batch():
    s, t, scores = make()
    index = torch.arange(10, 16)
    args = dict(noise="laplace", noise_scale=0.1, noise_seed=5, reduction="none")
    torch.manual_seed(0)
    a = swing(s, t, batch={"private": scores, "index": index}, **args)
    torch.manual_seed(1)  # the global generator plays no part
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    b = swing(s[perm], t[perm], batch={"private": scores[perm], "index": index[perm]}, **args)
    torch.testing.assert_close(b, a[perm], rtol=0, atol=0)
    other = swing(s, t, batch={"private": scores, "index": index}, **{**args, "noise_seed": 6})
    assert not torch.allclose(a, other)
    rows = item_noise(torch.tensor([4, 4, 8]), 2, 3, "gaussian", 1.0, 0)  # an item's rows: one generator's draws
    assert torch.equal(rows[:2], rows[2:4]) and not torch.equal(rows[:2], rows[4:])
    assert torch.equal(rows[:2].reshape(-1), draw_noise((6,), "gaussian", 1.0, torch.Generator().manual_seed(4)))


def test_gradcheck_float64():
    s, t, scores = make(n=4, c=3, dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)
    batch = {"private": scores, "index": torch.arange(4)}
    assert torch.autograd.gradcheck(lambda a, b: swing(a, b, batch=batch, temperature=1.5, private_temperature=7.0,
                                                       noise_scale=0), (s, t))
    noisy = {"batch": batch, "noise_scale": 0.05, "noise_seed": 0}  # fixed noise: a function of the student's logits
    assert torch.autograd.gradcheck(lambda a: swing(a, t.detach(), **noisy, reduction="none"), (s,))


def test_bad_inputs_name_the_fix():
    s, t, scores = make()
    with pytest.raises(ValueError, match="no privacy score 'private'.*score_key"):
        swing(s, t, batch={"score": scores})
    with pytest.raises(ValueError, match=r"privacy score 1\.5 outside \[0, 1\]"):
        swing(s, t, batch={"private": torch.tensor([0.0, 1.5, 0, 0, 0, 0])})
    with pytest.raises(ValueError, match="4 values for 6 logit rows"):
        swing(s, t, batch={"private": torch.zeros(4)})
    with pytest.raises(ValueError, match="noise='uniform'; choose from: laplace, gaussian"):
        swing(s, t, batch={"private": scores}, noise="uniform")
    with pytest.raises(ValueError, match="batch\\['index'\\].*noise_seed: null"):
        swing(s, t, batch={"private": scores}, noise_scale=0.1, noise_seed=0)


def test_a_resumed_fit_draws_the_same_noise(tmp_path):
    """4 epochs straight and 2 + a resume to 4, with fresh noise from the global generator: the same weights."""
    g = torch.Generator().manual_seed(0)
    data = TensorDictDataset("s", x=torch.randn(32, 6, generator=g), label=torch.randint(0, 3, (32,), generator=g),
                             private=(torch.rand(32, generator=g) < 0.3).float())

    def fresh(seed=0):
        torch.manual_seed(seed)
        return Distiller(Net(nn.Linear(6, 3), ("x",)), [Teacher(nn.Linear(6, 3), ("x",))],
                         [Term("swing", args={"noise_scale": 0.2})], ConstantRouter())

    def fit(run_dir, module, callbacks=(), resume=False):
        return Trainer(run_dir=run_dir, max_epochs=4, batch_size=8, lr=0.5, keep="last", resume=resume,
                       tensorboard=False, progress="off").fit(module, data, data, callbacks=list(callbacks))

    full_mod = fresh()
    fit(tmp_path / "full", full_mod)
    with pytest.raises(Crash):
        fit(tmp_path / "cut", fresh(), [CrashAtEpoch(2)])
    resumed_mod = fresh(seed=5)
    fit(tmp_path / "cut", resumed_mod, resume=True)
    for k, v in full_mod.state_dict().items():
        assert torch.equal(v, resumed_mod.state_dict()[k]), k


def test_exposure_of_a_hand_made_ranking():
    losses = torch.tensor([0.5, 0.1, 0.9, 0.3])
    assert exposure(losses, 1) == 2.0  # rank 1 of 4: log2 4 - log2 1
    assert exposure(losses, 3) == 1.0  # rank 2
    assert exposure(losses, 2) == 0.0  # rank 4
    assert exposure(torch.tensor([0.2, 0.2, 0.2, 0.2]), 0) == pytest.approx(2 - math.log2(2.5))  # ties: mean rank
    assert exposure(torch.tensor([0.1, 0.2, 0.2, 0.7]), 2) == pytest.approx(2 - math.log2(2.5))  # ranks 2 and 3


def test_canary_candidates_and_their_exposure_under_a_model():
    canary = Canary("my pin is {}", (0, 4), label=2)
    texts = canary.candidates()
    assert len(texts) == 100 and texts[31] == "my pin is 3 1"
    assert texts[canary.index] == canary.text() == "my pin is 0 4"
    ids = torch.arange(100)[:, None]

    def logits_of(b):  # the loss on label 2 grows with |id - 4|: the canary (id 4) ranks first
        x = b["ids"].double()
        return torch.cat([torch.zeros_like(x), torch.zeros_like(x), -(x - 4).abs(), torch.zeros_like(x)], 1)

    assert exposures(logits_of, [canary], [{"ids": ids}], batch_size=7) == [math.log2(100)]
    assert exposures(logits_of, [Canary("my pin is {}", (0, 9), label=2)], [{"ids": ids}]) == \
        [pytest.approx(math.log2(100) - math.log2(10))]  # ids 0-8 lie closer to 4 than 9: rank 10
    planted = plant(3, 4, num_classes=4, seed=0)
    assert planted == plant(3, 4, num_classes=4, seed=0) != plant(3, 4, num_classes=4, seed=1)
    assert len({c.template for c in planted}) == 3 and all(len(c.secret) == 4 for c in planted)
    with pytest.raises(ValueError, match="canaries=9; at most 8"):
        plant(9, 3, 4, 0)


@pytest.fixture
def data_root():
    if DATA is None:
        pytest.skip("set MMKD_DATA to the data root (for example ../shared/data)")
    return DATA


def test_the_canaries_join_the_training_split_flagged_private(data_root):
    from mmkd.modalities.canaries import agnews_canaries
    from mmkd.modalities.text import tokenize

    d = agnews_canaries(data_root, canaries=2, digits=3, copies=3, canary_seed=1, limit=10, max_length=16)
    train = d.train.tensors
    assert (len(d.train), len(d.val), len(d.test)) == (16, 10, 10)
    assert train["private"].tolist() == [0.0] * 10 + [1.0] * 6
    assert d.val.tensors["private"].sum() == 0 and d.test.tensors["private"].sum() == 0
    planted = plant(2, 3, 4, 1)
    assert train["label"][10:].tolist() == [planted[0].label] * 3 + [planted[1].label] * 3
    assert (train["row"][10:] == -1).all() and (train["row"][:10] >= 0).all()
    tok = tokenize([planted[1].text()], max_length=16)
    assert torch.equal(train["input_ids"][-1], tok["input_ids"][0])


def test_config_trains_a_step_on_a_tiny_subset(data_root, tmp_path):
    from mmkd.cli import compose
    from mmkd.run import run

    cfg = compose(["experiment=agnews_swing", f"data_root={data_root}", f"out_dir={tmp_path}", "data.args.limit=8",
                   "data.args.canaries=2", "data.args.copies=2", "teachers.bert.epochs=1", "trainer.max_epochs=1",
                   "trainer.tensorboard=false", "trainer.progress=off"])
    assert cfg.losses.swing.args.score_key == cfg.data.args.score_key == "private"
    assert cfg.losses.ce.weight == 0  # the student learns of the canaries through the teacher alone
    r = run(cfg)
    assert r["student"]["test_acc"] >= 0 and math.isfinite(r["student"]["test_loss"])
    history = (Path(r["run_dir"]) / "student" / "metrics.csv").read_text().splitlines()
    assert len(history) == 2 and math.isfinite(float(history[1].split(",")[history[0].split(",").index("train/swing")]))
