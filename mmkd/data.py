"""In-memory data sets of named tensors, their splits, and the loaders the trainer uses.

Items and batches are dicts of named tensors plus an ``"index"`` entry (the item's position in its
data set), which lets cached teacher outputs be looked up per instance.
"""
from __future__ import annotations

import csv
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mmkd.checks import SEED, Fractions, Range
from mmkd.registry import DATASETS


class DataError(ValueError):
    """Input data that cannot be used: a missing file or folder, an unreadable or malformed file.

    The message names the file (or data root) and what to do; ``mmkd`` prints it on one line and
    exits with code 2.
    """


DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}  # file extension -> field delimiter


def delimiter_of(path: str | os.PathLike, delimiter: Optional[str] = None, what: str = "file") -> str:
    """``delimiter`` if given, else the one of ``path``'s extension (``.csv``: comma; ``.tsv``, ``.tab``:
    tab); another extension is a :class:`DataError` asking for the delimiter."""
    if delimiter is not None:
        if len(delimiter) != 1:
            raise DataError(f"{path}: the delimiter must be one character, got {delimiter!r}")
        return delimiter
    suffix = Path(path).suffix.lower()
    if suffix not in DELIMITERS:
        raise DataError(f"{path}: cannot tell the {what}'s delimiter from its extension {suffix or '(none)'!r}; "
                        f"name it .csv or .tsv, or give the delimiter (e.g. delimiter: ';')")
    return DELIMITERS[suffix]


@dataclass
class Table:
    """The cells of a delimited text file: its ``header`` (``None`` without one), its ``rows`` (lists
    of strings) and the file ``lines`` each row starts on (from 1)."""

    path: Path
    header: Optional[list[str]]
    rows: list[list[str]]
    lines: list[int]

    def column(self, column: str | int, what: str = "column") -> int:
        """The 0-based index of ``column``: a header name, or an index (an int, or digits without a
        header); a :class:`DataError` naming the file lists the columns there are."""
        width = len(self.header) if self.header is not None else max((len(r) for r in self.rows), default=0)
        if isinstance(column, str) and self.header is not None and column in self.header:
            return self.header.index(column)
        if isinstance(column, int) or (self.header is None and str(column).isdigit()):
            if 0 <= int(column) < width:
                return int(column)
            raise DataError(f"{self.path}: no {what} {column} (0-based); it has {width} columns")
        if self.header is None:
            raise DataError(f"{self.path}: {what} {column!r} names a column, but the file has no header (header: "
                            "false); give its 0-based index")
        raise DataError(f"{self.path}:1: no {what} {column!r}; it has: {', '.join(self.header)}")

    def cell(self, i: int, column: int, name: str) -> str:
        """Row ``i``'s cell in ``column``; a short row is a :class:`DataError` naming the line and column."""
        row = self.rows[i]
        if column >= len(row):
            raise DataError(f"{self.path}:{self.lines[i]}: no value in column {name!r} (column {column + 1}): the row "
                            f"has {len(row)} fields{'' if self.header is None else f', the header {len(self.header)}'}")
        return row[column]


def read_table(path: str | os.PathLike, delimiter: Optional[str] = None, header: bool = True,
               limit: Optional[int] = None) -> Table:
    """The first ``limit`` data rows (all by default) of the UTF-8 delimited text file ``path``
    (quoted fields may hold delimiters and line breaks; empty lines are skipped). A missing file, a
    file that is not UTF-8 or not readable as delimited text is a :class:`DataError` naming the file
    and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no such file {str(path)!r} (a relative path is taken from the data root)")
    sep = delimiter_of(path, delimiter)
    rows, lines, names = [], [], None
    line = 1
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, delimiter=sep, strict=True)  # strict: an unclosed quote is an error
            for row in reader:
                start, line = line, reader.line_num + 1
                if not row:
                    continue
                if header and names is None:
                    names = row
                    continue
                if limit is not None and len(rows) >= limit:
                    break
                rows.append(row)
                lines.append(start)
    except UnicodeDecodeError as e:
        line, byte = _undecodable(path)
        raise DataError(f"{path}:{line}: not UTF-8 text ({e.reason}, byte {byte:#04x}); save the file as UTF-8") from None
    except csv.Error as e:
        raise DataError(f"{path}:{line}: not readable as {'comma' if sep == ',' else repr(sep)}-delimited text "
                        f"({e}); a quoted field must end in a quote, and quotes inside it are doubled") from None
    if header and names is None:
        raise DataError(f"{path}: the file is empty; expected a header line and rows")
    return Table(path, names, rows, lines)


def _undecodable(path: Path) -> tuple[int, int]:
    """The first line of ``path`` (from 1) that is not UTF-8, and its first bad byte."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                return n, raw[e.start]
    return 1, 0


