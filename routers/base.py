"""The router interface of the mixture-of-teachers core."""
from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor, nn

from mmkd.net import Batch, Output
from mmkd.registry import ROUTERS


def register_router(name: str) -> Callable:
    """Register a :class:`Router` subclass under ``name`` (usable as ``router.name`` in configs)."""
    return ROUTERS.register(name)


class Router(nn.Module):
    """Weighs the teachers per instance.

    ``forward(student, teachers, batch)`` receives the student's :class:`~mmkd.net.Output`, one
    ``Output`` per teacher, and the batch, and returns weights of shape ``[batch, len(teachers)]``
    (rows normally sum to one). Gradients flow through the weights into a learned router.

    A router may also set :attr:`aux_losses` during its forward: named, already weighted loss
    tensors (such as a load-balancing loss) that the :class:`~mmkd.distiller.Distiller` takes out
    and adds to its returned losses as ``"router/<name>"`` and to the total ``"loss"``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.aux_losses: dict[str, Tensor] = {}

    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        raise NotImplementedError
