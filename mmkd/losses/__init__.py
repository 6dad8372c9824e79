"""The loss library: pure functions registered by name.

Every loss has the signature ``loss(student_logits, teacher_logits=None, target=None, **hparams)``.
Per-sample losses accept ``reduction="none"`` and then return one value per instance, which lets the
mixture core weight each teacher per instance; batch-level losses (registered with
``per_sample=False``) always return a scalar. Write your own in a few lines::

    from mmkd.losses import reduce, register_loss

    @register_loss("l2_logits")
    def l2_logits(student_logits, teacher_logits, target=None, reduction="mean"):
        per_sample = (student_logits - teacher_logits).pow(2).mean(dim=1)
        return reduce(per_sample, reduction)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from mmkd.registry import LOSSES


def register_loss(name: str, *, teacher: bool = True, per_sample: bool = True, batch: bool = False,
                  ranges: Mapping[str, Any] | None = None, negative_weight: bool = False,
                  module: Callable[..., Any] | None = None, sparse: bool = False) -> Callable:
    """Register a loss function under ``name``.

    ``teacher``: whether the loss reads teacher logits (False for label-only losses such as CE).
    ``per_sample``: whether it supports ``reduction="none"`` (one value per instance).
    ``batch``: whether it also needs the batch (e.g. a graph's ``edge_index``); it then receives
    it as the keyword argument ``batch``.
    ``ranges``: what each argument accepts (:mod:`mmkd.checks`), checked before anything trains.
    ``negative_weight``: whether a negative term weight is meaningful (a reward rather than a cost);
    by default a term's weight must be non-negative.
    ``module``: for a loss with learned parts (CTKD's temperature), the factory of an ``nn.Module``
    made for each term from the term's arguments that the factory takes; the term's module trains
    with the student (it is saved with it), the loss receives it as the keyword argument ``module``,
    and a module that is also a :class:`~mmkd.callbacks.Callback` is called during the fit.
    ``sparse``: whether the loss reads a :class:`~mmkd.sparse.SparseLogits` teacher (a top-k cache)
    as it is; other losses receive its dense reconstruction.
    """
    return LOSSES.register(name, teacher=teacher, per_sample=per_sample, batch=batch, ranges=dict(ranges or {}),
                           negative_weight=negative_weight, module=module, sparse=sparse)


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduce a ``[batch]`` tensor of per-instance losses: ``"mean"``, ``"sum"`` or ``"none"``."""
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"unknown reduction {reduction!r}; choose from: mean, sum, none")


from mmkd.losses.bkl import bkl  # noqa: E402  (imports register the losses)
from mmkd.losses.ce import ce  # noqa: E402
from mmkd.losses.dist import dist  # noqa: E402
from mmkd.losses.dkd import dkd  # noqa: E402
from mmkd.losses.gld import gld  # noqa: E402
from mmkd.losses.kd import kd  # noqa: E402
from mmkd.losses.mcmi import mcmi  # noqa: E402  (and the callback mcmi_centroids, its official centroids)
from mmkd.losses.nkd import nkd  # noqa: E402
from mmkd.losses.pld import pld  # noqa: E402
from mmkd.losses.sinkd import sinkd  # noqa: E402
from mmkd.losses.swing import swing  # noqa: E402  (per-instance temperature from a privacy score, noisy targets)
from mmkd.losses.adaptive import ctkd, taid, tgeo  # noqa: E402  (adaptive/: targets, temperatures that move)
from mmkd.losses.heads import lelp, ofa, ofa_branches  # noqa: E402  (heads/: extra heads on the student)
from mmkd.losses.self import gt_labels, gt_mix, uskd  # noqa: E402  (self/: targets from the student itself)
from mmkd.losses.tokens import dac_kl, fkl, gjsd, rkl, skew_fkl, skew_rkl, span_corr, tvd  # noqa: E402  (tokens/)
from mmkd.losses.features import at, crd, fitnet, kdsvd, nd, nst, ofd, pkt, reviewkd, rkd, sp, vid  # noqa: E402,E501

__all__ = ["register_loss", "reduce", "bkl", "ce", "dist", "dkd", "gld", "kd", "mcmi", "nkd", "pld", "sinkd", "swing",
           "ctkd", "taid", "tgeo", "lelp", "ofa", "ofa_branches", "gt_labels", "gt_mix", "uskd",
           "dac_kl", "fkl", "gjsd", "rkl", "skew_fkl", "skew_rkl", "span_corr", "tvd",
           "at", "crd", "fitnet", "kdsvd", "nd", "nst", "ofd", "pkt", "reviewkd", "rkd", "sp", "vid"]
