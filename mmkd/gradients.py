"""Backward rules: how a training step's named losses become parameter gradients.

By default the :class:`~mmkd.trainer.Trainer` calls ``losses["loss"].backward()``. A
:class:`BackwardRule` among the callbacks of a fit (at most one; like a
:class:`~mmkd.policies.DataPolicy`, it is a :class:`~mmkd.callbacks.Callback` with one more hook)
replaces that call: ``rule.backward(losses, params)`` writes ``.grad`` of the trainable ``params``
from the step's named losses (the module's ``forward`` output), before gradient clipping and the
optimizer step. A rule computes gradients with ``torch.autograd.grad``, which DDP's gradient
synchronisation does not see, so the trainer refuses one under ``torchrun`` with more than one process.

Register one with :func:`register_backward`; a config names it at the top level as
``backward: {name, args}`` (for the distill pipeline's student stage; ``mmkd list`` shows them).
A rule whose registration declares ``reads_losses=("primary", ...)`` has those arguments checked
against the config's loss terms before anything runs.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.registry import GRADIENTS


def register_backward(name: str, **meta: Any) -> Callable:
    """Register a :class:`BackwardRule` subclass under ``name`` (``backward: {name: ...}`` in configs)."""
    return GRADIENTS.register(name, **meta)


class BackwardRule(Callback):
    """``backward(losses, params)``: set ``p.grad`` of every trainable parameter for one step."""

    def backward(self, losses: dict[str, Tensor], params: Sequence[nn.Parameter]) -> None:
        raise NotImplementedError


def flat_grad(loss: Tensor, params: Sequence[nn.Parameter]) -> Tensor:
    """``d loss / d params`` flattened into one vector (zeros for parameters ``loss`` does not reach)."""
    if not loss.requires_grad:
        return torch.cat([torch.zeros(p.numel(), device=p.device, dtype=p.dtype) for p in params])
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def project_conflicting(g_primary: Tensor, g_secondary: Tensor) -> Tensor:
    """``g_s - min(<g_s, g_p>, 0) / ||g_p||^2 * g_p``: the secondary gradient without its component
    against the primary one when they conflict (``<g_s, g_p> < 0``), else ``g_s`` unchanged."""
    dot = torch.dot(g_secondary, g_primary)
    if dot >= 0:
        return g_secondary
    return g_secondary - dot / g_primary.pow(2).sum() * g_primary


@register_backward("align", reads_losses=("primary", "secondary"))
class Align(BackwardRule):
    """Gradient alignment over all parameters (Dual-Head KD, Yang et al., arXiv:2411.08937, 2024; the
    PCGrad projection of Yu et al., NeurIPS 2020, with the primary objective never projected).

    With ``P`` the sum of the ``primary`` loss entries, ``S`` that of the ``secondary`` ones and
    ``R = loss - P - S`` the rest of the total, and ``g_X = d X / d theta`` over all trainable
    parameters ``theta`` flattened into one vector:

        g_S <- g_S - min(<g_S, g_P>, 0) / ||g_P||^2 * g_P,     theta.grad = g_P + g_S + g_R.

    Without a conflict this is ``loss.backward()``. The entries are the module's named losses as it
    returns them (for the Distiller: the loss terms' keys, already weighted).

    Args:
        primary: the loss entries whose gradient is kept (e.g. ``[ce]``).
        secondary: the loss entries whose gradient is projected off the primary's (e.g. ``[bkl]``).
    """

    def __init__(self, primary: Sequence[str] = ("ce",), secondary: Sequence[str] = ("bkl",)):
        self.primary, self.secondary = ([n] if isinstance(n, str) else list(n) for n in (primary, secondary))
        if not self.primary or not self.secondary:
            raise ValueError("give at least one loss entry in primary and in secondary")
        if both := sorted(set(self.primary) & set(self.secondary)):
            raise ValueError(f"{both[0]!r} is in primary and in secondary; give each loss entry once")
        if "loss" in self.primary + self.secondary:
            raise ValueError("'loss' is the total; name the loss terms (e.g. primary: [ce], secondary: [bkl])")

    def _sum(self, losses: dict[str, Tensor], names: list[str], key: str) -> Tensor:
        for name in names:
            if name not in losses:
                raise ValueError(f"backward.args.{key}: the module returns no loss {name!r}; it returns: "
                                 f"{', '.join(k for k in losses if k != 'loss')}")
        return sum((losses[n] for n in names[1:]), losses[names[0]])

    def backward(self, losses, params):
        primary, secondary = self._sum(losses, self.primary, "primary"), self._sum(losses, self.secondary, "secondary")
        g_p, g_s = flat_grad(primary, params), flat_grad(secondary, params)
        g = g_p + project_conflicting(g_p, g_s) + flat_grad(losses["loss"] - primary - secondary, params)
        offset = 0
        for p in params:
            p.grad = g[offset:offset + p.numel()].view_as(p).clone()
            offset += p.numel()
