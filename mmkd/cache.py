"""Teacher-output cache: a frozen teacher's outputs on a deterministic data set, computed once.

The outputs are stored on disk under a key made of a hash of the teacher (weights, input keys,
feature paths) and the data set's fingerprint, so later epochs and later runs reuse them and the
student's epochs run no teacher forward; any change to the teacher's weights changes the key.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmkd import io
from mmkd.data import loader
from mmkd.net import Batch, Output, Teacher


def teacher_hash(teacher: Teacher) -> str:
    """SHA-256 over the teacher's class, module tree (``repr``: catches parameter-free changes such as
    another activation), input keys, feature paths and every tensor of its state."""
    h = hashlib.sha256(f"{type(teacher.model).__qualname__}|{teacher.model!r}|{teacher.keys}|"
                       f"{teacher.feature_paths}".encode())
    for name, t in sorted(teacher.model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class CachedTeacher(nn.Module):
    """Stands in for a frozen teacher: returns stored outputs for the batch's ``"index"`` entry.

    Only valid for batches of the data set it was built on (the training set).
    """

    def __init__(self, teacher: Teacher, logits: Tensor, features: dict[str, Tensor], path: Path):
        super().__init__()
        self.keys, self.frozen, self.path = teacher.keys, True, path
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
    if not getattr(dataset, "deterministic", False) or not hasattr(dataset, "fingerprint"):
        raise ValueError(f"data set {getattr(dataset, 'name', dataset)!r} is not marked deterministic "
                         "with a fingerprint; its teacher outputs cannot be cached")
    key = hashlib.sha256(f"{teacher_hash(teacher)}|{dataset.fingerprint}".encode()).hexdigest()[:24]
    path = Path(root) / f"{key}.pt"
    if path.exists():
        stored = torch.load(path, map_location="cpu")
        return CachedTeacher(teacher, stored["logits"], stored["features"], path)
    device = torch.device(device)
    teacher.to(device).eval()
    logits, features = [], {p: [] for p in teacher.feature_paths}
    for batch in loader(dataset, batch_size):
        out = teacher({k: v.to(device) for k, v in batch.items()})
        logits.append(out.logits.float().cpu())
        for p, f in out.features.items():
            features[p].append(f.float().cpu())
    stored = {"logits": torch.cat(logits), "features": {p: torch.cat(f) for p, f in features.items()}}
    io.save(stored, path)
    return CachedTeacher(teacher, stored["logits"], stored["features"], path)
