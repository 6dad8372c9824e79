"""PGKD: the validation report, the generation plan, the writer's texts, the appended items and their
schedule, and the pipeline's cycles (early stopping, labelling, resumption) on a fake AG News."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from mmkd import Distiller, Net, Term, Trainer, TrainerConfig
from mmkd.cli import compose, main
from mmkd.config import ConfigError
from mmkd.data import TensorDictDataset
from mmkd.methods.pgkd import (Appended, AppendedPolicy, f1_per_class, hard_negatives, options, plan, read_items,
                               write)
from mmkd.models import Generative
from mmkd.modalities.agnews import CLASS_NAMES


def test_f1_per_class_matches_sklearn():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        pred, target = torch.randint(0, 4, (50,), generator=g), torch.randint(0, 3, (50,), generator=g)
        want = f1_score(target.numpy(), pred.numpy(), labels=[0, 1, 2, 3], average=None, zero_division=0)
        assert np.allclose(f1_per_class(pred, target, 4).numpy(), want)
    assert f1_per_class(torch.tensor([0, 0]), torch.tensor([0, 0]), 3).tolist() == [1.0, 0.0, 0.0]


def test_hard_negatives_are_the_wrong_items_most_confident_first():
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    target = torch.tensor([0, 0, 0, 1, 0, 1])
    # wrong: 1 (0.8), 2 (0.7), 3 (0.6), 4 (0.7); a tie goes to the lower index
    assert hard_negatives(probs, target).tolist() == [1, 2, 4, 3]
    assert hard_negatives(probs[:1], target[:1]).tolist() == []


OPTS = {"per_cycle": 7, "worst": 2, "hard": 0.5, "prompt_words": 2}


def test_the_plan_asks_the_worst_classes_for_texts_near_their_hard_negatives():
    names = ["A", "B", "C"]
    f1 = torch.tensor([0.9, 0.2, 0.2])  # B and C tie: B first, and it takes the remainder
    texts = ["a b c d", "one two three", "x y z", "p q", "single"]
    target = torch.tensor([0, 1, 2, 1, 2])
    hard = torch.tensor([4, 0, 3, 1])  # most confident first; 0 is class A's (not asked)
    got = plan(f1, hard, target, texts, names, OPTS)
    assert [k for k, _ in got] == [1] * 4 + [2] * 3
    # B: 4 texts, 2 from its hard negatives 3 then 1; C: 3 texts, round(1.5) = 2 from its one hard negative
    assert [p for _, p in got] == ["B: p q", "B: one two", "B: ", "B: ", "C: single", "C: single", "C: "]
    # no raw texts, or no hard negative of a class: plain prompts
    assert [p for _, p in plan(f1, hard, target, None, names, OPTS)] == ["B: "] * 4 + ["C: "] * 3
    assert [p for _, p in plan(f1, torch.tensor([0]), target, texts, names, {**OPTS, "hard": 1.0})] == \
        ["B: "] * 4 + ["C: "] * 3


class Tok:
    """Characters as token ids (``eos`` = 0)."""

    eos_id = 0

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


class Scripted(Generative, torch.nn.Module):
    """Continues each prompt with ``"<n> " + "z" * n + eos + "q"``, ``n`` its length; records the calls."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def forward(self, input_ids):
        raise NotImplementedError

    def generate(self, ids, max_new_tokens, temperature=0.0, top_p=1.0, seed=0):
        self.calls.append((ids.shape, seed))
        n = ids.shape[1]
        return torch.tensor([[ord(c) for c in f"{n} " + "z" * n] + [0, ord("q")]] * len(ids))