def hash_tensors(h, tensors: Mapping[str, Tensor]) -> None:
    """Feed ``tensors`` into the hash object ``h`` (``hashlib.sha256()``), in name order: for each,
    ``name:dtype:shape`` and then its raw bytes. Data set fingerprints and teacher hashes (the keys of
    caches on disk) are made with it, so what it feeds must never change."""
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


class Fingerprinted(Dataset):
    """A data set with an identity the teacher-output cache can key on.

    ``name`` identifies it; :attr:`fingerprint` is a hash of its contents (by :func:`hash_tensors`);
    ``deterministic`` says whether an item is the same every time it is read (no random augmentation,
    no sampled neighbourhood): only then may teacher outputs on it be cached (:func:`cacheable`).
    """

    name: str
    deterministic: bool = True

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError


class Epochal(Dataset):
    """A data set whose items depend on the epoch, drawn reproducibly (an augmentation seeded by
    ``(seed, epoch, item)``): the :class:`~mmkd.trainer.Trainer` calls :meth:`set_epoch` before
    each epoch's batches are read, so a run and its resumption see the same views."""

    def set_epoch(self, epoch: int) -> None:
        raise NotImplementedError

    @property
    def reproducible(self) -> bool:
        """Whether an item's view depends only on ``(epoch, item)`` and the data set (then a frozen
        teacher's outputs on the views can be cached, :mod:`mmkd.view_cache`); batches then carry
        ``epoch``."""
        return False


def cacheable(dataset: Dataset) -> bool:
    """Whether teacher outputs on ``dataset`` may be cached: a deterministic :class:`Fingerprinted` set."""
    return isinstance(dataset, Fingerprinted) and dataset.deterministic


