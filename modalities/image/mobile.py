"""Small CIFAR students of the distillation literature (CRD's ``MobileNetV2`` and ``ShuffleV2``).

**MobileNetV2** (Sandler et al., CVPR 2018): a stride-2 3x3 stem of ``32w`` channels, then inverted
residual blocks ``x -> [x +] bn(conv1x1(relu(bn(dwconv3x3(relu(bn(conv1x1_expand(x))))))))`` (expansion
``t``, the residual where stride is 1 and widths agree) in seven stages ``(t, c, n, s)`` = (1, 16, 1, 1),
(t, 24, 2, 1), (t, 32, 3, 2), (t, 64, 4, 2), (t, 96, 3, 1), (t, 160, 3, 2), (t, 320, 1, 1) with widths
``c * w``, a 1x1 convolution to 1280 channels, pooling and the classifier. ``mobilenetv2``: ``t = 6``,
``w = 0.5`` (CRD's CIFAR student).

**ShuffleNetV2** (Ma et al., ECCV 2018), CRD's CIFAR variant: a 1x1 stem of 24 channels (stride 1, no
max-pooling), stages of 116, 232, 464 channels (3, 7, 3 units); a unit splits the channels in half,
transforms one half by ``relu(bn(conv1x1(bn(dwconv3x3(relu(bn(conv1x1(x))))))))``, concatenates and
shuffles the channels (2 groups); a stage's first unit halves the resolution with both halves
transformed. Then a 1x1 convolution to 1024 channels, pooling and the classifier.

Both are :class:`~mmkd.models.Classifier` s (``fc``); ``pool`` is the pooled embedding.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mmkd.models import Classifier
from mmkd.registry import MODELS


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
    return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        self.residual = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(conv_bn(c_in, mid, 1), conv_bn(mid, mid, 3, stride, groups=mid),
                                  conv_bn(mid, c_out, 1, relu=False))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(Classifier, nn.Module):
    """MobileNetV2 for CIFAR, expansion ``expand`` and width multiplier ``width`` (module docstring)."""

    classifier_path = "fc"
    STAGES = ((1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2), (None, 96, 3, 1),
              (None, 160, 3, 2), (None, 320, 1, 1))

    def __init__(self, num_classes: int, in_shape: Sequence[int], expand: int = 6, width: float = 0.5):
        super().__init__()
        c = int(32 * width)
        self.stem = conv_bn(in_shape[0], c, 3, 2)
        blocks = []
        for t, ch, n, s in self.STAGES:
            out = int(ch * width)
            for i in range(n):
                blocks.append(InvertedResidual(c, out, s if i == 0 else 1, t or expand))
                c = out
        self.blocks = nn.Sequential(*blocks)
        last = int(1280 * width) if width > 1.0 else 1280
        self.head_conv = conv_bn(c, last, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(last, num_classes)
        self.num_features = last

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.head_conv(self.blocks(self.stem(x)))))


def shuffle(x: Tensor, groups: int = 2) -> Tensor:
    """Channel shuffle: ``[B, g*k, H, W] -> [B, k*g, H, W]`` interleaving the ``groups``."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ShuffleUnit(nn.Module):
    """A ShuffleNetV2 unit: stride 1 transforms half the channels; stride 2 both halves (``c_in -> c_out``)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        mid = c_out // 2
        c_branch = c_in if stride == 2 else c_in // 2
        self.right = nn.Sequential(conv_bn(c_branch, mid, 1), conv_bn(mid, mid, 3, stride, groups=mid, relu=False),
                                   conv_bn(mid, mid, 1))
        self.left = nn.Sequential(conv_bn(c_in, c_in, 3, stride, groups=c_in, relu=False),
                                  conv_bn(c_in, mid, 1)) if stride == 2 else None

    def forward(self, x: Tensor) -> Tensor:
        if self.left is None:
            keep, work = x.chunk(2, dim=1)
            return shuffle(torch.cat([keep, self.right(work)], 1))
        return shuffle(torch.cat([self.left(x), self.right(x)], 1))


class ShuffleNetV2(Classifier, nn.Module):
    """ShuffleNetV2 for CIFAR (module docstring)."""

    classifier_path = "fc"

    def __init__(self, num_classes: int, in_shape: Sequence[int], widths: Sequence[int] = (116, 232, 464),
                 units: Sequence[int] = (3, 7, 3), last: int = 1024):
        super().__init__()
        self.stem = conv_bn(in_shape[0], 24, 1)
        c, stages = 24, []
        for w, n in zip(widths, units):
            stages += [ShuffleUnit(c, w, 2), *(ShuffleUnit(w, w) for _ in range(n))]
            c = w
        self.stages = nn.Sequential(*stages)
        self.head_conv = conv_bn(c, last, 1)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(last, num_classes)
        self.num_features = last

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.head_conv(self.stages(self.stem(x)))))


MODELS.register("mobilenetv2")(MobileNetV2)
MODELS.register("shufflenetv2")(ShuffleNetV2)
