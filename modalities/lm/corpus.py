"""Language-modelling corpora as blocks of token ids, and the data sets ``tinyshakespeare`` and ``agnews_lm``.

A block holds ``T + 1`` token ids ``x_0 .. x_T`` (``T = block_size``); position ``t`` reads
``input_ids[t] = x_t`` and predicts its next token ``x_{t+1}``. ``mask[t]`` is True where that next
token is real (not padding), and the block's ``label`` lists those targets in order, so
``label == x[1:][mask]``. Every kept position is an instance of the core (``DataSplits.tokens = "mask"``).

Layouts (:class:`TokenBlocks`):

- ``stream``: one token stream cut into blocks of ``T + 1`` tokens at stride ``T`` (consecutive
  blocks share one token: the last target of one is the first input of the next), so ``L`` tokens give
  ``floor((L - 1) / T)`` blocks; the tokens after the last whole block are dropped.
- ``pack``: documents, each followed by ``eos``, concatenated into one stream and cut as ``stream``;
  a block may span documents (the ``eos`` ending one predicts the first token of the next).
- ``pad``: one document per block: the document and its ``eos``, cut to ``T + 1`` tokens and padded
  with ``pad_id``; ``mask`` is False where the target is padding. Empty documents are dropped.
"""
from __future__ import annotations

import codecs
import hashlib
import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mmkd.checks import COUNT, SEED, Range
from mmkd.config import ConfigError
from mmkd.data import DataError, DataSplits, Fingerprinted, hash_tensors, stratified_split
from mmkd.registry import DATASETS

from ..agnews import CLASS_NAMES, FILES, read_tsv
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer

DOMAINS = list(CLASS_NAMES)  # agnews_lm's per-token "domain": the topic (AG News class) of the token's document
KINDS = ("char", "bpe")  # the tokenizers a corpus can train
LAYOUTS = ("pad", "pack")  # agnews_lm's document layouts
METRICS = ["ppl", "acc", "loss"]


class TokenBlocks(Fingerprinted):
    """Blocks of token ids with their next-token targets (see the module docstring); deterministic.

    Items: ``{"input_ids": long [T], "mask": bool [T], "label": long [n], "index": long scalar}`` plus
    each extra entry as ``[n]`` (its values at the kept positions), ``n = mask.sum()``.
    :meth:`__getitems__` gathers a batch at once: ``input_ids`` and ``mask`` ``[B, T]``, ``index`` ``[B]``,
    ``label`` and the extras ``[N]``: the kept positions of all rows, row-major (the order of
    ``logits[mask]`` for ``[B, T, vocab]`` logits).

    Args:
        name: identifies the data set (part of its fingerprint).
        ids: long ``[blocks, T + 1]``, the tokens ``x_0 .. x_T`` of each block.
        mask: bool ``[blocks, T]``, True where ``x_{t+1}`` is a real target.
        layout: how the blocks were made (e.g. ``"pad:64:pad=0:eos=1"``), part of the fingerprint.
        **extras: per-position tensors ``[blocks, T]`` (e.g. ``domain``), values of position ``t``'s target.
    """

    deterministic = True

    def __init__(self, name: str, ids: Tensor, mask: Tensor, layout: str, **extras: Tensor):
        if ids.dim() != 2 or mask.shape != (len(ids), ids.shape[1] - 1):
            raise ValueError(f"TokenBlocks {name!r}: ids {tuple(ids.shape)} and mask {tuple(mask.shape)} do not "
                             "match [blocks, T + 1] and [blocks, T]")
        for k, v in extras.items():
            if v.shape != mask.shape:
                raise ValueError(f"TokenBlocks {name!r}: extra {k!r} has shape {tuple(v.shape)}, the mask {tuple(mask.shape)}")
        self.name, self.layout = name, layout
        self.ids, self.mask, self.extras = ids.long(), mask.bool(), extras
        self._fingerprint: str | None = None

    @property
    def block_size(self) -> int:
        """``T``, the positions of a block."""
        return self.mask.shape[1]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        m = self.mask[i]
        return {"input_ids": self.ids[i, :-1], "mask": m, "label": self.ids[i, 1:][m], "index": torch.tensor(i),
                **{k: v[i][m] for k, v in self.extras.items()}}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        ids, m = self.ids[idx], self.mask[idx]
        return {"input_ids": ids[:, :-1], "mask": m, "label": ids[:, 1:][m], "index": idx,
                **{k: v[idx][m] for k, v in self.extras.items()}}

    def head(self, n: int) -> TokenBlocks:
        """The first ``n`` blocks (all if there are fewer)."""
        return TokenBlocks(self.name, self.ids[:n], self.mask[:n], self.layout,
                           **{k: v[:n] for k, v in self.extras.items()})

    @property
    def fingerprint(self) -> str:
        """A hash of the name, the layout, the token ids, the mask and the extras (:func:`hash_tensors`)."""
        if self._fingerprint is None:
            h = hashlib.sha256(f"{self.name}\0{self.layout}".encode())
            hash_tensors(h, {"ids": self.ids, "mask": self.mask, **{f"extra/{k}": v for k, v in self.extras.items()}})
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def stream(name: str, tokens: Tensor, block_size: int, **extras: Tensor) -> TokenBlocks:
    """The ``stream`` layout: blocks of ``block_size + 1`` tokens of the 1-D ``tokens`` at stride
    ``block_size``; ``extras`` are 1-D like ``tokens`` (position ``t`` of a block takes the value of its
    target token). Fewer than ``block_size + 1`` tokens is a ``ValueError``."""
    return _cut(name, tokens, block_size, f"stream:{block_size}", extras)


