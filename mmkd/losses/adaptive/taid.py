"""TAID: temporally adaptive interpolated distillation.

The student learns from an intermediate distribution that moves from its own towards the teacher's
as training goes on:

    p_t = softmax(((1 - t) * sg(z_s) + t * z_t) / T)          (logits interpolated, sg: stop-gradient)
    TAID(s, t) = T^2 * sum_c -p_t,c log q_s,c,                 q_s = softmax(z_s / T)

per instance (for a language model, per unmasked token: each is a row). The official code
(SakanaAI/TAID, ``src/distil_losses/taid.py`` with ``forward_kl`` of ``src/distil_losses/fkl.py``,
based on DistiLLM's) uses T = 1 and this cross-entropy value, whose gradient is that of the forward KL
``KL(p_t || q_s) = CE - H(p_t)`` because ``p_t`` is detached from the student; ``kl=True`` gives the
KL value itself (0 at t = 0, Hinton's KD at t = 1). Entries where a logit is infinite (a masked
vocabulary) are left out of the sum, as in the official code.

The interpolation parameter t is adapted by :class:`TAIDInterpolation` (callback ``taid``), from the
relative change of this loss between steps (the official ``TAID.update_t``): with the previous loss
``l'``, the momentum ``m`` and the progress ``p = step / steps``,

    m <- beta * m + (1 - beta) * (l' - l) / (l' + 1e-15)
    t <- min(t_end, max(t_start + (t_end - t_start) * p, t + alpha * sigmoid(m) * (1 - t)))

after every training step but the first, which only records ``l``; the step's loss is computed with
the t of the previous update. Defaults t_start = 0.4, t_end = 1, alpha = 5e-4, beta = 0.99.

Shing, Misaki, Bao, Yokoi and Akiba, "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models", ICLR 2025 (arXiv:2501.16937).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmkd.callbacks import Callback, register_callback
from mmkd.checks import FRACTION, PROBABILITY, TEMPERATURE, Range
from mmkd.losses import reduce, register_loss
from mmkd.schedules import value_at


@register_loss("taid", teacher=True, per_sample=True, ranges={"t": FRACTION, "temperature": TEMPERATURE})
def taid(student_logits, teacher_logits, target=None, *, t=None, temperature=1.0, kl=False, reduction="mean"):
    """``T^2 * sum_c -p_t,c log q_s,c`` with ``p_t = softmax(((1 - t) sg(z_s) + t z_t) / T)``,
    ``q_s = softmax(z_s / T)``; ``kl=True`` subtracts the entropy of ``p_t`` (the same gradient), giving
    ``T^2 * KL(p_t || q_s)``.

    Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer
    in Language Models", ICLR 2025. ``t`` (a number or a 0-d tensor in [0, 1]) is set before each step
    by the ``taid`` callback (:class:`TAIDInterpolation`); the official code uses ``temperature=1``
    and the cross-entropy value (``kl=False``), which the callback's update reads.
    """
    if t is None:
        raise ValueError("loss taid: t is not set; add the callback that adapts it (callbacks: [{name: taid}]) "
                         "or give the term args.t")
    t = torch.as_tensor(t, dtype=student_logits.dtype, device=student_logits.device)
    mixed = (1 - t) * student_logits.detach() + t * teacher_logits
    log_q = F.log_softmax(student_logits / temperature, dim=1)
    log_p = F.log_softmax(mixed / temperature, dim=1)
    p = log_p.exp()
    infinite = torch.isinf(student_logits) | torch.isinf(teacher_logits)
    per_sample = -(p * log_q).masked_fill(infinite, 0).sum(dim=1)
    if kl:
        per_sample = per_sample + (p * log_p).masked_fill(infinite | (p == 0), 0).sum(dim=1)
    return reduce(per_sample * temperature**2, reduction)


@register_callback("taid", reads_losses=("term",),
                   ranges={"t_start": PROBABILITY, "t_end": Range(0, 1, low_open=True), "alpha": FRACTION,
                           "beta": FRACTION})
class TAIDInterpolation(Callback):
    """Adapts the ``t`` of the loss term ``term`` (a ``taid`` term of the :class:`~mmkd.distiller.Distiller`
    being fitted) as the official TAID code does.

    Before each training step it sets the term's ``args["t"]`` (replacing any given value); after it, it
    updates t from the term's loss value and the progress ``trainer.global_step / trainer.max_steps``
    of that step (see :mod:`mmkd.losses.adaptive.taid`). ``adaptive=False`` (the official
    ``--taid_disable_adaptive``) follows the linear ``t_start -> t_end`` alone. A term weight other than
    1 is divided out of the loss value first; at a weight of 0 the value is unknown and nothing is
    updated. Under DDP every process updates from rank 0's loss value, so all hold the t that rank 0
    saves (the official t is a module buffer, which PyTorch DDP broadcasts from rank 0 before each
    forward). t, the momentum and the previous loss are 0-d float32 tensors on the loss's device (no
    host synchronisation per step), saved with the training state; ``on_epoch_end`` adds ``<term>/t``
    to the metrics.
    """

    def __init__(self, term: str = "taid", t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4,
                 beta: float = 0.99, adaptive: bool = True):
        if not 0.0 <= t_start < 1.0:
            raise ValueError(f"taid t_start={t_start!r}; it must be in [0, 1)")
        if not 0.0 < t_end <= 1.0:
            raise ValueError(f"taid t_end={t_end!r}; it must be in (0, 1]")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"taid alpha={alpha!r}; it must be in [0, 1]")
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"taid beta={beta!r}; it must be in [0, 1]")
        self.term, self.t_start, self.t_end, self.alpha, self.beta = term, t_start, t_end, alpha, beta
        self.adaptive = adaptive
        self.t = torch.tensor(t_start, dtype=torch.float32)
        self.momentum = torch.zeros((), dtype=torch.float32)
        self.prev_loss = torch.tensor(float("inf"), dtype=torch.float32)
        self._progress = 0.0
        self._term = None  # the driven term, found when the fit starts

    def update(self, loss: Tensor, progress: float, skip: Tensor | bool = False) -> None:
        """One update from the step's loss ``loss`` at ``progress``; while the previous loss is infinite
        (at the start, or after an infinite loss) it only records the loss. ``skip`` keeps everything."""
        loss = loss.detach().to(torch.float32)
        t, m, prev = (v.to(loss.device) for v in (self.t, self.momentum, self.prev_loss))
        first = torch.isinf(prev)
        momentum = self.beta * m + (1 - self.beta) * ((prev - loss) / (prev + 1e-15))
        target = self.t_start + (self.t_end - self.t_start) * progress
        if self.adaptive:
            step = t + self.alpha * torch.sigmoid(momentum) * (1 - t)
            # the official min(t_end, max(target, step)) with Python's comparisons (a NaN step gives target)
            up = torch.where(step > target, step, target)
            new_t = torch.where(up < self.t_end, up, self.t_end)
        else:
            new_t = torch.full_like(t, target)
        skip = torch.as_tensor(skip, device=loss.device)
        self.t = torch.where(first | skip, t, new_t)
        self.momentum = torch.where(first | skip, m, momentum)
        self.prev_loss = torch.where(skip, prev, loss)

    # ------------------------------------------------------------------ the hooks
    def on_fit_start(self, trainer, module) -> None:
        from mmkd.distiller import loss_term  # the loss library is imported before the core

        self._term = loss_term(module, self.term, "t", "taid")
        self._term.args["t"] = self.t

    def on_step_start(self, trainer, module, batch) -> None:
        self._progress = trainer.global_step / trainer.max_steps
        self._term.args["t"] = self.t

    def on_step_end(self, trainer, module, losses: dict) -> None:
        term = self._term
        value = losses[term.name].detach().clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(value, 0)  # every process follows rank 0's loss, so all hold rank 0's t
        weight = value_at(term.weight, module.progress, module.epoch)
        skip: Any = False
        if not (isinstance(weight, (int, float)) and weight == 1):
            weight = torch.as_tensor(weight, dtype=torch.float32, device=value.device)
            skip, value = weight == 0, value / weight
        self.update(value, self._progress, skip)

    def on_epoch_end(self, trainer, module, metrics) -> None:
        metrics[f"{self.term}/t"] = float(self.t)

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t.detach().cpu().clone(), "momentum": self.momentum.detach().cpu().clone(),
                "prev_loss": self.prev_loss.detach().cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t, self.momentum, self.prev_loss = (state[k].to(torch.float32) for k in ("t", "momentum", "prev_loss"))
