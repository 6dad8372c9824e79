"""CRD: contrastive representation distillation, NCE against memory banks of both embeddings.

The student's and the teacher's features of an item (flattened) are projected by linear heads to unit
vectors of ``dim`` (128), ``v_s = n(W_s f_s + b_s)`` and ``v_t = n(W_t f_t + b_t)`` (``n(x) = x / ||x||``).
Two memory banks hold one such vector per training item, ``M_s`` (student's) and ``M_t`` (teacher's).
For an item ``i`` of the batch, with ``K`` negatives ``j_1..j_K`` drawn from the items of other classes
and ``N`` the number of training items:

    P_s(j) = exp(<v_s, M_t[j]> / tau) / Z_s,      P_t(j) = exp(<v_t, M_s[j]> / tau) / Z_t
    L(P) = -log(P(i) / (P(i) + K/N + eps)) - sum_k log((K/N) / (P(j_k) + K/N + eps))
    CRD(i) = L(P_s) + L(P_t)   per instance (eps = 1e-7),

the student anchored against the teacher's memory and the teacher against the student's (the NCE
bound of the paper's eq. 18 with the uniform noise ``1/N``). ``Z_s`` and ``Z_t`` are constants set on
the first batch to ``N`` times the mean of the ``exp`` terms over that batch's ``K + 1`` items. After
the scores, the positive rows of both banks move to the batch's vectors:
``M[i] <- n(m M[i] + (1 - m) v)`` (momentum ``m``, 0.5). Tian, Krishnan and Isola, "Contrastive
Representation Distillation", ICLR 2020 (arXiv:1910.10699).

Followed: the official code (HobbitLong/RepDistiller: ``crd/criterion.py``, ``CRDLoss``, ``Embed``,
``ContrastLoss``; ``crd/memory.py``, ``ContrastMemory``; ``dataset/cifar100.py``,
``CIFAR100InstanceSample``, mode ``exact``) and mdistiller's copy (``mdistiller/distillers/CRD.py``):
``dim = 128``, ``K = 16384``, ``tau = 0.07``, ``m = 0.5``; the banks start uniform in
``[-sqrt(3/dim), sqrt(3/dim)]``; the positive is the item itself and the negatives are drawn without
replacement from the items of other classes (with replacement where fewer than ``K`` exist); the banks
are not trained, the heads train with the student. The official weights are CE 1.0 + CRD 0.8, without
KD (RepDistiller's README, ``--distill crd -a 0 -b 0.8``; mdistiller's ``CRD.LOSS.CE_WEIGHT 1.0``,
``FEAT_WEIGHT 0.8``). Differences in how, not in what: the scores are gathered from ``v @ M.T``
rather than computed from the gathered memory rows (the official ``bmm``; equal up to rounding); the
normalisations are ``F.normalize`` (``||x||`` clamped at 1e-12); and the negatives, a uniform K-subset
of the other classes' items as in the official sampler, are the K smallest of uniform keys from a
generator that is part of the module's state (saved with it: a resumed fit draws what an uninterrupted
one draws) rather than numpy draws in the data loader's workers. ``negatives: uniform`` draws them
uniformly over all items instead, with replacement (the official memory's own sampler, used when no
negatives are given). Not offered: the official ``relax`` mode (a random item of the class as the
positive).

The heads, the banks, ``Z`` and the generator make :class:`CRDMemory`, the term's module (saved with the
student's training state); the item labels the negatives avoid are read from the training set when the
fit starts. CRD needs each row's training-set position (the batch's ``index``), one teacher, one
process, and a training set that holds its labels.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.checks import COUNT, FRACTION, Range
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import same_batch

NEGATIVES = ("other_classes", "uniform")
EPS = 1e-7  # the official ContrastLoss's


def nce(p: Tensor, num_items: int) -> Tensor:
    """``-log(p_0 / (p_0 + K/N + eps)) - sum_k log((K/N) / (p_k + K/N + eps))`` per row of ``p``
    (``[batch, K + 1]``: column 0 the positive's normalised score, then the K negatives'; ``N =
    num_items``): CRD's NCE loss of one side, the official ``ContrastLoss`` before its batch mean."""
    noise = (p.shape[1] - 1) / num_items
    pos, neg = p[:, 0], p[:, 1:]
    return -torch.log(pos / (pos + noise + EPS)) - torch.log(noise / (neg + noise + EPS)).sum(1)


def item_labels(dataset, key: str) -> Tensor:
    """The label of every item of ``dataset`` by position: a :class:`~mmkd.data.TensorDictDataset`'s
    ``tensors[key]``, or the ``labels`` tensor of a data set that holds one per item (the image sets)."""
    from mmkd.data import TensorDictDataset

    labels = dataset.tensors.get(key) if isinstance(dataset, TensorDictDataset) else getattr(dataset, "labels", None)
    if not isinstance(labels, Tensor) or labels.shape != (len(dataset),):
        raise ValueError(f"loss crd: cannot read the labels of the training set ({type(dataset).__name__}) that its "
                         "negatives avoid; give it a `labels` tensor (one per item) or the term "
                         "args.negatives: uniform")
    return labels.long()


