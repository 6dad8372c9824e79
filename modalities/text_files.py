"""Your own text classification data from one CSV or TSV file: the data set ``text_csv``.

One row per item: one or more text columns, a label column and, optionally, a split column. The
file is read as UTF-8 delimited text (quoted fields may hold delimiters, quotes doubled, and line
breaks); every problem is a :class:`mmkd.data.DataError` of one line naming the file, the line and the
column. Labels are mapped to classes in sorted order of their names (numeric order when all are
integers); the mapping is logged.

Batch keys: a text column ``c`` gives ``c_input_ids`` and ``c_attention_mask`` (int64, stored padded
to ``max_length``), so a student reads ``inputs: [c_input_ids, c_attention_mask]``; without a header,
column ``i`` is called ``col<i>`` (``col0_input_ids``). Each item also holds ``label`` and ``row`` (its
data row in the file, from 0). Batches are padded to their longest sentence (``dynamic_padding``).
``mmkd predict`` on a student of this data set reads raw sentences (the data set records its
tokenizer in ``text_inputs``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

from mmkd.checks import COUNT, SEED, Fractions, Range
from mmkd.config import ConfigError
from mmkd.data import DataError, DataSplits, read_table, stratified_split
from mmkd.metrics import task_metrics
from mmkd.registry import DATASETS

from .manifest import class_names
from .text import MINILM, text_dataset, text_input, tokenize

log = logging.getLogger("mmkd")
SPLITS = ("train", "val", "test")


def _columns(spec: str | int | Sequence[str | int], what: str) -> list[str | int]:
    """One column or a list of them (config lists arrive as OmegaConf lists)."""
    if isinstance(spec, (str, int)) and not isinstance(spec, bool):
        return [spec]
    try:
        out = list(spec)
    except TypeError:
        raise ConfigError(f"data.args.{what}: give a column name or 0-based index, or a list of them; got {spec!r}") from None
    if not out or not all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in out):
        raise ConfigError(f"data.args.{what}: give a column name or 0-based index, or a list of them; got {spec!r}")
    return out


def _listing(names: list[str], counts: dict[str, list[int]]) -> str:
    """``"0=neg (train 40, val 5, test 5), 1=pos (...)"``: the classes and their rows per split."""
    return ", ".join(f"{i}={n} ({', '.join(f'{s} {c}' for s, c in zip(SPLITS, counts[n]))})"
                     for i, n in enumerate(names))


@DATASETS.register("text_csv", ranges={"max_length": COUNT, "limit": COUNT, "split_seed": SEED, "fractions": Fractions(),
                                    "val_fraction": Range(0, 1, low_open=True, high_open=True)})
def text_csv(root: str | os.PathLike = "data", file: Optional[str] = None,
             text: str | int | Sequence[str | int] = "text", label: str | int = "label", header: bool = True,
             delimiter: Optional[str] = None, limit: Optional[int] = None, split_column: str | int | None = None,
             fractions: Sequence[float] = (0.8, 0.1, 0.1), val_fraction: float = 0.1, split_seed: int = 0,
             tokenizer: str = MINILM, max_length: int = 128, dynamic_padding: bool = True) -> DataSplits:
    """Text classification from one CSV or TSV file.

    Args:
        root: the data root; a relative ``file`` is taken from there (an absolute one as it is).
        file: the ``.csv`` (comma) or ``.tsv`` / ``.tab`` (tab) file; another extension needs ``delimiter``.
        text: the text column, or a list of them (several texts per item, e.g. ``[title, body]``):
            header names, or 0-based indices (``header: false``).
        label: the label column (any strings; class names are their sorted distinct values).
        header: whether the first line names the columns.
        delimiter: one character, overriding the extension's.
        limit: read only the first ``limit`` data rows of the file (before splitting; not per class).
        split_column: a column whose values are ``train``, ``val`` or ``test``; with no ``val`` rows, a
            stratified ``val_fraction`` of ``train`` (drawn with ``split_seed``) is the validation set.
            Without it, the rows are split by ``fractions`` (train, val, test), stratified by class
            and drawn with ``split_seed`` (:func:`mmkd.data.stratified_split`).
        tokenizer: ``"minilm"`` (all-MiniLM-L6-v2's word pieces, shipped) or a local Hugging Face
            tokenizer folder; ``max_length``: token ids per item (longer texts are cut).
        dynamic_padding: pad each batch to its longest sentence rather than to ``max_length``
            (:class:`mmkd.modalities.text.TextDataset`); ``false`` keeps every batch ``max_length`` wide,
            which per-token features of a fixed width need: a cached teacher's token states, or a
            ``linear`` adapter on them (the ``token`` adapter and pooled features need nothing).

    Items: ``{"<c>_input_ids", "<c>_attention_mask": int64 [max_length], "label": int64, "row": int64}``.
    """
    for key, value in (("header", header), ("dynamic_padding", dynamic_padding)):
        if not isinstance(value, bool):
            raise ConfigError(f"data.args.{key}={value!r}; give true or false")
    if file is None:
        raise ConfigError("data.args.file: give the CSV or TSV file (relative to the data root, or absolute)")
    if len(fractions) != 3:
        raise ConfigError(f"data.args.fractions: give three fractions (train, val, test); got {list(fractions)}")
    path = Path(root) / file
    table = read_table(path, delimiter, header, limit)
    if not table.rows:
        raise DataError(f"{path}: no data rows; expected {'a header line and ' if header else ''}one row per item")
    width = len(table.header) if table.header is not None else len(table.rows[0])
    name = (lambda c: table.header[c]) if table.header is not None else (lambda c: f"col{c}")
    for i, row in enumerate(table.rows):
        if len(row) != width:
            where = f"no column {name(len(row))!r}" if len(row) < width else f"a field after column {name(width - 1)!r}"
            raise DataError(f"{path}:{table.lines[i]}: {len(row)} fields, but the "
                            f"{'header has' if table.header is not None else 'first row has'} {width} ({where}); "
                            "quote a text that holds the delimiter")
    texts = [table.column(c, "text column") for c in _columns(text, "text")]
    label_col = table.column(label, "label column")
    split_col = None if split_column is None else table.column(split_column, "split column")
    used = [*texts, label_col, *([] if split_col is None else [split_col])]
    if len(set(used)) != len(used):
        raise ConfigError(f"data.args: text {[name(c) for c in texts]}, label {name(label_col)!r} and split column "
                          f"{None if split_col is None else name(split_col)!r} must be distinct columns of {path}")

    labels = []
    for i, row in enumerate(table.rows):
        if row[label_col].strip() == "":
            raise DataError(f"{path}:{table.lines[i]}: column {name(label_col)!r} (the label) is empty; give every "
                            "row a label")
        labels.append(row[label_col].strip())
    names = class_names(labels)
    index = {n: k for k, n in enumerate(names)}
    y = torch.tensor([index[v] for v in labels], dtype=torch.long)

    if split_col is not None:
        parts: dict[str, list[int]] = {s: [] for s in SPLITS}
        for i, row in enumerate(table.rows):
            value = row[split_col].strip()
            if value not in parts:
                raise DataError(f"{path}:{table.lines[i]}: column {name(split_col)!r} is {row[split_col]!r}; "
                                f"expected {', '.join(SPLITS)}")
            parts[value].append(i)
        idx = {s: torch.tensor(v, dtype=torch.long) for s, v in parts.items()}
        if not len(idx["val"]) and len(idx["train"]):
            keep, held = stratified_split(y[idx["train"]], [1 - val_fraction, val_fraction], split_seed)
            idx["train"], idx["val"] = idx["train"][keep], idx["train"][held]
    else:
        idx = dict(zip(SPLITS, stratified_split(y, list(fractions), split_seed)))
    counts = {n: [int((y[idx[s]] == k).sum()) for s in SPLITS] for k, n in enumerate(names)}
    listing = _listing(names, counts)
    if len(names) < 2:
        raise DataError(f"{path}: column {name(label_col)!r} holds {len(names)} class ({listing}); a classifier "
                        "needs at least two: is it the label column?")
    for s in SPLITS:
        if not len(idx[s]):
            how = f"rows with {name(split_col)!r} = {s}" if split_col is not None else "more rows or another fraction"
            raise DataError(f"{path}: the {s} split has no rows; give it {how} (classes: {listing})")
    if lacking := [n for n in names if not counts[n][0]]:
        raise DataError(f"{path}: classes {', '.join(map(repr, lacking))} have no training rows; add some or drop "
                        f"them (classes: {listing})")
    log.info("text_csv: %s: %d classes: %s", path, len(names), listing)

    tensors: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SPLITS}
    text_inputs, shapes = {}, {}
    for c in texts:
        prefix = f"{name(c)}_"
        for s in SPLITS:
            tokens = tokenize([table.rows[i][c] for i in idx[s].tolist()], tokenizer=tokenizer, max_length=max_length)
            tensors[s].update({prefix + k: v for k, v in tokens.items()})
        text_inputs[name(c)] = text_input(prefix, tokenizer, max_length)
        shapes.update({k: (max_length,) for k in text_inputs[name(c)]["keys"]})
    sets = [text_dataset(f"text_csv/{s}", dynamic_padding, **tensors[s], label=y[idx[s]], row=idx[s])
            for s in SPLITS]
    return DataSplits(*sets, num_classes=len(names), shapes=shapes, class_names=names, text_inputs=text_inputs,
                      metrics=task_metrics(y, len(names)))
