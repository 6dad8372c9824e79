"""Values that change over training: a loss term's weight or argument (a temperature lowered from high
to low, a weight warmed up from 0, a weight decayed in steps), a router's balance weight.

A :class:`Schedule` is evaluated at the training state ``(p, e)``: the progress ``p`` (the fraction of
all training steps done, 0 at the first step and approaching 1 at the last) and the 0-based epoch
``e``. The :class:`Clock` callback (which every :class:`~mmkd.distiller.Distiller` fit runs) sets both
before every step. Both are functions of the trainer's step and epoch counters alone, so a resumed run
continues every schedule exactly where it stopped. In a config, a mapping with a ``schedule`` key,
wherever a term's ``weight``, a term's ``args`` value or a router's ``balance_weight`` takes a number::

    losses:
      dkd: {weight: {schedule: warmup, epochs: 20}}                  # mdistiller's DKD warm-up
      kd: {weight: {schedule: step, every: 30, gamma: 0.5}}          # MST-Distill's KD weight
      trg_global: {args: {temperature: {schedule: cosine, start: 1.0, end: 0.1}}}

Kinds (:data:`KINDS`): ``cosine`` and ``linear`` (:class:`Anneal`, over the progress), ``warmup``
(:class:`Warmup`, over epochs or a fraction of training) and ``step`` (:class:`StepDecay`, over epochs).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor

from mmkd.callbacks import Callback

Number = Union[float, Tensor]


class Schedule:
    """A value at the training state: ``schedule(progress, epoch)``; either may be a float or a 0-d
    tensor (the Distiller passes buffers, so a compiled module is not recompiled as they change)."""

    kind: str = ""

    def __call__(self, progress: Number, epoch: Number = 0) -> Number:
        raise NotImplementedError

    def bounds(self) -> tuple[float, float]:
        """The least and the greatest value it takes (range checks of config values use them)."""
        raise NotImplementedError

    def describe(self) -> str:
        """Its config mapping, ``{schedule: step, every: 30, gamma: 0.5, start: 1}``."""
        parts = [f"schedule: {self.kind}"] + [f"{f.name}: {getattr(self, f.name):g}" for f in fields(self)
                                              if f.name != "kind" and getattr(self, f.name) is not None]
        return "{" + ", ".join(parts) + "}"

    @staticmethod
    def parse(value: Any, where: str = "schedule") -> Any:
        """``value`` itself, or a :class:`Schedule` when it is a mapping with a ``schedule`` key
        (``{schedule: cosine|linear, start: ..., end: ...}``, ``{schedule: warmup, epochs: N}`` or
        ``{schedule: warmup, fraction: f}``, ``{schedule: step, every: N, gamma: g}``); ``where`` names
        it in errors."""
        if not isinstance(value, Mapping) or "schedule" not in value:
            return value
        kind = value["schedule"]
        if kind not in KINDS:
            raise ValueError(f"{where}: unknown schedule {kind!r}; choose from: {', '.join(KINDS)}")
        cls = KINDS[kind]
        required, optional = cls.KEYS
        given = set(value) - {"schedule"}
        extra, missing = given - set(required) - set(optional), set(required) - given
        if extra or missing:
            keys = ", ".join([*required, *(f"[{k}]" for k in optional)])
            raise ValueError(f"{where}: a {kind} schedule takes the keys {keys}; "
                             + (f"unknown: {', '.join(sorted(extra))}" if extra else
                                f"missing: {', '.join(sorted(missing))}"))
        try:
            args = {k: float(v) for k, v in value.items() if k != "schedule"}
        except (TypeError, ValueError):
            raise ValueError(f"{where}: the values of a schedule are numbers; got {dict(value)!r}") from None
        try:
            return cls(**args, **({"kind": kind} if cls is Anneal else {}))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


def _clamp01(p: Number) -> Number:
    return p.clamp(0, 1) if isinstance(p, Tensor) else min(max(p, 0.0), 1.0)


@dataclass(frozen=True)
class Anneal(Schedule):
    """``start`` at progress 0 to ``end`` at progress 1:

    * ``cosine``: ``end + (start - end) * (1 + cos(pi * p)) / 2`` (slow at both ends);
    * ``linear``: ``start + (end - start) * p``.
    """

    start: float
    end: float
    kind: str = "cosine"
    KEYS = (("start", "end"), ())

    def __post_init__(self) -> None:
        if self.kind not in ("cosine", "linear"):
            raise ValueError(f"schedule: unknown kind {self.kind!r}; choose from: cosine, linear")

    def __call__(self, progress: Number, epoch: Number = 0) -> Number:
        p = _clamp01(progress)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * p
        cos = torch.cos(math.pi * p) if isinstance(p, Tensor) else math.cos(math.pi * p)
        return self.end + (self.start - self.end) * (1 + cos) / 2

    def bounds(self) -> tuple[float, float]:
        return min(self.start, self.end), max(self.start, self.end)

    def describe(self) -> str:
        return f"{{schedule: {self.kind}, start: {self.start:g}, end: {self.end:g}}}"


@dataclass(frozen=True)
class Warmup(Schedule):
    """A linear warm-up from 0 to ``end``, then ``end``:

    * over ``epochs``, per epoch as mdistiller's DKD: ``end * min((e + 1) / epochs, 1)`` in the 0-based
      epoch ``e`` (mdistiller counts epochs from 1: ``min(epoch / warmup, 1)``), so the first epoch
      trains at ``end / epochs`` and epoch ``epochs - 1`` reaches ``end``;
    * over a ``fraction`` of training, per step: ``end * min(p / fraction, 1)``.
    """

    epochs: Optional[float] = None
    fraction: Optional[float] = None
    end: float = 1.0
    kind: str = "warmup"
    KEYS = ((), ("epochs", "fraction", "end"))

    def __post_init__(self) -> None:
        if (self.epochs is None) == (self.fraction is None):
            raise ValueError("a warmup schedule takes one of epochs (a count) or fraction (of training)")
        if self.epochs is not None and not (self.epochs >= 1 and self.epochs == int(self.epochs)):
            raise ValueError(f"warmup epochs={self.epochs:g}; give a whole number >= 1")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"warmup fraction={self.fraction:g}; give a fraction of training in (0, 1]")

    def __call__(self, progress: Number, epoch: Number = 0) -> Number:
        ramp = (epoch + 1) / self.epochs if self.epochs is not None else progress / self.fraction
        return self.end * (ramp.clamp(max=1) if isinstance(ramp, Tensor) else min(ramp, 1.0))

    def bounds(self) -> tuple[float, float]:
        return min(0.0, self.end), max(0.0, self.end)


@dataclass(frozen=True)
class StepDecay(Schedule):
    """``start`` multiplied by ``gamma`` at the end of epochs 0, ``every``, ``2 * every``, ...:
    ``start * gamma ** ceil(e / every)`` in the 0-based epoch ``e`` (MST-Distill's loop: ``if epoch %
    every == 0: weight *= gamma`` after each epoch's training)."""

    every: float
    gamma: float
    start: float = 1.0
    kind: str = "step"
    KEYS = (("every", "gamma"), ("start",))

    def __post_init__(self) -> None:
        if not (self.every >= 1 and self.every == int(self.every)):
            raise ValueError(f"step every={self.every:g}; give a whole number of epochs >= 1")
        if not 0 < self.gamma:
            raise ValueError(f"step gamma={self.gamma:g}; give a positive factor")

    def __call__(self, progress: Number, epoch: Number = 0) -> Number:
        if isinstance(epoch, Tensor):
            return self.start * torch.pow(torch.as_tensor(self.gamma, dtype=epoch.dtype, device=epoch.device),
                                          torch.ceil(epoch / self.every))
        return self.start * self.gamma ** math.ceil(epoch / self.every)

    def bounds(self) -> tuple[float, float]:
        # the values run from start towards 0 (gamma < 1) or away from it (gamma > 1, unbounded)
        far = 0.0 if self.gamma <= 1 else math.copysign(math.inf, self.start)
        return min(self.start, far), max(self.start, far)


KINDS: dict[str, type] = {"cosine": Anneal, "linear": Anneal, "warmup": Warmup, "step": StepDecay}


def value_at(v: Any, progress: Number, epoch: Number) -> Any:
    """``v(progress, epoch)`` for a :class:`Schedule`, else ``v`` itself."""
    return v(progress, epoch) if isinstance(v, Schedule) else v


class Clock(Callback):
    """Before each training step, sets ``target``'s training state (``target.set_progress(p, e)``):
    ``p = trainer.global_step / trainer.max_steps`` and the 0-based epoch ``e = trainer.epoch``, at which
    :class:`Schedule` s are evaluated."""

    def __init__(self, target: Any):
        self.target = target

    def on_step_start(self, trainer, module, batch) -> None:
        self.target.set_progress(trainer.global_step / trainer.max_steps, trainer.epoch)
