"""MiniPLM's difference sampling: the pre-training corpus refined offline by a teacher and a small
reference LM (Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training Language Models", ICLR 2025,
arXiv:2410.17215), as the data policy ``miniplm``.

Each training block ``x`` is scored by how much more likely the teacher finds it than the reference
model (trained on a small slice of the corpus) does, per token:

    score(x) = 1/|x| sum_t [log p_T(x_t | x_<t) - log p_ref(x_t | x_<t)]

and the student pre-trains with the plain LM loss on the ``ratio`` of blocks with the highest scores
(0.5 in the paper), kept in corpus order: the official code scores every instance with both models'
per-instance mean LM loss (``PretrainLMInferer``), takes ``small - large``, sorts descending and keeps
the top ``int(ratio * n)`` (``construct_pretrain_data.py``). Blocks the teacher finds easy but the
reference does not are the "down-weighted easy / up-weighted hard and diverse" knowledge of the paper.
No teacher runs while the student trains: the two models score the training set once, before the first
epoch, and are released; the selection is saved with the training state, so a resumed run trains on
the same blocks. Teacher and reference are models of finished runs (:func:`mmkd.export.trained_model`):
``teacher`` and ``reference`` are run directories, ``teacher_name`` / ``reference_name`` the teacher of
that run to use (``None``: the run's student). The scores are written to the student stage's
``miniplm_scores.npy``; ``scores: <that file>`` refines the same corpus for other students without
running either model again (the paper's point: one refined corpus, many students).

Where this differs: the paper scores documents of the Pile in 1,024-token instances and pre-trains on
tens of billions of tokens; here an instance is a training block of the configured data set (any
:class:`~mmkd.modalities.lm.corpus.TokenBlocks`), and the teacher, reference and student share its
tokenizer (the paper's refined corpus is text, usable by students with another tokenizer: write
``indices`` out to do that). Ties are broken by the lower index; at least one block is kept.
"""
from __future__ import annotations

import math
import time

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mmkd.checks import COUNT, Range
from mmkd.config import ConfigError
from mmkd.data import loader
from mmkd.net import Net
from mmkd.policies import DataPolicy, load_scores, register_policy, save_scores, top_fraction

from .models import check_vocab, run_net


@torch.no_grad()
def difference_scores(teacher: Net, reference: Net, dataset: Dataset, device: torch.device,
                      batch_size: int = 64) -> Tensor:
    """Per block of ``dataset`` (float64 ``[len]``): the mean over its target tokens of
    ``log p_T(y) - log p_ref(y)``, for token :class:`~mmkd.net.Net` s ``teacher`` and ``reference`` (used
    in eval mode; their modes are restored); ``-inf`` for a block without a target."""
    modes = [net.training for net in (teacher, reference)]
    teacher.eval(), reference.eval()
    out = []
    for batch in loader(dataset, batch_size):
        rows = torch.repeat_interleave(torch.arange(len(batch["mask"])), batch["mask"].sum(1))
        batch = {k: v.to(device) for k, v in batch.items()}
        logp = [net(batch).logits.float().log_softmax(-1).gather(1, batch["label"][:, None])[:, 0]
                for net in (teacher, reference)]
        diff = (logp[0] - logp[1]).double().cpu()
        total = torch.zeros(len(batch["mask"]), dtype=torch.float64).index_add_(0, rows, diff)
        count = torch.bincount(rows, minlength=len(batch["mask"]))
        out.append(torch.where(count > 0, total / count.clamp_min(1), -math.inf))
    for net, mode in zip((teacher, reference), modes):
        net.train(mode)
    return torch.cat(out)


@register_policy("miniplm", ranges={"ratio": Range(0, 1, low_open=True), "batch_size": COUNT})
class DifferenceSampling(DataPolicy):
    """MiniPLM's difference sampling (module docstring): before the first epoch, keep the ``ratio`` of
    the training blocks with the largest ``log p_T - log p_ref`` per token; every epoch trains on them.

    ``teacher`` / ``reference``: run directories; ``teacher_name`` / ``reference_name``: which of the
    run's teachers (``None``: its student); or ``scores``: the ``miniplm_scores.npy`` an earlier run
    wrote (one float per training block; neither model is loaded). Reports ``miniplm/kept`` (blocks)
    and ``miniplm/score_s`` (the seconds scoring took, 0 with ``scores``) with each epoch's metrics.
    """

    def __init__(self, teacher: str | None = None, reference: str | None = None, ratio: float = 0.5,
                 teacher_name: str | None = None, reference_name: str | None = None, scores: str | None = None,
                 batch_size: int = 64):
        from mmkd.export import finished_run  # the export module imports the model registry

        self.ratio, self.batch_size = ratio, batch_size
        self.indices: Tensor | None = None
        self.scores: Tensor | None = None
        self.seconds = 0.0
        self.models = []
        if scores is not None:
            self.scores = load_scores(scores, "scores", "the miniplm_scores.npy of an earlier run")
            return
        if teacher is None or reference is None:
            raise ConfigError("give both teacher and reference (run directories), or scores (an earlier run's "
                              "miniplm_scores.npy)")
        runs = (("teacher", teacher, teacher_name), ("reference", reference, reference_name))
        for what, run_dir, name in runs:  # both checked before either is loaded
            finished_run(run_dir, name, key=what, teacher_key=f"{what}_name")
        self.models = [(what, *run_net(run_dir, name, what)) for what, run_dir, name in runs]

    def select(self, trainer, module, dataset):
        if self.indices is None:
            if self.scores is None:
                self.scores = self.score(trainer, module, dataset)
                save_scores(trainer, "miniplm_scores.npy", self.scores)
            elif len(self.scores) != len(dataset):
                raise ConfigError(f"scores: {len(self.scores)} scores for {len(dataset)} training blocks; give the "
                                  "scores of this data set (the same data.args)")
            self.indices = top_fraction(self.scores, self.ratio)
        return Subset(dataset, self.indices.tolist())

    def score(self, trainer, module, dataset) -> Tensor:
        """Both models' :func:`difference_scores` of ``dataset``, then the models are released."""
        for what, _, n in self.models:
            check_vocab(f"policies: miniplm {what}", n, module.student, dataset, trainer.device)
        start = time.perf_counter()
        nets = [net.to(trainer.device) for _, net, _ in self.models]
        scores = difference_scores(*nets, dataset, trainer.device, self.batch_size)
        self.seconds = time.perf_counter() - start
        self.models = []  # released: no teacher runs while the student trains
        return scores

    def on_epoch_end(self, trainer, module, metrics):
        metrics["miniplm/kept"] = float(len(self.indices))
        metrics["miniplm/score_s"] = self.seconds

    def state_dict(self):
        return {"indices": self.indices, "scores": self.scores, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.indices, self.scores, self.seconds = state["indices"], state["scores"], state["seconds"]
        self.models = []
