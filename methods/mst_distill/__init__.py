"""MST-Distill: a mixture of specialised teachers for cross-modal distillation, in three stages.

Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation",
ACM MM 2025. Each stage is a pipeline of ``mmkd run`` (``pipeline: mst_stage1|2|3``, options under
``method``); a stage reads the previous stage's run directory.

1. ``mst_stage1``, co-training (:class:`~mmkd.methods.mst_distill.cotraining.CoTraining`): the
   multimodal teacher, the cross-modal teacher (``teachers``) and the student train together,

       L = sum_m CE(z_m, y) + sum_m sum_{o != m} T^2 KL(p_o || p_m),   p = softmax(z / T),

   every KL term differentiated in both members, as in the reference code (``method.detach: true``
   stops the gradient of each term's target ``p_o``, deep mutual learning's form).
2. ``mst_stage2``, plug-in masking: for each frozen stage-1 teacher ``i`` and each layer ``l`` of
   ``method.layers[i]`` a :class:`~mmkd.methods.mst_distill.masknet.MaskNet` multiplies that layer's
   output by a per-channel mask, giving ``sum_i L_i`` specialised teachers sharing the backbones. The
   masks train together (the MaskNets are the module's only trainable parts), each bringing its
   teacher towards the frozen student,

       L_mask = T^2 KL(p_student || p_teacher(masked)),   T = 4, the mean over the batch,

   and stage 2 keeps the epoch with the lowest validation criterion, the sum over the stage-1
   teachers of the mean of their masks' validation ``L_mask`` (one epoch for all masks, as in the
   reference code).
3. ``mst_stage3``, routed distillation: a router (``router``, e.g. ``linear`` on the student's logits)
   weighs the frozen (cached) specialised teachers per instance; with the config's loss terms
   ``ce`` and ``kd``,

       L = CE(z_s, y) + lambda_kd(e) sum_t w_t T^2 KL(p_t || p_s) + lambda_b(e) balance(P),

   where ``mode: hard`` is the paper's ``w_t = 1/k`` on the top-k teachers (``k = 1`` by default;
   the router then learns from the balance term only) and ``mode: soft`` uses ``w = P`` (it learns
   from the KL terms too). The shipped configs decay the weights in the 0-based epoch ``e`` as the
   reference loop does: ``lambda_kd = 0.5 ** ceil(e / 30)``, ``lambda_b = 0.9 ** ceil(e / 10)``
   (step schedules, :mod:`mmkd.schedules`), with ``balance = kl``, ``KL(u || mean_b P) / T``
   (:mod:`mmkd.routers.gating`). A routing report (``routing.png``, ``routing.json``) shows, per
   class of the test split, how often each specialised teacher is picked (``hard``) or how much it
   weighs (``soft``).

Modules: :mod:`~mmkd.methods.mst_distill.pipeline` (the three pipelines, the mask-training module
:class:`~mmkd.methods.mst_distill.pipeline.MaskFit`, the routing report),
:mod:`~mmkd.methods.mst_distill.masknet` (MaskNets and specialised teachers),
:mod:`~mmkd.methods.mst_distill.cotraining` (co-training). The routers stage 3 uses (``linear``,
``mlp``, ``noisy_topk``; hard top-k and the balance losses) are in :mod:`mmkd.routers`.
"""
from mmkd.methods.mst_distill.cotraining import CoTraining
from mmkd.methods.mst_distill.masknet import MaskedModel, MaskNet, specialized_teachers
from mmkd.methods.mst_distill import pipeline  # noqa: F401  (registers the mst_stage1|2|3 pipelines)

__all__ = ["CoTraining", "MaskNet", "MaskedModel", "specialized_teachers"]
