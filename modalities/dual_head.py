"""Dual-head students: one backbone, a cross-entropy head and a distillation head.

Two methods share the model :class:`DualHead`:

* DHO (Kang et al., "Simple yet Effective Semi-supervised Knowledge Distillation from Vision-Language
  Models via Dual-Head Optimization", arXiv:2505.07675, 2025): the CE head ``z_ce`` learns from the
  labelled instances, the KD head ``z_kd`` matches a (vision-language zero-shot) teacher on labelled and
  unlabelled ones; at inference

      p = (1 - alpha) * softmax(z_ce) + alpha * softmax(z_kd / beta),

  ``alpha`` and ``beta`` picked on the validation split by :func:`search_alpha_beta` (:func:`calibrate`)
  and stored as buffers, so they are in the state dict and in the exported graph.
* Dual-Head KD (Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an
  Auxiliary Head", arXiv:2411.08937, 2024): the main head learns with CE, the auxiliary head with the
  binary KL loss (``bkl``); only the main head predicts (``inference="ce"``); optionally the auxiliary
  head's gradient on the shared features is projected off the CE gradient (:func:`align_gradients`).

Wiring through the mixture core: in training the model returns the CE head's logits (the ``logits`` the
``ce`` term reads) and the KD head is a sub-module whose output the Net exposes as the feature
``kd_head``; so a run lists ``features: [kd_head]`` and uses the terms ``ce`` (on logits; label -1 =
unlabelled is ignored) and ``kd``/``bkl`` with ``student: features.kd_head`` against the teacher's
logits. In eval mode the model returns the inference rule's output (log-probabilities for DHO), which
is what ``Trainer.evaluate``, ``mmkd.export`` and ``mmkd predict`` see.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mmkd.build import create_model
from mmkd.checks import FRACTION, POSITIVE, SEED, Range
from mmkd.data import DataSplits, TensorDictDataset, loader
from mmkd.registry import DATASETS, MODELS

from .fusion import strip_head

ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
BETAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 4.0)


class _AlignGradients(torch.autograd.Function):
    """Identity into two branches; backward projects the second branch's gradient off the first's when
    they conflict (PCGrad-style): ``g_2 <- g_2 - min(<g_2, g_1>, 0) / ||g_1||^2 * g_1``, returns ``g_1 + g_2``."""

    @staticmethod
    def forward(ctx, h: Tensor) -> tuple[Tensor, Tensor]:
        return h.clone(), h.clone()

    @staticmethod
    def backward(ctx, g_1: Optional[Tensor], g_2: Optional[Tensor]) -> Tensor:
        if g_1 is None or g_2 is None:
            return g_2 if g_1 is None else g_1
        dot = (g_1 * g_2).sum()
        return g_1 + g_2 - dot.clamp(max=0) / g_1.pow(2).sum().clamp(min=1e-12) * g_1


def align_gradients(h: Tensor) -> tuple[Tensor, Tensor]:
    """Two copies ``(h_ce, h_kd)`` of the shared features ``h`` for the CE and the KD head. In the
    backward pass the KD gradient ``g_kd`` (over the whole batch tensor) is replaced, when
    ``<g_kd, g_ce> < 0``, by its projection ``g_kd - <g_kd, g_ce> / ||g_ce||^2 * g_ce`` orthogonal to
    the CE gradient; ``h`` receives ``g_ce + g_kd``. Trainer-agnostic: it lives in the model's graph."""
    return _AlignGradients.apply(h)


def combine(z_ce: Tensor, z_kd: Tensor, alpha: Tensor | float, beta: Tensor | float) -> Tensor:
    """``log((1 - alpha) * softmax(z_ce) + alpha * softmax(z_kd / beta))``, computed as a log-sum-exp."""
    alpha = torch.as_tensor(alpha, dtype=z_ce.dtype, device=z_ce.device)
    parts = torch.stack([torch.log(1 - alpha) + F.log_softmax(z_ce, dim=-1),
                         torch.log(alpha) + F.log_softmax(z_kd / beta, dim=-1)])
    return torch.logsumexp(parts, dim=0)


