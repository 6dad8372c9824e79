"""Teacher-output cache: a frozen teacher's outputs on a deterministic data set, computed once.

The outputs are stored on disk under a key made of a hash of the teacher (weights, input keys,
feature paths) and the data set's fingerprint, so later epochs and later runs reuse them and the
student's epochs run no teacher forward; any change to the teacher's weights changes the key.
Each entry ``<key>.pt`` has an index ``<key>.json`` with its size and SHA-256 (``mmkd.io.save_checked``):
an entry that is damaged, or has no index, is rebuilt with a warning, never loaded blindly.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmkd import io
from mmkd.data import cacheable, hash_tensors, loader
from mmkd.net import Batch, Output, Teacher

log = logging.getLogger("mmkd")


def _fits(stored, teacher: Teacher, n: int) -> bool:
    """Whether a loaded cache entry has the layout this module writes: ``n`` rows of logits and of
    every feature path of ``teacher``."""
    if not isinstance(stored, dict) or not isinstance(stored.get("logits"), Tensor):
        return False
    features = stored.get("features")
    return (stored["logits"].ndim == 2 and len(stored["logits"]) == n and isinstance(features, dict)
            and set(features) == set(teacher.feature_paths)
            and all(isinstance(f, Tensor) and len(f) == n for f in features.values()))


def teacher_hash(teacher: Teacher) -> str:
    """SHA-256 over the teacher's class, module tree (``repr``: catches parameter-free changes such as
    another activation), input keys, feature paths and every tensor of its state."""
    h = hashlib.sha256(f"{type(teacher.model).__qualname__}|{teacher.model!r}|{teacher.keys}|"
                       f"{teacher.feature_paths}".encode())
    hash_tensors(h, teacher.model.state_dict())
    return h.hexdigest()


class Cached(nn.Module):
    """A stand-in for a frozen teacher that serves its stored outputs on the training set; ``live`` is
    the teacher itself (not a sub-module: its weights are not saved again), for any other data
    (the fidelity metrics on the test split)."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.__dict__["live"] = teacher
        self.keys, self.frozen = teacher.keys, True


class CachedTeacher(Cached):
    """Stands in for a frozen teacher: returns stored outputs for the batch's ``"index"`` entry.

    Only valid for batches of the data set it was built on (the training set).
    """

    def __init__(self, teacher: Teacher, logits: Tensor, features: dict[str, Tensor], path: Path):
        super().__init__(teacher)
        self.path = path
        self.logits, self.features = logits, features

    def forward(self, batch: Batch) -> Output:
        idx = batch["index"]
        if self.logits.device != idx.device:
            self.logits = self.logits.to(idx.device)
            self.features = {k: v.to(idx.device) for k, v in self.features.items()}
        return Output(self.logits[idx], {k: v[idx] for k, v in self.features.items()})


@torch.no_grad()
def cache_teacher(teacher: Teacher, dataset: Dataset, root: str | os.PathLike,
                  batch_size: int = 512, device: str | torch.device = "cpu") -> CachedTeacher:
    """Return a :class:`CachedTeacher` for ``teacher`` on ``dataset``, computing it only on a miss.

    Raises ``ValueError`` if the teacher is not frozen or the data set is not deterministic (then
    its outputs differ from epoch to epoch and must be computed live).
    """
    if not teacher.frozen:
        raise ValueError("only a frozen teacher can be cached; a co-trained teacher changes every step")
    if not cacheable(dataset):
        raise ValueError(f"data set {getattr(dataset, 'name', dataset)!r} is not a deterministic "
                         "mmkd.data.Fingerprinted data set; its teacher outputs cannot be cached")
    key = hashlib.sha256(f"{teacher_hash(teacher)}|{dataset.fingerprint}".encode()).hexdigest()[:24]
    path = Path(root) / f"{key}.pt"
    stored = io.load_checked(path, log)  # None on a miss, and (with a warning) on a damaged entry
    if stored is not None:
        if _fits(stored, teacher, len(dataset)):
            log.info("teacher cache hit: %s (%d items of %s)", path, len(dataset), dataset.name)
            return CachedTeacher(teacher, stored["logits"], stored["features"], path)
        log.warning("%s: cache entry does not hold this teacher's outputs on %d items; rebuilding it",
                    path, len(dataset))
    log.info("teacher cache miss: computing %s's outputs on %d items into %s",
             type(teacher.model).__name__, len(dataset), path)
    device = torch.device(device)
    teacher.to(device).eval()
    logits, features = [], {p: [] for p in teacher.feature_paths}
    for batch in loader(dataset, batch_size):
        out = teacher({k: v.to(device) for k, v in batch.items()})
        logits.append(out.logits.float().cpu())
        for p, f in out.features.items():
            features[p].append(f.float().cpu())
    stored = {"logits": torch.cat(logits), "features": {p: torch.cat(f) for p, f in features.items()}}
    io.save_checked(stored, path)  # atomic, then its size and SHA-256 in <key>.json
    return CachedTeacher(teacher, stored["logits"], stored["features"], path)
