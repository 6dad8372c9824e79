"""Loss hyper-parameters that change over training (a temperature lowered from high to low, a
weight ramped up).

A :class:`Schedule` in a loss term's ``args`` is evaluated at the training progress ``p`` (the
fraction of all training steps done, 0 at the first step and approaching 1 at the last), which the
:class:`Clock` callback (which every :class:`~mmkd.distiller.Distiller` fit runs) sets before every
step; the loss function receives the value. Since ``p`` is a function of the step counter alone, a resumed run
continues the schedule exactly where it stopped. In a config, a mapping with a ``schedule`` key::

    losses:
      trg_global: {args: {temperature: {schedule: cosine, start: 1.0, end: 0.1}}}
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Union

import torch
from torch import Tensor

from mmkd.callbacks import Callback

KINDS = ("cosine", "linear")


@dataclass(frozen=True)
class Schedule:
    """``start`` at progress 0 to ``end`` at progress 1:

    * ``cosine``: ``end + (start - end) * (1 + cos(pi * p)) / 2`` (slow at both ends);
    * ``linear``: ``start + (end - start) * p``.
    """

    start: float
    end: float
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"schedule: unknown kind {self.kind!r}; choose from: {', '.join(KINDS)}")

    def __call__(self, progress: Union[float, Tensor]) -> Union[float, Tensor]:
        p = progress.clamp(0, 1) if isinstance(progress, Tensor) else min(max(progress, 0.0), 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * p
        cos = torch.cos(math.pi * p) if isinstance(p, Tensor) else math.cos(math.pi * p)
        return self.end + (self.start - self.end) * (1 + cos) / 2

    @classmethod
    def parse(cls, value: Any, where: str = "schedule") -> Any:
        """``value`` itself, or a :class:`Schedule` when it is a mapping with a ``schedule`` key
        (``{schedule: cosine|linear, start: ..., end: ...}``); ``where`` names it in errors."""
        if not isinstance(value, Mapping) or "schedule" not in value:
            return value
        extra = set(value) - {"schedule", "start", "end"}
        missing = {"start", "end"} - set(value)
        if extra or missing:
            raise ValueError(f"{where}: a schedule takes the keys schedule, start, end; "
                             + (f"unknown: {', '.join(sorted(extra))}" if extra else
                                f"missing: {', '.join(sorted(missing))}"))
        try:
            return cls(float(value["start"]), float(value["end"]), str(value["schedule"]))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


class Clock(Callback):
    """Before each training step, sets ``target``'s training progress (``target.set_progress(p)``) to
    ``p = trainer.global_step / trainer.max_steps``, the value :class:`Schedule` s are evaluated at."""

    def __init__(self, target: Any):
        self.target = target

    def on_step_start(self, trainer, module, batch) -> None:
        self.target.set_progress(trainer.global_step / trainer.max_steps)
