"""The CIFAR networks of the distillation literature (CRD, mdistiller), registered by name.

**ResNets for CIFAR** (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2):
a 3x3 convolution stem of ``widths[0]`` channels, then three stages of ``n = (depth - 2) / 6`` basic
blocks (``x -> relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))``) of ``widths[1:]`` channels, the
second and third stage starting with stride 2 (a 1x1 convolution + BatchNorm shortcut where the shape
changes), global average pooling and a linear classifier. ``resnet8/14/20/32/44/56/110``: widths
16, 16, 32, 64; ``resnet8x4``, ``resnet32x4``: 32, 64, 128, 256 (mdistiller's CIFAR-100 pairs:
resnet32x4 -> resnet8x4, resnet56 -> resnet20).

**Wide ResNets** (Zagoruyko and Komodakis, "Wide Residual Networks", BMVC 2016): WRN-``depth``-``k``,
``n = (depth - 4) / 6`` pre-activation blocks (``x -> conv3x3(drop(relu(bn(conv3x3(relu(bn(x))))))) +
shortcut``) a stage, of 16k, 32k, 64k channels after a 16-channel stem, then BatchNorm, ReLU, pooling and
the classifier. ``wrn_16_1``, ``wrn_16_2``, ``wrn_40_1``, ``wrn_40_2`` (CRD's wrn_40_2 -> wrn_16_2).

Convolutions are initialised with Kaiming normal (fan-out), BatchNorm with weight 1 and bias 0.
All are :class:`~mmkd.models.Classifier` s (``fc`` holds the classifier); their stages ``layer1``
to ``layer3`` and ``pool`` (the pooled embedding) are the module paths feature losses name. A ResNet
made with ``preact=True`` also exposes ``preact1`` to ``preact3``: each stage's output before its last
ReLU (the sum of the last block's residual branch and shortcut; mdistiller's ``preact_feats``, which
OFD reads), through parameter-free identities, so the weights are those of ``preact=False``.
``cifar_resnet`` takes the blocks, kernel sizes and widths of each stage as arguments.
Input ``[batch, 3, 32, 32]`` (any size works; pooling is adaptive).
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import PROBABILITY
from mmkd.models import Classifier
from mmkd.registry import MODELS


class BasicBlock(nn.Module):
    """Post-activation basic block: two 3x3 convolutions with BatchNorm, the shortcut added before the
    last ReLU. The sum before that ReLU passes through the modules of ``taps`` (identities that the
    network registers as its own feature paths; not sub-modules of the block)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, kernel: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, kernel, 1, kernel // 2, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.taps: list[nn.Module] = []

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))) + self.shortcut(x)
        for tap in self.taps:
            out = tap(out)
        return F.relu(out)


class WideBlock(nn.Module):
    """Pre-activation block of a wide ResNet, dropout between its two convolutions."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = F.dropout(F.relu(self.bn2(self.conv1(pre))), self.dropout, self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(pre))


def _init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(Classifier, nn.Module):
    """A ResNet for CIFAR of ``depth = 6n + 2`` layers and stage ``widths`` (see the module docstring);
    ``preact``: expose each stage's output before its last ReLU as ``preact1`` to ``preact3``.
    ``blocks`` (one count a stage) replaces ``depth``'s ``n`` blocks in every stage, and ``kernels``
    (one odd size a stage) the blocks' 3x3 convolutions: the search space of student searches."""

    classifier_path = "fc"

    def __init__(self, num_classes: int, in_shape: Sequence[int], depth: int = 20,
                 widths: Sequence[int] = (16, 16, 32, 64), preact: bool = False,
                 blocks: Sequence[int] | None = None, kernels: Sequence[int] | None = None):
        super().__init__()
        if blocks is None:
            if (depth - 2) % 6 or depth < 8:
                raise ValueError(f"depth must be 6n + 2 (8, 14, 20, 32, 44, 56, 110), got {depth}")
            blocks = [(depth - 2) // 6] * (len(widths) - 1)
        kernels = [3] * len(blocks) if kernels is None else list(kernels)
        if not len(blocks) == len(kernels) == len(widths) - 1:
            raise ValueError(f"blocks {list(blocks)}, kernels {kernels} and widths {list(widths)}: give one block count "
                             "and one kernel size a stage, and one width more (the stem's)")
        if min(blocks) < 1 or any(k < 1 or k % 2 == 0 for k in kernels) or min(widths) < 1:
            raise ValueError(f"blocks {list(blocks)} must be >= 1, kernels {kernels} odd, widths {list(widths)} >= 1")
        self.stem = nn.Sequential(nn.Conv2d(in_shape[0], widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        c = widths[0]
        for i, (w, n, k) in enumerate(zip(widths[1:], blocks, kernels)):
            blocks_i = [BasicBlock(c if j == 0 else w, w, 2 if i and j == 0 else 1, k) for j in range(n)]
            if preact:
                setattr(self, f"preact{i + 1}", nn.Identity())
                blocks_i[-1].taps.append(getattr(self, f"preact{i + 1}"))
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks_i))
            c = w
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)
        self.num_features = c
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))


