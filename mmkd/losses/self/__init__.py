"""Self-distillation losses: the target comes from the student itself or from its own earlier rounds.

- ``uskd``: self-KD with customised soft labels, no teacher (Yang et al., ICCV 2023);
- ``gt_mix``, ``gt_labels``: the mixed target ``alpha y + (1 - alpha) p_prev`` of repeated
  self-distillation rounds and round 0's labels-only form (Borup and Andersen, NeurIPS 2021; the rounds
  are the ``self_distill`` pipeline of :mod:`mmkd.methods.self_distill`).
"""
from __future__ import annotations

from mmkd.losses.self.gt_mix import gt_labels, gt_mix  # noqa: E402  (imports register the losses)
from mmkd.losses.self.uskd import uskd  # noqa: E402

__all__ = ["gt_labels", "gt_mix", "uskd"]
