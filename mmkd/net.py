"""Students and teachers: a model plus the batch keys it reads and the features it exposes.

A batch is a dict of named tensors (``{"image": ..., "audio": ..., "label": ...}``) or a PyG
``Data``; a :class:`Net` calls its model with the entries named by ``keys``, in order, and records
the outputs of the sub-modules named in ``features`` with forward hooks, so user models need no edits.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

Batch = Any  # dict[str, Tensor] or torch_geometric.data.Data


def select(batch: Batch, keys: Sequence[str]) -> list[Tensor]:
    """The entries of ``batch`` named by ``keys``; a clear error names a missing key."""
    out = []
    for key in keys:
        try:
            out.append(batch[key])
        except (KeyError, AttributeError):
            have = batch.keys()  # dict, or PyG Data (a method there too)
            raise KeyError(f"batch has no key {key!r}; it has: {', '.join(sorted(map(str, have)))}") from None
    return out


@dataclass
class Output:
    """What a student or teacher returns: logits and named intermediate features.

    For a sequence model (a :class:`Net` with ``tokens``) a token is an instance: ``logits`` are
    ``[tokens, vocab]`` over the positions the batch's token mask keeps (and the features likewise),
    ``sequence`` is the ``[batch, time, vocab]`` view and ``mask`` the ``[batch, time]`` mask.
    A cached teacher's ``logits`` may be a :class:`~mmkd.sparse.SparseLogits` (top-k)."""

    logits: Tensor
    features: dict[str, Tensor] = field(default_factory=dict)
    sequence: Tensor | None = None
    mask: Tensor | None = None


class Net(nn.Module):
    """A model, the batch keys it reads, and the sub-module paths whose outputs it exposes.

    Args:
        model: any ``nn.Module`` returning logits ``[batch, classes]``.
        keys: batch entries passed to ``model`` as positional arguments, in order.
        features: dotted module paths (as in ``model.named_modules()``) whose forward outputs are
            returned in :attr:`Output.features`.
        tokens: for a sequence model (``[batch, time, vocab]`` logits), the batch entry holding the
            ``[batch, time]`` token mask; the outputs are then the kept tokens' rows (see :class:`Output`).
    """

    def __init__(self, model: nn.Module, keys: Sequence[str] = ("x",), features: Sequence[str] = (),
                 tokens: str | None = None):
        super().__init__()
        self.model = model
        self.keys = tuple(keys)
        self.feature_paths = tuple(features)
        self.tokens = tokens
        for path in self.feature_paths:
            model.get_submodule(path)  # fail early on a wrong path

    def forward(self, batch: Batch) -> Output:
        features: dict[str, Tensor] = {}
        handles = [
            self.model.get_submodule(path).register_forward_hook(
                lambda m, args, out, path=path: features.__setitem__(path, out))
            for path in self.feature_paths
        ]
        try:
            logits = self.model(*select(batch, self.keys))
        finally:
            for h in handles:
                h.remove()
        if self.tokens is None:
            return Output(logits, features)
        mask = select(batch, [self.tokens])[0].bool()
        if logits.shape[:2] != mask.shape:
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)} for a token mask "
                             f"{self.tokens!r} of shape {tuple(mask.shape)}; a sequence model returns "
                             "[batch, time, vocab]")
        rows = {k: f[mask] if f.shape[:2] == mask.shape else f for k, f in features.items()}
        return Output(logits[mask], rows, logits, mask)


class Teacher(Net):
    """A :class:`Net` that is either frozen (no gradient, always in eval mode) or co-trained."""

    def __init__(self, model: nn.Module, keys: Sequence[str] = ("x",), features: Sequence[str] = (),
                 frozen: bool = True, tokens: str | None = None):
        super().__init__(model, keys, features, tokens)
        self.frozen = frozen
        if frozen:
            model.requires_grad_(False)
            model.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(mode and not self.frozen)

    def forward(self, batch: Batch) -> Output:
        if self.frozen:
            with torch.no_grad():
                return super().forward(batch)
        return super().forward(batch)


def num_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())
