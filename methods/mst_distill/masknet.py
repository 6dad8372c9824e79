"""MaskNets and specialised teachers (MST-Distill's stage-2 building block).

A MaskNet turns a layer's output ``x`` (``[B, C]``, or ``[B, C, L]`` / ``[B, C, H, W]`` maps) into a
per-channel mask and multiplies it in:

    z   = x                                  for [B, C]
        = GAP(ReLU(BN(Conv1x1(DWConv3x3/2(x)))))   for maps (a light conv, then global average pooling)
    e_c = z_c * a_c + b_c                    a linear lift of each channel's value to a d-dim token
    m   = sigmoid(MHSA(e_1..e_C) w + w_0)    self-attention over the C channel tokens, one value each
    x'  = x * m                              (broadcast over the spatial positions)

Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation",
ACM MM 2025. (Their reference code lifts the whole C-vector to C tokens with one dense
``C -> C*d`` layer; here each channel has its own ``1 -> d`` lift, which keeps it linear in C.)

A MaskNet attaches to a frozen teacher with a forward hook (:meth:`MaskNet.attach` /
:meth:`MaskNet.detach`); :func:`specialized_teachers` builds, from each of the given teachers,
one :class:`~mmkd.net.Teacher` per masked layer, all sharing the teacher's weights, each with its
own MaskNet active during its own forward only.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from mmkd.net import Batch, Net, Teacher


def spatial_reduction(channels: int, dims: int) -> nn.Module:
    """``[B, C, *spatial] -> [B, C]``: depthwise 3x3 stride-2 conv, 1x1 conv, BatchNorm, ReLU,
    global average pooling (``dims`` = 1 or 2 spatial dimensions)."""
    conv, bn, pool = {1: (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d),
                      2: (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d)}[dims]
    return nn.Sequential(conv(channels, channels, 3, stride=2, padding=1, groups=channels, bias=False),
                         conv(channels, channels, 1, bias=False), bn(channels), nn.ReLU(), pool(1), nn.Flatten())


class MaskNet(nn.Module):
    """Per-channel mask in (0, 1) for features of shape ``shape`` (without the batch dimension).

    Args:
        shape: ``(C,)``, ``(C, L)`` or ``(C, H, W)``.
        dim: the width ``d`` of each channel token.
        heads: attention heads (must divide ``dim``).
    """

    def __init__(self, shape: Sequence[int], dim: int = 32, heads: int = 4):
        super().__init__()
        if not 1 <= len(shape) <= 3:
            raise ValueError(f"MaskNet: features of shape {tuple(shape)}; expected (C,), (C, L) or (C, H, W)")
        self.shape, channels = tuple(shape), shape[0]
        self.reduce = spatial_reduction(channels, len(shape) - 1) if len(shape) > 1 else nn.Identity()
        self.lift_weight = nn.Parameter(torch.empty(channels, dim).uniform_(-1, 1))
        self.lift_bias = nn.Parameter(torch.empty(channels, dim).uniform_(-1, 1))
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.out = nn.Linear(dim, 1)
        self._handle: RemovableHandle | None = None

    def forward(self, x: Tensor) -> Tensor:
        """The mask ``m``, shape ``[B, C]``."""
        tokens = self.reduce(x).unsqueeze(-1) * self.lift_weight + self.lift_bias  # [B, C, d]
        mixed, _ = self.attn(tokens, tokens, tokens, need_weights=False)
        return torch.sigmoid(self.out(mixed).squeeze(-1))

    def masked(self, x: Tensor) -> Tensor:
        """``x * m``, the mask broadcast over any spatial dimensions."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"MaskNet built for features {self.shape} got {tuple(x.shape[1:])}")
        m = self(x)
        return x * m.view(*m.shape, *[1] * (x.dim() - 2))

    def attach(self, model: nn.Module, path: str) -> RemovableHandle:
        """Multiply the output of ``model``'s sub-module ``path`` by the mask from now on (a forward
        hook that runs before any other hook on that module). Returns the hook's handle."""
        if self._handle is not None:
            raise RuntimeError("MaskNet is already attached; detach() it first")
        self._handle = model.get_submodule(path).register_forward_hook(
            lambda module, args, out: self.masked(out), prepend=True)
        return self._handle

    def detach(self) -> None:
        """Remove the hook: the layer's output is left as it is again."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class MaskedModel(nn.Module):
    """``model`` (frozen, always in eval mode) with ``masknet`` multiplying the output of its
    sub-module ``path``, during this module's forward only.

    Sub-module paths of ``model`` resolve on this module too (``get_submodule("fc1")``), so a
    :class:`~mmkd.net.Teacher` around it exposes the same features as one around ``model``. Its
    ``state_dict`` and ``repr`` include the MaskNet and the path, so the teacher cache tells masked
    teachers apart.
    """

    def __init__(self, model: nn.Module, path: str, masknet: MaskNet):
        super().__init__()
        model.get_submodule(path)  # fail early on a wrong path
        self.model, self.path, self.masknet = model, path, masknet
        model.requires_grad_(False)
        model.eval()

    def forward(self, *inputs: Tensor) -> Tensor:
        self.masknet.attach(self.model, self.path)
        try:
            return self.model(*inputs)
        finally:
            self.masknet.detach()

    def train(self, mode: bool = True) -> "MaskedModel":
        super().train(mode)
        self.model.eval()
        return self

    def get_submodule(self, target: str) -> nn.Module:
        try:
            return super().get_submodule(target)
        except AttributeError:
            return self.model.get_submodule(target)

    def extra_repr(self) -> str:
        return f"path={self.path!r}"


@torch.no_grad()
def feature_shapes(net: Net, paths: Sequence[str], batch: Batch) -> dict[str, tuple[int, ...]]:
    """The shapes (without the batch dimension) of ``net.model``'s sub-module outputs at ``paths``."""
    out = Net(net.model, net.keys, paths)(batch)
    return {p: tuple(out.features[p].shape[1:]) for p in paths}


def specialized_teachers(teachers: Sequence[Teacher], layers: Sequence[Sequence[str]], batch: Batch,
                         dim: int = 32, heads: int = 4) -> list[Teacher]:
    """One specialised teacher per (teacher, layer): ``teachers[i]`` with a MaskNet at ``layers[i][j]``.

    Each is a :class:`~mmkd.net.Teacher` (``frozen=False``) around a :class:`MaskedModel` sharing
    ``teachers[i]``'s weights, which are frozen; its MaskNet is its only trainable part. ``batch`` (a
    few training items) sizes the MaskNets. Wrap ``t.model`` in ``Teacher(..., frozen=True)`` to
    freeze a trained MaskNet too (then its outputs can be cached). Order: teacher by teacher, layer
    by layer.
    """
    if len(layers) != len(teachers):
        raise ValueError(f"specialized_teachers: {len(teachers)} teachers but {len(layers)} lists of layers")
    out = []
    for teacher, paths in zip(teachers, layers):
        if not isinstance(teacher, Teacher):
            raise TypeError(f"specialized_teachers: {type(teacher).__name__} has no model to mask; "
                            "pass the Teacher itself, not its cached outputs")
        teacher.model.requires_grad_(False).eval()
        shapes = feature_shapes(teacher, paths, batch)
        out += [Teacher(MaskedModel(teacher.model, p, MaskNet(shapes[p], dim, heads)), teacher.keys,
                        teacher.feature_paths, frozen=False) for p in paths]
    return out
