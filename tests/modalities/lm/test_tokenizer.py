"""Character and byte-level BPE tokenizers: hand-computed ids, round trips, determinism, save/load."""
from __future__ import annotations

import json
import pickle

import pytest
from hypothesis import given, settings, strategies as st

from mmkd.data import DataError
from mmkd.modalities.lm.tokenizer import BPETokenizer, CharTokenizer, Tokenizer
from mmkd.registry import TOKENIZERS

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "Café naïve — 日本語 🎉\tthe cat sat on the mat; the cat sat on the hat. <eos>\n") * 20
SAMPLES = ["", "a", "\n", "\n\n  \t x", "héllo wörld", "日本語のテキスト", "🎉🎉 e\u0301", "<eos> and <pad>",
           "  leading and trailing  ", "the cat\r\nsat", "\x00\x7f\u200b"]


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train([TEXT], vocab_size=300)


def test_char_ids_are_the_sorted_characters_after_pad_and_eos():
    tok = CharTokenizer.train(["ba\n", "b€"])
    assert tok.chars == "\nab€" and (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 6)
    assert tok.encode("ab\n€") == [3, 4, 2, 5]
    assert tok.encode_batch(["a", "", "bb"]) == [[3], [], [4, 4]]
    assert tok.decode([0, 3, 1, 4, 0]) == "ab"  # pad and eos are not text


@given(st.text(alphabet=sorted(set(TEXT)), max_size=60))
@settings(max_examples=40, deadline=None)
def test_char_round_trip(s):
    tok = CharTokenizer.train([TEXT])
    ids = tok.encode(s)
    assert len(ids) == len(s) and all(2 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == s


def test_char_unknown_character_is_a_one_line_error_naming_it():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(DataError, match=r"'z' \(U\+007A, at offset 2\)") as e:
        tok.encode("abz")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="token id 9 is outside its vocabulary"):
        tok.decode([2, 9])
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.train(["", ""])


def test_special_token_strings_in_text_are_text(bpe):
    char = CharTokenizer.train(["<eos>pad"])
    for tok in (char, bpe):
        ids = tok.encode("<eos><pad>")
        assert tok.pad_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == "<eos><pad>"


@pytest.mark.parametrize("s", SAMPLES)
def test_bpe_round_trip(bpe, s):
    ids = bpe.encode(s)
    assert all(2 <= i < bpe.vocab_size for i in ids)
    assert bpe.decode(ids) == s
    assert bpe.encode_batch([s, s]) == [ids, ids]


@given(s=st.text(max_size=40))
@settings(max_examples=60, deadline=None)
def test_bpe_round_trip_on_any_text(bpe, s):
    assert bpe.decode(bpe.encode(s)) == s


def test_bpe_learns_the_training_text(bpe):
    assert bpe.vocab_size == 300
    assert len(bpe.encode(" cat sat")) == 2  # frequent words merged whole
    assert len(bpe.encode(" qzx")) == 4  # unseen: its bytes (a space and 3 letters)
    bytes_only = BPETokenizer.train([TEXT], vocab_size=258)
    assert bytes_only.vocab_size == 258 and bytes_only.encode("cat") == [bytes_only.tokenizer.token_to_id(c) for c in "cat"]
    assert len(bytes_only.encode("日")) == 3  # its 3 UTF-8 bytes


def test_bpe_is_deterministic(bpe):
    again = BPETokenizer.train([TEXT], vocab_size=300)
    assert again == bpe and again.to_json() == bpe.to_json()
    assert again.encode(TEXT) == bpe.encode(TEXT)
    assert BPETokenizer.train([TEXT], vocab_size=290) != bpe


def test_bpe_vocab_below_the_bytes_is_refused():
    with pytest.raises(ValueError, match="vocab_size=100; byte-level BPE needs at least 258"):
        BPETokenizer.train([TEXT], vocab_size=100)


def test_save_and_load(tmp_path, bpe):
    from tokenizers import Tokenizer as HFTokenizer

    for tok in (CharTokenizer.train([TEXT]), bpe):
        path = tmp_path / f"{tok.type}.json"
        tok.save(path)
        obj = json.loads(path.read_text(encoding="utf-8"))
        assert obj["type"] == tok.type
        back = Tokenizer.load(path)
        assert type(back) is type(tok) and back == tok
        assert back.encode(TEXT) == tok.encode(TEXT) and back.vocab_size == tok.vocab_size
        assert back.encode("<eos>") == tok.encode("<eos>")  # a literal <eos> stays text after loading
        assert TOKENIZERS[tok.type](path) == tok  # the core's loader of its "type"
    inner = HFTokenizer.from_str(json.dumps(json.loads((tmp_path / "bpe.json").read_text())["tokenizers"]))
    assert inner.encode("the cat", add_special_tokens=False).ids == bpe.encode("the cat")


@pytest.mark.parametrize("content, match", [
    (None, "no tokenizer file"),
    (b"{not json", "not a tokenizer JSON file"),
    (b"\xff\xfe", "not a tokenizer JSON file"),
    (pickle.dumps({"type": "char"}), "not a tokenizer JSON file"),
    (b"[1, 2]", "unknown tokenizer type None"),
    (b'{"type": "wordpiece"}', "unknown tokenizer type 'wordpiece'; .*one of: bpe, char"),
    (b'{"type": "char", "specials": ["<pad>", "<eos>"], "chars": "ba"}', "malformed char tokenizer"),
    (b'{"type": "char", "chars": "ab"}', "malformed char tokenizer"),
    (b'{"type": "bpe"}', "malformed bpe tokenizer"),
    (b'{"type": "bpe", "tokenizers": {"model": 3}}', "malformed bpe tokenizer"),
], ids=["missing", "not-json", "not-utf8", "pickle", "no-type", "unknown-type", "unsorted-chars", "no-specials",
        "no-bpe-object", "bad-bpe-object"])
def test_load_of_a_bad_file_is_a_data_error_naming_it(tmp_path, content, match):
    path = tmp_path / "tokenizer.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        Tokenizer.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
