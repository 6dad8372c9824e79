"""The one trainer: it fits a :class:`Module`, whose ``forward(batch)`` returns a dict of named losses
(with the total under ``"loss"``) and whose ``predict(batch)`` returns logits.

It knows nothing about specific methods: distillation, co-training and plain supervised training
are all :class:`~mmkd.distiller.Distiller` s to it, and what a method adds to the loop (schedules,
calibration, data selection) comes as :mod:`~mmkd.callbacks` and :mod:`~mmkd.policies` it calls.
"""
from __future__ import annotations

import logging
import math
import os
import random
import re
import time
import dataclasses
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, DistributedSampler

from mmkd import fsdp, io
from mmkd.callbacks import Callback, EarlyStopping, MetricsLogger, ModelCheckpoint, ProgressBar
from mmkd.data import DataError, EpochSampler, Epochal, SelfBatching, loader
from mmkd.gradients import BackwardRule
from mmkd.metrics import MetricSet
from mmkd.net import Batch
from mmkd.policies import DataPolicy
from mmkd.registry import METRICS

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
    nesterov: bool = True  # sgd only (with momentum); false: heavy-ball momentum, as CRD and mdistiller train
    scheduler: str = "cosine"  # cosine | linear | step | none (stepped every batch)
    warmup_epochs: float = 0.0
    step_epochs: int = 30  # step scheduler: decay by `gamma` every `step_epochs`
    milestones: Optional[List[int]] = None  # step scheduler: decay by `gamma` at these epochs instead
    gamma: float = 0.1
    grad_clip: Optional[float] = None  # max global gradient norm
    metrics: Optional[List[str]] = None  # evaluated as val/<name> (mmkd.metrics); None: the data set's
    monitor: str = "auto"  # metric that picks the best checkpoint and drives early stopping; auto: val/<metrics[0]>
    mode: str = "auto"  # max | min | auto (min for a loss, max otherwise)
    patience: Optional[int] = None  # stop after this many epochs without improvement
    ties: str = "first"  # first | last: which of several epochs with the best score is kept
    keep: str = "best"  # best (by monitor) | last: the epoch whose weights the fit ends with
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the module
    strategy: str = "auto"  # under torchrun: auto / ddp (replicas, DistributedDataParallel) | fsdp (sharded, mmkd.fsdp)
    deterministic: bool = False  # torch.use_deterministic_algorithms
    seed: int = 0
    num_workers: int = 0
    progress: str = "auto"  # auto (a bar on a TTY) | on | off
    tensorboard: bool = True
    finite_check_every: int = 1  # check the loss for NaN/inf every N steps


DEFAULT_METRICS = ("acc", "loss")  # when neither the config nor the data set names any


def resolved(c: TrainerConfig, metrics: Sequence[str] | None = None) -> TrainerConfig:
    """A copy of ``c`` with its automatic choices made: ``metrics`` (``None``: the data set's
    ``metrics``, else :data:`DEFAULT_METRICS`), ``monitor`` (``auto``: ``val/<first metric>``; a
    registered metric ``val/<m>`` outside the set adds ``m`` to it; a module may also report its own) and ``mode`` (``auto``: ``min`` when the monitored
    value is a loss or a metric registered ``lower=True``, such as ``ppl``, else ``max``)."""
    names = list(c.metrics if c.metrics is not None else metrics or DEFAULT_METRICS)
    monitor = f"val/{names[0]}" if c.monitor == "auto" else c.monitor
    if monitor.startswith("val/") and monitor[4:] in METRICS and monitor[4:] not in names:
        names.append(monitor[4:])
    lower = monitor.endswith("loss") or (monitor[4:] in METRICS and METRICS.meta(monitor[4:]).get("lower", False))
    mode = c.mode if c.mode != "auto" else ("min" if lower else "max")
    return dataclasses.replace(c, metrics=names, monitor=monitor, mode=mode)


CHOICES = {"optimizer": ("adamw", "adam", "sgd"), "scheduler": ("cosine", "linear", "step", "none"), "mode": ("max", "min", "auto"),
           "ties": ("first", "last"), "keep": ("best", "last"), "precision": ("auto", "bf16", "fp32"), "strategy": ("auto", "ddp", "fsdp"), "progress": ("auto", "on", "off")}
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
    if c.milestones is not None and (list(c.milestones) != sorted(set(c.milestones)) or min(c.milestones, default=1) < 1):
        raise ValueError(f"trainer.milestones={list(c.milestones)!r}; give increasing epochs, each at least 1")
    if unknown := [m for m in c.metrics or () if m not in METRICS]:
        raise ValueError(f"trainer.metrics: unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS.names())}")
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