def _cut(name: str, tokens: Tensor, block_size: int, layout: str, extras: dict[str, Tensor]) -> TokenBlocks:
    if block_size < 1:
        raise ValueError(f"block_size={block_size}; it must be at least 1")
    n = (len(tokens) - 1) // block_size
    if n < 1:
        raise ValueError(f"{len(tokens)} tokens are fewer than one block of block_size + 1 = {block_size + 1}")

    def cut(t: Tensor) -> Tensor:
        return t[:n * block_size + 1].unfold(0, block_size + 1, block_size).contiguous()

    return TokenBlocks(name, cut(tokens), torch.ones(n, block_size, dtype=torch.bool), layout,
                       **{k: cut(v)[:, 1:] for k, v in extras.items()})


def _join(docs: Sequence[Sequence[int]], eos_id: int) -> tuple[Tensor, Tensor]:
    """The documents, each followed by ``eos_id``, as one long tensor, and the lengths (``eos`` included)."""
    sizes = torch.tensor([len(d) for d in docs], dtype=torch.long)
    flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(docs), dtype=np.int64, count=int(sizes.sum())))
    out = torch.full((len(flat) + len(docs),), eos_id, dtype=torch.long)
    out[torch.arange(len(flat)) + torch.repeat_interleave(torch.arange(len(docs)), sizes)] = flat  # one eos per earlier doc
    return out, sizes + 1


def pack(name: str, docs: Sequence[Sequence[int]], block_size: int, eos_id: int, **extras: Tensor) -> TokenBlocks:
    """The ``pack`` layout: ``docs`` (token ids), each followed by ``eos_id``, as one stream cut by
    :func:`stream`; ``extras`` hold one value per document (``[docs]``), given to its tokens and its ``eos``."""
    tokens, lengths = _join(docs, eos_id)
    owner = torch.repeat_interleave(torch.arange(len(docs)), lengths)
    return _cut(name, tokens, block_size, f"pack:{block_size}:eos={eos_id}", {k: v[owner] for k, v in extras.items()})


