"""Vision-language: an open_clip image tower with a zero-shot classifier built from class-name prompts
(Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", ICML 2021).

Zero-shot head with a prompt ensemble: for class ``c`` and templates ``p_1..p_K``,
``w_c = normalize(mean_k normalize(g(p_k(c))))`` with ``g`` the text encoder; for an image ``x``
with image encoder ``f``, ``logits_c = exp(s) * cos(f(x), w_c)``, ``s`` the model's log logit scale.
``open_clip`` is imported on first use only.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from mmkd.models import Classifier
from mmkd.registry import MODELS

TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
             "a low resolution photo of a {}.", "a drawing of a {}.")


class ZeroShotHead(nn.Module):
    """A cosine classifier ``exp(logit_scale) * cos(f, w_c)``; ``weight`` ``[classes, dim]`` holds the
    class embeddings (normalised in the forward pass, so the formula holds after training too)."""

    def __init__(self, weight: Tensor, logit_scale: Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.logit_scale = nn.Parameter(logit_scale.detach().clone().reshape(()))

    def forward(self, f: Tensor) -> Tensor:
        return self.logit_scale.exp() * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).T


class CLIPClassifier(Classifier, nn.Module):
    """A CLIP image tower and a zero-shot head whose class embeddings come from the text tower.

    ``forward(image)`` takes ``[batch, 1 or 3, height, width]`` images in ``[0, 1]``: grey images are
    repeated to 3 channels, resized (bicubic) to the tower's input size and normalised with the
    model's mean and standard deviation. The text tower is used once, here, and not kept.

    Feature path: ``visual`` (the image embedding ``[batch, embed_dim]`` before normalisation).
    A :class:`mmkd.models.Classifier` (``num_features`` ``embed_dim``); ``reset_classifier(k)`` puts a
    plain linear classifier in place of the zero-shot head.

    Args:
        model: an ``open_clip`` CLIP model (``encode_text``, ``visual``, ``logit_scale``).
        tokenizer: its tokenizer (list of strings -> token ids).
        class_names: one name per class, put into every template.
        templates: ``str.format`` templates with one ``{}``.
    """

    def __init__(self, model: nn.Module, tokenizer, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES):
        super().__init__()
        from open_clip import build_zero_shot_classifier

        self.visual = model.visual
        cfg = model.visual.preprocess_cfg
        self.size = tuple(model.visual.image_size) if isinstance(model.visual.image_size, Sequence) \
            else (model.visual.image_size,) * 2
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1))
        training = model.training
        model.eval()
        weight = build_zero_shot_classifier(model, tokenizer, list(class_names), list(templates),
                                            num_classes_per_batch=None, device=model.logit_scale.device)
        model.train(training)
        self.head = ZeroShotHead(weight.T, model.logit_scale)
        self.num_features = self.head.weight.shape[1]

    def preprocess(self, x: Tensor) -> Tensor:
        """``[batch, 1 or 3, H, W]`` in ``[0, 1]`` -> the image tower's normalised 3-channel input."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bicubic", align_corners=False)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.visual(self.preprocess(x)))


def _plain(x: Any) -> Any:
    """Hydra containers -> plain dicts and lists (open_clip checks for ``dict``)."""
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, (DictConfig, ListConfig)) else x


@MODELS.register("clip")
def clip(num_classes: int, in_shape: Sequence[int], arch: str = "ViT-B-32", pretrained: Optional[str] = None,
         class_names: Optional[Sequence[str]] = None, templates: Sequence[str] = TEMPLATES,
         config: Optional[Mapping[str, Any]] = None) -> CLIPClassifier:
    """An ``open_clip`` model of architecture ``arch`` as a zero-shot image classifier.

    Args:
        num_classes: the number of classes (``class_names`` must have as many).
        in_shape: ``(1 or 3, height, width)`` of one image.
        arch: an ``open_clip`` architecture (``open_clip.list_models()``), e.g. ``ViT-B-32``, ``RN50``;
            or ``local-dir:<folder>``, a folder holding ``open_clip_config.json`` and the weights.
        pretrained: ``None`` (random initialisation), a local checkpoint file, or an ``open_clip``
            pretrained tag (``open_clip.list_pretrained()``, e.g. ``laion2b_s34b_b79k``; downloads, so
            only where the network is reachable).
        class_names: the prompts' class names; default ``"0"``, ``"1"``, ...
        templates: prompt templates, averaged per class (a prompt ensemble).
        config: entries replacing those of the architecture's config (``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ...), e.g. a tiny model for tests.
    """
    import open_clip

    if len(in_shape) != 3 or in_shape[0] not in (1, 3):
        raise ValueError(f"clip: in_shape must be (1 or 3, height, width), got {tuple(in_shape)}")
    names = [str(c) for c in _plain(class_names)] if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"clip.class_names: {len(names)} names for {num_classes} classes")
    if ":" not in arch and arch not in open_clip.list_models():
        raise ValueError(f"clip.arch: unknown architecture {arch!r}; see open_clip.list_models(), e.g. ViT-B-32, RN50")
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, **(_plain(config) or {}))
    except RuntimeError as e:
        if pretrained is None:
            raise
        raise ValueError(f"clip.pretrained: cannot load {pretrained!r} for {arch!r} ({e}); give a local checkpoint "
                         "file, or a tag from open_clip.list_pretrained() where it can be downloaded") from None
    tokenizer = open_clip.get_tokenizer(arch, context_length=model.context_length)
    return CLIPClassifier(model, tokenizer, names, _plain(templates))
