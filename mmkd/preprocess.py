"""Feature preprocessing that a data set applies to its raw inputs, recorded so deployment repeats it.

A data set describes what it did to each input key as a list of steps in
:attr:`mmkd.data.DataSplits.preprocessing`, e.g.
``{"x": [{"op": "row_normalize"}, {"op": "standardize", "mean": [...], "std": [...]}]}``.
The list is saved in the run's ``data.json`` and in the export's ``meta.json``; :func:`apply` runs it
on new raw inputs (``mmkd predict``). Every step works row by row with stored statistics, so applying
it to a batch gives the same rows as applying it to the whole set.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor


def row_normalize(x: Tensor) -> Tensor:
    """``x_i / sum_j x_ij`` for every row ``i`` (rows summing to 0 are left as they are): the
    row-normalised bag-of-words features of the Planetoid graphs (Kipf and Welling, ICLR 2017)."""
    total = x.sum(1, keepdim=True)
    return x / torch.where(total == 0, torch.ones_like(total), total)


def standardize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean) / std`` per feature, with the training set's ``mean`` and ``std``
    (a zero ``std`` divides by 1)."""
    mean_t, std_t = torch.as_tensor(mean, dtype=x.dtype), torch.as_tensor(std, dtype=x.dtype)
    return (x - mean_t) / torch.where(std_t == 0, torch.ones_like(std_t), std_t)


STEPS: dict[str, Callable[..., Tensor]] = {"row_normalize": row_normalize, "standardize": standardize}


def apply(steps: Sequence[Mapping], x: Tensor) -> Tensor:
    """Run the preprocessing ``steps`` (dicts ``{"op": name, **params}``) on ``x``, in order."""
    for step in steps:
        params = dict(step)
        op = params.pop("op", None)
        if op not in STEPS:
            raise ValueError(f"preprocessing: unknown op {op!r}; choose from: {', '.join(STEPS)}")
        x = STEPS[op](x, **params)
    return x
