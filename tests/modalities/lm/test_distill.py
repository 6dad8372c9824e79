"""Language models in the mixture core: a token is an instance. Padding never reaches a loss or a
metric, per-token router weights mix teachers token by token, the sparse token cache serves each
example's stored targets whatever the batch order, fidelity and perplexity match naive computations,
and a tiny run end to end: `mmkd run`, `mmkd generate`, and bad input with exit code 2."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkd import Distiller, Net, Teacher, Term, Trainer
from mmkd.cli import main
from mmkd.data import loader
from mmkd.metrics import MetricSet
from mmkd.modalities.lm.corpus import pad, stream
from mmkd.modalities.lm.models import causal_lm
from mmkd.router import Router
from mmkd.routers import ConstantRouter
from mmkd.sparse import SparseLogits
from mmkd.token_cache import SHARD, bytes_per_token, cache_tokens

V, T = 11, 6


class NaNAtPadding(nn.Module):
    """A sequence model whose logits are NaN wherever the input is the pad id (0)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, V)

    def forward(self, ids):
        z = self.emb(ids)
        return torch.where((ids == 0).unsqueeze(-1), torch.full_like(z, math.nan), z)


def padded_docs():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(2, V, (int(n),), generator=g).tolist() for n in torch.randint(1, T, (12,), generator=g)]
    return pad("docs", docs, T, pad_id=0, eos_id=1)


def test_padding_never_reaches_a_loss_or_a_metric():
    data = padded_docs()
    batch = next(iter(loader(data, 12)))
    assert (~batch["mask"]).any() and len(batch["label"]) == int(batch["mask"].sum())
    torch.manual_seed(0)
    student = Net(NaNAtPadding(), ("input_ids",), tokens="mask")
    teacher = Teacher(NaNAtPadding(), ("input_ids",), tokens="mask")
    # pad positions are inputs only after the document's eos: the kept positions read real tokens
    module = Distiller(student, [teacher], [Term("ce"), Term("fkl"), Term("kd")], router=ConstantRouter())
    losses = module(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    seq = student.model(batch["input_ids"])
    keep = batch["mask"]
    assert torch.allclose(losses["ce"], F.cross_entropy(seq[keep], batch["label"]))
    got = Trainer(device="cpu", metrics=["ppl", "acc", "loss"]).evaluate(module, data)
    assert all(math.isfinite(v) for v in got.values())
    full = next(iter(loader(data, len(data))))
    z = student.model(full["input_ids"])[full["mask"]]
    ce = F.cross_entropy(z, full["label"]).detach()
    assert got["loss"] == pytest.approx(float(ce), rel=1e-5) and got["ppl"] == pytest.approx(math.exp(float(ce)), rel=1e-5)
    assert got["acc"] == pytest.approx(float((z.argmax(1) == full["label"]).double().mean()))


class PerToken(Router):
    """Weights ``[tokens, 2]`` from a fixed function of the student's logits (one row per kept token)."""

    def forward(self, student, teachers, batch):
        w = torch.sigmoid(student.logits.detach()[:, 0])
        return torch.stack([w, 1 - w], 1)


def test_router_weights_mix_teachers_token_by_token():
    data = padded_docs()
    batch = next(iter(loader(data, 12)))
    torch.manual_seed(1)
    models = [causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2) for _ in range(3)]
    student = Net(models[0], ("input_ids",), tokens="mask")
    teachers = [Teacher(m, ("input_ids",), tokens="mask") for m in models[1:]]
    module = Distiller(student, teachers, [Term("fkl")], router=PerToken())
    got = module(batch)["fkl"]
    keep = batch["mask"]
    zs = models[0](batch["input_ids"])[keep]
    w = torch.sigmoid(zs[:, 0])
    want = 0.0
    for n in range(len(zs)):  # naive: per token, each teacher's KL(p_t || q) weighted by its router weight
        q = F.log_softmax(zs[n], -1)
        for i, (m, wi) in enumerate(zip(models[1:], (w[n], 1 - w[n]))):
            p = F.log_softmax(m(batch["input_ids"])[keep][n], -1)
            want = want + wi * (p.exp() * (p - q)).sum()
    assert torch.allclose(got, want / len(zs), atol=1e-6)


def test_fidelity_metrics_against_a_naive_count():
    g = torch.Generator().manual_seed(0)
    z, ref_logits = torch.randn(50, V, generator=g), torch.randn(50, V, generator=g)
    ref = F.log_softmax(ref_logits, 1)
    m = MetricSet(["agree", "tkl", "acc"])
    assert m.reads_reference and not MetricSet(["acc"]).reads_reference
    m.update(z[:20], torch.zeros(20, dtype=torch.long), ref[:20])
    m.update(z[20:], torch.zeros(30, dtype=torch.long), ref[20:])
    got = m.compute()
    assert got["agree"] == pytest.approx(sum(int(a.argmax() == b.argmax()) for a, b in zip(z, ref)) / 50)
    kl = sum(float((r.exp() * (r - F.log_softmax(a, 0))).sum()) for a, r in zip(z, ref)) / 50
    assert got["tkl"] == pytest.approx(kl, rel=1e-5)
    plain = MetricSet(["agree", "acc"])
    plain.update(z, torch.zeros(50, dtype=torch.long))  # no reference: agreement left out, not 0
    assert set(plain.compute()) == {"acc"}


