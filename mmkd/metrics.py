"""Evaluation metrics: what the :class:`~mmkd.trainer.Trainer` reports on the validation and test splits.

A metric is a registered factory ``num_classes -> torchmetrics.Metric`` whose ``update(logits, target)``
takes a batch's logits ``[B, C]`` (float) and labels ``[B]`` (only labelled items, ``target >= 0``).
``trainer.metrics`` names the set (default ``[acc, loss]``); each lands in the epoch's metrics as
``val/<name>``, which ``trainer.monitor`` may name. Under DDP, torchmetrics sums the states of all
processes in ``compute()``.

========  ==========================================================================
``acc``    top-1 accuracy, ``mean_b [argmax z_b = y_b]`` (float64 counts)
``loss``   mean cross-entropy, ``mean_b -log softmax(z_b)_{y_b}`` (float64 sum)
``f1``     macro F1, the unweighted mean over classes of ``2 P_c R_c / (P_c + R_c)``
``auroc``  macro one-vs-rest ROC-AUC on ``softmax(z)``
``top5``   top-5 accuracy
``ppl``    perplexity, ``exp(loss)`` (a language model's, over its tokens: each is an instance)
``agree``  fidelity: top-1 agreement with the teachers, ``mean_b [argmax z_b = argmax p_b]``
``tkl``    fidelity: mean ``KL(p_b || softmax(z_b))`` to the teachers
========  ==========================================================================

The fidelity metrics (:class:`Fidelity`) compare the predictions with the module's reference
distribution ``p`` (:meth:`mmkd.trainer.Module.reference`: for a
:class:`~mmkd.distiller.Distiller`, the router-weighted mixture of its live teachers' probabilities);
without teachers they report nothing. The ``distill`` pipeline adds both to every distilled
student's test evaluation.

A data set declares the metrics that suit its task (:attr:`mmkd.data.DataSplits.metrics`, used unless
``trainer.metrics`` is set); :func:`task_metrics` chooses them from the labels: ROC-AUC first for two
classes (the usual figure for binary node classification, where a majority guess scores a high
accuracy), macro-F1 first when the largest class is at least :data:`IMBALANCED` times the smallest,
accuracy otherwise; accuracy and the loss are always reported too.

Add one with :func:`register_metric`::

    from torchmetrics.classification import MulticlassPrecision
    from mmkd.metrics import register_metric

    @register_metric("precision")
    def precision(num_classes):
        return MulticlassPrecision(num_classes, average="macro")
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from mmkd.registry import METRICS


def register_metric(name: str, lower: bool = False) -> Callable:
    """Register a factory ``num_classes -> torchmetrics.Metric`` under ``name``; ``lower``: lower values
    are better (a monitor on it then picks the minimum, ``trainer.mode=auto``)."""
    return METRICS.register(name, lower=lower)


class _Mean(Metric):
    """``sum_batches value(logits, target) / items`` with float64 states (exact counts)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def value(self, logits: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, logits: Tensor, target: Tensor) -> None:
        self.total += self.value(logits, target).double()
        self.count += len(target)

    def compute(self) -> Tensor:
        return self.total / self.count


class Accuracy(_Mean):
    """Top-1 accuracy."""

    def value(self, logits, target):
        return (logits.argmax(1) == target).sum()


class CrossEntropy(_Mean):
    """Mean cross-entropy of the logits."""

    def value(self, logits, target):
        return F.cross_entropy(logits, target, reduction="sum")


class Perplexity(CrossEntropy):
    """``exp`` of the mean cross-entropy."""

    def compute(self):
        return super().compute().exp()


class Fidelity(_Mean):
    """A metric of the predictions against a reference distribution (log-probabilities ``[B, C]``):
    its ``update`` takes ``(logits, target, reference)``."""

    def value(self, logits: Tensor, target: Tensor, reference: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, logits: Tensor, target: Tensor, reference: Tensor) -> None:
        self.total += self.value(logits, target, reference).double()
        self.count += len(target)


class Agreement(Fidelity):
    """Top-1 agreement with the reference."""

    def value(self, logits, target, reference):
        return (logits.argmax(1) == reference.argmax(1)).sum()


class TeacherKL(Fidelity):
    """``KL(reference || softmax(logits))`` per instance, summed."""

    def value(self, logits, target, reference):
        return F.kl_div(F.log_softmax(logits.float(), 1), reference.float(), log_target=True, reduction="sum")


register_metric("acc")(lambda num_classes: Accuracy())
register_metric("loss", lower=True)(lambda num_classes: CrossEntropy())
register_metric("f1")(lambda num_classes: MulticlassF1Score(num_classes, average="macro"))
register_metric("auroc")(lambda num_classes: MulticlassAUROC(num_classes, average="macro"))
register_metric("top5")(lambda num_classes: MulticlassAccuracy(num_classes, top_k=min(5, num_classes), average="micro"))
register_metric("ppl", lower=True)(lambda num_classes: Perplexity())
register_metric("agree")(lambda num_classes: Agreement())
register_metric("tkl", lower=True)(lambda num_classes: TeacherKL())
FIDELITY = ("agree", "tkl")  # what the distill pipeline adds to a distilled student's test evaluation


IMBALANCED = 10.0  # largest / smallest class size from which macro-F1 leads a multi-class data set's metrics


def task_metrics(labels: Tensor, num_classes: int) -> list[str]:
    """The metrics that suit a classification task with these ``labels`` (``[items]``, ``-1``: no
    label; ignored): ``[auroc, acc, loss]`` for two classes, ``[f1, acc, loss]`` when the largest class
    has at least :data:`IMBALANCED` times the labelled items of the smallest, ``[acc, loss]`` otherwise."""
    if num_classes == 2:
        return ["auroc", "acc", "loss"]
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes)
    if counts.min() == 0 or counts.max() >= IMBALANCED * counts.min():
        return ["f1", "acc", "loss"]
    return ["acc", "loss"]


class MetricSet:
    """The named metrics of an evaluation, built at the first batch (when the class count is known);
    :meth:`reset` readies them for the next evaluation (cheaper than building them again)."""

    def __init__(self, names: Sequence[str], device: torch.device | str = "cpu"):
        self.factories = {name: METRICS[name] for name in names}
        # whether a metric reads a reference distribution (Fidelity); told by one built for 2 classes
        self.reads_reference = any(isinstance(f(2), Fidelity) for f in self.factories.values())
        self.device = torch.device(device)
        self.metrics: dict[str, Metric] = {}
        self.classes: int | None = None
        self.count = 0

    def reset(self) -> None:
        self.count = 0
        for m in self.metrics.values():
            m.reset()

    def update(self, logits: Tensor, target: Tensor, reference: Tensor | None = None) -> None:
        """Add a batch; ``reference`` (log-probabilities, or None) feeds the :class:`Fidelity` metrics."""
        if logits.shape[1] != self.classes:  # the first batch, or a data set with another class count
            self.metrics = {n: f(logits.shape[1]).to(self.device) for n, f in self.factories.items()}
            self.classes = logits.shape[1]
        self.count += len(target)
        for m in self.metrics.values():
            if not isinstance(m, Fidelity):
                m.update(logits, target)
            elif reference is not None:
                m.update(logits, target, reference)

    def compute(self) -> dict[str, float]:
        """The metrics' values; a :class:`Fidelity` metric that saw no reference is left out."""
        return {name: float(m.compute()) for name, m in self.metrics.items()
                if not (isinstance(m, Fidelity) and m.count == 0)}
