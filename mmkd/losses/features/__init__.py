"""Feature and relation distillation losses: they compare intermediate features, not logits.

Each is a loss term that reads features (``Term(name, student="features.<path>",
teacher="features.<path>")``; the paths are listed in the student's and teacher's ``features``):

- ``fitnet``: hint regression (Romero et al., ICLR 2015), needs matching shapes (an adapter);
- ``at``: attention transfer (Zagoruyko and Komodakis, ICLR 2017), per instance;
- ``nst``: neuron selectivity transfer (Huang and Wang, 2017), per instance;
- ``pkt``: probabilistic knowledge transfer (Passalis and Tefas, ECCV 2018), over the batch;
- ``sp``: similarity-preserving KD (Tung and Mori, ICCV 2019), over the batch;
- ``rkd``: relational KD, distance and angle (Park et al., CVPR 2019), over the batch;
- ``nd``: the norm and direction of the embedding against the teacher's class centres (Wang et al. 2023).
- ``crd``: contrastive representation distillation, NCE against memory banks of both embeddings
  (Tian et al., ICLR 2020), per instance; needs the batch's ``index``.
- ``reviewkd``: knowledge review, every stage through learned fusion modules (Chen et al., CVPR 2021),
  per instance (the term reads ``features``: all stages).
- ``ofd``: overhaul of feature distillation, a partial L2 on pre-ReLU maps above the teacher's margin
  through a learned connector (Heo et al., ICCV 2019), per instance.
- ``vid``: variational information distillation, the Gaussian likelihood of the teacher's map under
  a learned regressor and variance (Ahn et al., CVPR 2019), per instance.
- ``kdsvd``: RBF relations of the leading singular vectors of consecutive stages (Lee et al.,
  ECCV 2018), per instance (the term reads ``features``: all stages).

The relation losses (``pkt``, ``sp``, ``rkd``) compare batch-by-batch similarity structures, so the
student's and teacher's feature widths may differ. Multi-stage methods (AT and NST on every stage in
mdistiller) are one term per stage, each with the method's weight: the terms add up.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def same_batch(name: str, student: Tensor, teacher: Tensor, min_dim: int = 2) -> None:
    """Raise a one-line ``ValueError`` unless both features have ``>= min_dim`` dimensions and the same
    batch size."""
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.ndim < min_dim or teacher.ndim < min_dim:
        raise ValueError(f"{name}: student features {s} and teacher features {t}; it needs [batch, ...] features "
                         f"of at least {min_dim} dimensions (read a hidden layer: features.<path>)")
    if s[0] != t[0]:
        raise ValueError(f"{name}: student features {s} and teacher features {t} have different batch sizes; "
                         "both sides must be computed on the same batch")


def match_spatial(name: str, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Feature maps ``[batch, channels, height, width]`` brought to one spatial size: the larger map is
    average-pooled (adaptive) to the smaller one's size, as mdistiller's AT and NST do. Channel counts
    may differ."""
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.ndim != 4 or teacher.ndim != 4:
        raise ValueError(f"{name}: student features {s} and teacher features {t}; it needs feature maps "
                         "[batch, channels, height, width] (read a convolutional stage, e.g. features.layer1)")
    same_batch(name, student, teacher)
    if s[2:] == t[2:]:
        return student, teacher
    if s[2] >= t[2] and s[3] >= t[3]:
        return F.adaptive_avg_pool2d(student, t[2:]), teacher
    if s[2] <= t[2] and s[3] <= t[3]:
        return student, F.adaptive_avg_pool2d(teacher, s[2:])
    raise ValueError(f"{name}: student feature maps {s} and teacher feature maps {t}: neither is at least as "
                     "large as the other in both height and width (the larger is average-pooled to the "
                     "smaller); read stages of compatible sizes")


from mmkd.losses.features.at import at  # noqa: E402  (imports register the losses)
from mmkd.losses.features.crd import crd  # noqa: E402  (and CRDMemory, its heads and memory banks)
from mmkd.losses.features.fitnet import fitnet  # noqa: E402
from mmkd.losses.features.kdsvd import kdsvd  # noqa: E402
from mmkd.losses.features.nd import nd  # noqa: E402  (and the callback nd_centers, its class centres)
from mmkd.losses.features.nst import nst  # noqa: E402
from mmkd.losses.features.ofd import ofd  # noqa: E402  (and Connector, its connector and margin)
from mmkd.losses.features.pkt import pkt  # noqa: E402
from mmkd.losses.features.reviewkd import reviewkd  # noqa: E402
from mmkd.losses.features.rkd import rkd  # noqa: E402
from mmkd.losses.features.sp import sp  # noqa: E402
from mmkd.losses.features.vid import vid  # noqa: E402  (and Regressor, its mean and variance)

__all__ = ["same_batch", "match_spatial", "at", "crd", "fitnet", "kdsvd", "nd", "nst", "ofd", "pkt", "reviewkd",
           "rkd", "sp", "vid"]