def test_reference_is_the_router_weighted_mixture_of_the_live_teachers(tmp_path):
    torch.manual_seed(2)
    models = [causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2) for _ in range(3)]
    data = padded_docs()
    teachers = [Teacher(m, ("input_ids",), tokens="mask") for m in models[1:]]
    cached = cache_tokens(teachers[0], data, tmp_path, k=4)
    module = Distiller(Net(models[0], ("input_ids",), tokens="mask"), [cached, teachers[1]], [Term("fkl")],
                       router=ConstantRouter([0.25, 0.75]))
    batch = next(iter(loader(data, 12)))
    keep = batch["mask"]
    p = [F.softmax(m(batch["input_ids"])[keep], -1) for m in models[1:]]
    want = (0.25 * p[0] + 0.75 * p[1]).log()  # the live teacher's full distribution, not the top-4 cache
    assert torch.allclose(module.reference(batch), want, atol=1e-5)


def test_token_cache_is_keyed_by_example_and_position(tmp_path):
    torch.manual_seed(3)
    teacher = Teacher(causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2), ("input_ids",), tokens="mask")
    data = padded_docs()
    cached = cache_tokens(teacher, data, tmp_path, k=3, batch_size=5)
    order = torch.randperm(len(data)).tolist()
    shuffled = data.__getitems__(order)
    out = cached(shuffled)
    live = SparseLogits.topk(teacher.model(shuffled["input_ids"])[shuffled["mask"]], 3)
    assert isinstance(out.logits, SparseLogits) and out.logits.shape == (int(shuffled["mask"].sum()), V)
    assert torch.equal(out.logits.indices, live.indices)
    assert torch.allclose(out.logits.values, live.values, atol=2e-3)  # float16 storage
    assert torch.allclose(out.logits.tail, live.tail, atol=1e-3)
    assert torch.allclose(out.logits.dense().exp().sum(1), torch.ones(len(live)), atol=1e-3)
    again = cache_tokens(teacher, data, tmp_path, k=3)  # a hit: nothing recomputed
    assert again.folder == cached.folder and again.meta["bytes_per_token"] == bytes_per_token(3, V) == 3 * 3 + 2


def test_a_missing_shard_is_rebuilt_and_the_others_kept(tmp_path):
    torch.manual_seed(4)
    teacher = Teacher(causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2), ("input_ids",), tokens="mask")
    g = torch.Generator().manual_seed(0)
    data = stream("long", torch.randint(0, V, (T * (SHARD + 40) + 1,), generator=g), T)
    cached = cache_tokens(teacher, data, tmp_path, k=2, batch_size=512)
    first, second = cached.folder / "s0.tail.npy", cached.folder / "s1.tail.npy"
    kept = first.stat().st_mtime_ns
    second.unlink()
    rebuilt = cache_tokens(teacher, data, tmp_path, k=2, batch_size=512)
    assert second.is_file() and first.stat().st_mtime_ns == kept
    batch = data.__getitems__([SHARD + 3, 1])
    assert torch.equal(rebuilt(batch).logits.indices, cached(batch).logits.indices)


def test_sparse_cache_loss_is_close_to_the_live_dense_one(tmp_path):
    torch.manual_seed(5)
    student = Net(causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2), ("input_ids",), tokens="mask")
    teacher = Teacher(causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2), ("input_ids",), tokens="mask")
    data = padded_docs()
    batch = next(iter(loader(data, 12)))
    live = Distiller(student, [teacher], [Term("fkl")], router=ConstantRouter())(batch)["fkl"].item()
    full = Distiller(student, [cache_tokens(teacher, data, tmp_path, k=V)], [Term("fkl")], router=ConstantRouter())
    top = Distiller(student, [cache_tokens(teacher, data, tmp_path, k=4)], [Term("fkl")], router=ConstantRouter())
    assert full(batch)["fkl"].item() == pytest.approx(float(live), abs=2e-3)  # float16 storage only
    assert top(batch)["fkl"].item() <= float(live) + 2e-3  # the bucketed KL is at most the dense one


# ----------------------------------------------------------------------------- end to end, CLI