def test_write_groups_prompts_by_length_cuts_at_eos_and_keeps_the_prompt_words():
    gen = Scripted()
    prompts = ["A: ", "B: two words", "A: ", "B: ", "A: x"]
    got = write(gen, Tok(), prompts, {"batch_size": 2, "max_new_tokens": 9, "temperature": 1.0, "top_p": 1.0}, seed=5)
    assert got == ["3 zzz", "two words 12 zzzzzzzzzzzz", "3 zzz", "3 zzz", "x 4 zzzz"]
    # three prompts of length 3 (two batches), one of 4, one of 12; each batch its own seed
    assert [(tuple(s), seed) for s, seed in gen.calls] == [
        ((2, 3), 5 * 1_000_003), ((1, 3), 5 * 1_000_003 + 1), ((1, 4), 5 * 1_000_003 + 2), ((1, 12), 5 * 1_000_003 + 3)]


def toy(n=5):
    return TensorDictDataset("toy", x=torch.arange(n * 2, dtype=torch.float32).view(n, 2), label=torch.arange(n) % 2,
                             index=torch.arange(n))


def test_appended_serves_the_added_rows_after_the_data_set_in_any_order():
    base = toy()
    extra = {"x": -torch.arange(6, dtype=torch.float32).view(3, 2) - 1, "label": torch.tensor([1, 0, 1])}
    data = Appended(base, extra)
    assert len(data) == 8
    ids = [6, 0, 7, 2, 5]
    batch = data.__getitems__(ids)
    for j, i in enumerate(ids):
        want = base[i] if i < 5 else {k: v[i - 5] for k, v in extra.items()}
        assert torch.equal(batch["x"][j], want["x"]) and batch["label"][j] == want["label"]
    assert batch["index"].tolist() == ids
    assert torch.equal(data[6]["x"], extra["x"][1])


def test_the_policy_reads_npz_refuses_pickles_and_missing_entries(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.zeros((2, 2), dtype=np.float32), label=np.array([1, 0]))
    policy = AppendedPolicy(str(tmp_path / "ok.npz"))
    data = toy()
    made = policy.select(None, None, data)
    assert len(made) == 7 and policy.select(None, None, data) is made and policy.planned(data) is made
    assert made.extra["label"].dtype == data.tensors["label"].dtype
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(ConfigError, match="not a NumPy .npz"):
        read_items(str(tmp_path / "obj.npz"))
    with pytest.raises(ConfigError, match="no such file"):
        read_items(str(tmp_path / "none.npz"))
    np.savez(tmp_path / "ragged.npz", x=np.zeros((2, 2)), label=np.zeros(3))
    with pytest.raises(ConfigError, match="one row per item"):
        read_items(str(tmp_path / "ragged.npz"))
    np.savez(tmp_path / "short.npz", x=np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ConfigError, match="lack label"):
        AppendedPolicy(str(tmp_path / "short.npz")).select(None, None, data)


def test_the_schedule_is_laid_out_on_the_extended_data(tmp_path):
    """An epoch over 5 + 7 items in batches of 4 is 3 steps, so the cosine schedule of 2 epochs ends (lr 0)
    at step 6; laid out on the 5 items alone (2 steps an epoch) it would turn back up after step 4."""
    np.savez(tmp_path / "more.npz", x=np.ones((7, 2), dtype=np.float32), label=np.zeros(7, dtype=np.int64))
    torch.manual_seed(0)
    model = Distiller(Net(torch.nn.Linear(2, 2), ["x"]), [], terms=[Term("ce")])
    trainer = Trainer(TrainerConfig(max_epochs=2, batch_size=4, lr=0.1, scheduler="cosine", warmup_epochs=0,
                                    progress="off", tensorboard=False), run_dir=tmp_path / "run")
    trainer.fit(model, toy(), toy(), callbacks=[AppendedPolicy(str(tmp_path / "more.npz"))])
    assert trainer.steps_per_epoch == 3 and trainer.global_step == 6
    lrs = [h["lr"] for h in trainer.history]
    assert np.allclose(lrs, [0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 6)), 0.0], atol=1e-9)


