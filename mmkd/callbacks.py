"""Callbacks: objects the :class:`~mmkd.trainer.Trainer` calls at fixed points of a fit.

Every hook is a no-op here; a callback overrides the ones it needs (Lightning's ``Callback`` is the
model). The trainer calls, in this order::

    on_fit_start
    for each epoch:  on_epoch_start,  (on_step_start, step, on_step_end) per batch,  on_epoch_end
    on_fit_end       (only when the fit completes)
    teardown         (always, also when the fit raises)

Hooks receive the trainer, whose attributes describe where the fit is: ``epoch`` (0-based),
``global_step`` (steps done before the current one), ``max_steps``, ``train_data``, ``val_data``,
``run_dir``, ``is_main`` (rank 0: the process that writes files) and ``should_stop`` (set it to end
the fit after this epoch). ``on_epoch_end`` may add entries to ``metrics``; callbacks run in list
order. A callback's :meth:`~Callback.state_dict` is saved in ``last.pt`` every epoch and handed back to
:meth:`~Callback.load_state_dict` on resume, so a resumed fit continues exactly.

The built-in ones (model checkpointing, early stopping, metric logging, the progress bar) are in this
module, with ``grad_norm`` for configs; a module the trainer fits adds its own through ``callbacks()`` (the Distiller's schedule
clock, DHO's calibration), and ``Trainer.fit(..., callbacks=[...])`` takes more. Register one for
configs with :func:`register_callback`::

    from mmkd.callbacks import Callback, register_callback

    @register_callback("print_lr")
    class PrintLR(Callback):
        def on_epoch_end(self, trainer, module, metrics):
            print(metrics["epoch"], metrics["lr"])
"""
from __future__ import annotations

import csv
import io as _io
import logging
import sys
from typing import Any, Callable

import torch
from torch import nn

from mmkd import io
from mmkd.registry import CALLBACKS

log = logging.getLogger("mmkd")


def register_callback(name: str, **meta: Any) -> Callable:
    """Register a :class:`Callback` subclass under ``name`` (``callbacks: [{name: ...}]`` in configs)."""
    return CALLBACKS.register(name, **meta)


class Callback:
    """Hooks into a :class:`~mmkd.trainer.Trainer` fit; every hook does nothing unless overridden."""

    def on_fit_start(self, trainer, module: nn.Module) -> None:
        """Before the first epoch (after a resume has restored the training state)."""

    def on_epoch_start(self, trainer, module: nn.Module) -> None:
        """Before the epoch's first step; ``trainer.epoch`` is the epoch about to run."""

    def on_step_start(self, trainer, module: nn.Module, batch) -> None:
        """Before the forward pass of a training step; ``trainer.global_step`` steps are done."""

    def on_step_end(self, trainer, module: nn.Module, losses: dict) -> None:
        """After the optimizer step; ``losses`` are the step's (attached) loss tensors."""

    def on_epoch_end(self, trainer, module: nn.Module, metrics: dict[str, float]) -> None:
        """After validation; ``metrics`` holds ``epoch``, ``train/*``, ``val/*``, ``lr`` and ``time/*``."""

    def on_fit_end(self, trainer, module: nn.Module, result) -> None:
        """After the last epoch, once ``module`` holds the best epoch's weights; ``result`` is the
        :class:`~mmkd.trainer.FitResult` (its ``metrics`` may be updated)."""

    def teardown(self, trainer) -> None:
        """Last of all, also when the fit raised: close files and progress bars."""

    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs to continue exactly (tensors, numbers, strings, lists, dicts)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def better(score: float, best: float | None, mode: str, ties: str) -> bool:
    """Whether ``score`` replaces ``best``: strictly better in ``mode`` (``max``/``min``), or equal
    when ``ties="last"``; any score beats no best yet."""
    if best is None:
        return True
    return (score > best if mode == "max" else score < best) or (ties == "last" and score == best)


def monitored(metrics: dict[str, float], monitor: str) -> float:
    """``metrics[monitor]``, or a ``KeyError`` listing the metrics there are."""
    if monitor not in metrics:
        raise KeyError(f"trainer.monitor={monitor!r} is not a metric; choose from: "
                       f"{', '.join(k for k in metrics if k != 'epoch')}")
    return metrics[monitor]


class ModelCheckpoint(Callback):
    """Keeps the best epoch by ``monitor``: its weights and metrics in ``run_dir/best.pt``; at the end
    of the fit the module gets them back. ``ties="first"`` keeps the earliest of equal scores,
    ``"last"`` the latest; ``keep="last"`` keeps the last epoch whatever its score (procedures that
    report the final weights, e.g. MST-Distill's stage 1)."""

    def __init__(self, monitor: str = "val/acc", mode: str = "max", ties: str = "first", keep: str = "best"):
        self.monitor, self.mode, self.ties, self.keep = monitor, mode, ties, keep
        self.best: float | None = None
        self.best_epoch = -1

    def on_epoch_end(self, trainer, module, metrics):
        score = monitored(metrics, self.monitor)
        if self.keep == "last" or better(score, self.best, self.mode, self.ties):
            self.best, self.best_epoch = score, metrics["epoch"]
            model, _ = trainer.model_state(module)  # every process: gathered from the shards under FSDP
            if trainer.is_main:
                io.save({"epoch": metrics["epoch"], "model": model, "metrics": metrics}, trainer.run_dir / "best.pt")

    def load_best(self, trainer, module) -> dict[str, float]:
        """Load the best epoch's weights into ``module``; return that epoch's metrics."""
        state = io.load(trainer.run_dir / "best.pt", "the best epoch's weights",
                        "delete it and last.pt to train that stage again")
        trainer.load_model_state(module, state["model"])
        return state["metrics"]

    def state_dict(self):
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state):
        self.best, self.best_epoch = state["best"], state["best_epoch"]


