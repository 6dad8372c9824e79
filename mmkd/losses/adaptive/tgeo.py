"""TGeo-KD: a per-instance fusion ratio of KD and CE, learned from the trilateral geometry of the
student's prediction, the teacher's and the ground truth.

With ``S_i = softmax(s_i)`` and ``T_i = softmax(t_i)`` (temperature 1), ``G_i = onehot(y_i)`` and
``Tbar_i`` the teacher's mean prediction over the training instances of class ``y_i``:

    x_i = [S_i, T_i, Tbar_i, G_i, |S_i - G_i|, |S_i - T_i|, |S_i - Tbar_i|,
           (G_i - Tbar_i) * (G_i - S_i), (G_i - T_i) * (G_i - S_i)]            (element-wise: 9 C values)
    alpha_i = sigmoid(f_w(x_i)),   f_w = Linear(9 C, hidden) - ReLU - Linear(hidden, 1)
    TGeo_i = alpha_i * KD_i + (1 - alpha_i) * CE_i                               per instance,
    KD_i = tau^2 KL(softmax(t_i / tau) || softmax(s_i / tau)),   CE_i = -log softmax(s_i)_{y_i}.

``x_i`` holds the intra-instance relations (the vertices S, T, G; the per-class lengths of the edges
S-G and S-T; the products of the edges G-T and G-S at G, which sum to their inner product, the angle
at G) and the inter-instance ones, through the class-mean vertex Tbar (its edge to S and the product
of G-Tbar with G-S). Alpha weights the teacher: a large alpha learns from the teacher, a small one
from the label. Hu, Wu, Li, Ma, Chen, Yan, Wang and Liu, "Less or More From Teacher: Exploiting
Trilateral Geometry For Knowledge Distillation", ICLR 2024 (arXiv:2312.15112).

Official code: Chengming0501/TGeo-KD, its CIFAR-100 code: ``cifar100/lib/models/reweighting.py``
(the ``reweighting`` head, its input ``_x_in`` above, hidden 128), ``cifar100/lib/losses/kd_loss.py``
(the fused loss) and ``cifar100/lib/trainer.py`` (``precompute``: Tbar; ``train``: ``--adapt 1``).
The paper's Section 3 text was not available where this was written (the abstract, the reviews and
the code were), so its equation numbers are not cited here; the formula is the official code's.

How the ratio network trains. The paper learns ``w`` "in a bilevel-optimization manner" (the student
minimises the fused loss on training data, ``w`` the student's loss on validation data). Its official
CIFAR code does not: the ratio head is part of the student model and is trained jointly with it, by
the same SGD, on the same fused training loss, with the student's softmax in ``x_i`` not detached
(the ratio's gradient also reaches the student through ``S_i``). This is what is done here: the
ratio network is the term's module, trained with the student (:func:`mmkd.losses.register_loss`).
The loss's gradient in ``alpha_i`` is proportional to ``KD_i - CE_i``, so the network moves each
instance's ratio towards the smaller of its two losses. A bilevel step is not implemented: its
hypergradient needs the student's forward on validation data at virtually updated weights, which a
loss term (it sees one training batch's logits) cannot do in our single trainer; the official
bilevel scripts (tabular data: ``src/fusion_ratio_bilevel.py``, ``HIL/control_kd_bilevel.py``) do
not compute one either (the first computes alpha under ``no_grad``, so its validation loss gives the
controller no gradient; the second fits the controller to the fused loss on validation data, the
student's weights fixed).

Deviations from the official CIFAR code, each named:

- ``Tbar`` is the teacher's class-mean prediction over the training set: one pass at the start of
  the fit with the frozen teacher (on the first epoch's views of an augmented set), as
  ``state_design`` of ``src/fusion_ratio_bilevel.py`` averages over its whole training set; the
  CIFAR code averages over its ``val_loader``, which is the test set (``get_test_dataloader``).
  ``means="batch"`` takes the class means within each batch instead.
- Each instance keeps its own alpha. The official loss multiplies alpha, shaped ``[B, 1]``, by the
  per-instance losses, shaped ``[B]``: the product broadcasts to ``[B, B]`` and its mean is
  ``(1 - mean alpha) mean CE + mean alpha mean KD``, one ratio per batch.
- KD carries ``tau^2`` as :func:`mmkd.losses.kd.kd` (the tabular scripts have it, the CIFAR one has
  not); at the official CIFAR temperature, 1 (the default), the two agree.

The module logs the mean alpha of each epoch's training steps as ``tgeo/alpha``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.checks import COUNT, TEMPERATURE
from mmkd.losses import reduce, register_loss
from mmkd.losses.kd import kd

MEANS = ("train", "batch")


def trilateral(s: Tensor, t: Tensor, g: Tensor, tbar: Tensor) -> Tensor:
    """The ratio network's input ``[batch, 9 C]`` from the ``[batch, C]`` student and teacher
    probabilities ``s`` and ``t``, the one-hot labels ``g`` and each instance's class-mean teacher
    prediction ``tbar``: ``[s, t, tbar, g, |s - g|, |s - t|, |s - tbar|, (g - tbar)(g - s), (g - t)(g - s)]``."""
    return torch.cat([s, t, tbar, g, (s - g).abs(), (s - t).abs(), (s - tbar).abs(), (g - tbar) * (g - s),
                      (g - t) * (g - s)], dim=1)


class TrilateralRatio(nn.Module, Callback):
    """TGeo-KD's fusion-ratio network ``sigmoid(Linear(9 C, hidden) - ReLU - Linear(hidden, 1))`` and
    the teacher's class-mean predictions ``class_means`` (``[C, C]``, row ``c``: the mean teacher
    probabilities over the training instances of class ``c``; saved with the module), computed at the
    start of the fit when ``means="train"`` and not yet computed; with ``means="batch"`` each batch
    gives its own. A callback: also logs the epoch's mean alpha (``tgeo/alpha``)."""

    def __init__(self, num_classes: int, hidden: int = 128, means: str = "train"):
        super().__init__()
        if means not in MEANS:
            raise ValueError(f"tgeo: means={means!r}; choose from: train (the teacher's class means over the "
                             "training set), batch (over each batch)")
        self.num_classes, self.means = int(num_classes), means
        self.net = nn.Sequential(nn.Linear(9 * self.num_classes, int(hidden)), nn.ReLU(), nn.Linear(int(hidden), 1))
        self.register_buffer("class_means", torch.zeros(self.num_classes, self.num_classes))
        self.register_buffer("counts", torch.zeros(self.num_classes))  # training instances per class; 0: not computed
        self._sum: Tensor | None = None
        self._count = 0

    def forward(self, x: Tensor) -> Tensor:
        """The fusion ratios ``[batch]`` in (0, 1) for the inputs ``x`` (:func:`trilateral`)."""
        alpha = torch.sigmoid(self.net(x)).squeeze(1)
        if self.training:
            self._sum = alpha.detach().sum() + (0 if self._sum is None else self._sum)
            self._count += len(alpha)
        return alpha

    def anchor(self, t: Tensor, target: Tensor) -> Tensor:
        """Each instance's class-mean teacher prediction ``[batch, C]`` (``t``: the teacher's probabilities)."""
        if self.means == "batch":
            onehot = F.one_hot(target, self.num_classes).to(t.dtype)
            return ((onehot.T @ t) / onehot.sum(0).clamp(min=1)[:, None])[target]
        if not self.counts.any():
            raise ValueError("tgeo: the teacher's class means are not computed; they are at the start of a "
                             "Distiller fit (or set means: batch)")
        return self.class_means.to(t.dtype)[target]

    @torch.no_grad()
    def estimate(self, trainer, module) -> None:
        """Set ``class_means`` and ``counts`` from one pass of the Distiller ``module``'s single frozen
        teacher over ``trainer.train_data`` (probabilities at temperature 1)."""
        from mmkd.data import SelfBatching, loader
        from mmkd.distiller import Distiller  # the loss library is imported before the core
        from mmkd.trainer import to_device

        if not isinstance(module, Distiller) or len(module.teachers) != 1:
            got = f"{len(module.teachers)} teachers" if isinstance(module, Distiller) else type(module).__name__
            raise ValueError(f"tgeo: the class means come from the one teacher of a Distiller; the fit has {got} "
                             "(or set means: batch)")
        if isinstance(trainer.train_data, SelfBatching):
            raise ValueError("tgeo: the training set makes its own batches; the class means need a plain labelled "
                             "data set (or set means: batch)")
        sums, counts = torch.zeros_like(self.class_means), torch.zeros_like(self.counts)
        for batch in loader(trainer.train_data, trainer.cfg.batch_size, num_workers=trainer.cfg.num_workers):
            batch = to_device(batch, trainer.device)
            y = batch[module.label_key]
            p = torch.softmax(module.teachers[0](batch).logits.float(), dim=1)[y >= 0]
            y = y[y >= 0]
            sums.index_add_(0, y, p.to(sums.dtype))
            counts += torch.bincount(y, minlength=self.num_classes).to(counts.dtype)
        if not counts.any():
            raise ValueError("tgeo: the training set has no labelled instance")
        self.class_means.copy_(sums / counts.clamp(min=1)[:, None])
        self.counts.copy_(counts)

    def on_fit_start(self, trainer, module) -> None:
        if self.means == "train" and not self.counts.any():  # a resumed fit has them back
            self.estimate(trainer, module)

    def on_epoch_start(self, trainer, module) -> None:
        self._sum, self._count = None, 0

    def on_epoch_end(self, trainer, module, metrics) -> None:
        if self._count:
            metrics["tgeo/alpha"] = float(self._sum) / self._count