class WideResNet(Classifier, nn.Module):
    """WRN-``depth``-``widen`` for CIFAR (see the module docstring)."""

    classifier_path = "fc"

    def __init__(self, num_classes: int, in_shape: Sequence[int], depth: int = 16, widen: int = 2,
                 dropout: float = 0.0):
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"depth must be 6n + 4 (10, 16, 22, 28, 40), got {depth}")
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_shape[0], 16, 3, 1, 1, bias=False)
        c = 16
        for i, w in enumerate((16 * widen, 32 * widen, 64 * widen)):
            blocks = [WideBlock(c if j == 0 else w, w, 2 if i and j == 0 else 1, dropout) for j in range(n)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            c = w
        self.pool = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)
        self.num_features = c
        _init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.layer3(self.layer2(self.layer1(self.stem(x))))))


def _resnet(name: str, depth: int, widths: tuple[int, ...]) -> None:
    def factory(num_classes: int, in_shape: Sequence[int], preact: bool = False) -> CifarResNet:
        return CifarResNet(num_classes, in_shape, depth, widths, preact)

    factory.__doc__ = (f"ResNet-{depth} for CIFAR, stage widths {widths} (:class:`CifarResNet`); ``preact``: "
                       "expose the stages' outputs before their last ReLU (``preact1`` to ``preact3``).")
    factory.__name__ = name
    MODELS.register(name)(factory)


@MODELS.register("cifar_resnet")
def cifar_resnet(num_classes: int, in_shape: Sequence[int], blocks: Sequence[int] = (3, 3, 3),
                 widths: Sequence[int] = (16, 16, 32, 64), kernels: Sequence[int] = (3, 3, 3),
                 preact: bool = False) -> CifarResNet:
    """A CIFAR ResNet of any shape (:class:`CifarResNet`): ``blocks`` basic blocks, ``kernels`` kernel
    sizes and ``widths[1:]`` channels a stage after a ``widths[0]``-channel stem (the defaults are
    ResNet-20); a student search writes its pick as this model."""
    return CifarResNet(num_classes, in_shape, widths=widths, preact=preact, blocks=blocks, kernels=kernels)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _resnet(f"resnet{_depth}", _depth, (16, 16, 32, 64))
for _depth in (8, 32):
    _resnet(f"resnet{_depth}x4", _depth, (32, 64, 128, 256))


def _wrn(name: str, depth: int, widen: int) -> None:
    def factory(num_classes: int, in_shape: Sequence[int], dropout: float = 0.0) -> WideResNet:
        return WideResNet(num_classes, in_shape, depth, widen, dropout)

    factory.__doc__ = f"WRN-{depth}-{widen} for CIFAR (:class:`WideResNet`); ``dropout`` inside its blocks."
    factory.__name__ = name
    MODELS.register(name, ranges={"dropout": PROBABILITY})(factory)


for _depth, _widen in ((16, 1), (16, 2), (40, 1), (40, 2)):
    _wrn(f"wrn_{_depth}_{_widen}", _depth, _widen)
