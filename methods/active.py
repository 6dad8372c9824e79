"""Active distillation with PCoreSet: rounds of labelling a budget of training items, chosen for
their coverage of the probability space, and distilling a fresh student on labelled and unlabelled
data (Kang, Lee, Jang, Kim and Hwang, "PCoreSet: Effective Active Learning through Knowledge
Distillation from Vision-Language Models", arXiv:2506.00910, 2025; the paper's ActiveKD framework).

Round 0 labels ``initial`` items per class (stratified, drawn with the run's seed). Round ``r``
trains the student from its initialisation on

    L = 1/2 CE(labelled) + 1/2 (KD_T(labelled) + KD_T(unlabelled)),   T = 2,

each step one batch of labelled and one of unlabelled items (the policy ``labels``; one epoch is one
pass over the unlabelled pool, the labelled pool cycled), and keeps the last epoch. Then the
``queries`` items of the unlabelled pool ``U`` that ``strategy`` picks are labelled:

- ``pcoreset``: greedy k-center in probability space. With ``C`` the labelled items,
  repeat ``queries`` times: ``x* = argmax_{x in U} min_{c in C} ||p(x) - p(c)||_2``, move ``x*`` to
  ``C``; ``p`` is the round's student's softmax (``space: student``, the official code) or the
  teacher's (``space: teacher``), on the items as the test split serves them (no augmentation);
- ``coreset`` (Sener and Savarese, ICLR 2018): the same on the L2-normalised features (``feature``, a
  module path of the student, or of the teacher with ``space: teacher``), with the distance ``1 - cos``;
- ``entropy``: the ``queries`` items of highest ``H(p) = -sum_c p_c log p_c`` (the official
  ``uncertainty``);
- ``random``: drawn with the run's seed and the round.

One ``mmkd run`` (``pipeline: active``, options under ``method``) runs every round, each a
``distill`` run in ``<run_dir>/round<r>/`` whose labelled items are ``<run_dir>/labelled<r>.npy``;
every round starts from the same initialisation (the run's seed), so rounds differ only by their
labels, and a trained teacher is stored once and reused (:mod:`mmkd.store`). The run directory gets
the last round's ``student.pt`` and ``results.json`` with a row per round (labelled items, scores);
``resume=true`` keeps finished rounds.

Official code followed: github.com/erjui/PCoreSet (``strategies.py``: the k-center on the student's
combined probabilities seeded with the labelled set, Euclidean distance, the feature coreset on
normalised features with ``1 - cos``; ``train_active_others.py``: the loss above, T = 2, a fresh
student each round, the last checkpoint). Deviations: its student is a dual-head network
(probabilities ``(1 - a) softmax(z_ce) + a softmax(z_kd)``, a = 0.5); here one head serves CE and KD
(``mmkd.methods.dual_head`` gives two). Its labelled loader samples with replacement, 200 passes over
the labelled set per epoch; here an epoch is a pass over the unlabelled pool. Its teacher is a CLIP
zero-shot classifier; here any teacher of the mixture core (a zero-shot CLIP teacher with the
``clip`` model and pretrained weights, see the README).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from mmkd import io, run
from mmkd.build import build_model, load_data, load_weights, trainer_config
from mmkd.checks import COUNT
from mmkd.config import ConfigError, check_names, typed_sections
from mmkd.data import EPOCHS, Fingerprinted, PairedBatches, loader
from mmkd.net import Net
from mmkd.policies import DataPolicy, load_scores, register_policy
from mmkd.registry import PIPELINES
from mmkd.trainer import Trainer, seed_everything, to_device

from .self_distill import run_round, scores, trained

log = logging.getLogger("mmkd")

STRATEGIES = ("pcoreset", "coreset", "entropy", "random")
SPACES = ("student", "teacher")
OPTIONS = {"strategy": "pcoreset", "rounds": None, "queries": None, "initial": 1, "space": "student",
           "feature": "pool", "batch_size": 256}


def k_center(pool: Tensor, centers: Tensor, k: int, distance: str = "euclidean") -> Tensor:
    """Greedy k-center: ``k`` rows of ``pool`` picked one at a time, each the row farthest from its
    nearest center (``centers`` and the rows picked so far; ties to the lower index); their indices in
    order of picking. ``distance``: ``euclidean`` or ``cosine`` (``1 - cos``, on normalised rows)."""
    if distance not in ("euclidean", "cosine"):
        raise ValueError(f"distance={distance!r}; choose from: euclidean, cosine")
    pool, centers = pool.double(), centers.double()
    if distance == "cosine":
        pool, centers = F.normalize(pool, dim=1), F.normalize(centers, dim=1)

    def dist(rows: Tensor, to: Tensor) -> Tensor:
        return torch.cdist(rows, to) if distance == "euclidean" else 1 - rows @ to.T

    k = min(k, len(pool))
    nearest = dist(pool, centers).min(1).values if len(centers) else torch.full((len(pool),), float("inf"),
                                                                                 dtype=torch.float64)
    picked: list[int] = []
    for _ in range(k):
        gap = nearest.clone()
        gap[picked] = -1.0
        i = int(gap.argmax())
        picked.append(i)
        nearest = torch.minimum(nearest, dist(pool, pool[i:i + 1]).flatten())
    return torch.tensor(picked, dtype=torch.long)


def entropy(probs: Tensor) -> Tensor:
    """``H(p) = -sum_c p_c log p_c`` per row (0 log 0 = 0)."""
    p = probs.double()
    return -(p * p.clamp_min(1e-300).log()).sum(1)


def initial_set(labels: Tensor, per_class: int, seed: int) -> Tensor:
    """``per_class`` training items of every class (all of a smaller class), drawn with ``seed``;
    sorted indices."""
    g = torch.Generator().manual_seed(seed)
    chosen = [idx[torch.randperm(len(idx), generator=g)[:per_class]]
              for c in labels.unique() for idx in [(labels == c).nonzero().flatten()]]
    return torch.cat(chosen).sort().values


class Masked(Fingerprinted):
    """``data`` with the labels of the items outside ``labelled`` (bool ``[len]``) set to -1
    (unlabelled: the CE term leaves them out); name and fingerprint are ``data``'s, so cached teacher
    outputs apply."""

    def __init__(self, data: Dataset, labelled: Tensor, key: str = "label"):
        self.data, self.labelled, self.key = data, labelled, key
        self.name, self.deterministic = data.name, data.deterministic

    @property
    def fingerprint(self) -> str:
        return self.data.fingerprint

    def __len__(self) -> int:
        return len(self.data)

    def _mask(self, items: dict, idx: Tensor) -> dict:
        return {**items, self.key: torch.where(self.labelled[idx], items[self.key], -1)}

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return self._mask(self.data[i], torch.tensor(i))

    def __getitems__(self, indices: Sequence[int]) -> dict[str, Tensor]:
        return self._mask(self.data.__getitems__(indices), torch.as_tensor(indices, dtype=torch.long))


@register_policy("labels", ranges={"unlabelled_batch": COUNT})
class Labels(DataPolicy):
    """Train on every item, with labels only for those in ``labelled`` (a ``.npy`` file of training
    indices); each step one batch of labelled items and one of ``unlabelled_batch`` (default
    ``trainer.batch_size``) unlabelled ones, ``epoch`` (``unlabelled``, ``labelled``, ``shorter``)
    the pool one epoch passes over once (:class:`~mmkd.data.PairedBatches`). The training set must
    be a :class:`~mmkd.data.Fingerprinted` one that gathers batches (``__getitems__``)."""

    def __init__(self, labelled: str, unlabelled_batch: int | None = None, epoch: str = "unlabelled"):
        if epoch not in EPOCHS:
            raise ConfigError(f"epoch={epoch!r}; choose from: {', '.join(EPOCHS)}")
        self.indices = load_scores(labelled, "labelled", "a .npy file of the labelled training items' indices").long()
        self.unlabelled_batch, self.epoch = unlabelled_batch, epoch
        self.data: Dataset | None = None

    def select(self, trainer, module, dataset):
        if self.data is None:
            if not isinstance(dataset, Fingerprinted) or not hasattr(dataset, "__getitems__"):
                raise ConfigError(f"policies: labels needs a training set that gathers batches; "
                                  f"{type(dataset).__name__} does not")
            if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
                raise ConfigError(f"labelled: indices outside 0..{len(dataset) - 1}; give indices of this training set")
            mask = torch.zeros(len(dataset), dtype=torch.bool)
            mask[self.indices] = True
            self.data = PairedBatches(Masked(dataset, mask), mask, self.unlabelled_batch, self.epoch)
        return self.data

    def on_epoch_end(self, trainer, module, metrics):
        metrics["active/labelled"] = float(len(self.indices))


def options(cfg: DictConfig) -> dict:
    """``cfg.method`` over :data:`OPTIONS`, checked; a bad value is a one-line :class:`ConfigError`."""
    given = OmegaConf.to_container(cfg.get("method") or {}, resolve=True)
    for key in given:
        if key not in OPTIONS:
            raise ConfigError(f"method.{key}: unknown option of pipeline active; valid keys: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **given}
    for key, what in (("rounds", "selection rounds after round 0"), ("queries", "items labelled per round"),
                      ("initial", "labelled items per class in round 0"), ("batch_size", "the selection's batch size")):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"method.{key}={v!r}; give a whole number >= 1 ({what})")
    if opts["strategy"] not in STRATEGIES:
        raise ConfigError(f"method.strategy={opts['strategy']!r}; choose from: {', '.join(STRATEGIES)}")
    if opts["space"] not in SPACES:
        raise ConfigError(f"method.space={opts['space']!r}; choose from: {', '.join(SPACES)}")
    if opts["space"] == "teacher" and len(cfg.teachers) != 1:
        raise ConfigError(f"method.space=teacher needs one teacher; teachers has {len(cfg.teachers)}")
    return opts


def round_config(cfg: DictConfig, labelled: Path, run_dir: Path, name: str) -> DictConfig:
    """The ``distill`` config of one round in ``run_dir``: ``cfg`` with the policy ``labels`` of the
    indices in ``labelled`` added, the last epoch kept."""
    node = OmegaConf.to_container(cfg, resolve=True)
    node["policies"] = [*node.get("policies", []), {"name": "labels", "args": {"labelled": str(labelled)}}]
    node["trainer"]["keep"] = "last"
    node.update(pipeline="distill", method={}, run_dir=str(run_dir), name=name, baseline=False, export=[],
                cache_dir=str(run.cache_path(cfg)), resume=bool(cfg.resume and (run_dir / "config.yaml").is_file()))
    out = typed_sections(OmegaConf.create(node))
    check_names(out)
    return out


@torch.no_grad()
def outputs(model: torch.nn.Module, keys: list[str], dataset: Dataset, device: torch.device, batch_size: int,
            feature: str | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``model``'s softmax probabilities, the labels and (with ``feature``, a module path) the flattened
    features on every item of ``dataset``, in order (eval mode)."""
    net = Net(model, keys, [feature] if feature else []).to(device).eval()
    probs, labels, feats = [], [], []
    for batch in loader(dataset, batch_size):
        out = net(to_device(batch, device))
        probs.append(out.logits.float().softmax(1).cpu())
        labels.append(batch["label"].cpu())
        if feature:
            feats.append(out.features[feature].flatten(1).float().cpu())
    return torch.cat(probs), torch.cat(labels), torch.cat(feats) if feature else None


