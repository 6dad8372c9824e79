"""Losses that train extra heads on the student (the term's learned module) on richer targets.

- ``lelp``: a pseudo-class head on the student's embedding, trained on pseudo-subclass targets from
  linear projections of the teacher's class embeddings (few-class distillation);
- ``ofa``, ``ofa_branches``: OFA-KD's target-enhanced loss on the logits and on branches that project
  intermediate student stages into logit space (heterogeneous teacher and student; Hao et al., NeurIPS 2023).
"""
from __future__ import annotations

from mmkd.losses.heads.lelp import lelp  # noqa: E402  (imports register the losses)
from mmkd.losses.heads.ofa import ofa, ofa_branches  # noqa: E402

__all__ = ["lelp", "ofa", "ofa_branches"]
