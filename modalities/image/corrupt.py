"""A fixed distribution shift of uint8 images: colour shifts and strong corruptions, seeded per image.

Each image ``x`` (on the [0, 1] scale) of a set is changed once, by draws from a generator seeded by
``(seed, item)`` (the same on every machine, whatever else the set holds), at ``strength`` ``s``:

    colour:    x <- clip(M x + b),   M = I + s N(0, 0.25^2)^{3 x 3} (channel mixing, a hue and
                                     saturation shift), b ~ s N(0, 0.1^2) per channel
    contrast:  x <- clip(m + c (x - m)),   c = exp(s U(-0.7, 0.7)), m the image's mean
    blur:      a Gaussian blur of sigma ~ s U(0, 1.2) pixels (none below 0.3)
    noise:     x <- clip(x + s N(0, 0.06^2)) per pixel

(in that order; ``s = 0`` leaves the images as they are). It is the shifted pool of KD^3's setting
("the original training data is unavailable; the student learns from a shifted pool"), e.g.
``data.args.corrupt=1.0`` on the images of ``cifar10`` the teacher never saw (``offset_per_class``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def item_generator(seed: int, item: int) -> torch.Generator:
    """The generator of item ``item``'s corruption: distinct for every pair, the same on every machine."""
    return torch.Generator().manual_seed((seed * 1_000_003 + item) % (2**63 - 1))


def blur(x: Tensor, sigma: float) -> Tensor:
    """``x`` (``[C, H, W]``) blurred by a separable Gaussian of ``sigma`` pixels (reflect padding)."""
    r = max(1, math.ceil(2 * sigma))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=x.dtype).square() / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def corrupt(images: Tensor, strength: float, seed: int = 0, first: int = 0) -> Tensor:
    """``images`` (uint8 ``[N, C, H, W]``) under the seeded shift of the module docstring; item ``n``
    draws from the generator of ``first + n``. ``strength`` 0 returns them unchanged."""
    if strength == 0:
        return images
    out = torch.empty_like(images)
    c = images.shape[1]
    for n, im in enumerate(images):
        g = item_generator(seed, first + n)
        x = im.float() / 255
        mix = torch.eye(c) + strength * 0.25 * torch.randn(c, c, generator=g)
        bias = strength * 0.1 * torch.randn(c, 1, 1, generator=g)
        contrast = math.exp(strength * (1.4 * float(torch.rand((), generator=g)) - 0.7))
        sigma = strength * 1.2 * float(torch.rand((), generator=g))
        noise = strength * 0.06 * torch.randn(x.shape, generator=g)
        x = (torch.einsum("ij,jhw->ihw", mix, x) + bias).clamp(0, 1)
        x = (x.mean() + contrast * (x - x.mean())).clamp(0, 1)
        if sigma >= 0.3:
            x = blur(x, sigma)
        out[n] = ((x + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    return out
