"""Data policies: what the student trains on, decided between epochs.

A :class:`DataPolicy` is a :class:`~mmkd.callbacks.Callback` with one more hook: before every epoch
the :class:`~mmkd.trainer.Trainer` hands it the training set (the full one, or what the policy before
it returned) and trains the epoch on the data set it returns: a subset (pruning, active selection), a
re-weighted or an extended one (generated data). Items keep their ``index`` entry, so cached teacher
outputs still apply to the items of a subset. Its state (e.g. the current selection) is saved with
the other callbacks', so a resumed run trains on the same data. The learning-rate schedule is laid
out over ``max_epochs`` epochs of the data set :meth:`DataPolicy.planned` gives: the full training
set, or the extended one of a policy that adds items.

Register one with :func:`register_policy`; a config lists them as ``policies: [{name, args}]`` (for
the student's stage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from mmkd.callbacks import Callback
from mmkd.checks import COUNT, NON_NEGATIVE_INT, Range
from mmkd.data import loader
from mmkd.registry import POLICIES


def register_policy(name: str, **meta: Any) -> Callable:
    """Register a :class:`DataPolicy` subclass under ``name`` (``meta``: e.g. ``ranges=`` for its args)."""
    return POLICIES.register(name, **meta)


class DataPolicy(Callback):
    """``select(trainer, module, dataset) -> Dataset``: the data set the next epoch trains on."""

    def select(self, trainer, module: nn.Module, dataset: Dataset) -> Dataset:
        return dataset

    def planned(self, dataset: Dataset) -> Dataset:
        """The data set whose epochs the learning-rate schedule is laid out on, before training starts:
        ``dataset`` (a subset keeps the full set's schedule); a policy that adds items gives the
        extended set, so that the schedule ends with the last epoch."""
        return dataset


@torch.no_grad()
def disagreement(module: nn.Module, dataset: Dataset, device: torch.device, batch_size: int = 256) -> Tensor:
    """Per item of ``dataset``, ``KL(p_T || p_S)`` of the teachers' mean probabilities
    ``p_T = mean_t softmax(z_t)`` from the student's ``p_S = softmax(z_s)``, for a
    :class:`~mmkd.distiller.Distiller` ``module`` (in eval mode; its mode is restored)."""
    if not len(module.teachers):
        raise ValueError("a disagreement score needs teachers; the Distiller has none")
    was_training = module.training
    module.eval()
    scores = []
    for batch in loader(dataset, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        log_s = module.student(batch).logits.float().log_softmax(1)
        p_t = torch.stack([t(batch).logits.float().softmax(1) for t in module.teachers]).mean(0)
        scores.append((p_t * (p_t.clamp_min(1e-12).log() - log_s)).sum(1).cpu())
    module.train(was_training)
    return torch.cat(scores)


def top_fraction(scores: Tensor, ratio: float) -> Tensor:
    """The indices of the ``max(1, int(ratio * n))`` highest ``scores`` (ties to the lower index), in
    increasing order."""
    keep = max(1, int(ratio * len(scores)))
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:keep]), dtype=torch.long)


def load_scores(path: str, key: str, what: str) -> Tensor:
    """Per-item scores (float64) from the ``.npy`` file ``path`` (no pickle); a missing or unreadable file
    is a :class:`~mmkd.config.ConfigError` naming the config ``key`` and ``what`` to give."""
    from mmkd.config import ConfigError

    if not Path(path).is_file():
        raise ConfigError(f"{key}: no such file {str(path)!r}; give {what}")
    try:
        scores = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ConfigError(f"{key}: {str(path)!r} is not a NumPy array of scores ({e})") from None
    if scores.ndim != 1 or not np.issubdtype(scores.dtype, np.number):
        raise ConfigError(f"{key}: {str(path)!r} holds a {scores.dtype} array of shape {scores.shape}; give one "
                          "number per training item")
    return torch.from_numpy(scores.astype(np.float64))


def save_scores(trainer, name: str, scores: Tensor) -> None:
    """Write ``scores`` (one per training item) to ``<stage dir>/<name>`` as a ``.npy`` file, on the
    main process only: what :func:`load_scores` reads back in a later run."""
    if trainer.is_main:
        Path(trainer.run_dir).mkdir(parents=True, exist_ok=True)
        np.save(Path(trainer.run_dir) / name, scores.numpy())


@register_policy("random", ranges={"fraction": Range(0, 1, low_open=True)})
class RandomSubset(DataPolicy):
    """Train on a random ``fraction`` of the training set: ``max(1, int(fraction * n))`` items drawn once,
    from the run's seed, kept in index order. The same-budget baseline of the selection policies
    (MiniPLM's difference sampling, pruning by score)."""

    def __init__(self, fraction: float = 0.5):
        self.fraction = fraction
        self.indices: Tensor | None = None

    def select(self, trainer, module, dataset):
        if self.indices is None:
            g = torch.Generator().manual_seed(trainer.cfg.seed)
            keep = max(1, int(self.fraction * len(dataset)))
            self.indices = torch.randperm(len(dataset), generator=g)[:keep].sort().values
        return Subset(dataset, self.indices.tolist())

    def state_dict(self):
        return {"indices": self.indices}

    def load_state_dict(self, state):
        self.indices = state["indices"]


@register_policy("hardest", ranges={"fraction": Range(0, 1, low_open=True), "start": NON_NEGATIVE_INT,
                                    "every": COUNT})
class Hardest(DataPolicy):
    """Train on the items the student has learned least: from epoch ``start`` (0-based) on, every
    ``every`` epochs, keep the ``fraction`` of the training set with the largest
    :func:`disagreement` ``KL(p_T || p_S)`` (ties broken by index); before ``start``, all of it.

    A data-pruning schedule in the spirit of uncertainty-driven selection for distillation (Xu et al.,
    "Computation-Efficient Knowledge Distillation via Uncertainty-Aware Mixup", 2020): an epoch costs
    ``fraction`` of a full one.
    """

    def __init__(self, fraction: float = 0.5, start: int = 1, every: int = 1):
        self.fraction, self.start, self.every = fraction, start, every
        self.indices: Tensor | None = None

    def select(self, trainer, module, dataset):
        epoch = trainer.epoch
        if epoch < self.start:
            return dataset
        if self.indices is None or (epoch - self.start) % self.every == 0:
            scores = disagreement(module, dataset, trainer.device)
            keep = max(1, round(self.fraction * len(scores)))
            order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
            self.indices = torch.tensor(sorted(order[:keep]))
        return Subset(dataset, self.indices.tolist())

    def state_dict(self):
        return {"indices": self.indices}

    def load_state_dict(self, state):
        self.indices = state["indices"]
