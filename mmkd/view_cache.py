"""Augmentation-aware teacher cache: a frozen teacher's outputs on seeded augmented views, stored once.

After FKD (Shen and Xing, "A Fast Knowledge Distillation Framework for Visual Recognition", ECCV 2022),
which stores the soft labels of random crops with their coordinates: when the training set draws
item ``i``'s view in epoch ``e`` from a generator seeded by ``(seed, e, i)`` (a reproducible
:class:`mmkd.data.Epochal` set, e.g. ``cifar10`` with ``augment_seed``), the teacher's output on that
view is the same in every run, so it is computed once, by the first run that meets the batch, and read
by every later one (other students, other losses, other student seeds). Each batch carries its
``index`` and ``epoch``.

Storage, per epoch, memory-mapped ``.npy`` files under ``<cache_dir>/views/<key>/``: the logits in
float16 (``[items, classes]``), or with ``topk=k`` the ``k`` largest log-probabilities (float16) and
their classes (uint8 / int16 / int32, the smallest that holds the class count), the teacher's
feature taps in float16 (``e<epoch>.feat<i>.npy``, the i-th of its sorted feature paths), plus a
filled mask (and the class count and feature shapes in ``meta.json``). A full row is read back as the logits themselves (every
loss sees what the live teacher gave, to float16 rounding); a top-k row as log-probabilities: the k
stored probabilities and the remaining mass ``1 - sum`` spread evenly over the other classes (losses
that apply a softmax see the reconstructed distribution; one that reads raw logits, such as ``bkl``,
sees log-probabilities instead). Each epoch's size and hit rate are logged when its last view is
served. The
key hashes the teacher (weights, module tree, inputs), the data set's fingerprint (its images, the
augmentations and their seed) and ``topk``; changing any of them starts a new cache. Files are
written before the mask marks their rows, so an interrupted run leaves rows to recompute, never a
half-written row that reads as filled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmkd import io
from mmkd.cache import Cached, teacher_hash
from mmkd.data import Epochal, Fingerprinted
from mmkd.net import Batch, Output, Teacher

log = logging.getLogger("mmkd")


def reproducible(dataset) -> bool:
    """Whether a teacher's outputs on ``dataset``'s augmented views may be cached: a fingerprinted
    :class:`Epochal` set whose views are seeded."""
    return isinstance(dataset, Epochal) and isinstance(dataset, Fingerprinted) and dataset.reproducible


def index_dtype(classes: int) -> np.dtype:
    """The smallest integer type that holds a class id below ``classes``."""
    return np.dtype(np.uint8 if classes <= 256 else np.int16 if classes <= 32767 else np.int32)


def reconstruct(values: Tensor, indices: Tensor, classes: int) -> Tensor:
    """Log-probabilities ``[N, classes]`` from the top-k log-probabilities ``values`` ``[N, k]`` at
    ``indices``: those k probabilities, and the remaining mass spread evenly over the other classes."""
    p = values.float().exp()
    k = p.shape[1]
    rest = (1 - p.sum(1, keepdim=True)).clamp_min(0) / max(classes - k, 1)
    out = rest.expand(-1, classes).clone()
    out.scatter_(1, indices.long(), p)
    return out.clamp_min(1e-12).log()


FP16_MAX = float(np.finfo(np.float16).max)


def half(x: Tensor, what: str) -> np.ndarray:
    """``x`` as float16, values beyond its range (65504) clamped to it, with a warning naming ``what``
    (an untrained deep network's logits can reach them)."""
    if (big := float(x.abs().max())) > FP16_MAX:
        log.warning("view cache: teacher %s up to %.3g, beyond float16's range; stored clamped to +-%g", what, big,
                    FP16_MAX)
        x = x.clamp(-FP16_MAX, FP16_MAX)
    return x.numpy().astype(np.float16)


class ViewCachedTeacher(Cached):
    """Stands in for a frozen teacher on a reproducible augmented training set (module docstring)."""

    def __init__(self, teacher: Teacher, folder: Path, items: int, topk: int | None):
        super().__init__(teacher)
        self.teacher, self.folder, self.items, self.topk = teacher, folder, items, topk
        self.paths = sorted(teacher.feature_paths)
        self.classes: int | None = None
        self.shapes: dict[str, list[int]] = {}  # feature path -> the shape of one view's features
        self._epoch: int | None = None
        self._files: dict[str, np.ndarray] = {}
        self.hits = self.misses = self.served = 0

    def _open(self, epoch: int) -> None:
        """Memory-map (creating them if new) the files of ``epoch``."""
        if self._epoch is not None and self.served < self.items:
            self._report()  # an epoch that did not serve every view (drop_last, a subset)
        self._epoch, classes = epoch, self.classes
        self.folder.mkdir(parents=True, exist_ok=True)
        shapes = ({"logits": ((self.items, classes), np.float16)} if self.topk is None else
                  {"values": ((self.items, self.topk), np.float16), "indices": ((self.items, self.topk), index_dtype(classes))})
        shapes.update({f"feat{i}": ((self.items, *self.shapes[p]), np.float16) for i, p in enumerate(self.paths)})
        shapes["filled"] = ((self.items,), np.bool_)
        self._files = {}
        for name, (shape, dtype) in shapes.items():
            path = self.folder / f"e{epoch}.{name}.npy"
            if path.exists():
                a = np.load(path, mmap_mode="r+")
                if a.shape != shape or a.dtype != dtype:
                    log.warning("%s: holds %s %s, not %s %s; rebuilding the epoch", path, a.shape, a.dtype, shape, dtype)
                    a = None
            else:
                a = None
            if a is None:
                a = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
                if name == "filled":
                    a[:] = False
            self._files[name] = a
        self.hits = self.misses = self.served = 0

    def _report(self) -> None:
        done = int(self._files["filled"].sum())
        size = sum(os.path.getsize(self.folder / f"e{self._epoch}.{n}.npy") for n in self._files)
        log.info("view cache: epoch %d: %d of %d batches' rows read from %s, %d computed; %d / %d views stored, "
                 "%.1f MB", self._epoch, self.hits, self.hits + self.misses, self.folder, self.misses, done,
                 self.items, size / 2**20)

    def forward(self, batch: Batch) -> Output:
        idx, epoch = batch["index"].cpu(), int(batch["epoch"][0])
        rows = idx.numpy()
        if self.classes is None and (self.folder / "meta.json").is_file():
            meta = json.loads((self.folder / "meta.json").read_text())
            self.classes, self.shapes = int(meta["classes"]), meta["features"]
        live = self.teacher(batch) if self.classes is None else None  # a new cache: learn the shapes
        if live is not None:
            self.classes = live.logits.shape[1]
            self.shapes = {p: list(live.features[p].shape[1:]) for p in self.paths}
            io.write_json({"classes": self.classes, "features": self.shapes}, self.folder / "meta.json")
        if epoch != self._epoch:
            self._open(epoch)
        filled = self._files["filled"]
        if not filled[rows].all():
            self.misses += 1
            computed = live if live is not None else self.teacher(batch)
            for i, p in enumerate(self.paths):
                self._files[f"feat{i}"][rows] = half(computed.features[p].float().cpu(), p)
            logits = computed.logits.float().cpu()
            if self.topk is None:
                self._files["logits"][rows] = half(logits, "logits")
            else:
                top = torch.log_softmax(logits, 1).topk(self.topk, 1)
                self._files["values"][rows] = top.values.numpy().astype(np.float16)
                self._files["indices"][rows] = top.indices.numpy().astype(self._files["indices"].dtype)
            for a in self._files.values():
                if a is not filled:
                    a.flush()
            filled[rows] = True  # after the rows themselves are written
            filled.flush()
        else:
            self.hits += 1
        self.served += len(rows)
        if self.served == self.items:
            self._report()
        if self.topk is None:
            out = torch.from_numpy(np.asarray(self._files["logits"][rows], dtype=np.float32))
        else:
            out = reconstruct(torch.from_numpy(np.asarray(self._files["values"][rows], dtype=np.float32)),
                              torch.from_numpy(np.asarray(self._files["indices"][rows]).astype(np.int64)), self.classes)
        device = batch["index"].device
        features = {p: torch.from_numpy(np.asarray(self._files[f"feat{self.paths.index(p)}"][rows],
                                                   dtype=np.float32)).to(device)
                    for p in self.teacher.feature_paths}  # the teacher's order (a term may read them all)
        return Output(out.to(device), features)


def cache_views(teacher: Teacher, dataset, root: str | os.PathLike, topk: int | None = None) -> ViewCachedTeacher:
    """A :class:`ViewCachedTeacher` for ``teacher`` on the reproducible augmented ``dataset``, its files
    under ``root/views/<key>``; ``ValueError`` for a teacher that is not frozen or a data set whose
    views are not seeded."""
    if not teacher.frozen:
        raise ValueError("only a frozen teacher's outputs can be cached")
    if not reproducible(dataset):
        raise ValueError(f"data set {getattr(dataset, 'name', dataset)!r} does not seed its views; set its augment_seed")
    key = hashlib.sha256(f"{teacher_hash(teacher)}|{dataset.fingerprint}|{topk}".encode()).hexdigest()[:24]
    folder = Path(root) / "views" / key
    log.info("view cache: teacher %s on %s in %s (%s)", type(teacher.model).__name__, dataset.name, folder,
             (f"top-{topk}" if topk else "full logits") + (f" and features {', '.join(teacher.feature_paths)}"
                                                           if teacher.feature_paths else ""))
    return ViewCachedTeacher(teacher, folder, len(dataset), topk)