@pytest.fixture
def fake_news(tmp_path):
    folder = tmp_path / "agnews"
    folder.mkdir()
    words = {"World": "war peace talks minister", "Sports": "game goal team coach", "Business": "stocks profit bank deal",
             "Sci/Tech": "software chips space web"}
    for name, n in (("dev.tsv", 120), ("test.tsv", 40)):
        rows = []
        for i in range(n):
            y = CLASS_NAMES[i % 4]
            w = words[y].split()
            rows.append(f"{w[i % 4]} {w[(i + 1) % 4]} news {i} {w[(i + 2) % 4]}\t{y}\n")
        (folder / name).write_text("".join(rows), encoding="utf-8")
    return tmp_path


TINY = ["trainer.tensorboard=false", "trainer.progress=off", "export=[]"]


def writer(root, run_dir):
    assert main(["run", "experiment=lm_agnews_writer", f"data_root={root}", f"run_dir={run_dir}",
                 "data.args.vocab_size=300", "data.args.block_size=24", "student.args.n_layer=1",
                 "student.args.n_embd=32", "student.args.n_head=2", "trainer.max_epochs=1", *TINY]) == 0


def small(root, gen, run_dir, *more):
    return ["run", "experiment=agnews_pgkd", f"data_root={root}", f"run_dir={run_dir}", f"method.generator={gen}",
            "data.args.per_class=3", "data.args.max_length=16", "teachers.minilm.name=text_transformer",
            "+teachers.minilm.args={hidden: 32, layers: 1, heads: 2}", "teachers.minilm.epochs=2",
            "student.args={hidden: 32, layers: 1, heads: 2}", "trainer.max_epochs=2", "method.cycles=2",
            "method.per_cycle=6", "method.max_new_tokens=8", *TINY, *more]


def test_options_are_checked(fake_news):
    with pytest.raises(ConfigError, match="method.generator=None"):
        options(compose(["experiment=agnews_pgkd"]))
    gen = fake_news / "gen"
    gen.mkdir()
    (gen / "results.json").write_text("{}")
    good = ["experiment=agnews_pgkd", f"method.generator={gen}"]
    assert options(compose(good))["cycles"] == 5
    for bad, match in ((["method.cycles=0"], "method.cycles"), (["method.hard=1.5"], "method.hard"),
                       (["method.top_p=0"], "method.top_p"), (["+method.rounds=1"], "unknown option"),
                       (["~teachers.minilm"], "one teacher")):
        with pytest.raises(ConfigError, match=match):
            options(compose([*good, *bad]))


def test_the_low_label_configs_share_their_setting():
    kd, pg = compose(["experiment=agnews_low_kd"]), compose(["experiment=agnews_pgkd"])
    assert kd.data == pg.data and kd.data.args.per_class == 22 and kd.teachers == pg.teachers
    assert kd.student == pg.student and kd.trainer == pg.trainer and kd.pipeline == "distill"
    assert set(kd.losses) == {"ce", "kd"} and set(pg.losses) == {"ce"} and pg.pipeline == "pgkd"


def test_bad_pgkd_options_exit_2_and_write_nothing(tmp_path, capsys):
    assert main(["run", "experiment=agnews_pgkd", f"out_dir={tmp_path}", f"method.generator={tmp_path / 'none'}"]) == 2
    assert "method.generator" in capsys.readouterr().err
    assert not (tmp_path / "agnews_pgkd").exists()


