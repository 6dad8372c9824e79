"""Image encoders: ResNet-18 (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016)
for 1- or 3-channel images of any size, randomly initialised or loaded from a local state dict.

The small CNN for images is the core's ``cnn`` (:class:`mmkd.models.CNN`, feature paths
``features`` and ``pool``).
"""
from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from mmkd.data import DataError
from mmkd.models import Classifier
from mmkd.registry import MODELS

log = logging.getLogger("mmkd")


@MODELS.register("resnet18")
class ResNet18(Classifier, ResNet):
    """torchvision's ResNet-18 for ``[batch, channels, height, width]`` images, ``channels`` 1 or 3.

    Feature paths: ``layer1`` ... ``layer4`` (feature maps; ``layer4`` is ``[batch, 512, h, w]``) and
    ``avgpool`` (the pooled embedding, ``[batch, 512]``); ``fc`` is the linear classifier. The module
    names are torchvision's, so torchvision's state dicts load as they are. A
    :class:`mmkd.models.Classifier` (``num_features`` 512, ``classifier_path`` ``fc``).

    Args:
        num_classes: classifier outputs.
        in_shape: ``(channels, height, width)`` of one image.
        small_input: a 3x3 stride-1 first convolution and no max-pooling (the CIFAR variant, for
            images such as 28x28 or 32x32) instead of the 7x7 stride-2 convolution and max-pooling;
            ``None`` chooses it for images whose shorter side is below 64 pixels.
        weights: path to a local state dict (torchvision's ImageNet ``resnet18-*.pth``, or one saved
            from this model); nothing is downloaded. See :func:`load_resnet_weights`.
    """

    classifier_path = "fc"  # torchvision's name

    def __init__(self, num_classes: int, in_shape: Sequence[int], small_input: Optional[bool] = None,
                 weights: Optional[str] = None):
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if len(in_shape) != 3:
            raise ValueError(f"resnet18: in_shape must be (channels, height, width), got {tuple(in_shape)}")
        channels = in_shape[0]
        self.small_input = min(in_shape[1:]) < 64 if small_input is None else small_input
        if self.small_input:
            self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        elif channels != 3:
            self.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        self.avgpool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = self.fc.in_features
        if weights is not None:
            load_resnet_weights(self, weights)


def load_resnet_weights(model: ResNet18, path: str | os.PathLike) -> None:
    """Load a local ResNet-18 state dict into ``model``, adapting what differs on purpose.

    A 3-channel first convolution loaded into a 1-channel model is summed over its input channels
    (a grey image ``g`` seen as ``(g, g, g)`` gives the same response). A first convolution of
    another kernel size (the ImageNet stem into a ``small_input`` model) and a classifier of another
    class count keep their random initialisation; each is logged. A missing or unreadable file and any
    other mismatch raise :class:`mmkd.data.DataError` naming the file.
    """
    if not os.path.isfile(path):
        raise DataError(f"resnet18.weights: no such file {str(path)!r}; give a local state dict "
                        "(e.g. torchvision's resnet18-f37072fd.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip or plain I/O errors of a damaged or foreign file
        raise DataError(f"resnet18.weights: {str(path)!r} is not a readable state dict "
                        f"({type(e).__name__}); give one saved with torch.save") from None
    if not isinstance(state, dict):
        raise DataError(f"resnet18.weights: {str(path)!r} holds a {type(state).__name__}, not a state dict; "
                        "give one saved with torch.save(model.state_dict(), path)")
    own, kept = model.state_dict(), set()  # kept: keys left at their random initialisation
    conv = state.get("conv1.weight")
    if conv is not None and conv.shape != own["conv1.weight"].shape:
        if conv.shape[2:] == own["conv1.weight"].shape[2:] and own["conv1.weight"].shape[1] == 1:
            state["conv1.weight"] = conv.sum(1, keepdim=True)
        else:
            log.info("resnet18: %s: first convolution %s does not fit %s; kept at random initialisation",
                     path, tuple(conv.shape), tuple(own["conv1.weight"].shape))
            del state["conv1.weight"]
            kept.add("conv1.weight")
    if "fc.weight" in state and state["fc.weight"].shape != own["fc.weight"].shape:
        log.info("resnet18: %s: classifier for %d classes; a new %d-class classifier is kept at random "
                 "initialisation", path, state["fc.weight"].shape[0], own["fc.weight"].shape[0])
        del state["fc.weight"], state["fc.bias"]
        kept |= {"fc.weight", "fc.bias"}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise DataError(f"resnet18.weights: {str(path)!r} does not fit: {str(e).splitlines()[-1].strip()}") from None
    wrong = [*unexpected, *sorted(set(missing) - kept)]
    if wrong:
        raise DataError(f"resnet18.weights: {str(path)!r} is not a ResNet-18 state dict; "
                         f"mismatched keys: {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}")

