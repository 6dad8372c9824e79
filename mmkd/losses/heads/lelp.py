"""LELP: distillation into pseudo-subclasses cut from linear projections of the teacher's embedding.

With few classes the teacher's probabilities carry little information, so LELP splits each class
into ``S`` pseudo-subclasses read off the teacher's penultimate embedding ``h`` (the input of its
linear classifier ``z = W h + b``) and distils the ``C x S`` distribution. Once, over the training
set: for each class ``c``, the mean ``mu_c`` of the teacher's embeddings of the class and ``S``
orthonormal directions ``v_{c,1..S}``: the top ``S`` principal components of the class's embeddings
projected onto the null space of ``W`` (what the logits do not already say), turned by a random
``S x S`` rotation so that each direction has the same variance in expectation. Then, per instance,

    a_{c,s} = <v_{c,s}, h - mu_c>                                  (the subclass coordinates)
    q_{c,s} = softmax(z / T)_c * softmax_s(a_{c,.} / beta)_s         (the pseudo-subclass targets)
    LELP(u, h) = T^2 * sum_{c,s} q_{c,s} (log q_{c,s} - log softmax(u / T)_{c,s})

where ``u`` are the ``C x S`` logits of the student's pseudo-class head (a linear layer on the
student's embedding, :class:`PseudoClassHead`), ``beta`` the subclass temperature and ``T`` the
distillation temperature. ``sum_s q_{c,s}`` is the teacher's class probability, and the student's
class probability is likewise the sum of its subclasses' probabilities. Loo, Iliopoulos, Hu and Vee,
"Linear Projections of Teacher Embeddings for Few-Class Distillation" (arXiv:2409.20449, 2024).

Followed: the paper's Section 3 (per-class PCA, the null-space projection, the random rotation, the
split with a subclass temperature, one KL over the ``C x S`` pseudo-classes); no official code was
found. Its random-projection ablation is ``directions="random"``; ``null_space=False`` skips the
projection. What differs here, or is our reading where the paper's text left it open:

- ``W`` and ``b`` are fitted by least squares to the teacher's logits from the embedding over the
  training set (exact for a linear head on that feature; a mismatch is refused), so a cached teacher,
  which keeps outputs but no classifier, works too; the loss computes the teacher's ``z`` from ``h``;
- the paper's student has only the ``C x S`` head, predicts the class of largest summed probability
  and trains at ``alpha = 0`` (no CE). Here the student keeps its own class head, which is what mmkd
  evaluates and deploys, and the pseudo-class head is the term's module on the same embedding; a
  config adds CE on labels to train the class head (the paper's ``alpha > 0``);
- the split is the teacher's class probability times a softmax over the class's coordinates, so the
  subclasses of a class sum to its probability; the coordinates are centred on the class mean (the
  PCA coordinates); each class draws its own rotation;
- the defaults ``subclasses=4``, ``temperature=4``, ``beta=1`` are ours (the paper grid-searches
  them); ``beta`` is in the units of the embedding, so the fit start logs the coordinates' spread.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.checks import COUNT, POSITIVE, SEED, TEMPERATURE
from mmkd.losses import reduce, register_loss
from mmkd.losses.features import same_batch

log = logging.getLogger("mmkd")

DIRECTIONS = ("pca", "random")


def affine_fit(h: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Least squares ``W [C, D]`` and ``b [C]`` with ``z ~ h W^T + b`` over the rows of ``h [N, D]``
    and ``z [N, C]``, in float64 (the minimum-norm solution when the rows do not determine it)."""
    x = torch.cat([h.double(), h.new_ones(len(h), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(x, z.double(), driver="gelsd").solution
    return sol[:-1].T.contiguous(), sol[-1].contiguous()


def null_basis(weight: Tensor) -> Tensor:
    """``[D, D - r]``: an orthonormal basis of the null space of ``weight [C, D]`` of rank ``r`` (the
    directions the logits ``weight @ h`` do not see)."""
    _, sv, vh = torch.linalg.svd(weight, full_matrices=True)
    rank = int((sv > sv.max().clamp(min=1e-300) * max(weight.shape) * torch.finfo(sv.dtype).eps).sum())
    return vh[rank:].T


def rotation(n: int, generator: torch.Generator) -> Tensor:
    """A random ``n x n`` rotation, uniform (Haar) over the orthogonal matrices, in float64."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def class_directions(h: Tensor, y: Tensor, num_classes: int, subclasses: int, weight: Tensor | None = None,
                     directions: str = "pca", seed: int = 0) -> tuple[Tensor, Tensor]:
    """The class means ``[C, D]`` of the embeddings ``h [N, D]`` (rows labelled ``y``; negative labels
    left out) and ``subclasses`` orthonormal directions per class ``[C, S, D]``, in float64.

    ``directions="pca"``: the top principal components of the class's embeddings, each class's turned
    by its own random rotation; ``"random"``: random orthonormal directions. With ``weight`` (the
    teacher's classifier) the embeddings are first projected onto its null space, so every direction
    lies there. ``seed`` draws the rotations (or the random directions)."""
    if directions not in DIRECTIONS:
        raise ValueError(f"lelp directions={directions!r}; choose from: {', '.join(DIRECTIONS)}")
    h = h.double()
    basis = null_basis(weight.double()) if weight is not None else torch.eye(h.shape[1], dtype=torch.float64)
    if subclasses > basis.shape[1]:
        raise ValueError(f"lelp: subclasses={subclasses} directions, but the embedding has only {basis.shape[1]} "
                         "dimensions outside the classifier's rows; give fewer subclasses (or null_space: false)")
    g = torch.Generator().manual_seed(seed)
    means, dirs = h.new_zeros(num_classes, h.shape[1]), []
    for c in range(num_classes):
        rows = h[y == c]
        if len(rows):
            means[c] = rows.mean(0)
        if directions == "random":
            q, _ = torch.linalg.qr(torch.randn(basis.shape[1], subclasses, generator=g, dtype=torch.float64))
            dirs.append((basis @ q).T)
            continue
        x = (rows - means[c]) @ basis  # the class's centred embeddings in null-space coordinates
        _, vectors = torch.linalg.eigh(x.T @ x)  # ascending eigenvalues
        top = vectors[:, -subclasses:].flip(1)
        dirs.append(rotation(subclasses, g) @ (basis @ top).T)
    return means, torch.stack(dirs)


def pseudo_targets(h: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, directions: Tensor,
                   temperature: float, beta: float) -> Tensor:
    """``[B, C * S]`` log-probabilities ``log q_{c,s} = log softmax(z / T)_c + log softmax_s(a_{c,.} /
    beta)_s`` of the teacher embeddings ``h [B, D]``, ``z = h W^T + b`` and ``a_{c,s} = <v_{c,s}, h -
    mu_c>`` (``weight [C, D]``, ``bias [C]``, ``mean [C, D]``, ``directions [C, S, D]``); index
    ``c * S + s``."""
    log_class = F.log_softmax((h @ weight.T + bias) / temperature, dim=1)
    coords = torch.einsum("bd,csd->bcs", h, directions) - torch.einsum("cd,csd->cs", mean, directions)
    return (log_class[:, :, None] + F.log_softmax(coords / beta, dim=2)).flatten(1)


class PseudoClassHead(nn.Module, Callback):
    """The student's pseudo-class head (a linear layer from its embedding to ``num_classes *
    subclasses`` logits, trained with it) and, in buffers saved with it, the teacher's classifier
    (fitted), class means and subclass directions, computed at the start of the first fit from the
    (single, frozen) teacher over the training set in order; a resumed fit keeps them."""

    def __init__(self, student_shape: Sequence[int] | None, teacher_shape: Sequence[int] | None,
                 num_classes: int, subclasses: int = 4, null_space: bool = True, directions: str = "pca",
                 seed: int = 0):
        super().__init__()
        if student_shape is None or teacher_shape is None:
            raise ValueError("lelp: it reads both sides' embeddings; give the term student: features.<path> and "
                             "teacher: features.<path>, and a teacher")
        if directions not in DIRECTIONS:
            raise ValueError(f"lelp directions={directions!r}; choose from: {', '.join(DIRECTIONS)}")
        self.num_classes, self.subclasses = int(num_classes), int(subclasses)
        self.null_space, self.mode, self.seed = bool(null_space), directions, int(seed)
        width = math.prod(teacher_shape)
        self.head = nn.Linear(math.prod(student_shape), self.num_classes * self.subclasses)
        self.register_buffer("weight", torch.zeros(self.num_classes, width))
        self.register_buffer("bias", torch.zeros(self.num_classes))
        self.register_buffer("mean", torch.zeros(self.num_classes, width))
        self.register_buffer("directions", torch.zeros(self.num_classes, self.subclasses, width))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, student_features: Tensor) -> Tensor:
        """The pseudo-class logits ``[B, C * S]`` of the student's embeddings (index ``c * S + s``)."""
        return self.head(student_features.flatten(1))

    def fit_projections(self, h: Tensor, z: Tensor, y: Tensor) -> None:
        """Set the buffers from the teacher's embeddings ``h [N, D]``, logits ``z [N, C]`` and the
        labels ``y [N]``; refuse logits that are not an affine function of the embedding."""
        h, z = h.double().flatten(1), z.double()
        weight, bias = affine_fit(h, z)
        err = float((h @ weight.T + bias - z).abs().max()) / max(float(z.abs().max()), 1e-12)
        if err > 1e-3:
            raise ValueError(f"lelp: the teacher's logits are not an affine function of the feature it reads "
                             f"(relative error {err:.2g}); read the embedding its linear classifier takes "
                             "(e.g. teacher: features.pool)")
        mean, dirs = class_directions(h, y, self.num_classes, self.subclasses, weight if self.null_space else None,
                                      self.mode, self.seed)
        for buf, value in ((self.weight, weight), (self.bias, bias), (self.mean, mean), (self.directions, dirs)):
            buf.copy_(value.to(buf))
        self.fitted.fill_(True)
        labelled = y >= 0
        coords = torch.einsum("nd,nsd->ns", h[labelled] - mean[y[labelled]], dirs[y[labelled]])
        log.info("lelp: %d classes x %d subclasses; the subclass coordinates' std is %.3g (beta is in these units)",
                 self.num_classes, self.subclasses, float(coords.std()) if coords.numel() > 1 else 0.0)

    @torch.no_grad()
    def on_fit_start(self, trainer, module) -> None:
        from mmkd.data import SelfBatching, loader
        from mmkd.distiller import pick
        from mmkd.trainer import to_device

        if bool(self.fitted):  # restored by a resumed fit (or fitted by an earlier one)
            return
        term = next(t for t in module.terms if t.module is self)
        if len(module.teachers) != 1:
            raise ValueError(f"lelp: the projections come from one teacher; the Distiller has {len(module.teachers)}")
        if isinstance(trainer.train_data, SelfBatching):
            raise ValueError("lelp: the training set makes its own batches; the projections need a plain labelled "
                             "data set")
        teacher, hs, zs, ys = module.teachers[0], [], [], []
        for batch in loader(trainer.train_data, trainer.cfg.batch_size, num_workers=trainer.cfg.num_workers):
            batch = to_device(batch, trainer.device)
            out = teacher(batch)
            hs.append(pick(out, term.teacher).flatten(1).cpu())
            zs.append(out.logits.cpu())
            ys.append(batch[module.label_key].cpu())
        if not hs:
            raise ValueError("lelp: the training set is empty")
        z = torch.cat(zs)
        if z.shape[1] != self.num_classes:
            raise ValueError(f"lelp: the teacher has {z.shape[1]} logits; the head was made for "
                             f"{self.num_classes} classes")
        self.fit_projections(torch.cat(hs), z, torch.cat(ys))


@register_loss("lelp", teacher=True, per_sample=True, module=PseudoClassHead,
               ranges={"subclasses": COUNT, "temperature": TEMPERATURE, "beta": POSITIVE, "seed": SEED})
def lelp(student_features, teacher_features, target=None, *, module=None, temperature=4.0, beta=1.0,
         reduction="mean"):
    """``T^2 KL(q || softmax(u / T))`` over the ``C x S`` pseudo-subclasses, ``u = module(student
    embedding)``, ``q`` the teacher's pseudo-subclass targets (:func:`pseudo_targets`) of its embedding.

    LELP, Loo et al. 2024 (module docstring). ``module`` is the term's :class:`PseudoClassHead`, which
    holds the projections; the teacher's side is a constant. ``target`` is not read."""
    if module is None:
        raise ValueError("loss lelp: no pseudo-class head; use it as a loss term (Term('lelp', student=..., "
                         "teacher=...)), which makes one")
    if not bool(module.fitted):
        raise ValueError("loss lelp: the projections are not computed yet; they are set when the fit starts "
                         "(the term's module is a callback of the Distiller's fit)")
    same_batch("lelp", student_features, teacher_features)
    h = teacher_features.detach().flatten(1).to(module.weight.dtype)
    if h.shape[1] != module.weight.shape[1]:
        raise ValueError(f"lelp: teacher features of width {h.shape[1]}; the projections were made for "
                         f"{module.weight.shape[1]}")
    log_q = pseudo_targets(h, module.weight, module.bias, module.mean, module.directions, temperature, beta)
    log_s = F.log_softmax(module(student_features) / temperature, dim=1)
    per_sample = (log_q.exp() * (log_q - log_s)).sum(1) * temperature**2
    return reduce(per_sample, reduction)
