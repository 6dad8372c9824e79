"""Sparse teacher-logit cache for sequences: a frozen language model's next-token distributions, once.

A frozen teacher on a fixed corpus (a deterministic :class:`~mmkd.data.Fingerprinted` set of token
blocks, whose batches carry ``index`` ``[batch]`` and the token ``mask`` ``[batch, time]``) is run
once; per example and position its ``k`` largest log-probabilities (float16), their token ids (the
smallest unsigned type that holds the vocabulary) and the probability mass outside them (float16)
are stored in memory-mapped ``.npy`` shards of ``SHARD`` examples, keyed by example id and position,
never by step: shuffled batches, a resumed run and any other student read the same targets. A batch
is served as a :class:`~mmkd.sparse.SparseLogits` over its kept tokens, which the token divergences
read directly (support plus a tail bucket) and every other consumer sees densified.

Layout, under ``<cache_dir>/tokens/<key>/``: ``meta.json`` (examples, block, k, vocabulary) and, per
shard ``s``, ``s<s>.values.npy`` ``[examples, time, k]``, ``s<s>.indices.npy`` and
``s<s>.tail.npy`` ``[examples, time]``. Each file is written in full and then renamed into place
(:func:`mmkd.io.atomic_path`), so an interrupted build resumes at the missing shards and never reads
a half-written one. The key hashes the teacher (weights, module tree, inputs), the
data set's fingerprint and ``k``. With ``k`` at least the vocabulary, the cache holds the full
distributions (exact up to float16).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from mmkd import io
from mmkd.cache import Cached, teacher_hash
from mmkd.data import cacheable, loader
from mmkd.net import Batch, Output, Teacher
from mmkd.sparse import SparseLogits

log = logging.getLogger("mmkd")

SHARD = 1024  # examples per shard file
PARTS = ("values", "indices", "tail")


def id_dtype(vocab: int) -> np.dtype:
    """The smallest unsigned integer type that holds a token id below ``vocab``."""
    return np.dtype(np.uint8 if vocab <= 256 else np.uint16 if vocab <= 65536 else np.uint32)


def bytes_per_token(k: int, vocab: int) -> int:
    """Bytes the cache stores per token: ``k`` float16 values and ids, and a float16 tail."""
    return k * (2 + id_dtype(vocab).itemsize) + 2


class CachedTokens(Cached):
    """Stands in for a frozen language-model teacher on the training blocks it was built on: serves the
    stored top-k distributions of the batch's ``index`` rows at its ``mask`` positions."""

    def __init__(self, teacher: Teacher, folder: Path, meta: dict):
        super().__init__(teacher)
        self.folder, self.meta = folder, meta
        self.tokens = teacher.tokens
        self.shards = [{p: np.load(folder / f"s{s}.{p}.npy", mmap_mode="r") for p in PARTS}
                       for s in range(shards_of(meta["examples"]))]

    def forward(self, batch: Batch) -> Output:
        idx = batch["index"].cpu().numpy()
        mask = batch[self.tokens].bool()
        parts = {p: np.empty((len(idx), *self.shards[0][p].shape[1:]), self.shards[0][p].dtype) for p in PARTS}
        for s in np.unique(idx // SHARD):  # one fancy read per shard the batch touches
            rows = np.flatnonzero(idx // SHARD == s)
            for p in PARTS:
                parts[p][rows] = self.shards[s][p][idx[rows] - s * SHARD]
        device = mask.device
        values = torch.from_numpy(parts["values"]).to(device)
        ids = torch.from_numpy(parts["indices"].astype(np.int64)).to(device)
        tail = torch.from_numpy(parts["tail"]).to(device)
        sparse = SparseLogits(values[mask].float(), ids[mask], tail[mask].float(), self.meta["vocab"])
        return Output(sparse, {}, None, mask)


def shards_of(examples: int) -> int:
    return (examples + SHARD - 1) // SHARD


def _write(folder: Path, s: int, arrays: dict[str, np.ndarray]) -> None:
    """Write shard ``s``: each part to a temporary file, then renamed into place (tail last: a shard is
    complete when all its parts exist)."""
    for p in PARTS:
        with io.atomic_path(folder / f"s{s}.{p}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arrays[p])


@torch.no_grad()
def cache_tokens(teacher: Teacher, dataset: Dataset, root: str | os.PathLike, k: int | None = None,
                 batch_size: int = 64, device: str | torch.device = "cpu") -> CachedTokens:
    """A :class:`CachedTokens` for ``teacher`` on ``dataset``, computing only the shards that are
    missing (``k``: the tokens kept per position; None or at least the vocabulary keeps all)."""
    if not teacher.frozen:
        raise ValueError("only a frozen teacher can be cached; a co-trained teacher changes every step")
    if teacher.tokens is None:
        raise ValueError("cache_tokens serves sequence models: give the Teacher its token mask (tokens='mask')")
    if not cacheable(dataset):
        raise ValueError(f"data set {getattr(dataset, 'name', dataset)!r} is not a deterministic "
                         "mmkd.data.Fingerprinted data set; its teacher outputs cannot be cached")
    device = torch.device(device)
    teacher.to(device).eval()
    probe = next(iter(loader(dataset, 1)))
    out = teacher({key: v.to(device) for key, v in probe.items()})
    vocab, block = out.sequence.shape[-1], out.sequence.shape[1]
    k = vocab if k is None else min(k, vocab)
    key = hashlib.sha256(f"{teacher_hash(teacher)}|{dataset.fingerprint}|k={k}".encode()).hexdigest()[:24]
    folder = Path(root) / "tokens" / key
    meta = {"examples": len(dataset), "block": block, "k": k, "vocab": vocab,
            "bytes_per_token": bytes_per_token(k, vocab)}
    missing = [s for s in range(shards_of(len(dataset)))
               if not all((folder / f"s{s}.{p}.npy").is_file() for p in PARTS)]
    if not missing:
        log.info("token cache hit: %s (%d examples, top-%d of %d, %d bytes a token)", folder, len(dataset), k,
                 vocab, meta["bytes_per_token"])
        return CachedTokens(teacher, folder, meta)
    log.info("token cache: computing %d of %d shards of %s's top-%d distributions into %s", len(missing),
             shards_of(len(dataset)), type(teacher.model).__name__, k, folder)
    folder.mkdir(parents=True, exist_ok=True)
    io.write_json(meta, folder / "meta.json")
    ids = id_dtype(vocab)
    for s in missing:
        part = Subset(dataset, range(s * SHARD, min(len(dataset), (s + 1) * SHARD)))
        chunks = {p: [] for p in PARTS}
        for batch in loader(part, batch_size):
            seq = teacher({key: v.to(device) for key, v in batch.items()}).sequence.float()
            sparse = SparseLogits.topk(seq.reshape(-1, vocab), k)
            shape = seq.shape[:2]
            chunks["values"].append(sparse.values.reshape(*shape, k).half().cpu().numpy())
            chunks["indices"].append(sparse.indices.reshape(*shape, k).cpu().numpy().astype(ids))
            chunks["tail"].append(sparse.tail.reshape(shape).half().cpu().numpy())
        _write(folder, s, {p: np.concatenate(c) for p, c in chunks.items()})
        log.info("token cache: shard %d of %d written", s + 1, shards_of(len(dataset)))
    return CachedTokens(teacher, folder, meta)