def test_a_tiny_lm_run_reports_perplexity_fidelity_and_samples(tiny_run):
    results = json.loads((tiny_run / "results.json").read_text())
    student = results["student"]
    assert {"test_ppl", "test_acc", "test_agree", "test_tkl"} <= set(student)
    assert student["test_ppl"] == pytest.approx(math.exp(student["test_loss"]), rel=1e-6)
    assert 0 <= student["test_agree"] <= 1 and student["test_tkl"] >= 0
    assert "test_agree" not in results["baseline"]  # no teacher: nothing to be faithful to
    assert (tiny_run / "tokenizer.json").is_file()
    assert (tiny_run / "samples.txt").read_text().count("=== continuation (greedy)") == 4


def test_generate_continues_a_prompt(tiny_run, capsys):
    assert main(["generate", f"run_dir={tiny_run}", "prompt=To be", "max_new_tokens=7"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed.startswith("To be") and len(printed) == len("To be") + 7  # characters: one per token
    assert main(["generate", f"run_dir={tiny_run}", "prompt=To be", "max_new_tokens=5", "temperature=0.8",
                 "top_p=0.9", "seed=3"]) == 0
    first = capsys.readouterr().out
    main(["generate", f"run_dir={tiny_run}", "prompt=To be", "max_new_tokens=5", "temperature=0.8", "top_p=0.9",
          "seed=3"])
    assert capsys.readouterr().out == first  # seeded sampling


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkd: error: ") and "\n" not in err, err
    return err


def test_a_tokenizer_that_does_not_match_the_checkpoint(tiny_run, tmp_path, capsys):
    import shutil

    other = tmp_path / "run"
    shutil.copytree(tiny_run, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["chars"] = tok["chars"][:-3] if "chars" in tok else tok
    (other / "tokenizer.json").write_text(json.dumps(tok))
    err = one_line_error(capsys, ["generate", f"run_dir={other}", "prompt=To"])
    assert "does not match the checkpoint" in err


def test_a_block_larger_than_the_context(corpus, tmp_path, capsys):
    err = one_line_error(capsys, ["run", "experiment=lm_shakespeare_ce", f"data_root={corpus}", f"out_dir={tmp_path}",
                                  "data.args.block_size=16", "student.args.context=8"])
    assert "16 tokens, more than the model's context of 8" in err and "block_size" in err
    assert not any(tmp_path.iterdir())  # nothing written before the config is checked


def test_a_missing_or_undecodable_corpus(tmp_path, capsys):
    err = one_line_error(capsys, ["run", "experiment=lm_shakespeare_ce", f"data_root={tmp_path}", f"out_dir={tmp_path / 'o'}"])
    assert "tinyshakespeare" in err and "input.txt" in err
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_bytes(b"To be\n\xff\xfe or not")
    err = one_line_error(capsys, ["run", "experiment=lm_shakespeare_ce", f"data_root={tmp_path}", f"out_dir={tmp_path / 'o'}"])
    assert "input.txt" in err and "UTF-8" in err


def test_a_saved_model_with_another_vocabulary(corpus, tmp_path, capsys):
    lm = causal_lm(V + 5, (16,), n_layer=1, n_embd=8, n_head=2)
    lm.lm.save_pretrained(tmp_path / "hf")
    capsys.readouterr()
    err = one_line_error(capsys, ["run", "experiment=lm_shakespeare_ce", f"data_root={corpus}", f"out_dir={tmp_path / 'o'}",
                                  "data.args.block_size=16", f"student.args.path={tmp_path / 'hf'}"])
    assert f"vocabulary of {V + 5} tokens" in err and "tokenizer" in err


def test_taid_on_tokens_resumes_exactly(tmp_path):
    """TAID over tokens, 3 epochs straight and 1 epoch + a crash + a resume: the same t, the same weights."""
    from mmkd.losses.adaptive.taid import TAIDInterpolation
    from tests.reference import Crash, CrashAtEpoch

    data = padded_docs()

    def module():
        torch.manual_seed(6)
        teacher = Teacher(causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2), ("input_ids",), tokens="mask")
        student = Net(causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2), ("input_ids",), tokens="mask")
        return Distiller(student, [teacher], [Term("taid")], router=ConstantRouter())

    def trainer(name, **kw):
        return Trainer(run_dir=tmp_path / name, max_epochs=3, batch_size=4, device="cpu", progress="off",
                       tensorboard=False, **kw)

    full = trainer("full").fit(module(), data, data, [TAIDInterpolation(alpha=0.05)])
    with pytest.raises(Crash):
        trainer("cut").fit(module(), data, data, [TAIDInterpolation(alpha=0.05), CrashAtEpoch(1)])
    resumed = trainer("cut", resume=True).fit(module(), data, data, [TAIDInterpolation(alpha=0.05)])
    assert [r["taid/t"] for r in resumed.history] == [r["taid/t"] for r in full.history]
    assert full.history[-1]["taid/t"] > 0.4  # t moved
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert all(torch.equal(v, b["callbacks"]["TAIDInterpolation"][k]) for k, v in a["callbacks"]["TAIDInterpolation"].items())
