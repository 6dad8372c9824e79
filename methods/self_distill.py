"""Self-distillation with ground-truth targets: rounds of fresh students of one architecture, each
fitting a mix of the labels and the previous round's predictions (Borup and Andersen, "Even your
Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation",
NeurIPS 2021, arXiv:2102.13088).

Round 0 fits the labels, round ``tau = 1..R`` (``method.rounds``) the mixed target of the loss
``gt_mix`` (:mod:`mmkd.losses.self.gt_mix`),

    q_tau = alpha_tau * onehot(y) + (1 - alpha_tau) * softmax(z^(tau-1)),
    L_tau = mean_c (softmax(z)_c - q_tau,c)^2,

the previous round's student frozen (its outputs cached) and read at T = 1. ``alpha`` weighs the
labels, as in the paper and its code: 1 trains on the labels alone, 0 is pure self-distillation.
Round 0's loss is ``gt_labels``, the same at ``alpha = 1``. In the paper's model, kernel ridge
regression with ``A = K (K + lambda I)^-1`` (the official ``toy_example.ipynb``), the fits are

    yhat^(0) = A y,   yhat^(tau) = A (alpha y + (1 - alpha) yhat^(tau-1)),
    yhat^(inf) = alpha K (alpha K + lambda I)^-1 y   (the first fit, regularisation lambda / alpha).

Optimal alpha (:func:`optimal_alpha`). A fit is linear in its target, so round tau's is affine in
alpha: ``yhat^(tau)(alpha) = alpha * f_1 + (1 - alpha) * f_0`` on any inputs, where ``f_1 = A y`` is
the fit to the labels alone (round 0's) and ``f_0 = A yhat^(tau-1)`` the fit to the previous
round's predictions alone. The alpha of the least squared error to targets ``t`` is then

    alpha* = <t - f_0, f_1 - f_0> / ||f_1 - f_0||^2,   clipped to [0, 1]

(1 when ``f_1 = f_0``: alpha changes nothing). ``method.alpha: auto`` estimates it so for a network,
treated as its linearisation (a kernel machine): at the start of round tau a probe student is
trained with ``alpha = 0`` from round tau-1's student (its run directory ``probe<tau>/``),
``f_1`` and ``f_0`` are round 0's and the probe's probabilities on the validation split, ``t`` its
one-hot labels (held-out labels: on the training items alpha* would reward fitting their noise),
and round tau trains with the estimate: two fits per round where a grid search needs one per alpha.
This estimator is derived from the paper's kernel-ridge model and its stated aim (a closed form per
step, estimated for networks at less cost than a grid search); the paper's own equation was not at
hand to compare it with.

One ``mmkd run`` (``pipeline: self_distill``, options under ``method``) runs the whole chain. Every
round (and probe) is a ``distill`` run of its own in ``<run_dir>/round<tau>/``: its config names the
teacher ``previous`` with ``checkpoint: <run_dir>/round<tau-1>/student.pt``. The run directory gets
the last round's ``student.pt`` (exported as a run's student), ``results.json`` with a row per round,
and ``curves.png`` with every round's curves. With ``resume=true`` finished rounds are kept and the
unfinished one continues. Round 0 is the labels-only baseline (``baseline`` is not used).

Options: ``rounds`` (R >= 1), ``alpha`` (a number in [0, 1] for every round, ``auto``, or a list of
R of them), ``criterion`` (``mse``, the official; ``ce``: the cross-entropy to q), ``init``
(``new``: round tau starts from the initialisation of seed ``seed + tau``, as the official code,
whose random state runs on between steps, the data split kept that of ``seed``; ``same``: every
round from round 0's initialisation, which makes an ``alpha = 1`` round round 0 again).

Official code followed: github.com/Kennethborup/self_distillation (``self_distiller.py``: the loss,
probabilities at T = 1, a fresh student each step, the next teacher the model as training left it,
hence ``trainer.keep: last`` in the shipped configs). Deviations: its ResNet-50, Adam (lr 1e-4),
batch 16, 75 epochs and ``1e-4 * sum_W ||W||_2`` penalty are not the shipped configs' protocol
(they use the library's CIFAR-10 setup and weight decay); it validates on the test set, the
estimate here on the validation split.
"""
from __future__ import annotations

import inspect
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from mmkd import io, run
from mmkd.build import build_model, load_data, load_weights, trainer_config
from mmkd.config import ConfigError, check_names, typed_sections
from mmkd.data import loader
from mmkd.losses.self.gt_mix import CRITERIA
from mmkd.net import Net
from mmkd.registry import DATASETS, PIPELINES
from mmkd.trainer import Trainer, to_device

log = logging.getLogger("mmkd")

