"""Losses whose target or temperature moves during training, with the part that moves it.

- ``taid``: the target interpolates from the student's own distribution to the teacher's, t adapted
  by the ``taid`` callback (Shing et al., ICLR 2025);
- ``ctkd``: KD at a learned temperature, the term's module trained through a curriculum-scaled
  gradient reversal (Li et al., AAAI 2023).
"""
from __future__ import annotations

from mmkd.losses.adaptive.ctkd import ctkd  # noqa: E402  (imports register the losses)
from mmkd.losses.adaptive.taid import taid  # noqa: E402
from mmkd.losses.adaptive.tgeo import tgeo  # noqa: E402

__all__ = ["ctkd", "taid", "tgeo"]
