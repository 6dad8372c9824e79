"""The mixture-of-teachers core: a student, teachers, a router and weighted loss terms.

For a batch, the student and every teacher produce :class:`~mmkd.net.Output`; the router turns
them into per-instance weights ``w[b, t]``; each loss term that reads a teacher is evaluated once per
teacher and mixed with those weights:

    L = sum_terms lambda_term * mean_b sum_t w[b, t] * loss_term(s_b, t_b, y_b)

(for batch-level losses the per-instance weights are averaged over the batch first). Single-teacher
KD is this with one teacher and a constant router; training on labels alone is this with no teacher.
In training, :mod:`~mmkd.transforms` (mixing, augmentation, generated sequences) turn the batch into
the one all of this sees first.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from mmkd.cache import Cached
from mmkd.callbacks import Callback
from mmkd.net import Batch, Net, Output, Teacher
from mmkd.registry import LOSSES
from mmkd.router import Router
from mmkd.schedules import Clock, Schedule, value_at
from mmkd.sparse import SparseLogits
from mmkd.trainer import Module
from mmkd.transforms import BatchTransform


@dataclass
class Term:
    """One weighted loss term: a registered loss name, its weight and its hyper-parameters.

    By default the loss compares logits; ``student="features.<path>"`` / ``teacher="features.<path>"``
    make it compare the named intermediate features instead (FitNet-style feature distillation), and
    ``"features"`` hands it the list of all the model's features, in the order the model lists them
    (ReviewKD's stages).
    ``adapter`` (e.g. a learned projector from the student's feature width to the teacher's) is
    applied to the student side first; its parameters train with the student. The ``weight`` and any
    ``args`` value may be a :class:`~mmkd.schedules.Schedule` (or its config mapping, e.g.
    ``{schedule: warmup, epochs: 20}``): the term then uses its value at the current training state.
    ``group`` names a batch entry (e.g. ``"labelled"`` of :class:`~mmkd.data.PairedBatches`): a
    per-instance loss is then averaged within each group of rows that share its value and the group
    means are summed, ``sum_g mean_{b in g} loss_b`` (DHO's ``KD(labelled) + KD(unlabelled)``), instead
    of one mean over the batch.
    """

    loss: str
    weight: float | Schedule = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    name: str | None = None  # key in the returned dict; defaults to ``loss``
    student: str = "logits"
    teacher: str = "logits"
    adapter: nn.Module | None = None
    group: str | None = None
    sizes: dict[str, Any] = field(default_factory=dict)  # what a module factory takes besides args (SIZES)

    def __post_init__(self) -> None:
        self.fn = LOSSES[self.loss]
        meta = LOSSES.meta(self.loss)
        factory = meta.get("module")
        own = module_args(factory)
        self.module = factory(**{k: v for k, v in {**self.sizes, **self.args}.items() if k in own}) if factory else None
        self.args = {k: v for k, v in self.args.items() if k not in own}
        self.reads_teacher, self.per_sample = meta["teacher"], meta["per_sample"]
        self.reads_batch, self.sparse = meta.get("batch", False), meta.get("sparse", False)
        self.name = self.name or self.loss
        self.weight = Schedule.parse(self.weight, f"loss term {self.name!r}, weight")
        self.args = {k: Schedule.parse(v, f"loss term {self.name!r}, {k}") for k, v in self.args.items()}
        if self.group is not None and not self.per_sample:
            raise ValueError(f"loss term {self.name!r}: group={self.group!r} needs a per-instance loss; "
                             f"{self.loss!r} is computed over the whole batch")
        for side in (self.student, self.teacher):
            if side not in ("logits", "features") and not side.startswith("features."):
                raise ValueError(f"loss term {self.name!r}: {side!r} is neither 'logits', 'features' nor "
                                 "'features.<path>'")


# What :func:`~mmkd.build.build_terms` gives a loss's module factory that takes them: the shapes
# (without batch) of what the term reads from the student and from the first teacher (a list of
# shapes for ``"features"``; the teacher's is None without teachers), the number of training items
# (CRD's memory bank) and of classes.
SIZES = ("student_shape", "teacher_shape", "num_items", "num_classes")


def module_args(factory) -> set[str]:
    """The names of the arguments of a loss's module ``factory`` (none without one)."""
    return set(inspect.signature(factory).parameters) if factory else set()


def pick(out: Output, what: str) -> Tensor | list[Tensor]:
    """``out.logits`` for ``"logits"``, the list of all features for ``"features"``, else the feature
    named by ``"features.<path>"``."""
    if what == "logits":
        return out.logits
    if what == "features":
        if not out.features:
            raise KeyError("the term reads all features, but the model exposes none (list them in the Net's/"
                           "Teacher's features)")
        return list(out.features.values())
    path = what.removeprefix("features.")
    if path not in out.features:
        raise KeyError(f"no feature {path!r}; the model exposes: {', '.join(out.features) or 'none'} "
                       "(list the path in the Net's/Teacher's features)")
    return out.features[path]


def as_float(x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
    """``x`` (or each tensor of the list ``x``) in float32 at least: losses compute in full precision."""
    return [t.float() for t in x] if isinstance(x, list) else x.float()


def group_mean(batch: Batch, term: Term):
    """``values -> sum_g mean_{b in g} values_b`` over the groups of rows sharing ``batch[term.group]``."""
    if term.group not in batch:
        raise KeyError(f"loss term {term.name!r}: group={term.group!r} is not a batch entry; the batch has: "
                       f"{', '.join(sorted(batch))}")
    _, inverse, counts = torch.unique(batch[term.group].reshape(-1), return_inverse=True, return_counts=True)

    def mean(values: Tensor) -> Tensor:
        sums = values.new_zeros(len(counts)).index_add(0, inverse.to(values.device), values)
        return (sums / counts.to(values.device)).sum()
    return mean


class Distiller(Module):
    """Student + teachers + router + loss terms; ``forward(batch)`` returns the named losses.

    Args:
        student: the :class:`~mmkd.net.Net` being trained.
        teachers: frozen or co-trained :class:`~mmkd.net.Teacher` s (may be cached, may be empty).
        terms: the weighted loss terms.
        router: any module mapping ``(student_output, teacher_outputs, batch)`` to ``[batch, teachers]``
            weights; required when there are teachers. A :class:`~mmkd.router.Router`'s auxiliary
            losses (:meth:`~mmkd.router.Router.pop_aux_losses`) are returned as ``"router/<name>"``
            and added to ``"loss"``.
        label_key: the batch entry holding class labels.
        transforms: :class:`~mmkd.transforms.BatchTransform` s applied, in order, to each training batch.
    """

    def __init__(self, student: Net, teachers: Sequence[Teacher], terms: Sequence[Term],
                 router: nn.Module | None = None, label_key: str = "label",
                 transforms: Sequence[BatchTransform] = ()):
        super().__init__()
        if not terms:
            raise ValueError("a Distiller needs at least one loss term (Term('ce') to train on labels)")
        if teachers and router is None:
            raise ValueError("a Distiller with teachers needs a router (ConstantRouter for plain KD)")
        if not teachers and any(t.reads_teacher for t in terms):
            names = [t.name for t in terms if t.reads_teacher]
            raise ValueError(f"loss terms {names} read a teacher, but the Distiller has none")
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        self.router = router
        self.terms = list(terms)
        self.adapters = nn.ModuleDict({t.name: t.adapter for t in self.terms if t.adapter is not None})
        self.loss_modules = nn.ModuleDict({t.name: t.module for t in self.terms if t.module is not None})
        moving = [type(t).__name__ for t in transforms if not t.keeps_inputs]
        if moving and any(isinstance(t, Cached) for t in teachers):
            raise ValueError(f"the batch transforms {moving} change the teachers' inputs, which a cached "
                             "teacher cannot follow; give the live teachers (teacher cache: false)")
        self.transforms = nn.ModuleList(transforms)
        self.label_key = label_key
        self.register_buffer("progress", torch.zeros(()), persistent=False)
        self.register_buffer("epoch", torch.zeros(()), persistent=False)

    def set_progress(self, done: float, epoch: int = 0) -> None:
        """Set the fraction of training done and the 0-based epoch; scheduled term weights and loss
        arguments are evaluated at them, and a :class:`~mmkd.router.Router`'s schedules too."""
        self.progress.fill_(done)
        self.epoch.fill_(epoch)
        if isinstance(self.router, Router):
            self.router.set_progress(done, epoch)

    def callbacks(self) -> list:
        """The :class:`~mmkd.schedules.Clock` that sets the progress before each step, and the student
        model, the router, the loss terms' modules and the batch transforms when they are
        :class:`~mmkd.callbacks.Callback` s (DHO's calibration, KD^3's selected share, CTKD's
        curriculum, HARD's examples)."""
        own = [self.student.model, self.router, *self.loss_modules.values(), *self.transforms]
        return [Clock(self), *(m for m in own if isinstance(m, Callback))]

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        for transform in self.transforms:
            batch = transform(batch, self.student, self.teachers)
        s = self.student(batch)
        target = batch[self.label_key] if self.label_key in batch else None
        outs = [t(batch) for t in self.teachers]
        w = self.router(s, outs, batch).float() if outs else None
        losses = {}
        for term in self.terms:
            value = self._term(term, s, outs, w, target, batch)
            weight = value_at(term.weight, self.progress, self.epoch)
            losses[term.name] = value if isinstance(weight, (int, float)) and weight == 1 else weight * value
        if outs and isinstance(self.router, Router):  # its own losses (e.g. load balancing), taken once
            losses.update({f"router/{k}": v for k, v in self.router.pop_aux_losses().items()})
        values = list(losses.values())
        losses["loss"] = sum(values[1:], values[0])
        return losses

    def _term(self, term: Term, s: Output, outs: list[Output], w: Tensor | None, target: Tensor | None,
              batch: Batch) -> Tensor:
        s_in = pick(s, term.student)
        if term.name in self.adapters:
            s_in = self.adapters[term.name](s_in)
        s_in = as_float(s_in)
        kwargs = {k: value_at(v, self.progress, self.epoch) for k, v in term.args.items()}
        if term.reads_batch:
            kwargs["batch"] = batch
        if term.name in self.loss_modules:
            kwargs["module"] = self.loss_modules[term.name]
        mean = Tensor.mean if term.group is None else group_mean(batch, term)
        if not term.reads_teacher:
            if term.group is None:
                return term.fn(s_in, None, target, **kwargs)
            return mean(term.fn(s_in, None, target, reduction="none", **kwargs))
        parts = []
        for i, t in enumerate(outs):
            t_in = as_float(pick(t, term.teacher))
            if isinstance(t_in, SparseLogits) and not term.sparse:
                t_in = t_in.dense()
            if term.per_sample:
                parts.append(mean(w[:, i] * term.fn(s_in, t_in, target, reduction="none", **kwargs)))
            else:
                parts.append(w[:, i].mean() * term.fn(s_in, t_in, target, **kwargs))
        return sum(parts[1:], parts[0])

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """The student's logits (what evaluation and deployment use)."""
        return self.student(batch).logits

    @torch.no_grad()
    def reference(self, batch: Batch) -> Tensor | None:
        """What the student is distilled towards, for the fidelity metrics: ``log sum_t w[b, t] p_t``,
        the router-weighted mixture of the teachers' probabilities (live teachers, also for cached
        ones: this works on any split); None without teachers."""
        if not len(self.teachers):
            return None
        device = next(self.student.parameters()).device
        live = [t.live.to(device) if isinstance(t, Cached) else t for t in self.teachers]
        outs = [t(batch) for t in live]
        w = self.router(self.student(batch), outs, batch).float()
        log_p = torch.stack([torch.log_softmax(o.logits.float(), -1) for o in outs], 1)
        return torch.logsumexp(log_p + w.clamp(min=1e-30).log().unsqueeze(-1), 1)


def loss_term(module: nn.Module, name: str, arg: str, who: str) -> Term:
    """The loss term ``name`` of the :class:`Distiller` ``module``, whose loss takes the keyword ``arg``:
    for a callback ``who`` that sets that argument during a fit (TAID's ``t``, MCMI's centroids). A
    one-line ``ValueError`` names what is wrong otherwise."""
    if not isinstance(module, Distiller):
        raise ValueError(f"callback {who} sets an argument of a Distiller's loss term; the fitted module is a "
                         f"{type(module).__name__}")
    term = next((t for t in module.terms if t.name == name), None)
    if term is None:
        raise ValueError(f"callback {who}: the Distiller has no loss term {name!r}; its terms are: "
                         f"{', '.join(t.name for t in module.terms)} (set args.term)")
    if arg not in inspect.signature(term.fn).parameters:
        raise ValueError(f"callback {who}: loss term {name!r} (loss {term.loss!r}) takes no {arg}; give the name "
                         "of a term whose loss does (args.term)")
    return term
