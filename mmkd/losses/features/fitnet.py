"""FitNet hint loss: regress the teacher's intermediate features from the student's.

    L_hint(s, t) = mean_d (r(f_S)_d - f_T,d)^2   per instance

where ``r`` is a learned regressor (the loss term's ``adapter``; see :mod:`mmkd.adapters`).
Romero, Ballas, Kahou, Chassang, Gatta and Bengio, "FitNets: Hints for Thin Deep Nets", ICLR 2015.
"""
from __future__ import annotations

from mmkd.losses import reduce, register_loss


@register_loss("fitnet", teacher=True, per_sample=True)
def fitnet(student_features, teacher_features, target=None, *, reduction="mean"):
    """``mean_d (s_d - t_d)^2`` per instance over all feature dimensions (FitNets, ICLR 2015).

    Use it on features: ``Term("fitnet", student="features.<path>", teacher="features.<path>",
    adapter=...)``; the adapter maps the student's features to the teacher's shape.
    """
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"fitnet: student features {tuple(student_features.shape)} and teacher features "
                         f"{tuple(teacher_features.shape)} differ; give the term an adapter (linear, conv or token)")
    return reduce((student_features - teacher_features).pow(2).flatten(1).mean(1), reduction)
