"""Learned routers: a gate network on the student's logits or on one of its features.

    H = g(x),   P = softmax(H)

``x`` is the student's logits (``source="logits"``) or its feature ``source="features.<path>"``
(flattened), ``g`` a linear map (:class:`LinearRouter`) or an MLP (:class:`MLPRouter`). The teacher
weights follow ``mode``:

- ``soft``: ``w = P``; the weights multiply each teacher's per-instance loss, so the gate also
  learns from the distillation terms.
- ``topk``: ``w = softmax(KeepTopK(H, k))`` (Shazeer et al., ICLR 2017): the top-k gates
  renormalised; the kept teachers' gates learn from the distillation terms.
- ``hard``: ``w = 1/k`` on the ``k`` teachers with the largest ``P`` (MST-Distill, Li et al.,
  ACM MM 2025): loss = CE + (1/k) sum over the picked teachers of KL; the gate's only gradient is
  the load-balancing loss.

Every mode adds ``balance_weight * balance(P)`` to the Distiller's losses as ``"router/balance"``
(``balance``: a name of :data:`~mmkd.routers.gating.BALANCES`, ``"kl"`` and ``"cv"`` MST-Distill's,
``"kl_sum"`` and ``"cv2"`` their variants), computed on the dense ``P`` so every teacher's gate gets
its gradient.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from mmkd.distiller import pick
from mmkd.net import Batch, Output
from mmkd.routers.base import Router, register_router
from mmkd.routers.gating import BALANCES, hard_top_k, softmax_weights, top_k_gates
from mmkd.schedules import Schedule, value_at

MODES = ("soft", "topk", "hard")


def input_width(source: str, in_features: int | None, num_classes: int | None,
                feature_shapes: dict[str, Sequence[int]] | None) -> int:
    """The width of the gate's input: ``in_features`` if given, else the number of classes
    (``source="logits"``) or the flattened size of the student feature named by ``source``."""
    if in_features is not None:
        return in_features
    if source == "logits" and num_classes is not None:
        return num_classes
    path = source.removeprefix("features.")
    if source != "logits" and feature_shapes and path in feature_shapes:
        return math.prod(feature_shapes[path])
    hint = "num_classes" if source == "logits" else f"list {path!r} in the student's features"
    raise ValueError(f"router input width unknown for source={source!r}; give in_features (or {hint})")


class GateRouter(Router):
    """A router whose weights come from a gate network ``gate: [batch, in] -> [batch, teachers]``.

    Args:
        gate: the gate network.
        num_teachers: its output width.
        source: ``"logits"`` or ``"features.<path>"``: what of the student the gate reads.
        mode: ``soft``, ``topk`` or ``hard`` (see the module docstring).
        k: the number of teachers kept per instance (``topk`` and ``hard``).
        balance: ``kl``, ``kl_sum``, ``cv`` or ``cv2``: the load-balancing loss on the gate probabilities.
        balance_weight: its weight (1.0: MST-Distill's default), or a :class:`~mmkd.schedules.Schedule`
            (``{schedule: step, every: 10, gamma: 0.9}``); must be positive for ``hard``.
        detach: stop gradients from the router into the student.
    """

    def __init__(self, gate: nn.Module, num_teachers: int, source: str = "logits", mode: str = "soft",
                 k: int = 1, balance: str = "kl", balance_weight: float = 1.0, detach: bool = False):
        super().__init__()
        if source != "logits" and not source.startswith("features."):
            raise ValueError(f"router source {source!r} is neither 'logits' nor 'features.<path>'")
        if mode not in MODES:
            raise ValueError(f"router mode {mode!r}; choose from: {', '.join(MODES)}")
        if balance not in BALANCES:
            raise ValueError(f"router balance {balance!r}; choose from: {', '.join(BALANCES)}")
        if mode != "soft" and not 1 <= k <= num_teachers:
            raise ValueError(f"router k={k} must be between 1 and num_teachers={num_teachers}")
        balance_weight = Schedule.parse(balance_weight, "router.args.balance_weight")
        if mode == "hard" and (balance_weight.bounds()[1] if isinstance(balance_weight, Schedule) else balance_weight) <= 0:
            raise ValueError("router mode 'hard' trains the gate through the balance loss only; set balance_weight > 0")
        self.gate, self.num_teachers, self.source, self.mode, self.k = gate, num_teachers, source, mode, k
        self.balance, self.balance_weight, self.detach = balance, balance_weight, detach

    def gate_logits(self, x: Tensor) -> Tensor:
        """``H = gate(x)``."""
        return self.gate(x)

    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        if len(teachers) != self.num_teachers:
            raise ValueError(f"router was built for {self.num_teachers} teachers but there are {len(teachers)}; "
                             f"set num_teachers={len(teachers)}")
        x = pick(student, self.source).flatten(1).float()
        logits = self.gate_logits(x.detach() if self.detach else x).float()
        probs = softmax_weights(logits)
        weight = value_at(self.balance_weight, self.progress, self.epoch)
        self.aux_losses = {"balance": weight * BALANCES[self.balance](probs)} if self.balance_weight else {}
        if self.mode == "soft":
            return probs
        if self.mode == "topk":
            return top_k_gates(logits, self.k)
        return hard_top_k(probs, self.k)


@register_router("linear")
class LinearRouter(GateRouter):
    """``H = x W + b``. ``in_features`` defaults to ``num_classes`` (``source="logits"``) or the
    size of the student feature named by ``source`` (``feature_shapes``); both are filled in by
    ``mmkd run``. Other arguments: see :class:`GateRouter`."""

    def __init__(self, num_teachers: int, in_features: int | None = None, num_classes: int | None = None,
                 feature_shapes: dict[str, Sequence[int]] | None = None, source: str = "logits", **routing):
        width = input_width(source, in_features, num_classes, feature_shapes)
        super().__init__(nn.Linear(width, num_teachers), num_teachers, source, **routing)


@register_router("mlp")
class MLPRouter(GateRouter):
    """``H = ReLU(x W_1 + b_1) W_2 + b_2`` with ``hidden`` units (default twice the input width,
    the width of MST-Distill's GateNet, which has no activation between its two layers and is
    therefore a linear router). Other arguments: see :class:`LinearRouter`."""

    def __init__(self, num_teachers: int, in_features: int | None = None, hidden: int | None = None,
                 num_classes: int | None = None, feature_shapes: dict[str, Sequence[int]] | None = None,
                 source: str = "logits", **routing):
        width = input_width(source, in_features, num_classes, feature_shapes)
        hidden = hidden or 2 * width
        gate = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, num_teachers))
        super().__init__(gate, num_teachers, source, **routing)
