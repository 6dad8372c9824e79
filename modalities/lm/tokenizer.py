"""Tokenizers of the language-modelling corpora: characters, and byte-level BPE (Sennrich et al., "Neural
Machine Translation of Rare Words with Subword Units", ACL 2016; the byte-level form of GPT-2, Radford et al.
2019) trained with Hugging Face's ``tokenizers`` library.

Both reserve the same two special tokens, ``pad_id = 0`` (``<pad>``, filler of padded blocks, never a
target) and ``eos_id = 1`` (``<eos>``, the end of a document); text never encodes to them, even a text
holding the strings ``<pad>`` or ``<eos>``, and :meth:`Tokenizer.decode` leaves them out. So
``decode(encode(s)) == s`` for every string ``s`` a tokenizer covers (any string for BPE; for characters,
strings made of the training text's characters).

A tokenizer is saved as one JSON file (:meth:`Tokenizer.save`) whose ``"type"`` field (``"char"`` or
``"bpe"``) tells :meth:`Tokenizer.load` which class reads it; loading parses JSON only (nothing is
unpickled). Runs keep it in their directory as ``tokenizer.json``; each type is registered in
:data:`mmkd.registry.TOKENIZERS` with :meth:`Tokenizer.load` as its loader (what ``mmkd generate`` calls).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from mmkd import io
from mmkd.data import DataError
from mmkd.registry import TOKENIZERS

PAD, EOS = "<pad>", "<eos>"  # the special tokens, ids 0 and 1 in every tokenizer
SPECIALS = (PAD, EOS)


class Tokenizer:
    """Text <-> token ids, with ``pad_id`` 0 and ``eos_id`` 1 (see the module docstring).

    Subclasses set :attr:`type` (the ``"type"`` field of their JSON) and implement :meth:`encode`,
    :meth:`decode`, :attr:`vocab_size`, :meth:`to_json` and :meth:`from_json`.
    """

    type: str = ""
    pad_id: int = 0
    eos_id: int = 1
    _types: dict[str, type[Tokenizer]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        Tokenizer._types[cls.type] = cls
        TOKENIZERS.register(cls.type)(Tokenizer.load)

    @property
    def vocab_size(self) -> int:
        """The number of token ids, special tokens included (ids are ``0 .. vocab_size - 1``)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text`` (never a special token)."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``; subclasses may encode them together, faster."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of token ids; ``pad`` and ``eos`` ids are left out, an id outside the vocabulary
        is a ``ValueError``."""
        raise NotImplementedError

    def to_json(self) -> dict:
        """The tokenizer as a JSON object, without its ``"type"`` field."""
        raise NotImplementedError

    @classmethod
    def from_json(cls, obj: dict, path: Path) -> Tokenizer:
        """The tokenizer of a :meth:`to_json` object read from ``path`` (named in a :class:`DataError`
        when the object is malformed)."""
        raise NotImplementedError

    def _check_ids(self, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"{self.type} tokenizer: token id {bad[0]} is outside its vocabulary [0, {self.vocab_size})")

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to ``path`` as one JSON file (atomically)."""
        io.write_json({"type": self.type, **self.to_json()}, path)

    @staticmethod
    def load(path: str | os.PathLike) -> Tokenizer:
        """The tokenizer saved in the JSON file ``path``; a missing, unreadable or malformed file is a
        :class:`DataError` naming it."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"no tokenizer file {str(path)!r}; give a tokenizer.json written by mmkd "
                            "(a run directory holds one)")
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a tokenizer JSON file ({str(e).splitlines()[0]}); "
                            "give a tokenizer.json written by mmkd") from None
        kind = obj.get("type") if isinstance(obj, dict) else None
        if kind not in Tokenizer._types:
            raise DataError(f"{path}: unknown tokenizer type {kind!r}; expected a \"type\" field, one of: "
                            f"{', '.join(sorted(Tokenizer._types))}")
        return Tokenizer._types[kind].from_json(obj, path)

    def __eq__(self, other: object) -> bool:
        """Tokenizers are equal when they are of one type with the same JSON."""
        return type(other) is type(self) and other.to_json() == self.to_json()


class CharTokenizer(Tokenizer):
    """One token per character (Unicode code point): ids 2, 3, ... are the sorted distinct characters
    of the training text, after ``pad`` (0) and ``eos`` (1).

    A character outside the vocabulary cannot be encoded: :meth:`encode` raises a one-line
    :class:`DataError` naming it (there is no ``unk`` token, so what is encoded always decodes back).

    Args:
        chars: the vocabulary, distinct characters in code-point order.
    """

    type = "char"

    def __init__(self, chars: str):
        if not chars or list(chars) != sorted(set(chars)):
            raise ValueError("CharTokenizer: chars must be distinct characters in code-point order, at least one")
        self.chars = chars
        self._codes = np.frombuffer(chars.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)

    @classmethod
    def train(cls, texts: Sequence[str]) -> CharTokenizer:
        """The tokenizer of the characters of ``texts``; no characters at all is a ``ValueError``."""
        chars = sorted(set().union(*map(set, texts)))
        if not chars:
            raise ValueError("CharTokenizer.train: the training text is empty")
        return cls("".join(chars))

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(SPECIALS)

    def encode(self, text: str) -> list[int]:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        pos = np.searchsorted(self._codes, codes).clip(max=len(self._codes) - 1)
        unknown = self._codes[pos] != codes
        if unknown.any():
            at = int(unknown.argmax())
            raise DataError(f"character {text[at]!r} (U+{ord(text[at]):04X}, at offset {at}) is not in the char "
                            f"tokenizer's {len(self.chars)} characters; train it on a text that has it, or use bpe")
        return (pos + len(SPECIALS)).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return "".join(self.chars[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))

    def to_json(self) -> dict:
        return {"specials": list(SPECIALS), "chars": self.chars}

    @classmethod
    def from_json(cls, obj: dict, path: Path) -> CharTokenizer:
        chars = obj.get("chars")
        if obj.get("specials") != list(SPECIALS) or not isinstance(chars, str) or not chars \
                or list(chars) != sorted(set(chars)):
            raise DataError(f"{path}: malformed char tokenizer; expected \"specials\": {list(SPECIALS)} and "
                            "\"chars\": distinct characters in code-point order")
        return cls(chars)


class BPETokenizer(Tokenizer):
    """Byte-level BPE of the ``tokenizers`` library: the text's UTF-8 bytes, split by GPT-2's
    pre-tokenisation pattern (no prefix space, no normalisation, so decoding gives the text back
    exactly), merged pair by pair as learnt in training.

    Its JSON is ``{"type": "bpe", "tokenizers": <the tokenizers library's own JSON>}``; that inner
    object is a complete ``tokenizers.Tokenizer`` (``Tokenizer.from_str(json.dumps(obj["tokenizers"]))``),
    with ``<pad>`` and ``<eos>`` as its special tokens 0 and 1.

    Args:
        tokenizer: a trained ``tokenizers.Tokenizer`` whose special tokens 0 and 1 are ``<pad>``, ``<eos>``.
    """

    type = "bpe"
    MIN_VOCAB = 256 + len(SPECIALS)  # every byte, and the special tokens

    def __init__(self, tokenizer):
        if [tokenizer.id_to_token(i) for i in range(len(SPECIALS))] != list(SPECIALS):
            raise ValueError(f"BPETokenizer: tokens 0 and 1 must be {PAD} and {EOS}")
        tokenizer.encode_special_tokens = True  # a literal "<eos>" in a text is text (not saved in the JSON)
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int) -> BPETokenizer:
        """Learn merges on ``texts`` until the vocabulary (256 bytes, the special tokens and the merged
        tokens) has ``vocab_size`` tokens, or no pair occurs twice. The same texts and size give the same
        tokenizer: merges are taken by count, ties broken by the ids of the pair (the byte alphabet's ids
        are fixed), and nothing is random."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < cls.MIN_VOCAB:
            raise ValueError(f"vocab_size={vocab_size}; byte-level BPE needs at least {cls.MIN_VOCAB} "
                             "(256 bytes and <pad>, <eos>)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def to_json(self) -> dict:
        return {"tokenizers": json.loads(self.tokenizer.to_str())}

    @classmethod
    def from_json(cls, obj: dict, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        inner = obj.get("tokenizers")
        try:
            if not isinstance(inner, dict):
                raise ValueError('no "tokenizers" object')
            return cls(HFTokenizer.from_str(json.dumps(inner)))
        except Exception as e:  # the library's parse errors have no common type
            raise DataError(f"{path}: malformed bpe tokenizer ({str(e).splitlines()[0] if str(e) else e!r}); "
                            "give a tokenizer.json written by mmkd") from None
