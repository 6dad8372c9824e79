"""The one trainer: it fits any module whose ``forward(batch)`` returns a dict of named losses
(with the total under ``"loss"``) and whose ``predict(batch)`` returns logits.

It knows nothing about specific methods: distillation, co-training and plain supervised training
are all :class:`~mmkd.distiller.Distiller` s to it.
"""
from __future__ import annotations

import csv
import io as _io
import logging
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

from mmkd import io
from mmkd.data import DataError, EpochSampler, loader
from mmkd.net import Batch

log = logging.getLogger("mmkd")


@dataclass
class TrainerConfig:
    """Everything about how a module is trained (the ``trainer`` group of a run config)."""

    max_epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adamw"  # adamw | adam | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | step | none (stepped every batch)
    warmup_epochs: float = 0.0
    step_epochs: int = 30  # step scheduler: decay by `gamma` every `step_epochs`
    gamma: float = 0.1
    grad_clip: Optional[float] = None  # max global gradient norm
    monitor: str = "val/acc"  # metric that picks the best checkpoint and drives early stopping
    mode: str = "max"  # max | min
    patience: Optional[int] = None  # stop after this many epochs without improvement
    ties: str = "first"  # first | last: which of several epochs with the best score is kept
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the module
    deterministic: bool = False  # torch.use_deterministic_algorithms
    seed: int = 0
    num_workers: int = 0
    progress: str = "auto"  # auto (a bar on a TTY) | on | off
    tensorboard: bool = True
    finite_check_every: int = 1  # check the loss for NaN/inf every N steps


CHOICES = {"optimizer": ("adamw", "adam", "sgd"), "scheduler": ("cosine", "step", "none"), "mode": ("max", "min"),
           "ties": ("first", "last"), "precision": ("auto", "bf16", "fp32"), "progress": ("auto", "on", "off")}
AT_LEAST = {"max_epochs": 1, "batch_size": 1, "step_epochs": 1, "finite_check_every": 1, "num_workers": 0,
            "warmup_epochs": 0, "weight_decay": 0, "momentum": 0, "patience": 1}


def check_config(c: Any) -> None:
    """Raise ``ValueError`` naming ``trainer.<key>`` and the valid values for an unusable setting of
    ``c`` (a :class:`TrainerConfig` or its config node); called before anything is trained."""
    for key, valid in CHOICES.items():
        if getattr(c, key) not in valid:
            raise ValueError(f"trainer.{key}={getattr(c, key)!r}; choose from: {', '.join(valid)}")
    for key, low in AT_LEAST.items():
        if getattr(c, key) is not None and getattr(c, key) < low:
            raise ValueError(f"trainer.{key}={getattr(c, key)!r}; it must be at least {low}")
    for key in ("lr", "grad_clip", "gamma"):
        if getattr(c, key) is not None and not 0 < getattr(c, key) < math.inf:
            raise ValueError(f"trainer.{key}={getattr(c, key)!r}; it must be a positive finite number")
    for key in ("warmup_epochs", "weight_decay", "momentum"):
        if not math.isfinite(getattr(c, key)):
            raise ValueError(f"trainer.{key}={getattr(c, key)!r}; give a finite number")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device):
        raise ValueError(f"trainer.device={c.device!r}; choose from: auto, cpu, cuda, cuda:N")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"trainer.device={c.device!r}, but no CUDA device is available; use auto or cpu")


