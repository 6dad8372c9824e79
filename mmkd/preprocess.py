"""Feature preprocessing that a data set applies to its raw inputs, recorded so deployment repeats it.

A data set describes what it did to each input key as a list of steps in
:attr:`mmkd.data.DataSplits.preprocessing`, e.g.
``{"x": [{"op": "row_normalize"}, {"op": "standardize", "mean": [...], "std": [...]}]}``.
The list is saved in the run's ``data.json`` and in the export's ``meta.json``; :func:`apply` runs it
on new raw inputs (``mmkd predict``). Every step works row by row with stored statistics, so applying
it to a batch gives the same rows as applying it to the whole set.

Raw text is turned into tensors by a *text step*: a function ``fn(texts: list[str], **params) ->
dict[str, Tensor]`` registered with :func:`register_text_step` (``tokenize`` in
:mod:`mmkd.modalities.text`; plug-ins add theirs). A data set records, per raw input name, the step
that made its stored tensors in :attr:`mmkd.data.DataSplits.text_inputs`, e.g.
``{"title": {"op": "tokenize", "tokenizer": "minilm", "max_length": 64, "prefix": "title_",
"keys": ["title_input_ids", "title_attention_mask"]}}``; :func:`apply_text` replays it on new
sentences (``mmkd predict`` on a text file), and the tensor steps above then run on each produced key.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence, TypeVar

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


def standardize_channels(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(x - mean_c) / std_c`` over the channels ``c`` of images ``[N, C, H, W]`` (pixel values
    as stored, e.g. 0-255), with the training set's per-channel ``mean`` and ``std``."""
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(view)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(view)
    return (x.float() - mean_t) / torch.where(std_t == 0, torch.ones_like(std_t), std_t)


STEPS: dict[str, Callable[..., Tensor]] = {"row_normalize": row_normalize, "standardize": standardize,
                                           "standardize_channels": standardize_channels}


def apply(steps: Sequence[Mapping], x: Tensor) -> Tensor:
    """Run the preprocessing ``steps`` (dicts ``{"op": name, **params}``) on ``x``, in order."""
    for step in steps:
        params = dict(step)
        op = params.pop("op", None)
        if op not in STEPS:
            raise ValueError(f"preprocessing: unknown op {op!r}; choose from: {', '.join(STEPS)}")
        x = STEPS[op](x, **params)
    return x


TextStep = Callable[..., "dict[str, Tensor]"]
TEXT_STEPS: dict[str, TextStep] = {}
_F = TypeVar("_F", bound=TextStep)


def register_text_step(name: str) -> Callable[[_F], _F]:
    """Decorator registering ``fn(texts: list[str], **params) -> dict[str, Tensor]`` (one row per text)
    as the text step ``name``; the params are what a data set records beside ``"op"`` and ``"keys"``
    in its ``text_inputs``. Registering another function under a taken name is a ``ValueError``."""

    def deco(fn: _F) -> _F:
        if name in TEXT_STEPS and TEXT_STEPS[name] is not fn:
            raise ValueError(f"text step {name!r} is already registered")
        TEXT_STEPS[name] = fn
        return fn

    return deco


def text_step(op: str) -> TextStep:
    """The text step registered as ``op`` (plug-ins are imported on a miss); a ``ValueError`` lists them."""
    if op not in TEXT_STEPS:
        from mmkd.registry import load_plugins

        load_plugins()
    if op not in TEXT_STEPS:
        raise ValueError(f"text preprocessing: unknown op {op!r}; choose from: {', '.join(sorted(TEXT_STEPS)) or 'none'}")
    return TEXT_STEPS[op]


def apply_text(step: Mapping, texts: Sequence[str]) -> dict[str, Tensor]:
    """Run the text step ``step`` (``{"op": name, **params, "keys": [produced keys]}``) on ``texts``.

    Returns the produced tensors, one row per text; with ``keys`` given, exactly those keys in that
    order (a step that does not produce one of them is a ``ValueError`` naming it).
    """
    params = dict(step)
    op = params.pop("op", None)
    keys = params.pop("keys", None)
    out = text_step(op)(list(texts), **params)
    if keys is None:
        return dict(out)
    missing = [k for k in keys if k not in out]
    if missing:
        raise ValueError(f"text preprocessing: step {op!r} produced {', '.join(out) or 'nothing'}, "
                         f"not {', '.join(missing)}")
    return {k: out[k] for k in keys}
