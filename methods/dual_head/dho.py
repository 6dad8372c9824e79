"""DHO: dual-head optimisation (Kang et al., "Simple yet Effective Semi-supervised Knowledge
Distillation from Vision-Language Models via Dual-Head Optimization", arXiv:2505.07675, 2025).

A :class:`~mmkd.methods.dual_head.model.DualHead` student (``inference="combine"``): the CE head ``z_ce``
learns from the labelled instances, the KD head ``z_kd`` matches a (vision-language zero-shot)
teacher on labelled and unlabelled ones. Each step takes one labelled batch ``L`` and one unlabelled
batch ``U`` (the official two loaders; the data set ``semi`` with ``batches: paired``,
:class:`mmkd.data.PairedBatches`) and minimises

    0.5 * CE_L(z_ce, y) + 0.5 * (KD_L(z_kd, z_t) + KD_U(z_kd, z_t)),

``KD = T^2 * KL(softmax(z_t / T) || softmax(z_kd / T))`` averaged over its batch, T = 2: the terms
``ce`` (weight 0.5; it averages over the labelled rows) and ``kd`` (weight 1: its mean over the
``|L| + |U|`` rows equals ``0.5 * (KD_L + KD_U)`` when the two batches have the same size). At inference

    p = (1 - alpha) * softmax(z_ce) + alpha * softmax(z_kd / beta),

(:func:`combine`), ``alpha`` and ``beta`` picked on the validation split by :func:`search_alpha_beta`
(:func:`calibrate`) after every epoch, the checkpoint kept being the epoch of the best searched
accuracy (``search: epoch``), and stored as buffers, so they are in the state dict and in the
exported graph. Our variants: ``batches: mixed`` (labelled and unlabelled items shuffled into one
batch) and ``search: end`` (one search after the fit, on the epoch of the best ``val/acc``).

In a config: ``student: {name: dual_head, features: [kd_head], args: {backbone: ..., inference:
combine}}``, the terms ``ce`` (on logits; label -1 = unlabelled is ignored) and ``kd`` with
``student: features.kd_head``, ``data: {name: semi, args: {name: <data set>, fraction: 0.01,
batches: paired}}``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.data import loader

if TYPE_CHECKING:
    from .model import DualHead

ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
BETAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


def combine(z_ce: Tensor, z_kd: Tensor, alpha: Tensor | float, beta: Tensor | float) -> Tensor:
    """``log((1 - alpha) * softmax(z_ce) + alpha * softmax(z_kd / beta))``, computed as a log-sum-exp."""
    alpha = torch.as_tensor(alpha, dtype=z_ce.dtype, device=z_ce.device)
    parts = torch.stack([torch.log(1 - alpha) + F.log_softmax(z_ce, dim=-1),
                         torch.log(alpha) + F.log_softmax(z_kd / beta, dim=-1)])
    return torch.logsumexp(parts, dim=0)


def search_alpha_beta(z_ce: Tensor, z_kd: Tensor, labels: Tensor, alphas: Sequence[float] = ALPHAS,
                      betas: Sequence[float] = BETAS) -> tuple[float, float, float]:
    """The ``(alpha, beta)`` of the grid whose combined prediction is most accurate on the labelled
    instances (label >= 0); ties go to the lower negative log-likelihood, then to the first in grid order
    (alpha outer, beta inner). Returns ``(alpha, beta, accuracy)``."""
    keep = labels >= 0
    z_ce, z_kd, y = z_ce[keep].double(), z_kd[keep].double(), labels[keep]
    if not len(y):
        raise ValueError("search_alpha_beta: no labelled instances (all labels are negative)")
    best, best_key = None, None
    for a in alphas:
        for b in betas:
            log_p = combine(z_ce, z_kd, a, b)
            key = ((log_p.argmax(1) == y).double().mean().item(), -F.nll_loss(log_p, y).item())
            if best_key is None or key > best_key:
                best, best_key = (float(a), float(b), key[0]), key
    return best


@torch.no_grad()
def calibrate(model: DualHead, dataset, keys: Sequence[str], batch_size: int = 256,
              label_key: str = "label") -> dict[str, float]:
    """Pick DHO's ``alpha``/``beta`` on ``dataset`` (the validation split) with :func:`search_alpha_beta`
    and store them in ``model``'s buffers; returns ``{"alpha", "beta", "acc"}`` (``acc``: validation accuracy)."""
    training, device = model.training, model.alpha.device
    model.eval()
    zs, ys = [], []
    for batch in loader(dataset, batch_size):
        zs.append(model.heads(*[batch[k].to(device) for k in keys]))
        ys.append(batch[label_key])
    alpha, beta, acc = search_alpha_beta(torch.cat([z[0] for z in zs]).cpu(), torch.cat([z[1] for z in zs]).cpu(),
                                         torch.cat(ys))
    model.alpha.fill_(alpha)
    model.beta.fill_(beta)
    model.train(training)
    return {"alpha": alpha, "beta": beta, "acc": acc}