class TensorDictDataset(Fingerprinted):
    """A data set of named tensors that share their first dimension.

    Batches are gathered with one indexing op per key (``__getitems__``), not item by item.

    Args:
        name: identifies the data set (part of its fingerprint).
        deterministic: whether an item is the same every time it is read (no random augmentation);
            only then may teacher outputs on it be cached.
        **tensors: the named tensors, e.g. ``image=..., label=...``.
    """

    def __init__(self, name: str, deterministic: bool = True, **tensors: Tensor):
        sizes = {k: len(v) for k, v in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"data set {name!r}: tensors differ in length: {sizes}")
        self.name = name
        self.deterministic = deterministic
        self.tensors = tensors
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**{k: v[i] for k, v in self.tensors.items()}, "index": torch.tensor(i)}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return {**{k: v[idx] for k, v in self.tensors.items()}, "index": idx}

    @property
    def fingerprint(self) -> str:
        """A hash of the name and the contents: the data set's identity for the teacher cache."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.name.encode())
            hash_tensors(h, self.tensors)
            self._fingerprint = h.hexdigest()
        return self._fingerprint


@dataclass
class DataSplits:
    """Train/val/test data sets and what models need to know about them."""

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    shapes: dict[str, tuple[int, ...]]  # shape of one item, per input key
    class_names: list[str] = field(default_factory=list)
    label_key: str = "label"
    # per input key, the steps that turned raw inputs into the stored ones (see mmkd.preprocess)
    preprocessing: dict[str, list[dict]] = field(default_factory=dict)
    # per raw text input, the text step that made stored keys from sentences (see mmkd.preprocess):
    # {"title": {"op": "tokenize", **params, "keys": ["title_input_ids", "title_attention_mask"]}}
    text_inputs: dict[str, dict] = field(default_factory=dict)
    # what evaluations report by default (mmkd.metrics; the first is monitored): task_metrics picks them
    metrics: list[str] = field(default_factory=lambda: ["acc", "loss"])
    # the training items that carry a label, for fits on labels alone (teachers); None: all of train.
    # A graph's neighbour-sampled training set has a seed per node (distillation reaches every node),
    # this one a seed per labelled node, as GLNN trains its teachers.
    labelled: Optional[Dataset] = None
    # sequence data (next-token prediction): the batch entry holding the [batch, time] token mask; a
    # token is then an instance (each batch's "label" holds the kept tokens' targets, [tokens])
    tokens: Optional[str] = None
    # the tokenizer that made the token ids, for runs that decode them (generation); anything with
    # ``save(path)``, written to the run directory as tokenizer.json
    tokenizer: Any = None

    def meta(self) -> dict:
        """JSON-serialisable description (saved in every run directory, read by export).

        ``inputs`` gives, per input key, the dtype of its values and their range on a sample of the
        training split (:func:`input_stats`): what export needs to build valid example inputs
        (integer token ids below the vocabulary size, 0/1 masks, floats).
        """
        return {"num_classes": self.num_classes, "shapes": {k: list(v) for k, v in self.shapes.items()},
                "class_names": self.class_names, "label_key": self.label_key,
                "preprocessing": self.preprocessing, "text_inputs": self.text_inputs, "metrics": self.metrics,
                "inputs": input_stats(self.train, list(self.shapes)), "tokens": self.tokens}


INPUT_SAMPLE = 512  # items of the training split (evenly spaced) that input_stats reads


def input_stats(dataset: Dataset, keys: Sequence[str], n: int = INPUT_SAMPLE) -> dict[str, dict]:
    """``{key: {"dtype": "int64", "min": 0, "max": 30521}}`` for each of ``keys`` found in up to ``n``
    evenly spaced items of ``dataset`` (a whole graph for a full-graph data set).

    Every value seen lies in ``[min, max]``, so integer ranges are valid model inputs (ids below the
    vocabulary size); ``min``/``max`` of floats are over their finite values (``None`` if there are
    none). The random number generators are left as they were (a sampled data set draws from them).
    """
    import random

    import numpy as np

    size = len(dataset)
    if not size or not keys:
        return {}
    idx = torch.linspace(0, size - 1, min(size, n), dtype=torch.float64).round().long().unique().tolist()
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            items = dataset.__getitems__(idx) if hasattr(dataset, "__getitems__") else [dataset[i] for i in idx]
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    if not isinstance(items, list):  # one gathered batch (TensorDictDataset, a full graph), not a list of items
        items = [items]
    stats = {}
    for k in keys:
        values = [item.get(k) if isinstance(item, dict) else getattr(item, k, None) for item in items]  # or PyG Data
        values = [v for v in values if isinstance(v, Tensor)]
        if not values:
            continue
        dtype = values[0].dtype
        flat = torch.cat([v.detach().reshape(-1).cpu() for v in values])
        if dtype.is_floating_point or dtype.is_complex:
            flat = (flat.real if dtype.is_complex else flat).double()  # exact for every float type
            flat = flat[torch.isfinite(flat)]
            lo, hi = (flat.min().item(), flat.max().item()) if len(flat) else (None, None)
        else:
            flat = flat.long()
            lo, hi = (int(flat.min()), int(flat.max())) if len(flat) else (0, 0)
        stats[k] = {"dtype": str(dtype).removeprefix("torch."), "min": lo, "max": hi}
    return stats


def _collate(items: list | dict) -> dict[str, Tensor]:
    if isinstance(items, dict):  # already gathered by __getitems__
        return items
    return torch.utils.data.default_collate(items)


class EpochSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch``: the order depends on nothing else,
    so a resumed run sees the same batches as an uninterrupted one."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def loader(dataset: Dataset, batch_size: int = 1, sampler: Sampler | None = None,
           num_workers: int = 0, drop_last: bool = False, batch_sampler: Sampler | None = None) -> DataLoader:
    """A ``DataLoader`` that gathers whole batches at once from data sets with ``__getitems__``; with
    ``batch_sampler`` (which yields the index lists of the batches) ``batch_size`` and ``sampler`` are unused."""
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_collate,
                          persistent_workers=num_workers > 0)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=_collate, drop_last=drop_last, persistent_workers=num_workers > 0)


EPOCHS = ("shorter", "labelled", "unlabelled")  # which of PairedBatches' two streams sets the epoch


class PairedSampler(Sampler[list[int]]):
    """The batches of :class:`PairedBatches`: step ``i`` is the ``i``-th batch of ``labelled_batch``
    labelled indices followed by the ``i``-th batch of ``unlabelled_batch`` unlabelled ones, each pool
    shuffled per epoch with a generator seeded by ``seed + epoch`` (like :class:`EpochSampler`; the two
    pools draw from separate generators). The last batch of a pool may be smaller (no drop-last).
    ``epoch``: ``shorter`` stops with the pool that runs out first (``zip`` of two loaders), ``labelled``
    / ``unlabelled`` after one pass over that pool, the other one starting a new shuffle when it runs out."""

    def __init__(self, labelled: Tensor, unlabelled: Tensor, labelled_batch: int, unlabelled_batch: int,
                 seed: int, epoch: str = "shorter"):
        if epoch not in EPOCHS:
            raise ValueError(f"epoch={epoch!r}; choose from: {', '.join(EPOCHS)}")
        self.pools, self.sizes = (labelled, unlabelled), (labelled_batch, unlabelled_batch)
        self.seed, self.mode, self.epoch = seed, epoch, 0
        self.counts = [-(-len(p) // b) for p, b in zip(self.pools, self.sizes)]  # batches per pass, last one partial

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return {"shorter": min(self.counts), "labelled": self.counts[0], "unlabelled": self.counts[1]}[self.mode]

    def _stream(self, pool: Tensor, size: int, offset: int) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch + offset)
        while True:
            order = pool[torch.randperm(len(pool), generator=g)].tolist()
            yield from (order[i:i + size] for i in range(0, len(order), size))

    def __iter__(self) -> Iterator[list[int]]:
        streams = [self._stream(p, b, k * 1_000_003) for k, (p, b) in enumerate(zip(self.pools, self.sizes))]
        for _ in range(len(self)):
            yield next(streams[0]) + next(streams[1])


class SelfBatching:
    """A training set that makes its own batches: the trainer asks :meth:`batch_sampler` for each fit's
    index lists (the epoch is their count) instead of shuffling it into ``trainer.batch_size`` batches.
    Such batches are not sharded across DDP processes; ``ddp_hint`` says what to use there instead."""

    ddp_hint = "train on one process"

    def batch_sampler(self, batch_size: int, seed: int) -> Sampler:
        """The sampler of one fit's batches (with ``set_epoch(epoch)`` when epochs differ)."""
        raise NotImplementedError


