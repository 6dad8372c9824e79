"""Multi-part distillation methods, one module or sub-package each (installed as ``mmkd.methods``).

- MST-Distill (Li et al., ACM MM 2025), :mod:`mmkd.methods.mst_distill`: a mixture of specialised
  teachers in three ``mmkd run`` pipelines ``mst_stage1|2|3`` (co-training, MaskNets, routed
  distillation with the routers of :mod:`mmkd.routers`).
- Dual-head students, the model ``dual_head`` (:mod:`mmkd.methods.dual_head`), shared by
  DHO (Kang et al., arXiv:2505.07675, 2025), :mod:`mmkd.methods.dual_head.dho`: a CE head and a KD head
  combined at inference, ``p = (1 - alpha) softmax(z_ce) + alpha softmax(z_kd / beta)``, with the
  semi-supervised data set ``semi`` (:mod:`mmkd.data`), and
  Dual-Head KD (Yang et al., arXiv:2411.08937, 2024), :mod:`mmkd.methods.dual_head.kd`: the binary KL
  loss ``bkl`` on an auxiliary head, optional gradient alignment.
- Active distillation with PCoreSet (Kang et al., arXiv:2506.00910, 2025), :mod:`mmkd.methods.active`:
  the pipeline ``active`` (rounds of labelling by k-center in probability space, or by the feature
  coreset, entropy or at random, each round a fresh student on CE + KD) and its data policy ``labels``.
- DisWOT (Dong et al., CVPR 2023), :mod:`mmkd.methods.diswot`: the pipeline ``diswot``, an
  evolutionary search of CIFAR ResNet students scored at initialisation against the teacher.
- CoMD (Li et al., arXiv:2311.08213, 2023), :mod:`mmkd.methods.comd`: the pipeline ``comd``, rounds in
  which the student learns from the teacher, the teacher from the student where it is beaten (the
  router ``competitive``), and the student's mistakes join the data (the policy ``augmented``).
- HARD (Nix et al., arXiv:2305.14890, 2023), :mod:`mmkd.methods.hard`: the batch transform ``hard``,
  a learned spatial transformer making inputs on which student and teacher disagree.
- KD^3 (Tang et al., ICCV 2023), :mod:`mmkd.methods.kd3`: distillation from a shifted, unlabelled pool:
  the router ``kd3`` (instances selected by the combined predictions of teacher and student), the
  loss ``kd3_align`` (weighted features and classifier parameters), the batch transform ``mixdist``
  and the loss ``kd3_contrast`` (MixDistribution's perturbed copies, aligned contrastively).
- PGKD (Di Palo et al., EMNLP 2024), :mod:`mmkd.methods.pgkd`: the pipeline ``pgkd``, cycles in which
  a class-conditional LM writes texts for the classes where the student's validation F1 is lowest
  (near its hard negatives), the teacher labels them and the student retrains on them (the policy
  ``appended``), stopped early on validation.
- Data pruning for distillation (Ben-Baruch et al., arXiv:2403.07854, 2024), :mod:`mmkd.methods.pruning`:
  the data policies ``el2n`` and ``prune`` (keep the top fraction of per-item scores) and the callback
  ``forgetting`` (forgetting events, written for ``prune``).
- TRG (Zhang et al., arXiv:2306.12442, 2023), :mod:`mmkd.methods.trg`: token-level relationship-graph
  losses ``trg_local``, ``trg_global``, ``trg_context``.

Each module's docstring carries its paper's formulas. A method that is one loss belongs in
``mmkd/losses/``, one that is a router in ``routers/``; a method needing more (a model, a pipeline,
several losses) gets a module here.
"""

from . import active  # noqa: F401  (registers the active pipeline and the labels policy)
from . import dual_head  # noqa: F401  (registers the dual-head model, DHO's calibration and the bkl loss)
from . import comd  # noqa: F401  (registers the comd pipeline and the augmented policy)
from . import diswot  # noqa: F401  (registers the diswot pipeline)
from . import hard  # noqa: F401  (registers the hard batch transform)
from . import kd3  # noqa: F401  (registers the kd3 router, the mixdist transform and the KD^3 losses)
from . import mst_distill  # noqa: F401  (registers the mst_stage1|2|3 pipelines)
from . import pgkd  # noqa: F401  (registers the pgkd pipeline and the appended policy)
from . import pruning  # noqa: F401  (registers the el2n and prune policies and the forgetting callback)
from . import self_distill  # noqa: F401  (registers the self_distill pipeline)
from . import trg  # noqa: F401  (registers the TRG losses)