class Module(nn.Module):
    """What the trainer fits (the :class:`~mmkd.distiller.Distiller` is one).

    ``forward(batch)`` returns a dict of named loss tensors with the total under ``"loss"``;
    ``predict(batch)`` returns the logits evaluation scores; ``label_key`` names the batch entry that
    holds the labels; :meth:`callbacks` lists the callbacks the module needs while it trains.
    """

    label_key: str = "label"

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def reference(self, batch: Batch) -> Tensor | None:
        """The log-probabilities ``[B, C]`` that fidelity metrics compare ``predict`` with (a
        distiller's teachers), or None (the default: nothing to be faithful to)."""
        return None

    def callbacks(self) -> list[Callback]:
        """Callbacks a fit of this module runs first (e.g. the clock of scheduled loss arguments)."""
        return []


def _expect_module(module: Any) -> None:
    if not isinstance(module, Module):
        raise TypeError(f"the trainer fits an mmkd.trainer.Module (e.g. a Distiller), not {type(module).__name__}")


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
    """Fits a :class:`Module` on a training set, evaluating on a validation set every epoch.

    Writes into ``run_dir``: ``last.pt`` (full training state, every epoch, atomically),
    ``best.pt`` (module weights of the best epoch by ``monitor``), ``metrics.csv`` and TensorBoard
    events in ``tb/``. With ``resume=True`` it continues from ``last.pt``, so the final metrics equal
    those of an uninterrupted run with the same seed. Launched with ``torchrun`` it trains with DDP:
    a ``DistributedSampler`` shards the data and only rank 0 writes files. A non-finite loss stops
    training with :class:`NonFiniteLoss`, one line naming ``stage`` (default: ``run_dir``).
    ``cache_dir`` is a folder that callbacks may keep computed values in across fits (a frozen
    encoder's embeddings); ``None`` keeps them in memory only.

    The loop itself is short: what happens around it is done by :mod:`~mmkd.callbacks` (the module's
    own, those given to :meth:`fit`, then model checkpointing, early stopping, logging and the
    progress bar), and :mod:`~mmkd.policies` among them pick each epoch's training data.
    """

    def __init__(self, config: TrainerConfig | None = None, run_dir: str | os.PathLike = "run",
                 resume: bool = False, stage: str | None = None, cache_dir: str | os.PathLike | None = None,
                 **overrides: Any):
        self.cfg = config or TrainerConfig()
        for k, v in overrides.items():
            if not hasattr(self.cfg, k):
                raise TypeError(f"unknown trainer option {k!r}")
            setattr(self.cfg, k, v)
        check_config(self.cfg)
        self.cfg = resolved(self.cfg)
        self.run_dir = Path(run_dir)
        self.stage = stage or str(self.run_dir)  # names the run's stage in errors (teachers/cnn, student, ...)
        self.resume = resume
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None  # for callbacks' caches on disk
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.device = self._device()
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.rank = dist.get_rank() if self.world > 1 else 0
        precision = self.cfg.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.bf16 = precision == "bf16"
        self._metrics: MetricSet | None = None  # built at the first evaluation, reset for each
        self.fsdp, self._replicated = False, []  # set by fit: trainer.strategy=fsdp under torchrun

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

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    # ------------------------------------------------------------------ optimisation
    def _optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                   nesterov=c.nesterov and c.momentum > 0)
        adam = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
        return adam(params, lr=c.lr, weight_decay=c.weight_decay)

    def _scheduler(self, opt: torch.optim.Optimizer, steps_per_epoch: int):
        """LR factor per step: linear warm-up over ``warmup_epochs``, then cosine or linear decay to 0 over
        the rest of the run (``linear``: Hugging Face's ``get_linear_schedule_with_warmup``), a step decay
        by ``gamma`` every ``step_epochs`` (or at each epoch of ``milestones``: torch's ``MultiStepLR``, the
        CIFAR protocol of CRD and mdistiller), or constant (``none``)."""
        c = self.cfg
        total, warmup = c.max_epochs * steps_per_epoch, int(c.warmup_epochs * steps_per_epoch)
        after_warmup = {
            "cosine": lambda step: 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))),
            "linear": lambda step: max(0.0, (total - step) / max(1, total - warmup)),
            "step": (lambda step: c.gamma ** sum(step >= m * steps_per_epoch for m in c.milestones)) if c.milestones
            else lambda step: c.gamma ** (step // (c.step_epochs * steps_per_epoch)),
            "none": lambda step: 1.0,
        }[c.scheduler]
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / warmup if step < warmup
                                                 else after_warmup(step))

    def _loader(self, data: Dataset):
        if isinstance(data, SelfBatching):  # e.g. PairedBatches: one labelled, one unlabelled batch per step
            if self.world > 1:
                raise ValueError(f"{self.stage}: {type(data).__name__} makes its own batches, which cannot be "
                                 f"sharded across processes; {data.ddp_hint}")
            sampler = data.batch_sampler(self.cfg.batch_size, self.cfg.seed)
            return sampler, loader(data, batch_sampler=sampler, num_workers=self.cfg.num_workers)
        if self.world > 1:
            sampler = DistributedSampler(data, self.world, self.rank, shuffle=True, seed=self.cfg.seed)
        else:
            sampler = EpochSampler(len(data), self.cfg.seed)
        return sampler, loader(data, self.cfg.batch_size, sampler, self.cfg.num_workers)

    # ------------------------------------------------------------------ fit
    def fit(self, module: Module, train: Dataset, val: Dataset, callbacks: Sequence[Callback] = ()) -> FitResult:
        """Train ``module`` on ``train``; at the end, ``module`` holds the best epoch's weights.

        ``callbacks`` run after the module's own and before the built-in ones (checkpoint, early
        stopping, logging, progress bar); :class:`~mmkd.policies.DataPolicy` s among them choose
        each epoch's training data, and a :class:`~mmkd.gradients.BackwardRule` among them (at most
        one; not under DDP) computes each step's gradients instead of ``losses["loss"].backward()``.
        """
        _expect_module(module)
        c = self.cfg
        module.to(self.device)
        self.fsdp = self.world > 1 and c.strategy == "fsdp"
        sharding = ExitStack()
        self._replicated = sharding.enter_context(fsdp.sharded(module, self.device)) if self.fsdp else []
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the module has no trainable parameters")
        self.train_data, self.val_data, self.history = train, val, []
        planned = train  # what the schedule is laid out on (DataPolicy.planned)
        for policy in (*module.callbacks(), *callbacks):
            if isinstance(policy, DataPolicy):
                planned = policy.planned(planned)
        self._data, (self._sampler, self._batches) = planned, self._loader(planned)
        self.steps_per_epoch = len(self._batches)
        self.max_steps = c.max_epochs * self.steps_per_epoch
        self.epoch = self.global_step = 0
        self.should_stop = False
        opt = self._optimizer(params)
        sched = self._scheduler(opt, self.steps_per_epoch)
        checkpoint = ModelCheckpoint(c.monitor, c.mode, c.ties, c.keep)
        bar = ProgressBar.wanted(c.progress) and self.is_main
        self.callbacks = [*module.callbacks(), *callbacks, checkpoint,
                          *([EarlyStopping(c.patience, c.monitor, c.mode, c.ties)] if c.patience else []),
                          MetricsLogger(c.tensorboard, quiet=bar), *([ProgressBar()] if bar else [])]
        rules = [cb for cb in self.callbacks if isinstance(cb, BackwardRule)]
        if len(rules) > 1:
            names = ", ".join(type(r).__name__ for r in rules)
            raise ValueError(f"{self.stage}: {len(rules)} backward rules ({names}); a fit takes at most one")
        if rules and self.world > 1:
            raise ValueError(f"{self.stage}: the backward rule {type(rules[0]).__name__} computes gradients with "
                             "torch.autograd.grad, which DDP does not synchronise; train on one process or drop it")
        self._backward = rules[0] if rules else None

        seed_everything(c.seed, c.deterministic)  # on resume too (deterministic kernels); RNG restored below
        self._restore(module, opt, sched)
        ddp = module
        if self.world > 1 and not self.fsdp:
            ddp = nn.parallel.DistributedDataParallel(
                module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        step_fn = torch.compile(ddp) if c.compile else ddp
        try:
            self._call("on_fit_start", module)
            while self.epoch < c.max_epochs and not self.should_stop:
                self._epoch(module, step_fn, opt, sched, params)
                self._save(module, opt, sched)
                self.epoch += 1
            if self.world > 1:
                dist.barrier()
            result = FitResult(checkpoint.best_epoch, checkpoint.best, checkpoint.load_best(self, module),
                               self.history)
            self._call("on_fit_end", module, result)
            sharding.close()  # the trained weights back in the module's own (unsharded) Nets
            self.fsdp = False
        finally:
            for cb in self.callbacks:
                cb.teardown(self)
        return result

    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _epoch(self, module: Module, step_fn, opt, sched, params) -> None:
        """One epoch: pick its data (policies), train on it, validate, run ``on_epoch_end``."""
        c = self.cfg
        data = self.train_data
        for policy in self.callbacks:
            if isinstance(policy, DataPolicy):
                data = policy.select(self, module, data)
        if data is not self._data:
            self._data, (self._sampler, self._batches) = data, self._loader(data)
        self._sampler.set_epoch(self.epoch)
        for d in {id(d): d for d in (self.train_data, data)}.values():  # a policy may have wrapped it
            if isinstance(d, Epochal):
                d.set_epoch(self.epoch)
        module.train()
        self._call("on_epoch_start", module)
        t0 = time.perf_counter()
        sums: dict[str, Tensor] = {}
        for step, batch in enumerate(self._batches):
            batch = to_device(batch, self.device)
            self._call("on_step_start", module, batch)
            with self._autocast():
                losses = step_fn(batch)
            loss = losses["loss"]
            if step % c.finite_check_every == 0 and not torch.isfinite(loss):
                raise NonFiniteLoss(self._diverged(losses, batch, step, module))
            opt.zero_grad(set_to_none=True)
            if self._backward is not None:
                self._backward.backward(losses, params)
            else:
                loss.backward()
            if self._replicated:
                fsdp.average_gradients(self._replicated)
            clip = fsdp.clip if self.fsdp else nn.utils.clip_grad_norm_
            norm = clip(params, c.grad_clip) if c.grad_clip else None
            if step % c.finite_check_every == 0:
                self._check_gradients(params, norm, step)
            opt.step()
            sched.step()
            for k, v in losses.items():
                sums[k] = sums[k] + v.detach() if k in sums else v.detach()
            self.global_step += 1
            self._call("on_step_end", module, losses)
        train_s = time.perf_counter() - t0
        if self.world > 1:  # buffers (BatchNorm statistics) are rank-local: all ranks take rank 0's
            for b in module.buffers():
                dist.broadcast(b, 0)
        metrics = {"epoch": self.epoch + 1}
        metrics.update({f"train/{k}": self._mean(v, len(self._batches)) for k, v in sums.items()})
        metrics.update({f"val/{k}": v for k, v in self.evaluate(module, self.val_data).items()})
        metrics["lr"] = opt.param_groups[0]["lr"]
        metrics["time/train_s"] = train_s
        metrics["time/epoch_s"] = time.perf_counter() - t0
        self.history.append(metrics)
        self._call("on_epoch_end", module, metrics)

    # ------------------------------------------------------------------ training state (last.pt)
    def _states(self, module: Module) -> dict[str, Any]:
        """The callbacks' states, keyed ``<class>`` (``<class>#<n>`` for the n-th repeat); stateless
        callbacks (empty ``state_dict``) are left out, so a resume may show or hide the progress bar,
        and so are the fitted module's own submodules (a loss term's module: saved with the model)."""
        states, seen = {}, {}
        own = {id(m) for m in module.modules()}
        for cb in self.callbacks:
            name = type(cb).__qualname__
            seen[name] = seen.get(name, -1) + 1
            if id(cb) not in own and (state := cb.state_dict()):
                states[name if not seen[name] else f"{name}#{seen[name]}"] = state
        return states

    def model_state(self, module: Module, opt=None) -> tuple[dict, dict | None]:
        """The full state dicts of ``module`` (and of ``opt``): gathered from the shards under FSDP (a
        collective call; every process must make it), the module's own otherwise."""
        if self.fsdp:
            return fsdp.full_state(module, opt)
        return module.state_dict(), None if opt is None else opt.state_dict()

    def load_model_state(self, module: Module, model: dict, opt=None, optim: dict | None = None) -> None:
        """Load full state dicts (as :meth:`model_state` gives them) into ``module`` and ``opt``."""
        if self.fsdp:
            return fsdp.load_full_state(module, model, opt, optim)
        module.load_state_dict(model)
        if opt is not None:
            opt.load_state_dict(optim)

    def _save(self, module: Module, opt, sched) -> None:
        model, optim = self.model_state(module, opt)
        if not self.is_main:
            return
        io.save({"epoch": self.epoch, "step": self.global_step, "model": model,
                 "optimizer": optim, "scheduler": sched.state_dict(), "rng": _rng_state(),
                 "history": self.history, "callbacks": self._states(module),
                 "done": self.should_stop or self.epoch + 1 == self.cfg.max_epochs}, self.run_dir / "last.pt")

    def _restore(self, module: Module, opt, sched) -> None:
        last = self.run_dir / "last.pt"
        if not (self.resume and last.exists()):
            return
        state = io.load(last, "the training state", "delete it to train that stage again")
        self.load_model_state(module, state["model"], opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        self.epoch = self.cfg.max_epochs if state["done"] else state["epoch"] + 1
        self.history, self.global_step = state["history"], state["step"]
        mine, saved = self._states(module), state["callbacks"]
        if set(mine) != set(saved):
            raise ValueError(f"{last} was saved by a fit with the callbacks {sorted(saved) or 'none'}, this fit "
                             f"has {sorted(mine) or 'none'}: resume with the same settings, or delete {last}")
        seen = {}
        for cb in self.callbacks:
            name = type(cb).__qualname__
            seen[name] = seen.get(name, -1) + 1
            key = name if not seen[name] else f"{name}#{seen[name]}"
            if key in saved:
                cb.load_state_dict(saved[key])
        log.info("resumed from %s at epoch %d", last, self.epoch)

    def _check_gradients(self, params: list, norm: Tensor | None, step: int) -> None:
        """:class:`NonFiniteLoss` before the optimizer steps when a gradient holds NaN or inf although
        the loss is finite (a loss whose gradient is unstable, e.g. through an SVD): the weights stay
        as they were. ``norm``: the total gradient norm when clipping computed it already."""
        if norm is None and self.fsdp:
            norm = fsdp.grad_norm(params)
        elif norm is None:
            grads = [p.grad for p in params if p.grad is not None]
            if not grads:
                return
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if not torch.isfinite(norm):
            raise NonFiniteLoss(f"{self.stage}: non-finite gradient at epoch {self.epoch + 1}, step {step + 1}, "
                                "the loss being finite: a loss term's gradient is unstable; check the terms' "
                                "inputs, lower trainer.lr, or set trainer.grad_clip")

    def _diverged(self, losses: dict[str, Tensor], batch: Batch, step: int, module: nn.Module) -> str:
        """One line for a non-finite loss: the stage, epoch and step, the non-finite terms, and advice
        that fits the cause (bad inputs, weights gone non-finite, a loss that is non-finite from the
        start, or divergence during training)."""
        terms = {k: float(v.detach()) for k, v in losses.items() if k != "loss" and not torch.isfinite(v).all()}
        where = (f"{self.stage}: non-finite loss at epoch {self.epoch + 1}, step {step + 1} "
                 f"({', '.join(f'{k}={v}' for k, v in terms.items()) or 'loss=' + str(float(losses['loss']))})")
        inputs = [k for k, v in (batch.items() if isinstance(batch, dict) else [])
                  if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
        if inputs:
            return f"{where}; the batch's {', '.join(inputs)} hold NaN or infinite values: clean the input data"
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            return f"{where}; the weights are no longer finite: lower trainer.lr or set trainer.grad_clip"
        if self.epoch == 0 and step == 0:
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
    def evaluate(self, module: Module, dataset: Dataset, extra: Sequence[str] = ()) -> dict[str, float]:
        """``trainer.metrics`` (:mod:`mmkd.metrics`; default accuracy and cross-entropy), and the
        metrics ``extra`` names, of ``module.predict`` on ``dataset``'s labelled instances (label >= 0),
        sharded across processes under DDP; fidelity metrics compare it with ``module.reference``."""
        _expect_module(module)
        module.to(self.device).eval()
        shard = list(range(self.rank, len(dataset), self.world))
        names = [*self.cfg.metrics, *(m for m in extra if m not in self.cfg.metrics)]
        if self._metrics is None or list(self._metrics.factories) != names:
            self._metrics = MetricSet(names, self.device)
        metrics = self._metrics
        metrics.reset()
        batches = loader(dataset, max(256, self.cfg.batch_size), shard, self.cfg.num_workers)
        for batch in batches:
            batch = to_device(batch, self.device)
            with self._autocast():
                logits = module.predict(batch).float()
                ref = module.reference(batch) if metrics.reads_reference else None
            y = batch[module.label_key]
            labelled = y >= 0  # negative labels mark instances outside the split (e.g. graph nodes)
            metrics.update(logits[labelled], y[labelled], None if ref is None else ref.float()[labelled])
        if self.fsdp:  # sharded weights are gathered in every forward: all processes make as many
            most = torch.tensor(len(batches), device=self.device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            missing = int(most) - len(batches)
            extra = to_device(next(iter(loader(dataset, 1))), self.device) if missing else None
            for _ in range(missing):
                with self._autocast():
                    module.predict(extra)
                    if metrics.reads_reference:
                        module.reference(extra)
        count = torch.tensor(metrics.count, device=self.device)
        if self.world > 1:
            dist.all_reduce(count)
        if count == 0:
            raise DataError(f"data set {getattr(dataset, 'name', type(dataset).__name__)!r} has no labelled item "
                            "to evaluate on (label >= 0); give every split at least one")
        return metrics.compute()
