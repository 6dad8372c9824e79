"""Small generic models registered by name: an MLP and a CNN.

Factories receive ``num_classes`` and ``in_shape`` (the shape of one input item) from the data set,
plus the model's own arguments from the config.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from mmkd.checks import COUNT, FRACTION, PROBABILITY, Each
from mmkd.registry import MODELS


@MODELS.register("mlp", ranges={"hidden": Each(COUNT), "dropout": PROBABILITY, "bn_momentum": FRACTION})
class MLP(nn.Module):
    """Flatten, then ``Linear -> ReLU -> Dropout`` per hidden layer, then a linear classifier.

    ``batch_norm`` puts a BatchNorm after each hidden Linear; ``bn_momentum`` is its running-statistics
    momentum (1.0: evaluation uses the last training batch's statistics, right for full-batch training
    on one graph, where a small momentum would leave the statistics far behind for hundreds of epochs).
    """

    def __init__(self, num_classes: int, in_shape: Sequence[int], hidden: Sequence[int] = (128,),
                 dropout: float = 0.0, batch_norm: bool = False, bn_momentum: float = 0.1):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(in_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), *([nn.BatchNorm1d(h, momentum=bn_momentum)] if batch_norm else []),
                       nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@MODELS.register("cnn", ranges={"channels": Each(COUNT), "dropout": PROBABILITY})
class CNN(nn.Module):
    """``Conv3x3 -> BatchNorm -> ReLU`` blocks (the second and later ones stride 2), global average
    pooling, dropout, and a linear classifier. Input ``[batch, channels, height, width]``."""

    def __init__(self, num_classes: int, in_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                 dropout: float = 0.0):
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = in_shape[0]
        for i, c in enumerate(channels):
            blocks += [nn.Conv2d(c_in, c, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout))
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)))