@register_loss("tgeo", teacher=True, per_sample=True, module=TrilateralRatio,
               ranges={"temperature": TEMPERATURE, "hidden": COUNT})
def tgeo(student_logits, teacher_logits, target, *, module=None, temperature=1.0, reduction="mean"):
    """``alpha_i KD_i + (1 - alpha_i) CE_i`` per instance, ``alpha_i`` from the term's ratio network
    (:class:`TrilateralRatio`) on the trilateral geometry of the student's and the teacher's
    predictions and the label (:func:`trilateral`); TGeo-KD, ICLR 2024 (module docstring).
    ``temperature``: KD's tau (the geometry is at temperature 1)."""
    if module is None:
        raise ValueError("loss tgeo: no ratio network; use it as a loss term (Term('tgeo')), which makes one")
    if target is None or (target < 0).any():
        raise ValueError("loss tgeo: every instance needs its label (the ground truth is a vertex of the geometry)")
    if student_logits.shape[1] != module.num_classes:
        raise ValueError(f"loss tgeo: the logits have {student_logits.shape[1]} classes, the ratio network was made "
                         f"for {module.num_classes} (num_classes)")
    s, t = torch.softmax(student_logits, dim=1), torch.softmax(teacher_logits, dim=1)
    g = F.one_hot(target, module.num_classes).to(s.dtype)
    alpha = module(trilateral(s, t, g, module.anchor(t, target)))
    distill = kd(student_logits, teacher_logits, temperature=temperature, reduction="none")
    per_sample = alpha * distill + (1 - alpha) * F.cross_entropy(student_logits, target, reduction="none")
    return reduce(per_sample, reduction)