OPTIONS = {"rounds": None, "alpha": None, "criterion": "mse", "init": "new"}
INITS = ("new", "same")
AUTO = "auto"


def options(cfg: DictConfig) -> dict:
    """``cfg.method`` over :data:`OPTIONS`, checked, with ``alpha`` as one value per round (a float
    or ``"auto"``); a bad value is a one-line :class:`ConfigError`."""
    given = OmegaConf.to_container(cfg.get("method") or {}, resolve=True)
    for key in given:
        if key not in OPTIONS:
            raise ConfigError(f"method.{key}: unknown option of pipeline self_distill; valid keys: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **given}
    rounds = opts["rounds"]
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"method.rounds={rounds!r}; give a whole number of distillation rounds >= 1 "
                          "(round 0, the fit to the labels, comes before them)")
    opts["alpha"] = alphas(opts["alpha"], rounds)
    if opts["criterion"] not in CRITERIA:
        raise ConfigError(f"method.criterion={opts['criterion']!r}; choose from: {', '.join(CRITERIA)}")
    if opts["init"] not in INITS:
        raise ConfigError(f"method.init={opts['init']!r}; choose from: new (seed + round, as the official code), "
                          "same (round 0's initialisation)")
    if cfg.teachers:
        raise ConfigError(f"teachers: {', '.join(cfg.teachers)}; pipeline self_distill's teacher in each round is "
                          "the previous round's student: leave teachers empty")
    return opts


def alphas(value: Any, rounds: int) -> list[float | str]:
    """``method.alpha`` as one value per round: a number in [0, 1] or ``auto`` for every round, or a
    list of ``rounds`` of them."""
    def one(v: Any) -> float | str | None:
        if v == AUTO:
            return AUTO
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1
        return float(v) if ok else None

    values = value if isinstance(value, list) else [value] * rounds
    parsed = [one(v) for v in values]
    if value is None or len(parsed) != rounds or None in parsed:
        raise ConfigError(f"method.alpha={value!r}; give the labels' weight: a number in [0, 1], auto (the "
                          f"closed-form estimate), or a list of {rounds} of them, one per round "
                          f"(method.rounds={rounds})")
    return parsed


def optimal_alpha(fit_labels: Tensor, fit_teacher: Tensor, target: Tensor) -> float:
    """``alpha* = <t - f_0, f_1 - f_0> / ||f_1 - f_0||^2`` clipped to [0, 1] (1 when ``f_1 = f_0``):
    the alpha whose ``alpha * f_1 + (1 - alpha) * f_0`` is nearest ``t`` in squared error, summed
    over all entries. ``fit_labels``: ``f_1``, the fit to the labels alone; ``fit_teacher``: ``f_0``,
    the fit to the previous round's predictions alone; ``target``: ``t``, held-out labels (one-hot);
    all of one shape, e.g. ``[items, classes]`` probabilities."""
    d = (fit_labels - fit_teacher).double()
    denom = d.pow(2).sum()
    if denom == 0:
        return 1.0
    alpha = float(((target.double() - fit_teacher.double()) * d).sum() / denom)
    return min(1.0, max(0.0, alpha))


@torch.no_grad()
def probabilities(model: torch.nn.Module, keys: list[str], dataset: Dataset, device: torch.device,
                  label_key: str = "label") -> tuple[Tensor, Tensor]:
    """``softmax`` of ``model``'s logits (float32) on the labelled items of ``dataset``, and their labels."""
    net = Net(model, keys).to(device).eval()
    probs, labels = [], []
    for batch in loader(dataset, 256):
        batch = to_device(batch, device)
        keep = batch[label_key] >= 0
        probs.append(net(batch).logits.float().softmax(1)[keep].cpu())
        labels.append(batch[label_key][keep].cpu())
    return torch.cat(probs), torch.cat(labels)


def trained(run_dir: Path, cfg: DictConfig, meta: dict) -> torch.nn.Module:
    """The student that the round in ``run_dir`` saved (``student.pt``), built from ``cfg.student``."""
    model = build_model(cfg.student, meta, "student")
    load_weights(model, str(run_dir / "student.pt"), f"the student of {run_dir}")
    return model