def teacher_model(cfg: DictConfig, meta: dict, round_dir: Path) -> torch.nn.Module:
    """The one teacher of ``cfg``: from its checkpoint, as built (``epochs: 0``; from the run's seed, as
    every round builds it), or as trained in ``round_dir``."""
    from mmkd.export import trained_model

    (name, tc), = cfg.teachers.items()
    if tc.checkpoint or tc.epochs == 0:
        seed_everything(cfg.seed)
        model = build_model(tc, meta, f"teachers.{name}")
        if tc.checkpoint:
            load_weights(model, tc.checkpoint, f"teachers.{name}.checkpoint", name)
        return model
    return trained_model(round_dir, name)[0]


def select(opts: dict, seed: int, tau: int, labelled: Tensor, probs: Tensor, feats: Tensor | None) -> Tensor:
    """The ``queries`` pool items (training indices, sorted) that ``opts['strategy']`` picks in round
    ``tau``, given the labelled indices and every item's probabilities (and features)."""
    pool = torch.ones(len(probs), dtype=torch.bool)
    pool[labelled] = False
    pool = pool.nonzero().flatten()
    k, strategy = min(opts["queries"], len(pool)), opts["strategy"]
    if strategy == "random":
        g = torch.Generator().manual_seed(seed * 1000 + tau)
        pick = torch.randperm(len(pool), generator=g)[:k]
    elif strategy == "entropy":
        h = entropy(probs[pool])
        pick = torch.tensor(sorted(range(len(pool)), key=lambda i: (-float(h[i]), i))[:k], dtype=torch.long)
    elif strategy == "pcoreset":
        pick = k_center(probs[pool], probs[labelled], k)
    else:
        pick = k_center(feats[pool], feats[labelled], k, "cosine")
    return pool[pick].sort().values


