"""MCMI: a teacher trained to maximise its conditional mutual information as well as its likelihood.

The teacher's conditional mutual information (CMI) measures how far its predicted distributions
spread around the centroid of their class:

    p_i = softmax(z_i),    q_c = mean_{i: y_i = c} p_i,
    CMI = mean_i KL(p_i || q_{y_i}) = mean_i sum_k p_i,k (log p_i,k - log q_{y_i},k)

and the MCMI teacher is trained on ``CE - lambda * CMI``, so that its probabilities estimate the
Bayes conditional distribution better than those of a teacher trained on CE alone (maximum
likelihood); the student is then distilled from it as usual. In a config the teacher's terms are
``teachers.<name>.losses: {ce: {weight: 1}, mcmi: {weight: -0.25}}``: this loss is the CMI itself,
registered with ``negative_weight=True``, and the official lambda is 0.25.

Ye, Hamidi, Tan and Yang, "Bayes Conditional Distribution Estimation for Knowledge Distillation
Based on Conditional Mutual Information", ICLR 2024 (arXiv:2401.08732).

What the official code (iclr2024mcmi/ICLRMCMI, ``FineTuneTeacher.py``, ``centroid.py``,
``losses.py`` ``CE_KL_PWCE_loss``, ``helper/loops.py`` ``train_fine_tune``) does:

- the CMI term is ``F.kl_div(Q[y].log(), log_softmax(z), log_target=True, reduction="batchmean")``,
  i.e. ``mean_i KL(p_i || Q_{y_i})`` at temperature 1, with the centroids ``Q`` constants (no
  gradient flows into them); the loss is ``param[0] * CE + param[1] * KL`` with ``--param 1 -0.25``
  in its scripts (lambda = 0.25);
- the centroids are estimated once, before training, by one pass over the (augmented) training
  loader with the model in train mode (``Centroid.update_epoch``): the class sums of the predicted
  distributions, each row normalised to sum 1 (the class mean). A per-batch moving average
  (``update_batch``, decay 0.9999) is present but commented out of the training loop;
- the MCMI objective fine-tunes a teacher already trained on CE (240 epochs): 20 epochs of SGD at
  half the teacher's learning rate (0.05), momentum 0.9, weight decay 5e-4, batch 64, cosine
  annealing; the student is distilled from the last epoch's teacher.

Here the centroids are, by default, the class means of the batch itself (detached, as the official
centroids are constants), which needs no state: since the class mean minimises
``sum_i KL(p_i || q)`` over ``q``, the gradient is the same as with the centroids attached. The
official estimate over the whole training set is :class:`MCMICentroids` (callback
``mcmi_centroids``), which passes it to the term as ``args.centroids``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmkd.callbacks import Callback, register_callback
from mmkd.checks import NON_NEGATIVE_INT
from mmkd.losses import reduce, register_loss


def class_means(probs: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``[num_classes, classes]``: row c the mean of ``probs`` over the rows labelled c (rows with a
    negative label are left out); a class without rows gets the uniform distribution."""
    labelled = target >= 0
    y = target[labelled]
    sums = probs.new_zeros(num_classes, probs.shape[1]).index_add_(0, y, probs[labelled])
    counts = torch.bincount(y, minlength=num_classes).to(probs.dtype)[:, None]
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, 1.0 / probs.shape[1]))


@register_loss("mcmi", teacher=False, per_sample=False, negative_weight=True)
def mcmi(student_logits, teacher_logits=None, target=None, *, centroids=None, reduction="mean"):
    """The conditional mutual information ``mean_i KL(p_i || q_{y_i})`` of the model's own
    predictions ``p = softmax(z)``; give it a negative weight to maximise it (MCMI: ``CE - 0.25 * CMI``).

    Ye, Hamidi, Tan and Yang, "Bayes Conditional Distribution Estimation for Knowledge Distillation
    Based on Conditional Mutual Information", ICLR 2024. ``centroids`` (``[classes, classes]``, row c
    the centroid ``q_c``, a constant) defaults to the detached class means of the batch; the callback
    ``mcmi_centroids`` sets the official estimate over the training set. Instances with a negative
    label are left out (their value is 0 and the mean runs over the labelled ones); ``teacher_logits``
    is ignored.
    """
    num_classes = student_logits.shape[1]
    labelled = target >= 0
    y = target.clamp(min=0)
    log_p = F.log_softmax(student_logits, dim=1)
    p = log_p.exp()
    if centroids is None:
        q = class_means(p.detach(), target, num_classes)
    else:
        q = torch.as_tensor(centroids, dtype=log_p.dtype, device=log_p.device)
        if q.shape != (num_classes, num_classes):
            raise ValueError(f"loss mcmi: centroids of shape {tuple(q.shape)}; give one distribution over the "
                             f"{num_classes} classes per class, [{num_classes}, {num_classes}]")
    log_q = q.clamp(min=torch.finfo(q.dtype).tiny).log()  # a centroid entry that underflowed to 0
    per_sample = (p * (log_p - log_q[y])).sum(dim=1) * labelled
    if reduction == "mean":
        return per_sample.sum() / labelled.sum().clamp(min=1)
    return reduce(per_sample, reduction)