@dataclass
class FitResult:
    """The best epoch, its metrics, and every epoch's metrics."""

    best_epoch: int
    best_score: float
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite: training stops instead of training through it."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a dict batch (or anything with ``.to``, such as a PyG ``Data``) to ``device``."""
    if isinstance(batch, dict):
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return batch.to(device)


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors, ints, floats and strings only, so that ``last.pt`` loads with
    ``torch.load(weights_only=True)`` (``np.random.get_state()`` holds a numpy array, which it refuses)."""
    version, mt, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss},
             "numpy": {"bit_generator": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`_rng_state` returned (exactly: the same draws follow)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], npy["key"].cpu().numpy().astype(np.uint32), int(npy["pos"]),
                         int(npy["has_gauss"]), float(npy["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


class Trainer:
    """Fits a module on a training set, evaluating on a validation set every epoch.

    Writes into ``run_dir``: ``last.pt`` (full training state, every epoch, atomically),
    ``best.pt`` (module weights of the best epoch by ``monitor``), ``metrics.csv`` and TensorBoard
    events in ``tb/``. With ``resume=True`` it continues from ``last.pt``, so the final metrics equal
    those of an uninterrupted run with the same seed. Launched with ``torchrun`` it trains with DDP:
    a ``DistributedSampler`` shards the data and only rank 0 writes files. Before each training step
    it calls ``module.set_progress(fraction_of_training_done)`` when the module has that method (the
    :class:`~mmkd.distiller.Distiller` evaluates scheduled loss arguments at it). A non-finite loss
    stops training with :class:`NonFiniteLoss`, one line naming ``stage`` (default: ``run_dir``).
    """

    def __init__(self, config: TrainerConfig | None = None, run_dir: str | os.PathLike = "run",
                 resume: bool = False, stage: str | None = None, **overrides: Any):
        self.cfg = config or TrainerConfig()
        for k, v in overrides.items():
            if not hasattr(self.cfg, k):
                raise TypeError(f"unknown trainer option {k!r}")
            setattr(self.cfg, k, v)
        check_config(self.cfg)
        self.run_dir = Path(run_dir)
        self.stage = stage or str(self.run_dir)  # names the run's stage in errors (teachers/cnn, student, ...)
        self.resume = resume
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = self._device()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.bf16 = precision == "bf16"

    def _device(self) -> torch.device:
        name = self.cfg.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda" and self.world > 1:
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        if name.startswith("cuda"):
            torch.cuda.set_device(torch.device(name))
        return torch.device(name)

    @property
    def is_main(self) -> bool:
        """Whether this process writes files and logs (rank 0)."""
        return self.rank == 0

    # ------------------------------------------------------------------ optimisation
    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.momentum > 0)
        adam = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        return adam(params, lr=c.lr, weight_decay=c.weight_decay)

    def _scheduler(self, opt: torch.optim.Optimizer, steps_per_epoch: int):
        """LR factor per step: linear warm-up over ``warmup_epochs``, then cosine decay to 0 over the
        rest of the run, a step decay by ``gamma`` every ``step_epochs``, or constant (``none``)."""
        c = self.cfg
        total, warmup = c.max_epochs * steps_per_epoch, int(c.warmup_epochs * steps_per_epoch)
        after_warmup = {
            "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))),
            "step": lambda step: c.gamma ** (step // (c.step_epochs * steps_per_epoch)),
            "none": lambda step: 1.0,
        }[c.scheduler]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / warmup if step < warmup
                                                 else after_warmup(step))

    # ------------------------------------------------------------------ fit
    def fit(self, module: nn.Module, train: Dataset, val: Dataset) -> FitResult:
        """Train ``module`` on ``train``; at the end, ``module`` holds the best epoch's weights."""
        c = self.cfg
        module.to(self.device)
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the module has no trainable parameters")
        if self.world > 1:
            sampler = DistributedSampler(train, self.world, self.rank, shuffle=True, seed=c.seed)
        else:
            sampler = EpochSampler(len(train), c.seed)
        train_loader = loader(train, c.batch_size, sampler, c.num_workers)
        opt = self._optimizer(params)
        sched = self._scheduler(opt, len(train_loader))

        start, history, best, best_epoch, bad = 0, [], None, -1, 0
        last = self.run_dir / "last.pt"
        seed_everything(c.seed, c.deterministic)  # on resume too (deterministic kernels); RNG restored below
        if self.resume and last.exists():
            state = io.load(last, "the training state", "delete it to train that stage again")
            module.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start, history = (c.max_epochs if state["done"] else state["epoch"] + 1), state["history"]
            best, best_epoch, bad = state["best"], state["best_epoch"], state["bad_epochs"]
            log.info("resumed from %s at epoch %d", last, start)

        ddp = module
        if self.world > 1:
            ddp = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        step_fn = torch.compile(ddp) if c.compile else ddp
        writer = self._tensorboard()
        progress = self._progress()
        if progress:
            stage = progress.add_task(str(self.run_dir), total=c.max_epochs, completed=start)
        autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext())
        set_progress = getattr(module, "set_progress", None)  # scheduled hyper-parameters (Distiller)
        total_steps = c.max_epochs * len(train_loader)
        try:
            for epoch in range(start, c.max_epochs):
                sampler.set_epoch(epoch)
                module.train()
                t0 = time.perf_counter()
                sums: dict[str, Tensor] = {}
                task = progress.add_task(f"  epoch {epoch + 1}", total=len(train_loader)) if progress else None
                for step, batch in enumerate(train_loader):
                    batch = to_device(batch, self.device)
                    if set_progress:
                        set_progress((epoch * len(train_loader) + step) / total_steps)
                    with autocast:
                        losses = step_fn(batch)
                    loss = losses["loss"]
                    if step % c.finite_check_every == 0 and not torch.isfinite(loss):
                        raise NonFiniteLoss(self._diverged(losses, batch, epoch, step, module))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if c.grad_clip:
                        nn.utils.clip_grad_norm_(params, c.grad_clip)
                    opt.step()
                    sched.step()
                    for k, v in losses.items():
                        sums[k] = sums[k] + v.detach() if k in sums else v.detach()
                    if progress:
                        progress.update(task, advance=1)
                train_s = time.perf_counter() - t0
                if progress:
                    progress.remove_task(task)
                if self.world > 1:  # buffers (BatchNorm statistics) are rank-local: all ranks take rank 0's
                    for b in module.buffers():
                        dist.broadcast(b, 0)
                metrics = {"epoch": epoch + 1}
                metrics.update({f"train/{k}": self._mean(v, len(train_loader)) for k, v in sums.items()})
                metrics.update({f"val/{k}": v for k, v in self.evaluate(module, val).items()})
                metrics["lr"] = opt.param_groups[0]["lr"]
                metrics["time/train_s"] = train_s
                metrics["time/epoch_s"] = time.perf_counter() - t0
                history.append(metrics)
                if c.monitor not in metrics:
                    raise KeyError(f"trainer.monitor={c.monitor!r} is not a metric; choose from: "
                                   f"{', '.join(k for k in metrics if k != 'epoch')}")
                score = metrics[c.monitor]
                improves = best is None or (score > best if c.mode == "max" else score < best)
                if improves or (c.ties == "last" and score == best):
                    best, best_epoch, bad = score, epoch + 1, 0
                    if self.is_main:
                        io.save({"epoch": epoch + 1, "model": module.state_dict(), "metrics": metrics},
                                self.run_dir / "best.pt")
                else:
                    bad += 1
                stop = c.patience is not None and bad >= c.patience
                if self.is_main:
                    io.save({"epoch": epoch, "model": module.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "rng": _rng_state(), "history": history,
                             "best": best, "best_epoch": best_epoch, "bad_epochs": bad,
                             "done": stop or epoch + 1 == c.max_epochs}, last)
                    self._log(metrics, history, writer, quiet=progress is not None,
                              last=stop or epoch + 1 == c.max_epochs)
                if progress:
                    progress.update(stage, advance=1, description=f"{self.run_dir}  {c.monitor}={score:.4f}")
                if stop:
                    log.info("early stop at epoch %d: %s did not improve for %d epochs",
                             epoch + 1, c.monitor, c.patience)
                    break
        finally:
            if progress:
                progress.stop()
            if writer:
                writer.close()
        if self.world > 1:
            dist.barrier()
        best_state = io.load(self.run_dir / "best.pt", "the best epoch's weights",
                             "delete it and last.pt to train that stage again")
        module.load_state_dict(best_state["model"])
        return FitResult(best_epoch, best, best_state["metrics"], history)

    def _diverged(self, losses: dict[str, Tensor], batch: Batch, epoch: int, step: int, module: nn.Module) -> str:
        """One line for a non-finite loss: the stage, epoch and step, the non-finite terms, and advice
        that fits the cause (bad inputs, weights gone non-finite, a loss that is non-finite from the
        start, or divergence during training)."""
        terms = {k: float(v.detach()) for k, v in losses.items() if k != "loss" and not torch.isfinite(v).all()}
        where = (f"{self.stage}: non-finite loss at epoch {epoch + 1}, step {step + 1} "
                 f"({', '.join(f'{k}={v}' for k, v in terms.items()) or 'loss=' + str(float(losses['loss']))})")
        inputs = [k for k, v in (batch.items() if isinstance(batch, dict) else [])
                  if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if inputs:
            return f"{where}; the batch's {', '.join(inputs)} hold NaN or infinite values: clean the input data"
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            return f"{where}; the weights are no longer finite: lower trainer.lr or set trainer.grad_clip"
        if epoch == 0 and step == 0:
            return (f"{where}; it is non-finite from the first step, so the learning rate is not the cause: "
                    "check the arguments of those loss terms (a temperature near 0 divides by zero)")
        return f"{where}; training diverged: lower trainer.lr or set trainer.grad_clip"

    def _mean(self, total: Tensor, n: int) -> float:
        if self.world > 1:
            total = total.clone()
            dist.all_reduce(total)
            n *= self.world
        return float(total) / n

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, module: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Accuracy and cross-entropy of ``module.predict`` on ``dataset``'s labelled instances
        (label >= 0), sharded across processes under DDP."""
        module.to(self.device).eval()
        key = getattr(module, "label_key", "label")
        shard = list(range(self.rank, len(dataset), self.world))
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # correct, loss sum, count
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()
        for batch in loader(dataset, max(256, self.cfg.batch_size), shard, self.cfg.num_workers):
            batch = to_device(batch, self.device)
            with autocast:
                logits = module.predict(batch).float()
            y = batch[key]
            labelled = y >= 0  # negative labels mark instances outside the split (e.g. graph nodes)
            logits, y = logits[labelled], y[labelled]
            totals += torch.stack([(logits.argmax(1) == y).sum().double(),
                                   nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                                   torch.tensor(len(y), dtype=torch.float64, device=self.device)])
        if self.world > 1:
            dist.all_reduce(totals)
        correct, loss, n = totals.tolist()
        if n == 0:
            raise DataError(f"data set {getattr(dataset, 'name', type(dataset).__name__)!r} has no labelled item "
                            "to evaluate on (label >= 0); give every split at least one")
        return {"acc": correct / n, "loss": loss / n}

    # ------------------------------------------------------------------ logging
    def _tensorboard(self):
        if not (self.cfg.tensorboard and self.is_main):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(self.run_dir / "tb"))

    def _progress(self):
        c = self.cfg
        show = c.progress == "on" or (c.progress == "auto" and sys.stderr.isatty())
        if not show or not self.is_main:
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from rich.console import Console

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=Console(stderr=True))
        progress.start()
        return progress

    def _log(self, metrics: dict[str, float], history: list[dict[str, float]], writer, quiet: bool,
             last: bool) -> None:
        """Write metrics.csv and TensorBoard scalars; log a line every tenth of the run (or at
        debug level only, when a progress bar shows them)."""
        columns = list(dict.fromkeys(k for row in history for k in row))
        buf = _io.StringIO()
        w = csv.DictWriter(buf, columns)
        w.writeheader()
        w.writerows(history)
        io.write_text(buf.getvalue(), self.run_dir / "metrics.csv")
        if writer:
            for k, v in metrics.items():
                if k != "epoch":
                    writer.add_scalar(k, v, metrics["epoch"])
        every = max(1, self.cfg.max_epochs // 10)
        level = logging.INFO if not quiet and (last or metrics["epoch"] % every == 0) else logging.DEBUG
        log.log(level, "%s epoch %d  %s", self.run_dir, metrics["epoch"],
                "  ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "epoch"))