@PIPELINES.register("active")
def active(cfg: DictConfig) -> dict[str, Any]:
    """Round 0 on ``method.initial`` labelled items per class, then ``method.rounds`` rounds that each
    label ``method.queries`` more by ``method.strategy`` and distil a fresh student (module docstring)."""
    t_start = time.perf_counter()
    opts = options(cfg)
    data, meta = load_data(cfg)
    plain = data.train.plain() if hasattr(data.train, "plain") else data.train  # selection sees test-time items
    labels = torch.cat([b["label"] for b in loader(plain, opts["batch_size"])])
    labelled = initial_set(labels, opts["initial"], cfg.seed)
    budget = len(labelled) + opts["rounds"] * opts["queries"]
    if budget >= len(labels):
        raise ConfigError(f"method: {len(labelled)} initial + {opts['rounds']} rounds x {opts['queries']} queries = "
                          f"{budget} labels, but the training set has {len(labels)} items; lower method.initial, "
                          f"method.rounds or method.queries so that an unlabelled pool is left")
    run_dir = run.start(cfg, meta)
    label, keys = run.label(cfg), list(cfg.student.inputs)
    device = Trainer(trainer_config(cfg)).device
    rows: list[dict] = []
    teacher_out = None
    for tau in range(opts["rounds"] + 1):
        here, file = run_dir / f"round{tau}", run_dir / f"labelled{tau}.npy"
        if not (cfg.resume and file.is_file()):
            np.save(file, labelled.numpy())
        labelled = torch.from_numpy(np.load(file)).long()
        results = run_round(round_config(cfg, file, here, f"{label}_round{tau}"))
        rows.append({"round": tau, "labelled": len(labelled), "run_dir": str(here), **scores(results)})
        log.info("round %d: %d labelled, test acc %s", tau, len(labelled), results["student"].get("test_acc"))
        if tau < opts["rounds"]:
            feature = opts["feature"] if opts["strategy"] == "coreset" else None
            if opts["space"] == "teacher":  # the same teacher every round: its outputs once
                if teacher_out is None:
                    (tc,) = cfg.teachers.values()
                    teacher_out = outputs(teacher_model(cfg, meta, here), list(tc.inputs), plain, device,
                                          opts["batch_size"], feature)
                probs, _, feats = teacher_out
            else:
                probs, _, feats = outputs(trained(here, cfg, meta), keys, plain, device, opts["batch_size"], feature)
            new = select(opts, cfg.seed, tau, labelled, probs, feats)
            labelled = torch.cat([labelled, new]).sort().values
        last = results
    io.save(io.load(here / "student.pt", "the last round's student", "rerun with resume=true"), run_dir / "student.pt")
    out = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir), "pipeline": "active",
           "metrics": trainer_config(cfg, data=data).metrics, "rounds": rows,
           "student": last["student"], "latency_batch": last["latency_batch"]}
    return run.finish(cfg, run_dir, out, t_start)