@register_callback("mcmi_centroids", reads_losses=("term",), ranges={"every": NON_NEGATIVE_INT})
class MCMICentroids(Callback):
    """The official centroid estimate of MCMI for the loss term ``term`` (an ``mcmi`` term of the
    :class:`~mmkd.distiller.Distiller` being fitted), set as its ``args["centroids"]``.

    The centroids are the class means of the model's predicted distributions (temperature 1) over
    one pass through the training set, in its own order and with its augmentation, the model in
    train mode as in the official ``Centroid.update_epoch`` (dropout active, batch statistics in
    batch norm; the running statistics it would update are put back). ``every=0`` (the official
    procedure) computes them once, before the first epoch, from the model as it starts (a
    pre-trained teacher when the fit fine-tunes one); ``every=k`` computes them again before every
    k-th epoch, which a teacher trained from scratch needs, as its predictions move. Under DDP every
    process takes rank 0's. The centroids are saved with the training state, so a resumed fit keeps
    the ones it used.
    """

    def __init__(self, term: str = "mcmi", every: int = 0):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"mcmi_centroids every={every!r}; give a whole number of epochs >= 0 (0: once)")
        self.term, self.every = term, every
        self.centroids: Tensor | None = None

    def _find(self, module):
        from mmkd.distiller import loss_term  # the loss library is imported before the core

        return loss_term(module, self.term, "centroids", "mcmi_centroids")

    @torch.no_grad()
    def estimate(self, trainer, module) -> Tensor:
        """The class means of ``module.student``'s predicted distributions over ``trainer.train_data``."""
        from mmkd.data import SelfBatching, loader
        from mmkd.trainer import to_device

        data = trainer.train_data
        if isinstance(data, SelfBatching):
            raise ValueError(f"callback mcmi_centroids: the training set ({type(data).__name__}) makes its own "
                             "batches; the centroids need a plain labelled data set")
        buffers = [b.detach().clone() for b in module.buffers()]
        was_training = module.training
        module.train()
        sums = counts = None
        for batch in loader(data, trainer.cfg.batch_size, num_workers=trainer.cfg.num_workers):
            batch = to_device(batch, trainer.device)
            target = batch[module.label_key]
            p = F.softmax(module.student(batch).logits.float(), dim=1)
            if sums is None:
                sums = p.new_zeros(p.shape[1], p.shape[1])
                counts = p.new_zeros(p.shape[1])
            labelled = target >= 0
            sums.index_add_(0, target[labelled], p[labelled])
            counts += torch.bincount(target[labelled], minlength=p.shape[1]).to(p.dtype)
        for b, saved in zip(module.buffers(), buffers):
            b.copy_(saved)
        module.train(was_training)
        if sums is None:
            raise ValueError("callback mcmi_centroids: the training set is empty")
        q = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None],
                        torch.full_like(sums, 1.0 / sums.shape[1]))
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(q, 0)
        return q

    def on_fit_start(self, trainer, module) -> None:
        term = self._find(module)
        if self.centroids is not None:  # restored by a resumed fit
            term.args["centroids"] = self.centroids.to(trainer.device)

    def on_epoch_start(self, trainer, module) -> None:
        due = self.centroids is None or (self.every > 0 and trainer.epoch % self.every == 0)
        if due:
            self.centroids = self.estimate(trainer, module)
        self._find(module).args["centroids"] = self.centroids.to(trainer.device)

    def state_dict(self) -> dict[str, Any]:
        return {"centroids": self.centroids.detach().cpu().clone() if self.centroids is not None else torch.empty(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["centroids"]
        self.centroids = saved.to(torch.float32) if saved.numel() else None