def pad(name: str, docs: Sequence[Sequence[int]], block_size: int, pad_id: int, eos_id: int,
        **extras: Tensor) -> TokenBlocks:
    """The ``pad`` layout: one block per non-empty document of ``docs``: its tokens and ``eos_id``, cut to
    ``block_size + 1`` tokens, then ``pad_id``; ``extras`` hold one value per document (``[docs]``).
    No non-empty document is a ``ValueError``."""
    if block_size < 1:
        raise ValueError(f"block_size={block_size}; it must be at least 1")
    keep = [i for i, d in enumerate(docs) if len(d)]
    if not keep:
        raise ValueError("no document has a token")
    tokens, lengths = _join([docs[i] for i in keep], eos_id)
    row = torch.repeat_interleave(torch.arange(len(keep)), lengths)
    pos = torch.arange(len(tokens)) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths)
    inside = pos <= block_size
    ids = torch.full((len(keep), block_size + 1), pad_id, dtype=torch.long)
    ids[row[inside], pos[inside]] = tokens[inside]
    mask = torch.arange(block_size) < (lengths.clamp(max=block_size + 1) - 1)[:, None]
    kept = torch.tensor(keep)
    return TokenBlocks(name, ids, mask, f"pad:{block_size}:pad={pad_id}:eos={eos_id}",
                       **{k: v[kept][:, None].expand(-1, block_size).contiguous() for k, v in extras.items()})


def read_text(path: Path) -> str:
    """The text of the UTF-8 file ``path`` (a leading byte-order mark dropped); a file that is not
    UTF-8 is a :class:`DataError` naming the file, the line and the byte."""
    raw = path.read_bytes()
    start = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as e:
        at = start + e.start
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}, byte {raw[at]:#04x} at offset {at}); "
                        "save the file as UTF-8") from None


def _check_block_size(block_size: int) -> None:
    if block_size < 1:
        raise DataError(f"data.args.block_size={block_size}; give a block size of at least 1")


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"data.args.{key}={value!r}; choose from: {', '.join(choices)}")


def _tokenizer(kind: str, texts: Sequence[str], vocab_size: int, path: str | os.PathLike | None) -> Tokenizer:
    """The saved tokenizer at ``path`` (a tokenizer.json, or a run directory holding one; relative to the
    working directory), else a ``kind`` tokenizer trained on ``texts``."""
    if path is not None:
        path = Path(path)
        return Tokenizer.load(path / "tokenizer.json" if path.is_dir() else path)
    if kind == "char":
        return CharTokenizer.train(texts)
    return BPETokenizer.train(texts, vocab_size)


def _encode(tok: Tokenizer, texts: Sequence[str], path: Path) -> list[list[int]]:
    """``tok.encode_batch(texts)``; a character the tokenizer lacks is a :class:`DataError` naming ``path``."""
    try:
        return tok.encode_batch(texts)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None


def _splits(sets: Sequence[TokenBlocks], tok: Tokenizer, block_size: int) -> DataSplits:
    return DataSplits(*sets, num_classes=tok.vocab_size, shapes={"input_ids": (block_size,)}, tokens="mask",
                      tokenizer=tok, metrics=list(METRICS), label_key="label")


def prefixed(texts: Sequence[str], labels: Tensor) -> list[str]:
    """``"<topic>: <text>"`` for each text and its topic index in :data:`DOMAINS`."""
    return [f"{DOMAINS[int(y)]}: {t}" for t, y in zip(texts, labels)]