class PairedBatches(SelfBatching, Fingerprinted):
    """A training set read as pairs of batches (semi-supervised recipes with a labelled and an
    unlabelled loader, e.g. DHO): every step is one batch of labelled items (``trainer.batch_size``) and
    one of unlabelled items (``unlabelled_batch``, default the same), concatenated, labelled rows first.
    Items are ``data``'s plus ``"labelled"`` (bool), which marks the rows drawn from the labelled pool.

    It makes its own batches (:class:`SelfBatching`; :meth:`batch_sampler`, a :class:`PairedSampler`);
    ``epoch`` says which pool sets the epoch's length (``shorter``: as ``zip`` of
    the two loaders). Under DDP it is refused. Its name and fingerprint are ``data``'s (the items are
    the same), so cached teacher outputs of ``data`` apply.

    Args:
        data: the training set (``__getitems__`` gathers a batch at once).
        labelled: bool ``[len(data)]``, True for the items of the labelled pool; the rest form the unlabelled one.
    """

    def __init__(self, data: Fingerprinted, labelled: Tensor, unlabelled_batch: Optional[int] = None,
                 epoch: str = "shorter"):
        labelled = torch.as_tensor(labelled, dtype=torch.bool)
        if len(labelled) != len(data):
            raise ValueError(f"PairedBatches: {len(labelled)} labelled flags for {len(data)} items")
        if labelled.all() or not labelled.any():
            raise ValueError(f"PairedBatches: the {'unlabelled' if labelled.all() else 'labelled'} pool is empty; "
                             "pairing needs labelled and unlabelled items (or use batches=mixed)")
        if unlabelled_batch is not None and unlabelled_batch < 1:
            raise ValueError(f"unlabelled_batch={unlabelled_batch!r}; it must be at least 1")
        if epoch not in EPOCHS:
            raise ValueError(f"epoch={epoch!r}; choose from: {', '.join(EPOCHS)}")
        self.data, self.labelled, self.unlabelled_batch, self.epoch = data, labelled, unlabelled_batch, epoch
        self.name, self.deterministic = data.name, data.deterministic

    ddp_hint = "train on one process or use batches=mixed"

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**self.data[i], "labelled": self.labelled[i]}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        items = self.data.__getitems__(indices) if hasattr(self.data, "__getitems__") else _collate(
            [self.data[i] for i in indices])
        return {**items, "labelled": self.labelled[idx]}

    def batch_sampler(self, batch_size: int, seed: int) -> PairedSampler:
        """The batches of one fit: ``batch_size`` labelled items (and ``unlabelled_batch``, default
        ``batch_size``, unlabelled ones) per step."""
        return PairedSampler(self.labelled.nonzero().flatten(), (~self.labelled).nonzero().flatten(), batch_size,
                             self.unlabelled_batch or batch_size, seed, self.epoch)


