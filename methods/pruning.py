"""Data pruning for distillation: score the training set, keep a fraction, distil on it ("Distilling the
Knowledge in Data Pruning", Ben-Baruch, Botach, Kviatkovsky, Aggarwal and Medioni, arXiv:2403.07854,
2024). The paper prunes with the usual scores and trains the student with KD from a teacher trained on
the full data; its finding is that with KD, random pruning does as well as score-based pruning.

Scores, higher is harder (kept first):

- **EL2N** (Paul, Ganguli and Dziugaite, "Deep Learning on a Data Diet", NeurIPS 2021): the error
  vector's norm of models trained briefly, averaged over ``M`` of them,

      EL2N(x, y) = 1/M sum_m || softmax(f_m(x)) - onehot(y) ||_2

  (the paper takes its models at epoch 20 of 200, over 10 initialisations): the policy ``el2n`` scores
  with the students of finished runs (``runs``).
- **Forgetting** (Toneva et al., "An Empirical Study of Example Forgetting during Deep Neural Network
  Learning", ICLR 2019): how often an item goes from correctly to wrongly classified between
  consecutive epochs of a training run; an item never classified correctly counts as forgotten more
  often than any other (``epochs``, above every possible count). The callback ``forgetting`` counts them
  in the run it is attached to, checking the whole training set at the end of each epoch (the paper
  checks each item when its mini-batch is trained, under augmentation; the end-of-epoch check is a
  common, deterministic approximation), and writes the scores to ``forgetting_scores.npy``.
- Random: the core policy ``random`` (the same budget).

``prune`` keeps the top ``fraction`` of any saved scores (``scores: <file>``: EL2N's, forgetting's, or
an array of one's own), ``keep: hard`` (the highest, the paper's default) or ``easy``. Kept items stay
in index order; ties go to the lower index; at least one item is kept. Selection happens before the
first epoch and is saved with the training state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mmkd.callbacks import Callback, register_callback
from mmkd.checks import COUNT, Range
from mmkd.config import ConfigError
from mmkd.data import loader
from mmkd.policies import DataPolicy, load_scores, register_policy, save_scores, top_fraction

KEEPS = ("hard", "easy")


@torch.no_grad()
def el2n(nets, dataset: Dataset, device: torch.device, batch_size: int = 256) -> Tensor:
    """EL2N per item of ``dataset`` (float64 ``[len]``): the mean over ``nets`` (each a
    :class:`~mmkd.net.Net`, used in eval mode; modes restored) of ``||softmax(z) - onehot(label)||_2``."""
    modes = [net.training for net in nets]
    out = []
    for net in nets:
        net.eval()
    for batch in loader(dataset, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        errors = []
        for net in nets:
            p = net(batch).logits.float().softmax(-1)
            errors.append((p - F.one_hot(batch["label"], p.shape[-1]).float()).norm(dim=-1))
        out.append(torch.stack(errors).mean(0).double().cpu())
    for net, mode in zip(nets, modes):
        net.train(mode)
    return torch.cat(out)


def forgetting_scores(correct: Tensor) -> Tensor:
    """Forgetting events per item from ``correct`` ``[epochs, n]`` (bool, classified correctly after each
    epoch): the count of correct-to-wrong transitions, and ``epochs`` for an item never correct."""
    events = (correct[:-1] & ~correct[1:]).sum(0)
    return torch.where(correct.any(0), events, correct.shape[0]).double()


@register_callback("forgetting", ranges={"batch_size": COUNT})
class Forgetting(Callback):
    """Count forgetting events of the training items over the fit (module docstring): after each epoch the
    student classifies the whole training set (eval mode); at the end ``forgetting_scores.npy`` (one float
    per item) is written into the stage's directory. Reports ``forgetting/events`` (the epoch's
    correct-to-wrong transitions) with each epoch's metrics."""

    def __init__(self, batch_size: int = 256):
        self.batch_size = batch_size
        self.correct: list[Tensor] = []

    @torch.no_grad()
    def on_epoch_end(self, trainer, module, metrics):
        student, was = module.student, module.training
        student.eval()
        right = []
        for batch in loader(trainer.train_data, self.batch_size):
            batch = {k: v.to(trainer.device) for k, v in batch.items()}
            right.append((student(batch).logits.argmax(-1) == batch["label"]).cpu())
        module.train(was)
        self.correct.append(torch.cat(right))
        metrics["forgetting/events"] = float((self.correct[-2] & ~self.correct[-1]).sum()) if len(self.correct) > 1 else 0.0

    def on_fit_end(self, trainer, module, result):
        if self.correct:
            save_scores(trainer, "forgetting_scores.npy", forgetting_scores(torch.stack(self.correct)))

    def state_dict(self):
        return {"correct": self.correct}

    def load_state_dict(self, state):
        self.correct = list(state["correct"])


