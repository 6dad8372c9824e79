"""Small generic models registered by name: an MLP and a CNN; the :class:`Classifier` contract of
models that other models wrap, and :func:`strip_head`.

Factories receive ``num_classes`` and ``in_shape`` (the shape of one input item) from the data set,
plus the model's own arguments from the config.
"""
from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor, nn

from mmkd.checks import COUNT, FRACTION, PROBABILITY, Each
from mmkd.registry import MODELS


class Generative:
    """A model that continues token sequences (a causal language model): subclass this mixin before
    ``nn.Module`` and implement :meth:`generate`."""

    def generate(self, ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> Tensor:
        """The ``[batch, max_new_tokens]`` tokens continuing ``ids`` ``[batch, time]``: greedy at
        ``temperature=0``, else sampled at that temperature from the top-p nucleus (seeded)."""
        raise NotImplementedError


class Classifier:
    """The classifier-head contract (timm's): a model that ends in a classifier fed by an embedding.

    A model implements it by subclassing this mixin before ``nn.Module`` (``class M(Classifier,
    nn.Module)``), setting ``num_features`` and keeping its classifier in the sub-module at
    ``classifier_path``. Wrappers (``fusion``'s encoders, ``dual_head``'s backbone) remove the
    classifier through :func:`strip_head` and read the embedding from ``forward``.

    Attributes:
        num_features: the width of the embedding the classifier reads (``[batch, num_features]``).
        classifier_path: the classifier's module path (default ``head``; ``fc`` for torchvision's
            ResNet; a path such as ``head.2`` for the last layer of a sequential head).

    Methods:
        get_classifier(): the classifier module.
        reset_classifier(num_classes=0): ``0`` replaces the classifier by ``nn.Identity``, so that
            ``forward`` returns the embedding ``[batch, num_features]``; ``num_classes > 0`` puts a
            freshly initialised ``nn.Linear(num_features, num_classes)`` there (``[batch, num_classes]``).

    The mixin adds no parameter or buffer: state-dict keys and ``forward`` are the model's own.
    """

    num_features: int
    classifier_path: str = "head"

    def get_classifier(self) -> nn.Module:
        """The classifier module (at ``classifier_path``)."""
        return self.get_submodule(self.classifier_path)

    def reset_classifier(self, num_classes: int = 0) -> None:
        """Replace the classifier: ``nn.Identity`` for ``num_classes=0``, else a fresh linear layer
        ``num_features -> num_classes`` on the device and dtype of the model's parameters."""
        if num_classes < 0:
            raise ValueError(f"reset_classifier: num_classes must be >= 0, got {num_classes}")
        if num_classes:
            ref = next(self.get_classifier().parameters(), None)
            if ref is None:
                ref = next(self.parameters(), None)
            kw = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
            head: nn.Module = nn.Linear(self.num_features, num_classes, **kw)
        else:
            head = nn.Identity()
        parent, _, name = self.classifier_path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, name, head)


def strip_head(model: nn.Module, where: str) -> int:
    """Remove ``model``'s classifier so that its ``forward`` returns the embedding it was fed; return the
    embedding's width.

    A :class:`Classifier` is stripped through its contract (``reset_classifier(0)``, width
    ``num_features``). A foreign model (e.g. a torchvision one) must have a linear ``head`` or, as in
    torchvision, ``fc``, which is replaced by ``nn.Identity``. Anything else is a one-line ``ValueError``
    naming ``where``.
    """
    if isinstance(model, Classifier):
        width = model.num_features
        model.reset_classifier(0)
        return width
    for attr in ("head", "fc"):
        layer = getattr(model, attr, None)
        if isinstance(layer, nn.Linear):
            setattr(model, attr, nn.Identity())
            return layer.in_features
    raise ValueError(f"{where}: {type(model).__name__} has no linear `head` or `fc` classifier to remove; "
                     "give a model that implements mmkd.models.Classifier or ends in one")


@MODELS.register("mlp", ranges={"hidden": Each(COUNT), "dropout": PROBABILITY, "bn_momentum": FRACTION})
class MLP(Classifier, nn.Module):
    """Flatten, then ``Linear -> ReLU -> Dropout`` per hidden layer, then a linear classifier.

    ``batch_norm`` puts a BatchNorm after each hidden Linear; ``bn_momentum`` is its running-statistics
    momentum (1.0: evaluation uses the last training batch's statistics, right for full-batch training
    on one graph, where a small momentum would leave the statistics far behind for hundreds of epochs).

    A :class:`Classifier`: ``num_features`` is the last hidden width (the flattened input width
    without hidden layers).
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
        self.num_features = width

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


@MODELS.register("cnn", ranges={"channels": Each(COUNT), "dropout": PROBABILITY})
class CNN(Classifier, nn.Module):
    """``Conv3x3 -> BatchNorm -> ReLU`` blocks (the second and later ones stride 2), global average
    pooling, dropout, and a linear classifier. Input ``[batch, channels, height, width]``.

    A :class:`Classifier`: ``num_features`` is ``channels[-1]``."""

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
        self.num_features = c_in

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)))
