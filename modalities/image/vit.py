"""A small Vision Transformer for 32x32 images (the heterogeneous students of OFA-KD on CIFAR).

**ViT** (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at
Scale", ICLR 2021), in the layout of DeiT (Touvron et al., ICML 2021) and timm's
``VisionTransformer``: the image is cut into ``patch x patch`` patches, each embedded linearly (a
stride-``patch`` convolution) to ``dim`` channels; a learned class token is prepended and learned
position embeddings are added; then ``depth`` pre-norm blocks

    x = x + attn(ln1(x)),   x = x + mlp(ln2(x)),   mlp = Linear(dim, r dim) -> GELU -> Linear(r dim, dim)

(multi-head self-attention of ``heads`` heads with a bias on q, k, v; MLP ratio ``r``), a final
LayerNorm, the class token as the embedding and a linear classifier. ``vit_tiny``: patch 4 (a 32x32
image is 8x8 = 64 patches, 65 tokens), DeiT-Tiny's width (``dim = 192``, 3 heads, r = 4) at
``depth = 6`` (DeiT-Tiny has 12 at 224x224 with patch 16). No dropout or stochastic depth.
Initialised as timm does: linear layers and the position embeddings truncated normal (std 0.02),
biases 0, the class token normal (std 1e-6), LayerNorm weight 1 and bias 0.

A :class:`~mmkd.models.Classifier` (``head``, ``num_features = dim``). Feature paths: ``blocks.<i>``
(the tokens ``[batch, 1 + patches, dim]`` after block ``i``, class token first), ``norm`` (the
normalised tokens) and ``pool`` (the class token ``[batch, dim]``, the embedding the head reads).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import COUNT, POSITIVE
from mmkd.models import Classifier
from mmkd.registry import MODELS


class Attention(nn.Module):
    """Multi-head self-attention over ``[batch, tokens, dim]`` with one ``qkv`` projection."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassToken(nn.Module):
    """``[batch, tokens, dim] -> [batch, dim]``: the first (class) token."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class VisionTransformer(Classifier, nn.Module):
    """A ViT with a class token for small images (module docstring); ``in_shape`` is ``[channels,
    height, width]``, both sides a multiple of ``patch``."""

    classifier_path = "head"

    def __init__(self, num_classes: int, in_shape: Sequence[int], patch: int = 4, dim: int = 192, depth: int = 6,
                 heads: int = 3, mlp_ratio: float = 4.0):
        super().__init__()
        if len(in_shape) != 3 or in_shape[1] % patch or in_shape[2] % patch:
            raise ValueError(f"vit: input shape {tuple(in_shape)} is not [channels, height, width] with both sides a "
                             f"multiple of patch={patch}; choose a patch size that divides the image")
        if dim % heads:
            raise ValueError(f"vit: dim={dim} is not a multiple of heads={heads}; choose heads that divide dim")
        tokens = (in_shape[1] // patch) * (in_shape[2] // patch)
        self.patch_embed = nn.Conv2d(in_shape[0], dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + tokens, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = ClassToken()
        self.head = nn.Linear(dim, num_classes)
        self.num_features = dim
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def tokens(self, x: Tensor) -> Tensor:
        """``[batch, C, H, W] -> [batch, 1 + patches, dim]``: patch embeddings after the class token, plus
        the position embeddings."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.norm(self.blocks(self.tokens(x)))))


MODELS.register("vit_tiny", ranges={"patch": COUNT, "dim": COUNT, "depth": COUNT, "heads": COUNT,
                                    "mlp_ratio": POSITIVE})(VisionTransformer)