class Pruned(DataPolicy):
    """A fixed subset: the top ``fraction`` of per-item scores (``keep`` ``hard``: highest first)."""

    def __init__(self, fraction: float, keep: str):
        if keep not in KEEPS:
            raise ConfigError(f"keep={keep!r}; choose from: {', '.join(KEEPS)}")
        self.fraction, self.keep = fraction, keep
        self.scores: Tensor | None = None
        self.indices: Tensor | None = None

    def score(self, trainer, module, dataset) -> Tensor:
        raise NotImplementedError

    def select(self, trainer, module, dataset):
        if self.indices is None:
            if self.scores is None:
                self.scores = self.score(trainer, module, dataset)
            if len(self.scores) != len(dataset):
                raise ConfigError(f"scores: {len(self.scores)} scores for {len(dataset)} training items; give the "
                                  "scores of this data set (the same data.args)")
            self.indices = top_fraction(self.scores if self.keep == "hard" else -self.scores, self.fraction)
        return Subset(dataset, self.indices.tolist())

    def on_epoch_end(self, trainer, module, metrics):
        metrics["prune/kept"] = float(len(self.indices))

    def state_dict(self):
        return {"indices": self.indices, "scores": self.scores}

    def load_state_dict(self, state):
        self.indices, self.scores = state["indices"], state["scores"]


@register_policy("prune", ranges={"fraction": Range(0, 1, low_open=True)})
class PruneByScore(Pruned):
    """Keep the top ``fraction`` of the scores in ``scores`` (a ``.npy`` file of one float per training
    item: ``forgetting_scores.npy``, ``el2n_scores.npy`` or one's own), ``keep: hard | easy``."""

    def __init__(self, scores: str, fraction: float = 0.5, keep: str = "hard"):
        super().__init__(fraction, keep)
        self.scores = load_scores(scores, "scores", "a forgetting_scores.npy or el2n_scores.npy of an earlier run")


@register_policy("el2n", ranges={"fraction": Range(0, 1, low_open=True), "batch_size": COUNT})
class EL2N(Pruned):
    """Keep the top ``fraction`` of the training items by EL2N under the students of the finished runs
    ``runs`` (module docstring), scored once before the first epoch; the scores go to the stage's
    ``el2n_scores.npy`` (``prune`` reuses them without the models)."""

    def __init__(self, runs: list[str], fraction: float = 0.5, keep: str = "hard", batch_size: int = 256):
        from mmkd.export import finished_run

        super().__init__(fraction, keep)
        if not runs:
            raise ConfigError("runs: give the run directories of one or more briefly trained models to score with")
        for r in runs:  # every run checked before any is loaded
            finished_run(r, None, key="runs")
        self.runs, self.batch_size = list(runs), batch_size

    def score(self, trainer, module, dataset) -> Tensor:
        from mmkd.export import trained_model
        from mmkd.net import Net

        nets = []
        for r in self.runs:
            model, cfg, _ = trained_model(r)
            nets.append(Net(model.to(trainer.device), cfg.student.inputs))
        scores = el2n(nets, dataset, trainer.device, self.batch_size)
        save_scores(trainer, "el2n_scores.npy", scores)
        return scores
