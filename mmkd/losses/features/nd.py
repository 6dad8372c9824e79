"""ND loss: regularise the norm and the direction of the student's embedding.

With ``s`` the student's and ``t`` the teacher's embedding of an instance of class ``y`` (the
penultimate features, the input of the classifier) and ``c_y`` the mean of the teacher's embeddings
of class ``y`` over the training set, ``e_y = c_y / ||c_y||``:

    ND(s, t, y) = 1 - <s, e_y> / max(||s||, ||t||)   per instance.

Its minimum asks for a student embedding along the teacher's class centre (direction) and at least
as long as the teacher's (norm): the projection ``<s, e_y>`` grows with ``||s||`` until it passes
``||t||``. Wang, Zhou, Zhu and Zhang, "Improving Knowledge Distillation via Regularizing Feature
Norm and Direction" (arXiv:2305.17007; official code: ``CIFAR/utils.py``, ``DirectNormLoss``, of
WangYZ1608/Knowledge-Distillation-via-ND). The official training adds it to CE and KD ("KD++": for
ResNet-56 -> ResNet-20, CE 1.0 + KD 1.0 at T = 4, warmed up over 20 epochs, + ND 2.0); the class
centres are computed once, from the trained teacher in evaluation mode over the training set, which
the callback ``nd_centers`` does (:class:`NDCenters`). A student whose embedding is narrower than
the teacher's goes through a linear projection (the term's ``adapter: linear``; the official
``EmbTrans``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mmkd.callbacks import Callback, register_callback
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import same_batch


@register_loss("nd", teacher=True, per_sample=True)
def nd(student_features, teacher_features, target, *, centers=None, reduction="mean"):
    """``1 - <s, c_y / ||c_y||> / max(||s||, ||t||)`` per instance (ND loss, Wang et al. 2023).

    ``centers`` (``[classes, dim]``, the teacher's class-mean embeddings) is set by the ``nd_centers``
    callback; the features are flattened to ``[batch, dim]``. Instances with a negative label
    (unlabelled) give 0 and are left out of the mean.
    """
    if centers is None:
        raise ValueError("loss nd: no class centres; add the callback that computes them from the teacher "
                         "(callbacks: [{name: nd_centers}]) or give the term args.centers")
    same_batch("nd", student_features, teacher_features)
    s, t = student_features.flatten(1), teacher_features.flatten(1)
    c = torch.as_tensor(centers, dtype=s.dtype, device=s.device)
    if s.shape[1] != t.shape[1] or c.shape[1:] != s.shape[1:]:
        raise ValueError(f"nd: student features {tuple(s.shape)}, teacher features {tuple(t.shape)} and centres "
                         f"{tuple(c.shape)} must share one width; give the term an adapter (linear)")
    labelled = target >= 0
    e = torch.nn.functional.normalize(c, dim=1)[target.clamp(min=0)]
    per_sample = (1 - (s * e).sum(1) / torch.maximum(s.norm(dim=1), t.norm(dim=1))) * labelled
    if reduction == "mean":
        return per_sample.sum() / labelled.sum().clamp(min=1)
    return reduce(per_sample, reduction)


@register_callback("nd_centers", reads_losses=("term",))
class NDCenters(Callback):
    """The class centres of the ND loss term ``term``: the mean of the (single, frozen) teacher's
    embeddings (the features the term reads) of each class over one pass through the training set,
    the teacher in evaluation mode, as the official code computes them before the student trains.
    Saved with the training state, so a resumed fit keeps them."""

    def __init__(self, term: str = "nd"):
        self.term = term
        self.centers: Tensor | None = None

    @torch.no_grad()
    def estimate(self, trainer, module, term) -> Tensor:
        """Class means of the teacher's ``term.teacher`` features over ``trainer.train_data``."""
        from mmkd.data import SelfBatching, loader
        from mmkd.distiller import pick
        from mmkd.trainer import to_device

        if len(module.teachers) != 1:
            raise ValueError(f"callback nd_centers: the class centres come from one teacher; the Distiller has "
                             f"{len(module.teachers)}")
        if isinstance(trainer.train_data, SelfBatching):
            raise ValueError("callback nd_centers: the training set makes its own batches; the centres need a "
                             "plain labelled data set")
        teacher = module.teachers[0]
        sums = counts = None
        for batch in loader(trainer.train_data, trainer.cfg.batch_size, num_workers=trainer.cfg.num_workers):
            batch = to_device(batch, trainer.device)
            y, out = batch[module.label_key], teacher(batch)
            f = pick(out, term.teacher).float().flatten(1)[y >= 0]
            y = y[y >= 0]
            if sums is None:
                sums = f.new_zeros(out.logits.shape[1], f.shape[1])
                counts = f.new_zeros(len(sums))
            sums.index_add_(0, y, f)
            counts += torch.bincount(y, minlength=len(sums)).to(f.dtype)
        if sums is None:
            raise ValueError("callback nd_centers: the training set is empty")
        return sums / counts.clamp(min=1)[:, None]

    def on_fit_start(self, trainer, module) -> None:
        from mmkd.distiller import loss_term  # the loss library is imported before the core

        term = loss_term(module, self.term, "centers", "nd_centers")
        if self.centers is None:  # not restored by a resumed fit
            self.centers = self.estimate(trainer, module, term)
        term.args["centers"] = self.centers.to(trainer.device)

    def state_dict(self) -> dict[str, Any]:
        return {"centers": self.centers.detach().cpu().clone() if self.centers is not None else torch.empty(0)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["centers"]
        self.centers = saved.to(torch.float32) if saved.numel() else None
