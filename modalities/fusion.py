"""Late fusion: one encoder per modality, their embeddings concatenated, an MLP classifier.

``logits = head([e_1(x_1); ...; e_M(x_M)])`` where each ``e_m`` is a registered model whose linear
classifier was removed (:func:`mmkd.models.strip_head`), so it returns its pooled embedding.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mmkd.build import create_model
from mmkd.checks import COUNT, PROBABILITY, Each
from mmkd.models import Classifier, strip_head
from mmkd.registry import MODELS


@MODELS.register("fusion", ranges={"hidden": Each(COUNT), "dropout": PROBABILITY})
class Fusion(Classifier, nn.Module):
    """Late fusion of per-modality encoders.

    ``forward(*inputs)`` takes the batch entries named in the model config's ``inputs``, in order
    (``in_shape`` maps them to their shapes). Feature paths: ``encoders.<name>`` (each modality's
    embedding) and ``head`` (the logits; ``head.0`` is the first linear layer on the concatenation).
    A :class:`mmkd.models.Classifier` whose classifier is the head's last linear layer
    (``num_features``: the last hidden width, or the concatenation's without hidden layers).

    Args:
        num_classes: classifier outputs.
        in_shape: batch key -> shape of one item, for every input.
        encoders: name -> ``{name: <registered model>, args: {...}, inputs: [<batch keys>]}``;
            ``inputs`` defaults to ``[<the encoder's name>]``, e.g.
            ``{image: {name: cnn}, audio: {name: audio_cnn, args: {channels: [16, 32]}}}``.
        hidden: widths of the MLP's hidden layers (``Linear -> ReLU -> Dropout``).
        dropout: dropout after each hidden layer.
    """

    def __init__(self, num_classes: int, in_shape: Mapping[str, Sequence[int]], encoders: Mapping[str, Any],
                 hidden: Sequence[int] = (128,), dropout: float = 0.0):
        super().__init__()
        if not isinstance(in_shape, Mapping):
            raise ValueError("fusion: list every batch key it reads in the model's `inputs` (in_shape must "
                             f"map keys to shapes, got {tuple(in_shape)})")
        if isinstance(encoders, DictConfig):
            encoders = OmegaConf.to_container(encoders, resolve=True)
        self.keys = tuple(in_shape)
        self.inputs: dict[str, tuple[str, ...]] = {}
        self.encoders = nn.ModuleDict()
        width = 0
        for name, spec in encoders.items():
            where = f"fusion.encoders.{name}"
            unknown = set(spec) - {"name", "args", "inputs"}
            if "name" not in spec or unknown:
                raise ValueError(f"{where}: expected {{name, args, inputs}}, got keys {sorted(spec)}")
            keys = tuple(spec.get("inputs") or [name])
            missing = [k for k in keys if k not in in_shape]
            if missing:
                raise ValueError(f"{where}.inputs: {missing} are not among the model's inputs "
                                 f"{list(self.keys)}; add them to `inputs`")
            shape = in_shape[keys[0]] if len(keys) == 1 else {k: in_shape[k] for k in keys}
            encoder = create_model(spec["name"], num_classes, shape, where, **(spec.get("args") or {}))
            width += strip_head(encoder, where)
            self.encoders[name], self.inputs[name] = encoder, keys
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        self.head = nn.Sequential(*layers, nn.Linear(width, num_classes))
        self.num_features, self.classifier_path = width, f"head.{len(layers)}"

    def forward(self, *xs: Tensor) -> Tensor:
        batch = dict(zip(self.keys, xs))
        feats = [enc(*[batch[k] for k in self.inputs[name]]).flatten(1) for name, enc in self.encoders.items()]
        return self.head(torch.cat(feats, 1))
