"""Ranges that registered losses, models and data sets declare for their arguments.

The owner of a value declares what it accepts, next to its registration::

    @register_loss("kd", ranges={"temperature": TEMPERATURE})
    @MODELS.register("mlp", ranges={"hidden": each(COUNT), "dropout": PROBABILITY})

and the config layer reports a value outside it in one line, before anything trains
(:func:`check_args`). A range is any object with ``check(key, value)`` raising ``ValueError``.
Every number a config gives, declared or not, must be finite.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


def is_number(v: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass(frozen=True)
class Range:
    """Numbers in ``[low, high]`` (``low_open`` / ``high_open`` exclude the bound); ``integer``: whole
    numbers only."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def __str__(self) -> str:
        kind, low, high = ("an integer", f"{self.low:d}", f"{self.high:d}") if self.integer and self.high != math.inf \
            else ("an integer" if self.integer else "a number", f"{self.low:g}", f"{self.high:g}")
        if self.high == math.inf:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"

    def contains(self, v: Any) -> bool:
        if not is_number(v) or not math.isfinite(v) or (self.integer and v != int(v)):
            return False
        above = v > self.low if self.low_open else v >= self.low
        below = v < self.high if self.high_open else v <= self.high
        return above and below

    def check(self, key: str, value: Any) -> None:
        from mmkd.schedules import Schedule

        values = list(value.bounds()) if isinstance(value, Schedule) else [value]
        for v in values:
            if not self.contains(v):
                raise ValueError(f"{key}={_show(value)}; it must be {self}")


@dataclass(frozen=True)
class Each:
    """A non-empty list whose every element lies in ``range``."""

    range: Range

    def check(self, key: str, value: Any) -> None:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) == 0:
            raise ValueError(f"{key}={_show(value)}; give a non-empty list, each {self.range}")
        for v in value:
            if not self.range.contains(v):
                raise ValueError(f"{key}={_show(value)}; each element must be {self.range}")


@dataclass(frozen=True)
class Fractions:
    """A non-empty list of positive fractions that sum to 1 (train/validation/test proportions)."""

    def check(self, key: str, value: Any) -> None:
        Each(Range(0, 1, low_open=True)).check(key, value)
        if abs(sum(value) - 1) > 1e-6:
            raise ValueError(f"{key}={_show(value)}; the fractions must sum to 1 (they sum to {sum(value):g})")


def each(r: Range) -> Each:
    """A non-empty list, each element in ``r``."""
    return Each(r)


def _show(value: Any) -> str:
    from mmkd.schedules import Schedule

    if isinstance(value, Schedule):
        return value.describe()
    return repr(list(value)) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else repr(value)


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1, high_open=True)  # dropout: 1 would drop everything
FRACTION = Range(0, 1)
COUNT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
SEED = Range(0, 2**63 - 1, integer=True)
TEMPERATURE = Range(0.01)  # near zero, logits / T overflow and the loss turns NaN


def check_args(where: str, ranges: Mapping[str, Any], args: Mapping[str, Any]) -> None:
    """Check ``args`` (``where``: the config key of their section, e.g. ``student.args``) against the
    declared ``ranges``; any number given must be finite. Raises ``ValueError`` naming the key."""
    for name, value in args.items():
        key = f"{where}.{name}"
        if value is None:  # an optional argument left unset
            continue
        if name in ranges:
            ranges[name].check(key, value)
        elif is_number(value) and not math.isfinite(value):
            raise ValueError(f"{key}={value!r}; give a finite number")
        elif isinstance(value, (list, tuple)) and any(is_number(v) and not math.isfinite(v) for v in value):
            raise ValueError(f"{key}={_show(value)}; give finite numbers")
