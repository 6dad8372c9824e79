"""CoMD: competitive, bidirectional distillation in rounds (Li, Yin, Wang, Jiang and Xu, "CoMD:
Competitive Multimodal Distillation", arXiv:2311.08213, 2023), for classifiers.

Teacher and student both keep learning. After the teacher is trained on the labels (round 0, or
given: ``teachers.<name>.checkpoint``), every round ``r = 1..R`` (``method.rounds``) has the paper's
three phases:

1. **Distillation**: the student (round 1: fresh; later: the previous round's) trains on the
   training data ``D_r`` with the experiment's loss terms (e.g. CE + KD) from the frozen teacher
   ``T_{r-1}``, under the experiment's router.
2. **Assessment**: both models are evaluated per training instance, by the cross-entropy of its label;
   ``beats`` is the share where the student's is lower than the teacher's, ``wrong`` the instances the
   student misclassifies.
3. **Competition** (the reverse direction): the teacher, from ``T_{r-1}``'s weights, trains with the
   same loss terms from the frozen student ``S_r`` under the router ``competitive``
   (:class:`~mmkd.routers.CompetitiveRouter`): its teacher terms count only on the instances where the
   student beats it, ``w(x) = 1[CE_S(x) < CE_T(x)]``, decided on each batch as it is seen. It gives
   ``T_r``.

Then **augmentation**: the instances the student got wrong join the training data as new items,
``D_{r+1} = D_r + {aug(x) : x wrong}`` (cumulative; the data policy ``augmented``: each copy a fixed,
seeded perturbation of the instance, its label kept). The rows of ``results.json`` give both models'
validation and test accuracy per round, ``beats`` and the number of added items.

One ``mmkd run`` (``pipeline: comd``, options under ``method``) runs it all; each phase is a ``distill``
run of its own: ``<run_dir>/teacher0/`` and ``round<r>/student/``, ``round<r>/teacher/``, the
student's wrong items in ``round<r>/wrong.npy``, the cumulative list in ``round<r>/augment.npy``. The
model that learns in a phase starts from the weights of the one before (``student.init``). With
``resume=true`` finished phases are kept and the unfinished one continues. The run directory gets the
last student's ``student.pt``.

Options: ``rounds`` (R >= 1), ``copies`` (augmented copies of each wrong instance, 1), ``noise`` (the
copies' Gaussian noise, in units of the normalised inputs, 0.1), ``shift`` (their random translation
of image-like inputs, in pixels, 2), ``teacher_epochs`` (the competition phase's epochs; default the
trainer's).

The paper distils multimodal LLMs (LLaVA): its assessment is a judge model comparing answers, its
augmentation new instructions written by the teacher around the hard ones. Here, for classifiers, the
comparison is the per-instance cross-entropy and the augmentation a perturbation of the instance; the
phase structure, the per-instance direction and the accumulation of hard instances follow the paper.
No official code was reachable.
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
from mmkd.checks import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT
from mmkd.config import ConfigError, check_names, typed_sections
from mmkd.data import Epochal, loader
from mmkd.net import Net
from mmkd.policies import DataPolicy, register_policy
from mmkd.registry import PIPELINES
from mmkd.trainer import Trainer, seed_everything, to_device

from .self_distill import run_round, scores

log = logging.getLogger("mmkd")

OPTIONS = {"rounds": None, "copies": 1, "noise": 0.1, "shift": 2, "teacher_epochs": None}
KEEP = ("label", "index", "epoch")  # batch entries a copy does not perturb


class Augmented(Epochal):
    """``dataset`` followed by ``copies`` perturbed copies of each item in ``items`` (indices into it,
    repeats allowed): copy ``e`` (its position in this set, ``n + k``) is item ``items[k // copies]``
    as ``dataset`` serves it, its float entries (but :data:`KEEP`) given Gaussian noise of std
    ``noise`` and, with two or more trailing dimensions (images, spectrograms), a translation by up to
    ``shift`` pixels each way (zeros moved in), drawn from a generator seeded by ``(seed, e)``: the same
    copy every epoch. ``index`` is the row's position here."""

    def __init__(self, dataset: Dataset, items: Sequence[int], copies: int = 1, noise: float = 0.1, shift: int = 2,
                 seed: int = 0):
        self.dataset, self.items = dataset, torch.as_tensor(items, dtype=torch.long)
        self.copies, self.noise, self.shift, self.seed = copies, noise, shift, seed
        self.n = len(dataset)
        if len(self.items) and (self.items.min() < 0 or self.items.max() >= self.n):
            raise ValueError(f"augmented: item indices must lie in [0, {self.n}); got {int(self.items.min())} .. "
                             f"{int(self.items.max())}")

    def __len__(self) -> int:
        return self.n + self.copies * len(self.items)

    def set_epoch(self, epoch: int) -> None:
        if isinstance(self.dataset, Epochal):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def perturb(self, batch: dict[str, Tensor], j: int, e: int) -> None:
        """Perturb row ``j`` of ``batch`` in place as copy ``e`` (the class docstring's draws)."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + e) % (2**63 - 1))
        for k, v in batch.items():
            if k in KEEP or not v.is_floating_point():
                continue
            x = v[j] + self.noise * torch.randn(v.shape[1:], generator=g, dtype=v.dtype)
            if v.dim() >= 3 and self.shift:
                dy, dx = (int(d) for d in torch.randint(-self.shift, self.shift + 1, (2,), generator=g))
                x = shifted(x, dy, dx)
            v[j] = x

    def __getitems__(self, ids: Sequence[int]) -> dict[str, Tensor]:
        ids = [int(i) for i in ids]
        source = [i if i < self.n else int(self.items[(i - self.n) // self.copies]) for i in ids]
        batch = fetch(self.dataset, source)
        copies = [(j, e) for j, e in enumerate(ids) if e >= self.n]  # only they cost a draw
        if copies:
            batch = {k: v.clone() for k, v in batch.items()}  # never write into the data set's own tensors
            for j, e in copies:
                self.perturb(batch, j, e)
        batch["index"] = torch.tensor(ids)
        return batch


def fetch(dataset: Dataset, ids: list[int]) -> dict[str, Tensor]:
    """``dataset``'s items ``ids`` as one batch (its ``__getitems__`` when it has one)."""
    if hasattr(dataset, "__getitems__"):
        return dataset.__getitems__(ids)
    rows = [dataset[i] for i in ids]
    return {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}


def shifted(x: Tensor, dy: int, dx: int) -> Tensor:
    """``x`` moved by ``dy`` rows and ``dx`` columns in its last two dimensions, zeros moved in."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    out[..., yd, xd] = x[..., ys, xs]
    return out


@register_policy("augmented", ranges={"copies": COUNT, "noise": NON_NEGATIVE, "shift": NON_NEGATIVE_INT})
class AugmentedPolicy(DataPolicy):
    """Train on the training set plus perturbed copies of the items listed in ``items`` (a ``.npy`` file
    of indices into the training set, no pickle), :class:`Augmented`; ``seed``: the copies' draws."""

    def __init__(self, items: str, copies: int = 1, noise: float = 0.1, shift: int = 2, seed: int = 0):
        from mmkd.policies import load_scores

        self.items = load_scores(items, "policies.augmented.items", "a .npy file of training-item indices").long()
        self.copies, self.noise, self.shift, self.seed = copies, noise, shift, seed
        self._made: tuple[int, Augmented] | None = None

    def select(self, trainer, module, dataset):
        if self._made is None or self._made[0] != id(dataset):  # one wrapper: the trainer keeps its loader
            self._made = (id(dataset), Augmented(dataset, self.items.tolist(), self.copies, self.noise, self.shift,
                                                 self.seed))
        return self._made[1]

    def planned(self, dataset):
        return self.select(None, None, dataset)


def options(cfg: DictConfig) -> dict:
    """``cfg.method`` over :data:`OPTIONS`, checked; a bad value is a one-line :class:`ConfigError`."""
    given = OmegaConf.to_container(cfg.get("method") or {}, resolve=True)
    for key in given:
        if key not in OPTIONS:
            raise ConfigError(f"method.{key}: unknown option of pipeline comd; valid keys: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **given}
    for key, low in (("rounds", 1), ("copies", 1), ("shift", 0)):
        v = opts[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f"method.{key}={v!r}; give a whole number >= {low}")
    if isinstance(opts["noise"], bool) or not isinstance(opts["noise"], (int, float)) or not opts["noise"] >= 0:
        raise ConfigError(f"method.noise={opts['noise']!r}; give a number >= 0 (the copies' noise std)")
    epochs = opts["teacher_epochs"]
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ConfigError(f"method.teacher_epochs={epochs!r}; give a whole number >= 1, or null (trainer.max_epochs)")
    if len(cfg.teachers) != 1:
        raise ConfigError(f"teachers: {', '.join(cfg.teachers) or 'none'}; pipeline comd takes one teacher, which "
                          "learns from the student in turn")
    return opts


def model_node(mc: Any, weights: str | None) -> dict:
    """A model section (name, args, inputs, features) starting from ``weights``, as a student."""
    node = {k: OmegaConf.to_container(mc[k]) if OmegaConf.is_config(mc[k]) else mc[k]
            for k in ("name", "args", "inputs", "features")}
    return {**node, "init": weights}


def teacher_node(mc: Any, weights: str, cache: bool) -> dict:
    """A frozen teacher section of the model ``mc`` loaded from ``weights``."""
    node = model_node(mc, None)
    node.pop("init")
    return {**node, "checkpoint": weights, "frozen": True, "cache": cache}


def augment_policy(augment: Path | None, opts: dict, seed: int) -> list[dict]:
    """The policy ``augmented`` over the items of ``augment`` (none without it)."""
    if augment is None:
        return []
    return [{"name": "augmented", "args": {"items": str(augment), "copies": opts["copies"], "noise": opts["noise"],
                                           "shift": opts["shift"], "seed": seed}}]


def phase_config(cfg: DictConfig, run_dir: Path, name: str, student: dict, teachers: dict, router: Any,
                 losses: Any, policies: list[dict], epochs: int | None = None,
                 trainer: dict | None = None) -> DictConfig:
    """The ``distill`` config of one phase in ``run_dir``: ``cfg``'s with the learning model ``student``,
    the frozen ``teachers``, the ``router``, ``losses`` and ``policies``, and ``epochs`` / ``trainer``
    (settings over ``cfg.trainer``) when given."""
    node = OmegaConf.to_container(cfg, resolve=True)
    node.update(pipeline="distill", method={}, run_dir=str(run_dir), name=name, baseline=False, export=[],
                student=student, teachers=teachers, router=router, losses=losses, policies=policies,
                cache_dir=str(run.cache_path(cfg)), resume=bool(cfg.resume and (run_dir / "config.yaml").is_file()))
    node["trainer"].update(trainer or {})
    if epochs is not None:
        node["trainer"]["max_epochs"] = epochs
    out = typed_sections(OmegaConf.create(node))
    check_names(out)
    return out


@torch.no_grad()
def label_ce(model: torch.nn.Module, keys: list[str], dataset: Dataset, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per item of ``dataset``: the cross-entropy of its label under ``model``, and whether its top
    class is the label (labelled items; unlabelled ones give ``inf`` and False)."""
    net = Net(model, keys).to(device).eval()
    ce, right = [], []
    for batch in loader(dataset, 256):
        batch = to_device(batch, device)
        y = batch["label"]
        logits = net(batch).logits.float()
        ce.append(torch.where(y >= 0, F.cross_entropy(logits, y.clamp(min=0), reduction="none"), torch.inf).cpu())
        right.append(((logits.argmax(1) == y) & (y >= 0)).cpu())
    return torch.cat(ce), torch.cat(right)


def trained(weights: Path, mc: Any, meta: dict, where: str, teacher: str | None = None) -> torch.nn.Module:
    """The model of section ``mc`` with ``weights`` (for a ``teacher``, also a run directory that trained it)."""
    model = build_model(mc, meta, where)
    load_weights(model, str(weights), where, teacher)
    return model


def first_teacher(cfg: DictConfig, meta: dict, run_dir: Path, label: str) -> tuple[str, dict]:
    """The weights of ``cfg``'s one teacher, written to ``<run_dir>/teacher0.pt`` when given
    (``checkpoint``) or used as built (``epochs: 0``), else trained on the labels by a ``distill`` run in
    ``<run_dir>/teacher0/`` (its ``losses``, default CE, and its ``trainer`` settings); and its row."""
    (tname, tc), = cfg.teachers.items()
    if tc.checkpoint or tc.epochs == 0:
        seed_everything(cfg.seed)
        model = (trained(Path(tc.checkpoint), tc, meta, f"teachers.{tname}.checkpoint", tname) if tc.checkpoint
                 else build_model(tc, meta, f"teachers.{tname}"))
        io.save(model.state_dict(), run_dir / "teacher0.pt")
        return str(run_dir / "teacher0.pt"), {"round": 0, "teacher": "given" if tc.checkpoint else "as built",
                                              "teacher_checkpoint": tc.checkpoint}
    here = run_dir / "teacher0"
    losses = OmegaConf.to_container(tc.losses) or {"ce": {"weight": 1.0}}
    res = run_round(phase_config(cfg, here, f"{label}_teacher0", model_node(tc, None), {}, {"name": "constant", "args": {}},
                                 losses, [], tc.epochs, OmegaConf.to_container(tc.trainer)))
    return str(here / "student.pt"), {"round": 0, "teacher": scores(res), "teacher_dir": str(here)}


@PIPELINES.register("comd")
def comd(cfg: DictConfig) -> dict[str, Any]:
    """Round 0 (the teacher on the labels, unless given), then ``method.rounds`` rounds of distillation,
    assessment, competition and augmentation (module docstring)."""
    t_start = time.perf_counter()
    opts = options(cfg)
    data, meta = load_data(cfg)
    run_dir = run.start(cfg, meta)
    label = run.label(cfg)
    (tname, tc), = cfg.teachers.items()
    device = Trainer(trainer_config(cfg)).device
    plain = data.train.plain() if hasattr(data.train, "plain") else data.train
    t_weights, row = first_teacher(cfg, meta, run_dir, label)
    rows: list[dict] = [row]
    s_weights, augment, wrong_all = None, None, np.zeros(0, dtype=np.int64)
    router = OmegaConf.to_container(cfg.router)
    losses = OmegaConf.to_container(cfg.losses)
    for r in range(1, opts["rounds"] + 1):
        here = run_dir / f"round{r}"
        live = augment is not None  # a cached teacher has no outputs on the added items
        s_res = run_round(phase_config(cfg, here / "student", f"{label}_round{r}_student", model_node(cfg.student, s_weights),
                                       {tname: teacher_node(tc, t_weights, not live)}, router, losses,
                                       augment_policy(augment, opts, cfg.seed)))
        s_weights = str(here / "student" / "student.pt")
        s_ce, s_right = label_ce(trained(Path(s_weights), cfg.student, meta, "student"), list(cfg.student.inputs),
                                 plain, device)
        t_ce, _ = label_ce(trained(Path(t_weights), tc, meta, f"teachers.{tname}"), list(tc.inputs), plain, device)
        labelled = torch.isfinite(s_ce)
        beats = float(((s_ce < t_ce) & labelled).sum() / labelled.sum().clamp(min=1))
        wrong = torch.nonzero(labelled & ~s_right).flatten().numpy()
        t_res = run_round(phase_config(cfg, here / "teacher", f"{label}_round{r}_teacher", model_node(tc, t_weights),
                                       {"student": teacher_node(cfg.student, s_weights, not live)},
                                       {"name": "competitive", "args": {}}, losses,
                                       augment_policy(augment, opts, cfg.seed), opts["teacher_epochs"]))
        t_weights = str(here / "teacher" / "student.pt")
        wrong_all = np.concatenate([wrong_all, wrong])
        np.save(here / "wrong.npy", wrong)
        np.save(here / "augment.npy", wrong_all)
        augment = here / "augment.npy"
        rows.append({"round": r, "student": scores(s_res), "teacher": scores(t_res), "beats": beats,
                     "wrong": int(len(wrong)), "trained_on_added": int(len(wrong_all) - len(wrong)) * opts["copies"],
                     "student_dir": str(here / "student"), "teacher_dir": str(here / "teacher")})
        log.info("comd round %d: student test %.4f, teacher test %.4f, the student beats the teacher on %.1f%%, "
                 "wrong on %d", r, s_res["student"].get("test_acc", float("nan")),
                 t_res["student"].get("test_acc", float("nan")), 100 * beats, len(wrong))
        last = s_res
    io.save(io.load(Path(s_weights), "the last round's student", "rerun with resume=true"), run_dir / "student.pt")
    out = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir), "pipeline": "comd",
           "metrics": trainer_config(cfg, data=data).metrics, "rounds": rows,
           "student": last["student"], "teacher": rows[-1]["teacher"], "latency_batch": last["latency_batch"]}
    return run.finish(cfg, run_dir, out, t_start)
