"""Sampled training data and the golden metric (modalities/lm/sampled.py): generation up to the full
context, the samples' prompts, masks and seeding (offline: drawn once; online: fresh per epoch; the
global RNG untouched), the refused cached teacher, the golden KL against a naive computation and at
zero for the oracle itself, and a tiny run end to end."""
from __future__ import annotations

import csv
import json
from types import SimpleNamespace

import pytest
import torch

from mmkd import Distiller, Net, Teacher, Term
from mmkd.cache import Cached
from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.data import loader
from mmkd.modalities.lm.corpus import tinyshakespeare
from mmkd.modalities.lm.models import causal_lm, run_net
from mmkd.modalities.lm.sampled import Golden, Sampled, token_kl

from .conftest import TINY

T = 16  # TINY's block size


def test_generation_reads_at_most_the_context():
    model = causal_lm(11, (8,), n_layer=1, n_embd=8, n_head=2).eval()
    seen = []
    model.lm.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]), with_kwargs=True)
    new = model.generate(torch.tensor([[1, 2, 3]]), 8, temperature=1.0, seed=0)
    assert new.shape == (1, 8)  # the prompt kept its last token, then 8 new ones: the model read <= 8 tokens
    with pytest.raises(ValueError, match="ask for at most 8"):
        model.generate(torch.tensor([[1, 2]]), 9)


@pytest.fixture(scope="module")
def train(corpus):
    return tinyshakespeare(root=corpus, block_size=T).train


def trainer(epoch: int):
    return SimpleNamespace(epoch=epoch, device=torch.device("cpu"))


def student_of(run):
    net, _ = run_net(str(run))
    return Distiller(net, [], [Term("ce")])


def test_samples_continue_seeded_prompts_and_mask_them(tiny_run, train):
    policy = Sampled(str(tiny_run), "lm", count=10, prompt=4, every=0, seed=3, batch_size=4)
    module = student_of(tiny_run)
    before = torch.random.get_rng_state()
    data = policy.select(trainer(0), module, train)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is left as it was
    assert len(data) == 10 and policy.ids.shape == (10, T + 1)
    g = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    order = torch.randperm(len(train), generator=g)[:10].tolist()
    assert torch.equal(policy.ids[:, :4], torch.stack([train[i]["input_ids"][:4] for i in order]))
    item = data[0]
    assert item["mask"].tolist() == [False] * 3 + [True] * (T - 3)
    assert torch.equal(item["label"], policy.ids[0, 4:])  # the targets: the sampled tokens
    again = Sampled(str(tiny_run), "lm", count=10, prompt=4, every=0, seed=3, batch_size=4)
    assert torch.equal(again.select(trainer(0), module, train).ids, policy.ids)  # seeded
    other = Sampled(str(tiny_run), "lm", count=10, prompt=4, every=0, seed=4, batch_size=4)
    assert not torch.equal(other.select(trainer(0), module, train).ids, policy.ids)
    assert policy.select(trainer(1), module, train).ids is policy.ids  # offline: drawn once


def test_online_samples_are_fresh_every_epoch_and_resume(tiny_run, train):
    module = student_of(tiny_run)
    policy = Sampled(str(tiny_run), "lm", count=6, prompt=2, every=1, seed=0)
    first = policy.select(trainer(0), module, train).ids
    second = policy.select(trainer(1), module, train).ids
    assert not torch.equal(first, second)
    resumed = Sampled(str(tiny_run), "lm", count=6, prompt=2, every=1, seed=0)
    resumed.load_state_dict(policy.state_dict())
    assert torch.equal(resumed.select(trainer(1), module, train).ids, second)  # not drawn again


def test_a_cached_teacher_and_a_prompt_as_long_as_the_block_are_refused(tiny_run, train):
    net, _ = run_net(str(tiny_run), "lm")
    module = SimpleNamespace(teachers=[Cached(Teacher(net.model, ("input_ids",), tokens="mask"))])
    with pytest.raises(ConfigError, match="cached teacher"):
        Sampled(str(tiny_run), "lm", count=2).select(trainer(0), module, train)
    with pytest.raises(ConfigError, match="give a prompt of 1 to 15 tokens"):
        Sampled(str(tiny_run), "lm", count=2, prompt=16).select(trainer(0), student_of(tiny_run), train)


def test_golden_is_the_mean_token_kl_from_the_oracle(tiny_run, corpus):
    val = tinyshakespeare(root=corpus, block_size=T).val
    oracle, _ = run_net(str(tiny_run), "lm")
    student, _ = run_net(str(tiny_run))
    got = token_kl(oracle, student, val, torch.device("cpu"), batch_size=3)
    batch = next(iter(loader(val, len(val))))
    with torch.no_grad():
        p, q = oracle(batch).logits.log_softmax(-1), student(batch).logits.log_softmax(-1)
    assert got == pytest.approx(float((p.exp() * (p - q)).sum(1).mean()), rel=1e-5) and got > 0
    assert token_kl(student, student, val, torch.device("cpu")) == pytest.approx(0.0, abs=1e-6)
    metrics = {}
    Golden(str(tiny_run)).on_epoch_end(SimpleNamespace(device=torch.device("cpu"), val_data=val),
                                         Distiller(student, [], [Term("ce")]), metrics)
    assert metrics["val/golden"] == pytest.approx(0.0, abs=1e-6)  # the oracle is the student itself


def test_a_run_on_online_samples_reports_proxy_and_golden(tiny_run, corpus, tmp_path):
    run = tmp_path / "run"
    assert main(["run", "experiment=lm_shakespeare_fkl", f"data_root={corpus}", f"run_dir={run}",
                 f"cache_dir={tmp_path / 'cache'}", "teachers.lm.cache=false", f"teachers.lm.checkpoint={tiny_run}",
                 f"policies=[{{name: sampled, args: {{model: '{tiny_run}', model_name: lm, count: 8, prompt: 4, every: 1}}}}]",
                 f"callbacks=[{{name: golden, args: {{model: '{tiny_run}', model_name: lm}}}}]",
                 "trainer.metrics=[ppl,acc,tkl]", "baseline=false", *TINY, "trainer.max_epochs=2"]) == 0
    with (run / "student" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["val/golden"]) > 0 and float(r["val/tkl"]) > 0 for r in rows)
    # the oracle is the teacher here: golden and proxy are the same KL
    assert [float(r["val/golden"]) for r in rows] == pytest.approx([float(r["val/tkl"]) for r in rows], rel=1e-4)
    assert json.loads((run / "results.json").read_text())["student"]["test_ppl"] > 0


def test_a_model_of_another_vocabulary_is_refused(tiny_run, train):
    other = Net(causal_lm(60, (T,), n_layer=1, n_embd=8, n_head=2), ("input_ids",), tokens="mask")
    with pytest.raises(ConfigError, match="policies: sampled model predicts .* tokens, the student 60"):
        Sampled(str(tiny_run), "lm", count=2).select(trainer(0), SimpleNamespace(teachers=[], student=other), train)