def read_labels(path: str | os.PathLike, n: int) -> Tensor:
    """The ``n`` topic indices of the ``.npy`` file ``path`` (no pickle); anything else is a :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data.args.prefix_labels: no such file {str(path)!r}; give a .npy file of one topic index "
                        "per training text")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"data.args.prefix_labels: {path} is not a NumPy array ({e})") from None
    if arr.shape != (n,) or not np.issubdtype(arr.dtype, np.integer) or (n and not 0 <= arr.min() <= arr.max() < len(DOMAINS)):
        raise DataError(f"data.args.prefix_labels: {path} holds a {arr.dtype} array of shape {arr.shape}; give {n} "
                        f"topic indices in 0..{len(DOMAINS) - 1}, one per training text")
    return torch.from_numpy(arr.astype(np.int64))


LM_RANGES = {"block_size": COUNT, "vocab_size": Range(BPETokenizer.MIN_VOCAB, integer=True), "limit": COUNT}


@DATASETS.register("tinyshakespeare", ranges=LM_RANGES)
def tinyshakespeare(root: str | os.PathLike = "data", block_size: int = 128, tokenizer: str = "char",
                    vocab_size: int = 512, tokenizer_path: str | os.PathLike | None = None,
                    limit: int | None = None) -> DataSplits:
    """Tiny Shakespeare (Karpathy, char-rnn, 2015): 1,115,394 characters of Shakespeare's plays as one
    token stream, cut in ``stream`` blocks (module docstring).

    The first 90% of the characters (``int(0.9 * n)``) are the training split; the last 10% are cut in
    two halves, the first the validation split, the second the test split (disjoint). Each split is
    tokenized on its own. Char-level, block 128: 7,842 / 435 / 435 blocks.

    Args:
        root: the data root holding ``tinyshakespeare/input.txt``.
        block_size: ``T``, the positions of a block (each block holds ``T + 1`` tokens).
        tokenizer: ``"char"`` (:class:`CharTokenizer`) or ``"bpe"`` (:class:`BPETokenizer`), trained on the
            training split only.
        vocab_size: the BPE vocabulary size (specials and the 256 bytes included); unused by ``char``.
        tokenizer_path: a saved ``tokenizer.json``, or a run directory holding one, used instead of
            training a tokenizer (``tokenizer`` and ``vocab_size`` are then unused); a relative path is
            taken from the working directory.
        limit: keep at most the first ``limit`` training blocks (quick runs); validation and test stay whole.

    Items: :class:`TokenBlocks` (``input_ids``, ``mask``, ``label``, ``index``); ``num_classes`` is the
    vocabulary size.
    """
    _check_block_size(block_size)
    _choice("tokenizer", tokenizer, KINDS)
    path = Path(root) / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        raise DataError(f"tinyshakespeare: missing {path}; put tiny Shakespeare's input.txt there "
                        "(set data_root or MMKD_DATA)")
    text = read_text(path)
    if not text:
        raise DataError(f"{path}: the file is empty; tinyshakespeare needs its text")
    cut = int(0.9 * len(text))
    half = cut + (len(text) - cut) // 2
    parts = {"train": text[:cut], "val": text[cut:half], "test": text[half:]}
    if not all(parts.values()):
        raise DataError(f"{path}: {len(text)} characters are too few to split 90/5/5 into train, val and test; "
                        "use a longer text")
    tok = _tokenizer(tokenizer, [parts["train"]], vocab_size, tokenizer_path)
    sets = []
    for split, part in parts.items():
        tokens = torch.tensor(_encode(tok, [part], path)[0], dtype=torch.long)
        if len(tokens) < block_size + 1:
            raise DataError(f"{path}: the {split} split has {len(tokens)} tokens, fewer than one block "
                            f"(data.args.block_size + 1 = {block_size + 1}); lower block_size or use a longer text")
        sets.append(stream(f"tinyshakespeare/{split}", tokens, block_size))
    if limit is not None:
        sets[0] = sets[0].head(limit)
    return _splits(sets, tok, block_size)


@DATASETS.register("agnews_lm", ranges={**LM_RANGES, "split_seed": SEED})
def agnews_lm(root: str | os.PathLike = "data", block_size: int = 64, tokenizer: str = "bpe", vocab_size: int = 2048,
              tokenizer_path: str | os.PathLike | None = None, layout: str = "pad", limit: int | None = None,
              split_seed: int = 0, label_prefix: bool = False,
              prefix_labels: str | os.PathLike | None = None) -> DataSplits:
    """AG News (Zhang et al., NeurIPS 2015) as a language-modelling corpus: each news text is a document.

    ``dev.tsv`` is split 90/10, stratified by topic with ``split_seed``, into training and validation
    (the same split as the ``agnews`` data set with its defaults); ``test.tsv`` is the test split.

    Args:
        root: the data root holding ``agnews/dev.tsv`` and ``agnews/test.tsv``.
        block_size: ``T``, the positions of a block.
        tokenizer: ``"bpe"`` (:class:`BPETokenizer`) or ``"char"`` (:class:`CharTokenizer`), trained on the
            training texts only (``char`` refuses validation or test texts with a character the training
            texts lack).
        vocab_size: the BPE vocabulary size (specials and the 256 bytes included); unused by ``char``.
        tokenizer_path: a saved ``tokenizer.json``, or a run directory holding one, used instead of
            training (``tokenizer`` and ``vocab_size`` are then unused); relative to the working directory.
        layout: ``"pad"`` (one document per block, cut and padded) or ``"pack"`` (documents joined by
            ``eos`` and cut into full blocks); see the module docstring.
        limit: keep at most the first ``limit`` training blocks (quick runs).
        split_seed: draws the validation split.
        label_prefix: start each document with its topic, ``"<topic>: <text>"`` (:func:`prefixed`): a
            class-conditional corpus, whose models generate a topic's text from the prompt ``"<topic>: "``.
        prefix_labels: with ``label_prefix``, a ``.npy`` file of one topic index per training text (in
            the training split's order, e.g. a classifier's predictions) used for the training texts'
            prefixes instead of their labels; validation and test keep their labels.

    Items: :class:`TokenBlocks` plus ``domain`` (long ``[n]``; ``[N]`` in a batch): the topic of each kept
    target token's document, an index into :data:`DOMAINS`. ``class_names`` is empty (the classes are
    the vocabulary).
    """
    _check_block_size(block_size)
    _choice("tokenizer", tokenizer, KINDS)
    _choice("layout", layout, LAYOUTS)
    folder = Path(root) / "agnews"
    missing = [str(folder / f) for f in FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"agnews_lm: missing {', '.join(missing)}; expected {' and '.join(FILES)} in {folder} "
                        "('text<TAB>label' lines; set data_root or MMKD_DATA)")
    read = {}
    for f in FILES:
        read_text(folder / f)  # names the line of a byte that is not UTF-8
        texts, labels = read_tsv(folder / f)
        if not texts:
            raise DataError(f"{folder / f}: the file is empty; expected 'text<TAB>label' lines")
        read[f] = (texts, labels)
    (dev, dev_labels), (test, test_labels) = read[FILES[0]], read[FILES[1]]
    train_idx, val_idx = stratified_split(dev_labels, [0.9, 0.1], split_seed)
    parts = {"train": (FILES[0], [dev[i] for i in train_idx], dev_labels[train_idx]),
             "val": (FILES[0], [dev[i] for i in val_idx], dev_labels[val_idx]),
             "test": (FILES[1], test, test_labels)}
    if label_prefix:
        given = None if prefix_labels is None else read_labels(prefix_labels, len(train_idx))
        parts = {split: (f, prefixed(texts, given if split == "train" and given is not None else labels), labels)
                 for split, (f, texts, labels) in parts.items()}
    elif prefix_labels is not None:
        raise ConfigError("data.args.prefix_labels is given without data.args.label_prefix=true; set both or neither")
    tok = _tokenizer(tokenizer, parts["train"][1], vocab_size, tokenizer_path)
    sets = []
    for split, (f, texts, labels) in parts.items():
        docs = _encode(tok, texts, folder / f)
        try:
            if layout == "pad":
                blocks = pad(f"agnews_lm/{split}", docs, block_size, tok.pad_id, tok.eos_id, domain=labels)
            else:
                blocks = pack(f"agnews_lm/{split}", docs, block_size, tok.eos_id, domain=labels)
        except ValueError as e:
            raise DataError(f"{folder / f}: the {split} split: {e}; lower data.args.block_size or give more text") from None
        sets.append(blocks)
    if limit is not None:
        sets[0] = sets[0].head(limit)
    return _splits(sets, tok, block_size)