class EarlyStopping(Callback):
    """Stops the fit once ``monitor`` has not improved (by :func:`better`) for ``patience`` epochs."""

    def __init__(self, patience: int, monitor: str = "val/acc", mode: str = "max", ties: str = "first"):
        self.patience, self.monitor, self.mode, self.ties = patience, monitor, mode, ties
        self.best: float | None = None
        self.bad = 0

    def on_epoch_end(self, trainer, module, metrics):
        score = monitored(metrics, self.monitor)
        if better(score, self.best, self.mode, self.ties):
            self.best, self.bad = score, 0
        else:
            self.bad += 1
        if self.bad >= self.patience:
            trainer.should_stop = True
            log.info("early stop at epoch %d: %s did not improve for %d epochs",
                     metrics["epoch"], self.monitor, self.patience)

    def state_dict(self):
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state):
        self.best, self.bad = state["best"], state["bad"]


class MetricsLogger(Callback):
    """Writes ``metrics.csv`` (every epoch so far) and TensorBoard scalars in ``run_dir/tb``, and logs a
    line every tenth of the run (at debug level only while a progress bar shows the metrics)."""

    def __init__(self, tensorboard: bool = True, quiet: bool = False):
        self.tensorboard, self.quiet = tensorboard, quiet
        self.writer = None

    def on_fit_start(self, trainer, module):
        if self.tensorboard and trainer.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.run_dir / "tb"))

    def on_epoch_end(self, trainer, module, metrics):
        if not trainer.is_main:
            return
        history = trainer.history
        columns = list(dict.fromkeys(k for row in history for k in row))
        buf = _io.StringIO()
        w = csv.DictWriter(buf, columns)
        w.writeheader()
        w.writerows(history)
        io.write_text(buf.getvalue(), trainer.run_dir / "metrics.csv")
        if self.writer:
            for k, v in metrics.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, metrics["epoch"])
        last = trainer.should_stop or metrics["epoch"] == trainer.cfg.max_epochs
        every = max(1, trainer.cfg.max_epochs // 10)
        level = logging.INFO if not self.quiet and (last or metrics["epoch"] % every == 0) else logging.DEBUG
        log.log(level, "%s epoch %d  %s", trainer.run_dir, metrics["epoch"],
                "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))

    def teardown(self, trainer):
        if self.writer:
            self.writer.close()
            self.writer = None


class ProgressBar(Callback):
    """A rich progress bar on stderr: the epochs of the stage, and the steps of the current epoch."""

    def __init__(self):
        self.bar = self.stage = self.task = None

    @staticmethod
    def wanted(setting: str) -> bool:
        """Whether ``trainer.progress`` (``auto``: only on a terminal, ``on``, ``off``) shows a bar."""
        return setting == "on" or (setting == "auto" and sys.stderr.isatty())

    def on_fit_start(self, trainer, module):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True))
        self.bar.start()
        self.stage = self.bar.add_task(str(trainer.run_dir), total=trainer.cfg.max_epochs, completed=trainer.epoch)

    def on_epoch_start(self, trainer, module):
        self.task = self.bar.add_task(f"  epoch {trainer.epoch + 1}", total=trainer.steps_per_epoch)

    def on_step_end(self, trainer, module, losses):
        self.bar.update(self.task, advance=1)

    def on_epoch_end(self, trainer, module, metrics):
        self.bar.remove_task(self.task)
        monitor = trainer.cfg.monitor
        self.bar.update(self.stage, advance=1, description=f"{trainer.run_dir}  {monitor}={metrics[monitor]:.4f}")

    def teardown(self, trainer):
        if self.bar:
            self.bar.stop()
            self.bar = None


@register_callback("grad_norm")
class GradNorm(Callback):
    """Adds ``train/grad_norm``, the mean over the epoch's steps of the global gradient norm
    ``||g||_2`` over all trainable parameters (before clipping), to the epoch's metrics: the first
    thing to look at when a run diverges or stalls."""

    def __init__(self):
        self.total, self.steps = 0.0, 0

    def on_epoch_start(self, trainer, module):
        self.total, self.steps = 0.0, 0

    def on_step_end(self, trainer, module, losses):
        grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
        self.total += float(torch.stack(grads).norm()) if grads else 0.0
        self.steps += 1

    def on_epoch_end(self, trainer, module, metrics):
        metrics["train/grad_norm"] = self.total / max(1, self.steps)