def round_config(cfg: DictConfig, tau: int, alpha: float, run_dir: Path, previous: Path | None,
                 opts: dict, name: str) -> DictConfig:
    """The ``distill`` config of round ``tau`` (or its probe) in ``run_dir``: the student of ``cfg``;
    without ``previous``, no teacher and the loss ``gt_labels``; else the teacher ``previous`` (the
    student saved in ``previous/student.pt``, frozen, cached) and ``gt_mix`` with ``alpha``."""
    node = OmegaConf.to_container(cfg, resolve=True)
    if opts["init"] == "new":
        node["seed"] = cfg.seed + tau
        factory = DATASETS[cfg.data.name]
        if "split_seed" in inspect.signature(factory).parameters or "split_seed" in DATASETS.meta(cfg.data.name).get(
                "ranges", {}):
            node["data"]["args"].setdefault("split_seed", cfg.seed)  # every round on the split of the run's seed
    if previous is None:
        node["teachers"] = {}
        node["losses"] = {"gt_labels": {"args": {"criterion": opts["criterion"]}}}
    else:
        node["teachers"] = {"previous": {k: node["student"][k] for k in ("name", "args", "inputs")}
                            | {"checkpoint": str(previous / "student.pt"), "frozen": True, "cache": True}}
        node["losses"] = {"gt_mix": {"args": {"alpha": alpha, "criterion": opts["criterion"]}}}
    node.update(pipeline="distill", method={}, run_dir=str(run_dir), name=name, baseline=False, export=[],
                cache_dir=str(run.cache_path(cfg)), resume=bool(cfg.resume and (run_dir / "config.yaml").is_file()))
    out = typed_sections(OmegaConf.create(node))
    check_names(out)
    return out


def run_round(cfg: DictConfig) -> dict:
    """Run the round ``cfg`` (:func:`round_config`) unless resuming finds it finished; its results."""
    done = Path(cfg.run_dir) / "results.json"
    if cfg.resume and done.is_file():
        log.info("%s: finished before, kept (%s)", cfg.name, cfg.run_dir)
        return json.loads(done.read_text())
    return run.run(cfg)


def scores(results: dict) -> dict:
    """The ``val_*`` and ``test_*`` entries of a round's student."""
    return {k: v for k, v in results["student"].items() if k.startswith(("val_", "test_"))}


@PIPELINES.register("self_distill")
def self_distill(cfg: DictConfig) -> dict[str, Any]:
    """Round 0 on the labels, then ``method.rounds`` rounds of self-distillation with ground truth,
    each a ``distill`` run in ``<run_dir>/round<tau>/`` whose teacher is the previous round's
    student; ``method.alpha: auto`` rounds first train their probe (``probe<tau>/``) and estimate
    alpha (:func:`optimal_alpha`) on the validation split."""
    t_start = time.perf_counter()
    opts = options(cfg)
    data, meta = load_data(cfg)
    run_dir = run.start(cfg, meta)
    label, keys = run.label(cfg), list(cfg.student.inputs)
    device = Trainer(trainer_config(cfg)).device
    rows: list[dict] = []
    previous = fit_labels = target = None
    for tau in range(opts["rounds"] + 1):
        here = run_dir / f"round{tau}"
        extra: dict[str, Any] = {}
        if tau == 0:
            alpha, source = 1.0, "labels"
        elif opts["alpha"][tau - 1] != AUTO:
            alpha, source = opts["alpha"][tau - 1], "config"
        else:
            probe = run_dir / f"probe{tau}"
            probed = run_round(round_config(cfg, tau, 0.0, probe, previous, opts, f"{label}_probe{tau}"))
            fit_teacher, _ = probabilities(trained(probe, cfg, meta), keys, data.val, device)
            alpha, source = optimal_alpha(fit_labels, fit_teacher, target), "auto"
            log.info("round %d: estimated alpha = %.4f (the labels' weight)", tau, alpha)
            stored = here / "config.yaml"
            if cfg.resume and stored.is_file():  # a resumed round keeps the alpha it started with
                alpha = float(OmegaConf.load(stored).losses.gt_mix.args.alpha)
            extra["probe"] = {"run_dir": str(probe), **scores(probed)}
        results = run_round(round_config(cfg, tau, alpha, here, previous, opts, f"{label}_round{tau}"))
        rows.append({"round": tau, "alpha": alpha, "alpha_from": source, "run_dir": str(here), **extra,
                     **scores(results)})
        if tau == 0 and AUTO in opts["alpha"]:  # f_1 of every estimate: round 0's fit
            fit_labels, labels = probabilities(trained(here, cfg, meta), keys, data.val, device)
            target = F.one_hot(labels, fit_labels.shape[1]).float()
        previous, last = here, results
    io.save(io.load(previous / "student.pt", "the last round's student", "rerun with resume=true"),
            run_dir / "student.pt")
    out = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir), "pipeline": "self_distill",
           "metrics": trainer_config(cfg, data=data).metrics, "rounds": rows,
           "baseline": {k: v for k, v in rows[0].items() if k.startswith(("val_", "test_"))},
           "student": last["student"], "latency_batch": last["latency_batch"]}
    return run.finish(cfg, run_dir, out, t_start)