def stratified_split(labels: Tensor, fractions: Sequence[float], seed: int) -> list[Tensor]:
    """Index tensors for a stratified split of ``labels`` into parts of the given fractions.

    Each class is shuffled with ``seed`` and cut in the given proportions, so every part has
    (up to rounding) the class balance of the whole.
    """
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in fractions]
    bounds = torch.tensor(fractions, dtype=torch.float64).cumsum(0)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        cuts = [0, *(bounds * len(idx)).round().long().tolist()]
        for p in range(len(fractions)):
            parts[p].append(idx[cuts[p]:cuts[p + 1]])
    return [torch.cat(p).sort().values for p in parts]


@DATASETS.register("digits", ranges={"split_seed": SEED, "fractions": Fractions()})
def digits(root: str | None = None, split_seed: int = 0,
           fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> DataSplits:
    """scikit-learn's digits: 1,797 real 8x8 grey-scale images of the digits 0-9 (UCI optdigits),
    shipped inside scikit-learn, so nothing is downloaded. A fixed stratified 60/20/20 split.

    Items: ``{"image": float [1, 8, 8] in [0, 1], "label": int64}``.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(d.target, dtype=torch.long)
    parts = stratified_split(labels, fractions, split_seed)
    sets = [TensorDictDataset(f"digits/{name}/{split_seed}", image=images[i], label=labels[i])
            for name, i in zip(("train", "val", "test"), parts)]
    return DataSplits(*sets, num_classes=10, shapes={"image": (1, 8, 8)},
                      class_names=[str(i) for i in range(10)])


def keep_labels(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """A copy of ``labels`` keeping a stratified ``fraction`` of them (per class ``max(1, round(fraction
    * n_c))``, drawn with ``seed``) and marking the rest ``-1`` (unlabelled), e.g. the 1% / 10% settings."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep_labels: fraction={fraction} must be in (0, 1]")
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(labels, -1)
    for c in labels[labels >= 0].unique():
        idx = (labels == c).nonzero().flatten()
        chosen = idx[torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]]
        out[chosen] = c
    return out


BATCHES = ("mixed", "paired")  # how semi's training batches mix labelled and unlabelled items


@DATASETS.register("semi", ranges={"fraction": Range(0, 1, low_open=True), "seed": SEED,
                                   "unlabelled_batch": Range(1, integer=True)})
def semi(root: str, name: str, args: Optional[Mapping[str, Any]] = None, fraction: float = 0.1,
         seed: int = 0, batches: str = "mixed", unlabelled_batch: Optional[int] = None,
         epoch: Optional[str] = None) -> DataSplits:
    """The registered data set ``name`` (with ``args``) whose training labels are cut to a stratified
    ``fraction`` by :func:`keep_labels`; the rest are -1 (unlabelled). Validation and test are unchanged.
    The training split must be a ``TensorDictDataset``.

    ``batches``: ``mixed`` shuffles labelled and unlabelled items together into ``trainer.batch_size``
    batches; ``paired`` makes every step one labelled batch of ``trainer.batch_size`` and one unlabelled
    batch of ``unlabelled_batch`` (default the same) with ``epoch`` (``shorter``, the default,
    ``labelled``, ``unlabelled``) setting the epoch's length (:class:`PairedBatches`; DHO's two loaders)."""
    if batches not in BATCHES:
        raise ValueError(f"batches={batches!r}; choose from: {', '.join(BATCHES)}")
    if epoch is not None and epoch not in EPOCHS:
        raise ValueError(f"epoch={epoch!r}; choose from: {', '.join(EPOCHS)}")
    for key, value in (("unlabelled_batch", unlabelled_batch), ("epoch", epoch)):
        if batches == "mixed" and value is not None:
            raise ValueError(f"{key} applies to batches=paired; remove it or set batches=paired")
    data = DATASETS[name](root=root, **(args or {}))
    train = data.train
    if not isinstance(train, TensorDictDataset) or data.label_key not in train.tensors:
        raise ValueError(f"semi: data set {name!r} has no in-memory training split with {data.label_key!r} labels")
    tensors = {**train.tensors, data.label_key: keep_labels(train.tensors[data.label_key], fraction, seed)}
    data.train = TensorDictDataset(f"{train.name}/semi-{fraction}-{seed}", train.deterministic, **tensors)
    if batches == "paired":
        data.train = PairedBatches(data.train, tensors[data.label_key] >= 0, unlabelled_batch, epoch or "shorter")
    return data