class DualHead(nn.Module):
    """A backbone returning features ``[B, width]`` and two linear heads, ``ce_head`` and ``kd_head``.

    ``forward(*inputs)``: in training, the CE head's logits (the KD head's are the ``kd_head`` feature);
    in eval mode, ``inference="combine"`` returns the DHO log-probabilities :func:`combine` with the
    ``alpha``/``beta`` buffers, ``inference="ce"`` the CE head's logits. ``align=True`` puts
    :func:`align_gradients` between the backbone and the heads in training.
    """

    def __init__(self, backbone: nn.Module, width: int, num_classes: int, inference: str = "combine",
                 align: bool = False, alpha: float = 0.5, beta: float = 1.0):
        super().__init__()
        if inference not in ("combine", "ce"):
            raise ValueError(f"dual_head.inference={inference!r}; choose from: combine, ce")
        self.backbone, self.inference, self.align = backbone, inference, align
        self.ce_head, self.kd_head = nn.Linear(width, num_classes), nn.Linear(width, num_classes)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.register_buffer("beta", torch.tensor(float(beta)))

    def heads(self, x: Tensor, *more: Tensor) -> tuple[Tensor, Tensor]:
        """Both heads' logits ``(z_ce, z_kd)`` for the backbone's inputs."""
        h = self.backbone(x, *more).flatten(1)
        h_ce, h_kd = align_gradients(h) if self.align and self.training else (h, h)
        return self.ce_head(h_ce), self.kd_head(h_kd)

    def calibrate(self, dataset, keys: Sequence[str], label_key: str = "label") -> dict[str, float]:
        """Pick ``alpha``/``beta`` on ``dataset`` (the validation split); see :func:`calibrate`. ``mmkd run``
        calls this after training, before the test evaluation, for models that define it. With
        ``inference="ce"`` nothing is picked (``{}``)."""
        return calibrate(self, dataset, keys, label_key=label_key) if self.inference == "combine" else {}

    def forward(self, x: Tensor, *more: Tensor) -> Tensor:
        z_ce, z_kd = self.heads(x, *more)
        if self.training or self.inference == "ce":
            return z_ce
        return combine(z_ce, z_kd, self.alpha, self.beta)


@MODELS.register("dual_head", ranges={"alpha": FRACTION, "beta": POSITIVE})
def dual_head(num_classes: int, in_shape: Any, backbone: Mapping[str, Any], inference: str = "combine",
              align: bool = False, alpha: float = 0.5, beta: float = 1.0) -> DualHead:
    """A :class:`DualHead` on a registered model whose linear classifier (``head`` or ``fc``) is removed.

    Args:
        backbone: ``{name: <registered model>, args: {...}}``, e.g. ``{name: cnn, args: {channels: [16, 32]}}``.
        inference: ``combine`` (DHO) or ``ce`` (Dual-Head KD: main head only).
        align: project the KD head's conflicting gradient off the CE head's (Dual-Head KD).
        alpha, beta: the initial DHO mixing weight and KD-head temperature (set by :func:`calibrate`).
    """
    if isinstance(backbone, DictConfig):
        backbone = OmegaConf.to_container(backbone, resolve=True)
    if "name" not in backbone or set(backbone) - {"name", "args"}:
        raise ValueError(f"dual_head.backbone: expected {{name, args}}, got keys {sorted(backbone)}")
    model = create_model(backbone["name"], num_classes, in_shape, "dual_head.backbone", **(backbone.get("args") or {}))
    width = strip_head(model, "dual_head.backbone")
    return DualHead(model, width, num_classes, inference, align, alpha, beta)


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


def keep_labels(labels: Tensor, fraction: float, seed: int = 0) -> Tensor:
    """A copy of ``labels`` keeping a stratified ``fraction`` of them (per class ``max(1, round(fraction
    * n_c))``, drawn with ``seed``) and marking the rest ``-1`` (unlabelled), e.g. the 1% / 10% settings."""
    if not 0 < fraction <= 1:
        raise ValueError(f"keep_labels: fraction={fraction} must be in (0, 1]")
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(labels, -1)
    for c in labels[labels >= 0].unique():
        idx = (labels == c).nonzero().flatten()
        chosen = idx[torch.randperm(len(idx), generator=g)[:max(1, round(fraction * len(idx)))]]
        out[chosen] = c
    return out


@DATASETS.register("semi", ranges={"fraction": Range(0, 1, low_open=True), "seed": SEED})
def semi(root: str, name: str, args: Optional[Mapping[str, Any]] = None, fraction: float = 0.1,
         seed: int = 0) -> DataSplits:
    """The registered data set ``name`` (with ``args``) whose training labels are cut to a stratified
    ``fraction`` by :func:`keep_labels`; the rest are -1 (unlabelled). Validation and test are unchanged.
    The training split must be a ``TensorDictDataset``."""
    data = DATASETS[name](root=root, **(args or {}))
    train = data.train
    if not isinstance(train, TensorDictDataset) or data.label_key not in train.tensors:
        raise ValueError(f"semi: data set {name!r} has no in-memory training split with {data.label_key!r} labels")
    tensors = {**train.tensors, data.label_key: keep_labels(train.tensors[data.label_key], fraction, seed)}
    data.train = TensorDictDataset(f"{train.name}/semi-{fraction}-{seed}", train.deterministic, **tensors)
    return data