class CRDMemory(nn.Module, Callback):
    """CRD's learned and remembered parts (module docstring): the student's and teacher's embedding
    heads, the memory banks ``memory_s`` and ``memory_t`` (``[num_items, dim]``), the constants ``z``
    (``[Z_s, Z_t]``, -1 until the first batch sets them) and the generator of the negatives.

    A callback: when the fit starts it reads the training set's labels (``labels``, which the
    ``other_classes`` negatives avoid) and checks that there is one teacher, one process and
    ``num_items`` items.
    """

    def __init__(self, student_shape, teacher_shape, num_items: int, dim: int = 128, k: int = 16384,
                 temperature: float = 0.07, momentum: float = 0.5, negatives: str = "other_classes"):
        super().__init__()
        if teacher_shape is None:
            raise ValueError("loss crd: it contrasts the student's embedding with a teacher's; the Distiller has no "
                             "teacher")
        if isinstance(student_shape, list) or isinstance(teacher_shape, list):
            raise ValueError("loss crd reads one feature per side (student: features.<path>), not the list of all "
                             "features")
        if negatives not in NEGATIVES:
            raise ValueError(f"loss crd: negatives={negatives!r}; choose from: {', '.join(NEGATIVES)}")
        self.k, self.temperature, self.momentum, self.negatives = int(k), float(temperature), float(momentum), negatives
        self.embed_s = nn.Linear(math.prod(student_shape), dim)
        self.embed_t = nn.Linear(math.prod(teacher_shape), dim)
        bound = 1 / math.sqrt(dim / 3)
        self.register_buffer("memory_s", torch.rand(num_items, dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(num_items, dim) * 2 * bound - bound)
        self.register_buffer("z", torch.full((2,), -1.0))
        self.seed = int(torch.randint(0, 2**62, ()))  # from the run's seeded generator
        self.rng: torch.Generator | None = None  # made on the banks' device at the first draw
        self.labels: Tensor | None = None  # every item's label, set when the fit starts

    @property
    def num_items(self) -> int:
        """The size of the training set (of each memory bank)."""
        return self.memory_s.shape[0]

    def embed(self, f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
        """The unit embeddings ``v_s``, ``v_t`` (``[batch, dim]``) of the flattened features."""
        return F.normalize(self.embed_s(f_s.flatten(1)), dim=1), F.normalize(self.embed_t(f_t.flatten(1)), dim=1)

    def generator(self, device: torch.device) -> torch.Generator:
        """The negatives' generator, on ``device`` (the banks'): made and seeded by ``seed`` at the first
        draw, and again if the banks have moved to another device since."""
        if self.rng is None or self.rng.device != device:
            self.rng = torch.Generator(device).manual_seed(self.seed)
        return self.rng

    def draw(self, index: Tensor) -> Tensor:
        """``[batch, K + 1]`` item positions: column 0 each row's own item (the positive), then its K
        negatives (``negatives``: items of other classes, a row of negative label taking any item; or
        any item, uniformly)."""
        b, n, g = len(index), self.num_items, self.generator(index.device)
        if self.negatives == "uniform":
            return torch.cat([index[:, None], torch.randint(0, n, (b, self.k), generator=g, device=index.device)], 1)
        if self.labels is None:
            raise ValueError("loss crd: no item labels for the negatives of other classes; they are read when the fit "
                             "starts (CRDMemory.on_fit_start), or set CRDMemory.labels")
        y = self.labels[index]
        other = (self.labels[None] != y[:, None]) | (y[:, None] < 0)
        count = other.sum(1)
        if not count.all():
            raise ValueError(f"loss crd: no training item of another class than {int(y[count == 0][0])} to draw "
                             "negatives from; give the term args.negatives: uniform")
        neg = torch.empty(b, self.k, dtype=torch.long, device=index.device)
        enough = count >= self.k
        if enough.any():  # without replacement: the K smallest of uniform keys, other items' keys above all
            keys = torch.rand(int(enough.sum()), n, generator=g, device=index.device).masked_fill_(~other[enough], 2.0)
            neg[enough] = keys.topk(self.k, dim=1, largest=False, sorted=False).indices
        if not enough.all():  # fewer than K candidates: with replacement, as the official sampler
            neg[~enough] = torch.multinomial(other[~enough].float(), self.k, replacement=True, generator=g)
        return torch.cat([index[:, None], neg], 1)

    def contrast(self, v_s: Tensor, v_t: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """``P_s``, ``P_t`` (``[batch, K + 1]``) of the items ``idx``: the student's embeddings scored against
        the teacher's memory and the teacher's against the student's, ``exp(<v, M[j]> / tau) / Z``; the
        first call sets ``z``."""
        e_s = torch.exp((v_s @ self.memory_t.T).gather(1, idx) / self.temperature)
        e_t = torch.exp((v_t @ self.memory_s.T).gather(1, idx) / self.temperature)
        if self.z[0] < 0:
            self.z.copy_(torch.stack([e_s.detach().mean(), e_t.detach().mean()]) * self.num_items)
        return e_s / self.z[0], e_t / self.z[1]

    @torch.no_grad()
    def update(self, index: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        """``M[i] <- n(m M[i] + (1 - m) v)`` for the batch's items, in both banks (new tensors: the scores'
        backward still reads the old ones)."""
        for name, v in (("memory_s", v_s), ("memory_t", v_t)):
            bank = getattr(self, name)
            moved = F.normalize(bank[index] * self.momentum + v * (1 - self.momentum), dim=1)
            setattr(self, name, bank.index_copy(0, index, moved))

    def forward(self, f_s: Tensor, f_t: Tensor, index: Tensor) -> Tensor:
        """Per-instance ``L(P_s) + L(P_t)`` of the features ``f_s``, ``f_t`` of the items ``index``; draws
        the negatives, then moves the banks. Computed in the banks' precision (float32; autocast off)."""
        index = index.to(self.memory_s.device).long()
        outside = index[(index < 0) | (index >= self.num_items)]
        if len(outside):
            raise ValueError(f"loss crd: batch index {int(outside[0])} is not a position in the {self.num_items} "
                             "training items the memory holds; CRD needs the training set's own item positions")
        with torch.autocast(f_s.device.type, enabled=False):
            v_s, v_t = self.embed(f_s.to(self.memory_s.dtype), f_t.to(self.memory_s.dtype))
            p_s, p_t = self.contrast(v_s, v_t, self.draw(index))
            self.update(index, v_s, v_t)
        return nce(p_s, self.num_items) + nce(p_t, self.num_items)

    def on_fit_start(self, trainer, module) -> None:
        """Check the fit (one process, one teacher, ``num_items`` training items) and read the labels."""
        if trainer.world > 1:
            raise ValueError(f"loss crd: each process would move its own memory banks ({trainer.world} processes); "
                             "train on one process")
        teachers = getattr(module, "teachers", ())
        if len(teachers) != 1:
            raise ValueError(f"loss crd: one teacher fills its memory; the Distiller has {len(teachers)}")
        if len(trainer.train_data) != self.num_items:
            raise ValueError(f"loss crd: the memory holds {self.num_items} items, the training set has "
                             f"{len(trainer.train_data)}; build the term for this training set (num_items)")
        if self.negatives == "other_classes":
            self.labels = item_labels(trainer.train_data, module.label_key).to(self.memory_s.device)

    def get_extra_state(self) -> dict[str, Any]:
        """The seed and the generator's device and state (empty before the first draw)."""
        return {"seed": self.seed, "device": str(self.rng.device) if self.rng is not None else "",
                "rng": self.rng.get_state() if self.rng is not None else torch.empty(0, dtype=torch.uint8)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`get_extra_state` saved: the same draws follow."""
        self.seed, self.rng = int(state["seed"]), None
        if state["device"]:
            if state["device"].startswith("cuda") and not torch.cuda.is_available():
                raise ValueError(f"loss crd: the negatives' generator was saved on {state['device']}; resume on a "
                                 "machine with CUDA, or delete the training state to start again")
            self.rng = torch.Generator(state["device"])
            self.rng.set_state(state["rng"])


@register_loss("crd", teacher=True, per_sample=True, batch=True, module=CRDMemory,
               ranges={"dim": COUNT, "k": COUNT, "temperature": Range(0.0125), "momentum": FRACTION})
def crd(student_features, teacher_features, target=None, *, module=None, batch=None, reduction="mean"):
    """Per instance ``L(P_s) + L(P_t)``, the NCE losses of the student's embedding against the teacher's
    memory and of the teacher's against the student's (CRD, ICLR 2020; module docstring).

    Use it on one feature per side, e.g. the penultimate embeddings: ``Term("crd", student="features.pool",
    teacher="features.pool")``; the term's :class:`CRDMemory` holds the heads and the memory banks, and
    the batch's ``index`` (each row's position in the training set) says which rows of the banks are the
    positives. A call moves the banks: call it once per training step. (``temperature`` at least 0.0125:
    ``exp(1 / tau)`` must stay finite in float32.)
    """
    if module is None:
        raise ValueError("loss crd: no memory module; use it as a loss term (Term('crd', ...)), which makes one")
    if batch is None or "index" not in batch:
        keys = ", ".join(sorted(batch)) if batch is not None else "none given"
        raise ValueError(f"loss crd: the batch has no 'index' entry (each row's position in the training set; it has: "
                         f"{keys}); train on a data set whose batches carry it (TensorDictDataset, the image sets)")
    same_batch("crd", student_features, teacher_features)
    return reduce(module(student_features, teacher_features, batch["index"]), reduction)
