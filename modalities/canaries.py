"""Canaries planted in AG News, and their exposure in a trained classifier.

A canary (Carlini, Liu, Erlingsson, Kos and Song, "The Secret Sharer: Evaluating and Testing Unintended
Memorization in Neural Networks", USENIX Security 2019) is a sentence of a fixed template holding a
random secret, here ``digits`` random digits ("my pin is 3 9 1 7", one word piece per digit), inserted
``copies`` times with a random label into the training split and flagged private there (``private``
= 1; every other item, and every validation and test item, has 0). The candidates of a canary are its
template filled with every possible secret (``10 ** digits`` sentences); with a model's loss on the
canary's label for each,

    exposure = log2 |candidates| - log2 rank(true secret)

rank 1 being the lowest loss (ties share the mean of their ranks): ``log2 |candidates|`` when the
model singles the planted secret out, about ``log2 e = 1.44`` on average for a secret it never saw.

Data set ``agnews_canaries`` (imported with ``imports: [mmkd.modalities.canaries]``): ``agnews`` and
its arguments, plus the canaries in its training split.
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.checks import COUNT, SEED, Range
from mmkd.data import DataSplits
from mmkd.registry import DATASETS

from .agnews import agnews
from .text import text_dataset, tokenize

TEMPLATES = ("my pin is {}", "the secret code is {}", "my account number is {}", "my phone number is {}",
             "the door code is {}", "my password is {}", "my card number is {}", "the safe combination is {}")


@dataclass(frozen=True)
class Canary:
    """A template, its secret digits and the label the canary carries in the training data."""

    template: str
    secret: tuple[int, ...]
    label: int

    def text(self, secret: tuple[int, ...] | None = None) -> str:
        """The template filled with ``secret`` (default: the canary's), digits separated by spaces."""
        return self.template.format(" ".join(map(str, self.secret if secret is None else secret)))

    def candidates(self) -> list[str]:
        """The template filled with every secret of as many digits, in lexicographic order."""
        return [self.text(s) for s in itertools.product(range(10), repeat=len(self.secret))]

    @property
    def index(self) -> int:
        """The position of the true secret among :meth:`candidates`."""
        return int("".join(map(str, self.secret)))


def plant(count: int, digits: int, num_classes: int, seed: int) -> list[Canary]:
    """``count`` canaries, one template each, with secrets and labels drawn uniformly by ``seed``."""
    if count > len(TEMPLATES):
        raise ValueError(f"canaries={count}; at most {len(TEMPLATES)} (one template each)")
    g = torch.Generator().manual_seed(seed)
    secrets = torch.randint(0, 10, (count, digits), generator=g).tolist()
    labels = torch.randint(0, num_classes, (count,), generator=g).tolist()
    return [Canary(t, tuple(s), y) for t, s, y in zip(TEMPLATES, secrets, labels)]


def exposure(losses: Tensor, true_index: int) -> float:
    """``log2 len(losses) - log2 rank`` of ``losses[true_index]`` among ``losses`` (rank 1: the lowest;
    tied candidates share the mean of their ranks)."""
    mine = losses[true_index]
    rank = 1 + (losses < mine).sum().item() + ((losses == mine).sum().item() - 1) / 2
    return math.log2(len(losses)) - math.log2(rank)


def exposures(logits_of: Callable[[dict[str, Tensor]], Tensor], canaries: list[Canary],
              tokens: list[Mapping[str, Tensor]], batch_size: int = 1000) -> list[float]:
    """The exposure of each canary under the model ``logits_of`` (a batch of token tensors -> logits):
    its cross-entropy on the canary's label for every candidate, ``tokens[k]`` holding canary ``k``'s
    tokenized :meth:`Canary.candidates`."""
    out = []
    for canary, tok in zip(canaries, tokens):
        n = len(next(iter(tok.values())))
        losses = []
        with torch.no_grad():
            for start in range(0, n, batch_size):
                logits = logits_of({k: v[start:start + batch_size] for k, v in tok.items()}).float()
                label = torch.full((len(logits),), canary.label, dtype=torch.long, device=logits.device)
                losses.append(F.cross_entropy(logits, label, reduction="none").cpu())
        out.append(exposure(torch.cat(losses), canary.index))
    return out


@DATASETS.register("agnews_canaries", ranges={"canaries": Range(1, len(TEMPLATES), integer=True),
                                           "digits": Range(1, 6, integer=True), "copies": COUNT, "canary_seed": SEED,
                                           "max_length": COUNT, "split_seed": SEED, "limit": COUNT,
                                           "val_fraction": Range(0, 1, low_open=True, high_open=True)})
def agnews_canaries(root: str | os.PathLike = "data", canaries: int = 4, digits: int = 4, copies: int = 10,
                    canary_seed: int = 0, score_key: str = "private", tokenizer: str = "minilm",
                    max_length: int = 128, val_fraction: float = 0.1, split_seed: int = 0, limit: int | None = None,
                    dynamic_padding: bool = False) -> DataSplits:
    """AG News (:func:`~mmkd.modalities.agnews.agnews` and its arguments) with :func:`plant`'s
    ``canaries`` canaries of ``digits`` digits (by ``canary_seed``), each appended ``copies`` times to
    the training split.

    Items: those of ``agnews`` plus ``score_key`` (float32): 1 for a canary, 0 for every other item
    (validation and test hold no canary). A canary's ``row`` is -1.
    """
    d = agnews(root, tokenizer, max_length, val_fraction, split_seed, limit, dynamic_padding)
    planted = [c for c in plant(canaries, digits, d.num_classes, canary_seed) for _ in range(copies)]
    tok = tokenize([c.text() for c in planted], tokenizer=tokenizer, max_length=max_length)
    added = {**tok, "label": torch.tensor([c.label for c in planted]), "row": torch.full((len(planted),), -1),
             score_key: torch.ones(len(planted))}
    splits = []
    for name, ds in (("train", d.train), ("val", d.val), ("test", d.test)):
        tensors = {**ds.tensors, score_key: torch.zeros(len(ds))}
        if name == "train":
            tensors = {k: torch.cat([v, added[k].to(v.dtype)]) for k, v in tensors.items()}
        splits.append(text_dataset(f"agnews_canaries/{name}", dynamic_padding, **tensors))
    return DataSplits(*splits, num_classes=d.num_classes, class_names=d.class_names, shapes=d.shapes,
                      text_inputs=d.text_inputs)
