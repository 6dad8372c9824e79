"""The router interface of the mixture-of-teachers core (routers themselves live in ``mmkd.routers``)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmkd.net import Batch, Output


class Router(nn.Module):
    """Weighs the teachers per instance.

    ``forward(student, teachers, batch)`` receives the student's :class:`~mmkd.net.Output`, one
    ``Output`` per teacher, and the batch, and returns weights of shape ``[batch, len(teachers)]``
    (rows normally sum to one). Gradients flow through the weights into a learned router.

    ``mode`` and ``k`` say how its weights pick teachers, for reports such as MST-Distill's routing
    table: ``soft`` (every teacher weighs in; ``k`` is 1) or the ``k`` largest (``topk``, ``hard``).

    A router may also set :attr:`aux_losses` during its forward: named, already weighted loss
    tensors (such as a load-balancing loss) that the :class:`~mmkd.distiller.Distiller` takes out with
    :meth:`pop_aux_losses` and adds to its returned losses as ``"router/<name>"`` and to the total.

    The Distiller passes on the training state before each step (:meth:`set_progress`): a router's
    own :class:`~mmkd.schedules.Schedule` s (a scheduled balance weight) are evaluated at
    :attr:`progress` and :attr:`epoch` (``mmkd.schedules.value_at(v, self.progress, self.epoch)``).
    """

    mode: str = "soft"
    k: int = 1

    def __init__(self) -> None:
        super().__init__()
        self.aux_losses: dict[str, Tensor] = {}
        self.register_buffer("progress", torch.zeros(()), persistent=False)
        self.register_buffer("epoch", torch.zeros(()), persistent=False)

    def set_progress(self, done: float, epoch: int = 0) -> None:
        """Set the fraction of training done and the 0-based epoch (the Distiller's clock calls it)."""
        self.progress.fill_(done)
        self.epoch.fill_(epoch)

    def forward(self, student: Output, teachers: Sequence[Output], batch: Batch) -> Tensor:
        raise NotImplementedError

    def pop_aux_losses(self) -> dict[str, Tensor]:
        """The auxiliary losses of the last forward, once (the dict is emptied)."""
        aux, self.aux_losses = self.aux_losses, {}
        return aux
