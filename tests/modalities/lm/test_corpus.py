"""Token blocks (stream, pack, pad) against naive loops; tinyshakespeare and agnews_lm on fake roots
(splits, tokenizers, refused inputs) and on the real files (``MMKD_DATA``)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from mmkd.config import ConfigError
from mmkd.data import DataError, cacheable, loader, stratified_split
from mmkd.modalities.agnews import CLASS_NAMES
from mmkd.modalities.lm.corpus import DOMAINS, TokenBlocks, pack, pad, stream
from mmkd.modalities.lm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from mmkd.registry import DATASETS

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
PLAY = "".join(f"Scene {i}: To be, or not to be — that is the question ß{i % 7}.\n\n" for i in range(60))


def naive_blocks(tokens: list[int], T: int) -> list[list[int]]:
    """Blocks of T + 1 tokens starting every T tokens, as long as a whole one fits."""
    out, start = [], 0
    while start + T + 1 <= len(tokens):
        out.append(tokens[start:start + T + 1])
        start += T
    return out


def check_items(ds: TokenBlocks) -> None:
    """Items agree with the batch of all of them, and each label is the next tokens where the mask is on."""
    batch = ds.__getitems__(list(range(len(ds))))
    labels, extras = [], {k: [] for k in ds.extras}
    for i in range(len(ds)):
        item = ds[i]
        assert item["index"].item() == i and item["input_ids"].shape == item["mask"].shape == (ds.block_size,)
        assert torch.equal(item["input_ids"], batch["input_ids"][i]) and torch.equal(item["mask"], batch["mask"][i])
        nxt = ds.ids[i, 1:].tolist()
        assert item["label"].tolist() == [nxt[t] for t in range(ds.block_size) if item["mask"][t]]
        labels += item["label"].tolist()
        for k in extras:
            assert len(item[k]) == len(item["label"])
            extras[k] += item[k].tolist()
    assert batch["label"].tolist() == labels and batch["index"].tolist() == list(range(len(ds)))
    for k, v in extras.items():
        assert batch[k].tolist() == v


# ------------------------------------------------------------------------------------------- layouts
def test_stream_blocks_overlap_by_one_token():
    tokens = torch.arange(100, 111)  # 11 tokens, T = 3: floor(10 / 3) = 3 blocks
    ds = stream("s", tokens, 3, pos=torch.arange(11))
    assert ds.ids.tolist() == naive_blocks(tokens.tolist(), 3) == [[100, 101, 102, 103], [103, 104, 105, 106],
                                                                    [106, 107, 108, 109]]
    assert ds.mask.all() and ds.extras["pos"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # the targets' values
    b = ds.__getitems__([2, 0])
    assert b["input_ids"].tolist() == [[106, 107, 108], [100, 101, 102]]
    assert b["label"].tolist() == [107, 108, 109, 101, 102, 103] and b["index"].tolist() == [2, 0]
    check_items(ds)
    assert len(stream("s", tokens, 10)) == 1 and len(stream("s", tokens, 1)) == 10
    with pytest.raises(ValueError, match="fewer than one block"):
        stream("s", tokens, 11)


def test_pack_joins_documents_with_eos():
    docs, eos = [[5, 6], [7], [8, 9, 10]], 1
    ds = pack("p", docs, 2, eos, domain=torch.tensor([0, 3, 2]))
    joined, owner = [], []
    for d, doc in enumerate(docs):
        joined += doc + [eos]
        owner += [[0, 3, 2][d]] * (len(doc) + 1)
    assert joined == [5, 6, 1, 7, 1, 8, 9, 10, 1]
    assert ds.ids.tolist() == naive_blocks(joined, 2) and ds.mask.all()
    assert ds.extras["domain"].tolist() == [b[1:] for b in naive_blocks(owner, 2)]
    check_items(ds)


def test_pad_puts_one_document_per_block():
    docs, pad_id, eos = [[5, 6, 7, 8, 9], [7], [], [4, 4, 4]], 0, 1
    ds = pad("d", docs, 3, pad_id, eos, domain=torch.tensor([1, 2, 3, 0]))
    assert ds.ids.tolist() == [[5, 6, 7, 8], [7, 1, 0, 0], [4, 4, 4, 1]]  # the empty document is dropped
    assert ds.mask.tolist() == [[True] * 3, [True, False, False], [True] * 3]
    assert ds.extras["domain"].tolist() == [[1] * 3, [2] * 3, [0] * 3]
    b = ds.__getitems__([0, 1, 2])
    assert b["label"].tolist() == [6, 7, 8, 1, 4, 4, 1] and b["domain"].tolist() == [1] * 3 + [2] + [0] * 3
    assert pad_id not in b["label"].tolist()  # padding is never a target
    check_items(ds)
    with pytest.raises(ValueError, match="no document has a token"):
        pad("d", [[], []], 3, 0, 1)


def test_fingerprint_hashes_tokens_and_layout():
    docs = [[5, 6, 7], [8, 9]]
    a, b = pack("x", docs, 2, 1), pack("x", docs, 2, 1)
    assert a.fingerprint == b.fingerprint and cacheable(a)
    assert pack("x", [[5, 6, 7], [8, 3]], 2, 1).fingerprint != a.fingerprint
    same_ids = stream("x", torch.tensor([5, 6, 7, 1, 8, 9, 1]), 2)
    assert torch.equal(same_ids.ids, a.ids) and same_ids.fingerprint != a.fingerprint  # the layout differs
    assert pack("y", docs, 2, 1).fingerprint != a.fingerprint
    assert pack("x", docs, 2, 1, domain=torch.tensor([0, 1])).fingerprint != a.fingerprint
    assert len(a.head(1)) == 1 and a.head(1).fingerprint != a.fingerprint and len(a.head(99)) == len(a)


def test_loader_gathers_batches():
    ds = pad("d", [[5] * n for n in range(1, 8)], 4, 0, 1, domain=torch.arange(7))
    batches = list(loader(ds, batch_size=3))
    assert [b["input_ids"].shape for b in batches] == [(3, 4), (3, 4), (1, 4)]
    assert sum(len(b["label"]) for b in batches) == int(ds.mask.sum())
    assert all(len(b["domain"]) == int(b["mask"].sum()) for b in batches)


# ---------------------------------------------------------------------------- tinyshakespeare (fake)
def fake_play(root: Path, text: str | bytes = PLAY) -> Path:
    path = root / "tinyshakespeare" / "input.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_tinyshakespeare_char_splits(tmp_path):
    fake_play(tmp_path)
    d = DATASETS["tinyshakespeare"](root=tmp_path, block_size=16)
    cut = int(0.9 * len(PLAY))
    half = cut + (len(PLAY) - cut) // 2
    tok = d.tokenizer
    assert isinstance(tok, CharTokenizer) and tok.chars == "".join(sorted(set(PLAY[:cut])))
    assert d.num_classes == tok.vocab_size and d.shapes == {"input_ids": (16,)} and d.tokens == "mask"
    assert d.metrics == ["ppl", "acc", "loss"] and d.class_names == [] and d.label_key == "label"
    for ds, part in ((d.train, PLAY[:cut]), (d.val, PLAY[cut:half]), (d.test, PLAY[half:])):
        assert len(ds) == (len(part) - 1) // 16
        assert [tok.decode(b) for b in ds.ids.tolist()] == [part[i * 16:i * 16 + 17] for i in range(len(ds))]
        check_items(ds)
    assert d.meta()["inputs"]["input_ids"]["max"] < tok.vocab_size
    assert len(DATASETS["tinyshakespeare"](root=tmp_path, block_size=16, limit=5).train) == 5


def test_tinyshakespeare_bpe_trains_on_the_training_split(tmp_path):
    fake_play(tmp_path)
    d = DATASETS["tinyshakespeare"](root=tmp_path, block_size=8, tokenizer="bpe", vocab_size=300)
    cut = int(0.9 * len(PLAY))
    assert d.tokenizer == BPETokenizer.train([PLAY[:cut]], 300) and d.num_classes == 300
    tokens = d.tokenizer.encode(PLAY[:cut])
    assert d.train.ids.tolist() == naive_blocks(tokens, 8)
    again = DATASETS["tinyshakespeare"](root=tmp_path, block_size=8, tokenizer="bpe", vocab_size=300)
    assert [s.fingerprint for s in (again.train, again.val, again.test)] == \
           [s.fingerprint for s in (d.train, d.val, d.test)]
    assert DATASETS["tinyshakespeare"](root=tmp_path, block_size=8).train.fingerprint != d.train.fingerprint


def test_tinyshakespeare_reuses_a_saved_tokenizer(tmp_path):
    fake_play(tmp_path)
    saved = BPETokenizer.train(["something else entirely, 12345"], 270)
    (tmp_path / "run").mkdir()
    saved.save(tmp_path / "run" / "tokenizer.json")
    for path in ("run", "run/tokenizer.json", tmp_path / "run"):  # relative to the working directory (tmp_path)
        d = DATASETS["tinyshakespeare"](root=tmp_path, block_size=8, tokenizer_path=path)
        assert d.tokenizer == saved and d.num_classes == saved.vocab_size
    CharTokenizer.train(["To be"]).save(tmp_path / "few.json")
    with pytest.raises(DataError, match=r"input.txt: character 'S' .*not in the char tokenizer"):
        DATASETS["tinyshakespeare"](root=tmp_path, tokenizer_path=tmp_path / "few.json")
    with pytest.raises(DataError, match="no tokenizer file"):
        DATASETS["tinyshakespeare"](root=tmp_path, tokenizer_path="nowhere/tokenizer.json")


@pytest.mark.parametrize("text, args, error, match", [
    (None, {}, DataError, r"tinyshakespeare: missing .*tinyshakespeare/input.txt"),
    (b"To be\nor no\xfft\n", {}, DataError, r"input.txt:2: not UTF-8 text .*byte 0xff"),
    (b"", {}, DataError, "input.txt: the file is empty"),
    (b"x", {}, DataError, "1 characters are too few to split"),
    (PLAY, {"block_size": 0}, DataError, r"data.args.block_size=0; give a block size of at least 1"),
    (PLAY[:300], {"block_size": 64}, DataError, r"input.txt: the val split has 15 tokens, fewer than one block"),
    (PLAY, {"tokenizer": "word"}, ConfigError, r"data.args.tokenizer='word'; choose from: char, bpe"),
], ids=["missing", "not-utf8", "empty", "one-char", "block-size", "short", "tokenizer"])
def test_tinyshakespeare_bad_input(tmp_path, text, args, error, match):
    if text is not None:
        fake_play(tmp_path, text)
    with pytest.raises(error, match=match) as e:
        DATASETS["tinyshakespeare"](root=tmp_path, **args)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------- agnews_lm (fake)
def fake_news(root: Path, dev: int = 40, test: int = 8) -> Path:
    folder = root / "agnews"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("dev.tsv", dev), ("test.tsv", test)):
        lines = [f"{CLASS_NAMES[i % 4]} story {i} in {name}: markets, goals & chips\t{CLASS_NAMES[i % 4]}\n"
                 for i in range(n)]
        (folder / name).write_text("".join(lines), encoding="utf-8")
    return folder


@pytest.mark.parametrize("layout", ["pad", "pack"])
def test_agnews_lm_blocks_and_domains(tmp_path, layout):
    fake_news(tmp_path)
    d = DATASETS["agnews_lm"](root=tmp_path, block_size=12, tokenizer="char", layout=layout)
    tok = d.tokenizer
    assert DOMAINS == ["World", "Sports", "Business", "Sci/Tech"] and d.class_names == []
    assert d.num_classes == tok.vocab_size and d.tokens == "mask" and d.shapes == {"input_ids": (12,)}
    dev = [(f"{CLASS_NAMES[i % 4]} story {i} in dev.tsv: markets, goals & chips", i % 4) for i in range(40)]
    test = [(f"{CLASS_NAMES[i % 4]} story {i} in test.tsv: markets, goals & chips", i % 4) for i in range(8)]
    train_idx, val_idx = stratified_split(torch.tensor([y for _, y in dev]), [0.9, 0.1], 0)
    assert tok.chars == "".join(sorted(set("".join(dev[i][0] for i in train_idx.tolist()))))
    for ds, docs in ((d.train, [dev[i] for i in train_idx.tolist()]), (d.val, [dev[i] for i in val_idx.tolist()]),
                     (d.test, test)):
        rows, domains, masks = [], [], []
        if layout == "pad":
            for text, y in docs:
                seq = (tok.encode(text) + [tok.eos_id])[:13]
                rows.append(seq + [tok.pad_id] * (13 - len(seq)))
                masks.append([t + 1 < len(seq) for t in range(12)])
                domains += [y] * (len(seq) - 1)
        else:
            joined, owner = [], []
            for text, y in docs:
                joined += tok.encode(text) + [tok.eos_id]
                owner += [y] * (len(text) + 1)
            rows = naive_blocks(joined, 12)
            masks = [[True] * 12 for _ in rows]
            domains = [y for b in naive_blocks(owner, 12) for y in b[1:]]
        assert ds.ids.tolist() == rows and ds.mask.tolist() == masks
        assert ds.__getitems__(list(range(len(ds))))["domain"].tolist() == domains
        check_items(ds)
    assert len(DATASETS["agnews_lm"](root=tmp_path, block_size=12, tokenizer="char", layout=layout, limit=3).train) == 3


def test_agnews_lm_bpe_and_split_seed(tmp_path):
    fake_news(tmp_path)
    d = DATASETS["agnews_lm"](root=tmp_path, vocab_size=300)
    assert isinstance(d.tokenizer, BPETokenizer) and d.num_classes == d.tokenizer.vocab_size <= 300
    assert len(d.train) == 36 and len(d.val) == 4 and len(d.test) == 8  # one block per document
    texts = [f"{CLASS_NAMES[i % 4]} story {i} in test.tsv: markets, goals & chips" for i in range(8)]
    assert [d.tokenizer.decode(r) for r in d.test.ids.tolist()] == texts  # whole: they fit in 64 tokens
    other = DATASETS["agnews_lm"](root=tmp_path, vocab_size=300, split_seed=1)
    assert other.val.fingerprint != d.val.fingerprint and other.tokenizer != d.tokenizer  # trained on other texts
    assert [other.tokenizer.decode(r) for r in other.test.ids.tolist()] == texts
    d.tokenizer.save(tmp_path / "tokenizer.json")
    again = DATASETS["agnews_lm"](root=tmp_path, tokenizer="char", tokenizer_path="tokenizer.json")
    assert again.tokenizer == d.tokenizer and again.train.fingerprint == d.train.fingerprint
    assert isinstance(Tokenizer.load(tmp_path / "tokenizer.json"), BPETokenizer)


@pytest.mark.parametrize("case, args, error, match", [
    ("missing", {}, DataError, r"agnews_lm: missing .*test.tsv; expected dev.tsv and test.tsv"),
    ("not-utf8", {}, DataError, r"test.tsv:3: not UTF-8 text .*byte 0xe9"),
    ("empty", {}, DataError, r"dev.tsv: the file is empty"),
    ("fine", {"block_size": -1}, DataError, r"data.args.block_size=-1"),
    ("fine", {"layout": "stack"}, ConfigError, r"data.args.layout='stack'; choose from: pad, pack"),
    ("fine", {"tokenizer": "wp"}, ConfigError, r"data.args.tokenizer='wp'"),
    ("fine", {"layout": "pack", "block_size": 500}, DataError,
     r"dev.tsv: the val split: \d+ tokens are fewer than one block of block_size \+ 1 = 501; lower data.args.block_size"),
], ids=["missing", "not-utf8", "empty", "block-size", "layout", "tokenizer", "short"])
def test_agnews_lm_bad_input(tmp_path, case, args, error, match):
    folder = fake_news(tmp_path)
    if case == "missing":
        (folder / "test.tsv").unlink()
    elif case == "not-utf8":
        (folder / "test.tsv").write_bytes(b"a\tWorld\nb\tWorld\ncaf\xe9\tWorld\n")
    elif case == "empty":
        (folder / "dev.tsv").write_bytes(b"")
    with pytest.raises(error, match=match) as e:
        DATASETS["agnews_lm"](root=tmp_path, **{"tokenizer": "char", **args})
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- real files
@pytest.fixture(scope="module")
def root():
    if DATA is None:
        pytest.skip("set MMKD_DATA to the shared data folder")
    return DATA


@pytest.fixture(scope="module")
def play(root):
    return (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")


def check_shifted(ds: TokenBlocks) -> None:
    """On stream blocks: label == input_ids shifted by one, and each block starts with the previous one's last target."""
    b = ds.__getitems__(list(range(0, len(ds), max(1, len(ds) // 50))))
    label = b["label"].view(len(b["index"]), -1)
    assert torch.equal(label[:, :-1], b["input_ids"][:, 1:])
    nxt = ds.__getitems__([i + 1 for i in b["index"].tolist() if i + 1 < len(ds)])
    assert torch.equal(label[:len(nxt["index"]), -1], nxt["input_ids"][:, 0])


def test_real_tinyshakespeare_char(root, play):
    assert len(play) == 1115394
    d = DATASETS["tinyshakespeare"](root=root)
    cut = int(0.9 * len(play))
    assert len(d.train) == int((0.9 * 1115394 - 1) // 128) == (cut - 1) // 128 == 7842
    assert len(d.val) == len(d.test) == ((len(play) - cut) // 2 - 1) // 128 == 435
    assert d.tokenizer.vocab_size == 65 + 2 and d.num_classes == 67
    assert d.tokenizer.decode(d.train[0]["input_ids"].tolist()) == play[:128]
    test, n = play[cut + (len(play) - cut) // 2:], len(d.test)
    assert d.tokenizer.decode(d.test[n - 1]["label"].tolist()) == test[(n - 1) * 128 + 1:n * 128 + 1]
    for ds in (d.train, d.val, d.test):
        check_shifted(ds)


def test_real_tinyshakespeare_bpe(root, play):
    d = DATASETS["tinyshakespeare"](root=root, tokenizer="bpe")
    cut = int(0.9 * len(play))
    tokens = d.tokenizer.encode(play[:cut])
    assert d.num_classes == 512 and len(d.train) == (len(tokens) - 1) // 128
    assert d.train.ids[0].tolist() == tokens[:129] and d.train.ids[-1].tolist() == tokens[(len(d.train) - 1) * 128:][:129]
    assert d.tokenizer.decode(tokens) == play[:cut]
    check_shifted(d.train)


def test_real_agnews_lm(root):
    d = DATASETS["agnews_lm"](root=root)
    assert (len(d.train), len(d.val), len(d.test)) == (9000, 1001, 7600) and d.num_classes == 2048
    lines = [line.rsplit("\t", 1) for line in (root / "agnews" / "test.tsv").read_text(encoding="utf-8").splitlines()]
    b = d.test.__getitems__(list(range(len(d.test))))
    counts = b["mask"].sum(1)
    assert torch.equal(b["domain"], torch.repeat_interleave(torch.tensor([CLASS_NAMES.index(y) for _, y in lines]), counts))
    assert d.tokenizer.pad_id not in b["label"].tolist()
    for i in range(0, 7600, 97):
        text = lines[i][0]
        decoded = d.tokenizer.decode([b["input_ids"][i, 0].item(), *d.test[i]["label"].tolist()])
        assert decoded == text if counts[i] < 64 else text.startswith(decoded)


def test_agnews_lm_label_prefix_starts_each_document_with_its_topic(tmp_path):
    import numpy as np

    fake_news(tmp_path)
    plain = DATASETS["agnews_lm"](root=tmp_path, vocab_size=300)
    d = DATASETS["agnews_lm"](root=tmp_path, vocab_size=300, label_prefix=True)
    dev = [(f"{CLASS_NAMES[i % 4]} story {i} in dev.tsv: markets, goals & chips", i % 4) for i in range(40)]
    train_idx, val_idx = stratified_split(torch.tensor([y for _, y in dev]), [0.9, 0.1], 0)
    for ds, idx in ((d.train, train_idx), (d.val, val_idx)):
        got = [d.tokenizer.decode(r[:int(m.sum())].tolist()) for r, m in zip(ds.ids, ds.mask)]  # the document, no eos
        assert got == [f"{CLASS_NAMES[dev[i][1]]}: {dev[i][0]}" for i in idx.tolist()]
    assert len(d.train) == len(plain.train) and d.train.fingerprint != plain.train.fingerprint
    # the training prefixes from a file (e.g. a classifier's predictions); validation keeps its labels
    given = np.array([(int(dev[i][1]) + 1) % 4 for i in train_idx.tolist()])
    np.save(tmp_path / "pred.npy", given)
    other = DATASETS["agnews_lm"](root=tmp_path, vocab_size=300, label_prefix=True, prefix_labels=tmp_path / "pred.npy")
    for ds, idx, topics in ((other.train, train_idx, given), (other.val, val_idx, [dev[i][1] for i in val_idx.tolist()])):
        got = [other.tokenizer.decode(r[:int(m.sum())].tolist()) for r, m in zip(ds.ids, ds.mask)]
        assert got == [f"{CLASS_NAMES[y]}: {dev[i][0]}" for i, y in zip(idx.tolist(), topics)]
    for bad, match in ((np.zeros(3, dtype=np.int64), "shape"), (np.full(len(given), 4), "topic indices"),
                       (np.zeros(len(given)), "float64")):
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(DataError, match=match):
            DATASETS["agnews_lm"](root=tmp_path, label_prefix=True, prefix_labels=tmp_path / "bad.npy")
    with pytest.raises(DataError, match="no such file"):
        DATASETS["agnews_lm"](root=tmp_path, label_prefix=True, prefix_labels=tmp_path / "none.npy")
    with pytest.raises(ConfigError, match="label_prefix"):
        DATASETS["agnews_lm"](root=tmp_path, prefix_labels=tmp_path / "pred.npy")