def test_cycles_generate_label_retrain_and_resume_exactly(fake_news):
    from omegaconf import OmegaConf

    from mmkd.build import build_model
    from mmkd.modalities.text import tokenize

    root = fake_news
    writer(root, root / "gen")
    run_dir = root / "run"
    assert main(small(root, root / "gen", run_dir, "method.patience=5")) == 0
    res = json.loads((run_dir / "results.json").read_text())
    teacher_row, *rows = res["cycles"]
    assert "teacher" in teacher_row and [r["cycle"] for r in rows] == [0, 1, 2]
    # early stopping's rule: kept exactly when the validation accuracy beats every earlier one
    best = -1.0
    for r in rows:
        assert r["kept"] == (r["val_acc"] > best)
        best = max(best, r["val_acc"])
    kept = [r for r in rows if r["kept"]]
    assert res["best_cycle"] == kept[-1]["cycle"] and res["student"]["val_acc"] == kept[-1]["val_acc"]
    final = torch.load(run_dir / "student.pt", weights_only=True)
    chosen = torch.load(run_dir / f"cycle{res['best_cycle']}" / "student.pt", weights_only=True)
    assert all(torch.equal(v, chosen[k]) for k, v in final.items())
    # the items accumulate; the teacher labels each text with its top class
    one, two = (dict(np.load(run_dir / f"generated{c}.npz")) for c in (1, 2))
    assert len(one["label"]) == rows[1]["generated"] and len(two["label"]) == rows[1]["generated"] + rows[2]["generated"]
    assert all(np.array_equal(two[k][:len(one[k])], v) for k, v in one.items())
    assert (two["row"] == -1).all()
    cfg = OmegaConf.load(run_dir / "config.yaml")
    meta = json.loads((run_dir / "data.json").read_text())
    teacher = build_model(cfg.teachers.minilm, meta, "teachers.minilm")
    teacher.load_state_dict(torch.load(run_dir / "teacher0" / "student.pt", weights_only=True))
    with torch.no_grad():
        logits = teacher.eval()(torch.from_numpy(two["input_ids"]), torch.from_numpy(two["attention_mask"]))
    assert np.array_equal(logits.argmax(1).numpy(), two["label"])
    lines = (run_dir / "cycle2" / "generated.tsv").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "asked\tlabel\tconfidence\ttext" and len(lines) == 1 + rows[2]["generated"]
    asked, label, conf, text = lines[1].split("\t")
    ids = tokenize([text], max_length=16)
    n = len(one["label"])
    assert np.array_equal(ids["input_ids"][0].numpy(), two["input_ids"][n]) and label == CLASS_NAMES[two["label"][n]]
    assert sum(rows[1]["asked"].values()) == rows[1]["generated"] and len(rows[1]["asked"]) <= 2
    # each cycle continues from the best student so far, on the labelled set plus the added items
    c2 = OmegaConf.load(run_dir / "cycle2" / "config.yaml")
    assert c2.student.init == str(run_dir / f"cycle{1 if rows[1]['kept'] else 0}" / "student.pt")
    assert [p.name for p in c2.policies] == ["appended"] and c2.policies[0].args["items"] == str(run_dir / "generated2.npz")
    assert dict(c2.teachers) == {}  # CE alone reads no teacher

    # interrupted in cycle 2: resume keeps its texts and ends where the whole run ended
    copy = root / "copy"
    shutil.copytree(run_dir, copy)
    for f in ("results.json", "student.pt"):
        (copy / "cycle2" / f).unlink()
        (copy / f).unlink(missing_ok=True)
    assert main(small(root, root / "gen", copy, "method.patience=5", "resume=true")) == 0
    again = json.loads((copy / "results.json").read_text())
    assert [{k: v for k, v in r.items() if k != "run_dir"} for r in again["cycles"][1:]] == \
        [{k: v for k, v in r.items() if k != "run_dir"} for r in rows]
    assert again["student"]["test_acc"] == res["student"]["test_acc"]


def test_patience_ends_the_loop(fake_news):
    root = fake_news
    writer(root, root / "gen")
    run_dir = root / "run"
    assert main(small(root, root / "gen", run_dir, "method.patience=1", "method.cycles=4")) == 0
    rows = json.loads((run_dir / "results.json").read_text())["cycles"][1:]
    misses = [i for i, r in enumerate(rows) if not r["kept"]]
    assert (misses and misses[0] == len(rows) - 1) or (not misses and len(rows) == 5)
