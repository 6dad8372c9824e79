"""Routers: per-instance weights over the teachers of a mixture, shape ``[batch, teachers]``.

Parameter-free: ``constant`` (:class:`ConstantRouter`), ``confidence`` (:class:`ConfidenceRouter`),
``competitive`` (:class:`CompetitiveRouter`: a teacher only where it beats the student on the label).
Learned, on the student's logits or a student feature: ``linear`` (:class:`LinearRouter`), ``mlp``
(:class:`MLPRouter`), ``noisy_topk`` (:class:`NoisyTopKRouter`), in ``soft``, ``topk`` or ``hard``
mode with a load-balancing loss (:mod:`mmkd.routers.gating`). MST-Distill, which routes over
specialised teachers with these routers, is in :mod:`mmkd.methods.mst_distill`. At inference,
:class:`DynamicFusion` weighs a large model, a small base and small experts per token for dynamic logit
fusion, and :class:`Fused` is the fused model (:mod:`mmkd.routers.fusion`).

Write your own by subclassing :class:`Router` and registering it::

    import torch
    from mmkd.routers import Router, register_router

    @register_router("entropy")
    class EntropyRouter(Router):
        def forward(self, student, teachers, batch):
            ent = torch.stack([-(t.logits.softmax(1) * t.logits.log_softmax(1)).sum(1) for t in teachers], 1)
            return (-ent).softmax(dim=1)  # confident (low-entropy) teachers weigh more
"""
from mmkd.routers.base import Router, register_router
from mmkd.routers.competitive import CompetitiveRouter
from mmkd.routers.confidence import ConfidenceRouter
from mmkd.routers.constant import ConstantRouter
from mmkd.routers.fusion import DynamicFusion, Fused
from mmkd.routers.gating import (cv2_balance, cv_balance, hard_top_k, kl_balance, kl_sum_balance, softmax_weights,
                                 top_k_gates, top_k_mask)
from mmkd.routers.learned import GateRouter, LinearRouter, MLPRouter
from mmkd.routers.noisy_topk import NoisyTopKRouter

__all__ = ["Router", "register_router", "ConstantRouter", "ConfidenceRouter", "GateRouter", "LinearRouter",
           "MLPRouter", "NoisyTopKRouter", "DynamicFusion", "Fused", "softmax_weights", "top_k_mask", "top_k_gates", "hard_top_k",
           "kl_balance", "kl_sum_balance", "cv_balance", "cv2_balance"]
