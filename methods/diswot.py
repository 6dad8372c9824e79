"""DisWOT: a student architecture for a teacher, searched without training (Dong, Li and Wei, "DisWOT:
Student Architecture Search for Distillation WithOut Training", CVPR 2023).

Each candidate student ``S`` is scored against the teacher ``T`` at initialisation, on one batch of
``B`` training images, by two distances (lower: the pair should distil better):

- semantic: the classifiers' weight gradients of the cross-entropy, ``g = dCE/dW`` (``[K, C]``, ``K``
  classes: a class-activation weighting of the last features, Grad-CAM's), as inter-class
  correlation matrices ``G = normalize_rows(g g^T)``: ``D_sem = ||G_T - G_S||_F^2 / K^2``;
- relation: the last feature maps ``f`` (``[B, ...]``, flattened) as sample-relation matrices
  ``R = normalize_rows(f f^T)``: ``D_rel = ||R_T - R_S||_F^2 / B^2``;

both are the loss ``sp`` (similarity-preserving KD, :mod:`mmkd.losses.features.sp`), the first over
the rows of ``g``, in float64; and ``score = -(D_sem + D_rel)``. An evolutionary search (:func:`evolve`) walks the space: a
population of ``population`` random candidates; each of ``iterations`` steps mutates one gene of a
parent drawn from the ``parents`` best, scores the child (unseen and within ``max_params``) and
drops the worst, so the population keeps its size. The best scored candidate is the pick.

The pipeline ``diswot`` (options under ``method``) searches the CIFAR ResNets of ``cifar_resnet``:
genes ``blocks1..3`` (blocks a stage), ``width1..3`` (channels a stage; the stem has ``width1``) and
``kernel1..3``; it writes ``<run_dir>/student.yaml`` (the pick as a ``student`` node), and
``results.json`` with every scored candidate, the pick and its Hydra override
(``student={name: cifar_resnet, ...}``) for a run that distils it.

Official code followed (github.com/lliai/DisWOT-CVPR2023, ``compute_diswot_procedure``): both
networks re-initialised with Gaussian weights (the teacher once for the whole search) (convolutions and linear layers ``N(0, 1)``, BatchNorm
1 / 0; ``teacher_init: trained`` keeps the teacher's trained weights instead, our option), one
training batch, the CE gradient of each classifier's weight and the SP relation of the last
features, the score the negated sum. Deviation: the official code compares the gradients as
per-class channel correlations (``C x C``, equal widths or a random 1x1 embedding); here as the
class-by-class matrix of the paper's inter-class formulation, defined for any two widths.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import random
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mmkd import io, run
from mmkd.build import build_model, load_data, load_weights
from mmkd.callbacks import ProgressBar
from mmkd.config import ConfigError
from mmkd.data import loader
from mmkd.losses.features.sp import sp
from mmkd.net import Net, num_params
from mmkd.registry import PIPELINES

log = logging.getLogger("mmkd")

SPACE = {**{f"blocks{i}": [1, 2, 3] for i in (1, 2, 3)}, "width1": [8, 16, 24], "width2": [16, 32, 48],
         "width3": [32, 64, 96], **{f"kernel{i}": [3, 5] for i in (1, 2, 3)}}
OPTIONS = {"space": SPACE, "population": 20, "iterations": 100, "parents": 5, "max_params": None,
           "batch_size": 64, "teacher_init": "gaussian", "feature": "layer3"}


def gaussian_init(model: nn.Module) -> nn.Module:
    """The official re-initialisation, in place: convolution and linear weights ``N(0, 1)``, their
    biases 0, BatchNorm / GroupNorm weight 1 and bias 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    return model


def signals(model: nn.Module, keys: list[str], feature: str, batch: dict) -> tuple[Tensor, Tensor]:
    """The CE gradient of ``model``'s classifier weight and the ``feature`` output on ``batch`` (train
    mode: BatchNorm on the batch's statistics, as at initialisation)."""
    net = Net(model, keys, [feature]).train()
    out = net(batch)
    weight = model.get_classifier().weight
    grad, = torch.autograd.grad(F.cross_entropy(out.logits, batch["label"]), weight)
    return grad.detach(), out.features[feature].detach()


def teacher_signals(teacher: nn.Module, batch: dict, keys: list[str], feature: str = "layer3",
                    init: str = "gaussian") -> tuple[Tensor, Tensor]:
    """The teacher's :func:`signals` on ``batch``, from a copy (re-initialised with ``init: gaussian``):
    computed once for a whole search, as the official code initialises its teacher once."""
    t = copy.deepcopy(teacher)
    return signals(gaussian_init(t) if init == "gaussian" else t, keys, feature, batch)


def proxy(teacher: tuple[Tensor, Tensor], student: nn.Module, batch: dict, keys: list[str],
          feature: str = "layer3") -> dict[str, float]:
    """DisWOT's distances and score of ``student`` (a copy of it, re-initialised) against the
    teacher's :func:`teacher_signals` on ``batch`` (module docstring)."""
    g_t, f_t = teacher
    g_s, f_s = signals(gaussian_init(copy.deepcopy(student)), keys, feature, batch)
    sem, rel = float(sp(g_s.double(), g_t.double())), float(sp(f_s.double(), f_t.double()))
    return {"semantic": sem, "relation": rel, "score": -(sem + rel)}


def mutate(candidate: dict, space: dict[str, list], rng: random.Random) -> dict:
    """``candidate`` with one gene (of those with a choice) set to another of its values."""
    gene = rng.choice([g for g, values in space.items() if len(values) > 1])
    return {**candidate, gene: rng.choice([v for v in space[gene] if v != candidate[gene]])}


def evolve(score: Callable[[dict], float], space: dict[str, list], population: int = 20, iterations: int = 100,
           parents: int = 5, valid: Callable[[dict], bool] = lambda c: True, seed: int = 0,
           progress: Callable[[int, int], None] | None = None) -> list[tuple[dict, float]]:
    """Every candidate the search scores, in order, with its score (module docstring). Candidates
    are dicts gene -> value of ``space``; ``valid`` rejects one before it is scored."""
    rng = random.Random(seed)
    seen: set[tuple] = set()
    history: list[tuple[dict, float]] = []

    def visit(c: dict) -> tuple[dict, float] | None:
        key = tuple(c[g] for g in space)
        if key in seen or not valid(c):
            return None
        seen.add(key)
        history.append((c, score(c)))
        if progress:
            progress(len(history), population + iterations)
        return history[-1]

    pool: list[tuple[dict, float]] = []
    for _ in range(100 * population):
        if len(pool) == population:
            break
        if (got := visit({g: rng.choice(v) for g, v in space.items()})) is not None:
            pool.append(got)
    if not pool:
        raise ValueError("evolve: no valid candidate in the space; loosen the constraint")
    for _ in range(iterations):
        parent = rng.choice(sorted(pool, key=lambda cs: -cs[1])[:parents])[0]
        if (got := visit(mutate(parent, space, rng))) is not None:
            pool.append(got)
            pool.remove(min(pool, key=lambda cs: cs[1]))
    return history


def architecture(c: dict) -> dict:
    """The ``cifar_resnet`` arguments of candidate ``c`` (genes of :data:`SPACE`)."""
    return {"blocks": [c[f"blocks{i}"] for i in (1, 2, 3)],
            "widths": [c["width1"], c["width1"], c["width2"], c["width3"]],
            "kernels": [c[f"kernel{i}"] for i in (1, 2, 3)]}


def options(cfg: DictConfig) -> dict:
    """``cfg.method`` over :data:`OPTIONS`, checked; a bad value is a one-line :class:`ConfigError`."""
    given = OmegaConf.to_container(cfg.get("method") or {}, resolve=True)
    for key in given:
        if key not in OPTIONS:
            raise ConfigError(f"method.{key}: unknown option of pipeline diswot; valid keys: {', '.join(OPTIONS)}")
    opts = {**OPTIONS, **given}
    for key in ("population", "parents", "batch_size"):
        if isinstance(opts[key], bool) or not isinstance(opts[key], int) or opts[key] < 1:
            raise ConfigError(f"method.{key}={opts[key]!r}; give a whole number >= 1")
    if isinstance(opts["iterations"], bool) or not isinstance(opts["iterations"], int) or opts["iterations"] < 0:
        raise ConfigError(f"method.iterations={opts['iterations']!r}; give a whole number >= 0")
    mp = opts["max_params"]
    if mp is not None and (isinstance(mp, bool) or not isinstance(mp, int) or mp < 1):
        raise ConfigError(f"method.max_params={mp!r}; give a whole number of parameters, or null for no limit")
    if opts["teacher_init"] not in ("gaussian", "trained"):
        raise ConfigError(f"method.teacher_init={opts['teacher_init']!r}; choose from: gaussian, trained")
    given_space = given.get("space") or {}
    if not isinstance(given_space, dict) or (unknown := set(given_space) - set(SPACE)):
        raise ConfigError(f"method.space: unknown gene {sorted(unknown)[0] if isinstance(given_space, dict) else ''!r}; "
                          f"the genes are: {', '.join(SPACE)}")
    space = opts["space"] = {**SPACE, **given_space}  # the genes not given keep their default choices
    for gene, values in space.items():
        if not isinstance(values, list) or not values or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in values):
            raise ConfigError(f"method.space.{gene}={values!r}; give a list of whole numbers >= 1")
        if gene.startswith("kernel") and any(x % 2 == 0 for x in values):
            raise ConfigError(f"method.space.{gene}={values}: kernel sizes must be odd")
    if len(cfg.teachers) != 1:
        raise ConfigError(f"pipeline diswot needs one teacher; teachers has {len(cfg.teachers)}")
    (name, tc), = cfg.teachers.items()
    if opts["teacher_init"] == "trained" and not tc.checkpoint:
        raise ConfigError(f"method.teacher_init=trained needs teachers.{name}.checkpoint (a trained teacher)")
    return opts


@contextlib.contextmanager
def progress(setting: str):
    """``advance(scored, total)`` for the search: a rich bar where ``trainer.progress`` shows one, else
    an INFO line at every tenth."""
    if not ProgressBar.wanted(setting):
        yield lambda n, total: log.info("diswot: %d / %d candidates scored", n, total) \
            if n % max(1, total // 10) == 0 else None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("diswot search")
        yield lambda n, total: bar.update(task, completed=n, total=total)


class Scorer:
    """DisWOT's proxy of ``cifar_resnet`` candidates for the one teacher of ``cfg``: the batch drawn
    with the run's seed from the training split, each candidate built from the run's seed;
    ``scorer(c)`` is :func:`proxy`'s dict, ``scorer.params(c)`` the candidate's parameter count."""

    def __init__(self, cfg: DictConfig, opts: dict, data, meta: dict):
        (name, tc), = cfg.teachers.items()
        torch.manual_seed(cfg.seed)
        self.teacher = build_model(tc, meta, f"teachers.{name}")
        if opts["teacher_init"] == "trained":
            load_weights(self.teacher, tc.checkpoint, f"teachers.{name}.checkpoint", name)
        g = torch.Generator().manual_seed(cfg.seed)
        pick = torch.randperm(len(data.train), generator=g)[:opts["batch_size"]].sort().values.tolist()
        self.batch = next(iter(loader(torch.utils.data.Subset(data.train, pick), len(pick))))
        self.teacher_out = teacher_signals(self.teacher, self.batch, list(tc.inputs), opts["feature"],
                                           opts["teacher_init"])
        self.cfg, self.opts, self.meta = cfg, opts, meta
        self.student = OmegaConf.to_container(cfg.student, resolve=True)
        self.keys = list(cfg.student.inputs)
        self.sizes: dict[tuple, int] = {}

    def model(self, c: dict) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return build_model(OmegaConf.create({**self.student, "name": "cifar_resnet", "args": architecture(c)}),
                           self.meta, "student")

    def params(self, c: dict) -> int:
        key = tuple(c.values())
        if key not in self.sizes:
            self.sizes[key] = num_params(self.model(c))
        return self.sizes[key]

    def __call__(self, c: dict) -> dict[str, float]:
        return proxy(self.teacher_out, self.model(c), self.batch, self.keys, self.opts["feature"])


@PIPELINES.register("diswot")
def diswot(cfg: DictConfig) -> dict[str, Any]:
    """Search a ``cifar_resnet`` student for the one teacher of ``cfg`` (module docstring)."""
    t_start = time.perf_counter()
    opts = options(cfg)
    data, meta = load_data(cfg)
    scorer = Scorer(cfg, opts, data, meta)
    params, keys = scorer.params, scorer.keys
    found: dict[tuple, dict] = {}

    def score(c: dict) -> float:
        found[tuple(c.values())] = scorer(c)
        return found[tuple(c.values())]["score"]

    t_search = time.perf_counter()
    try:
        with progress(cfg.trainer.progress) as advance:
            history = evolve(score, opts["space"], opts["population"], opts["iterations"], opts["parents"],
                             (lambda c: params(c) <= opts["max_params"]) if opts["max_params"] else (lambda c: True),
                             cfg.seed, advance)
    except ValueError:
        raise ConfigError(f"method.max_params={opts['max_params']}: no candidate of method.space found with so few "
                          "parameters; raise it or add smaller choices") from None
    search_s = time.perf_counter() - t_search
    run_dir = run.start(cfg, meta)
    best, best_score = max(history, key=lambda cs: cs[1])
    student = {**scorer.student, "name": "cifar_resnet", "args": architecture(best)}
    io.write_text(OmegaConf.to_yaml(OmegaConf.create({"student": student})), run_dir / "student.yaml")
    args = architecture(best)
    override = (f"student={{name: cifar_resnet, inputs: [{', '.join(keys)}], args: {{blocks: {args['blocks']}, "
                f"widths: {args['widths']}, kernels: {args['kernels']}}}}}")
    log.info("diswot: %d candidates scored in %.1f s; pick %s (score %.4g, %d parameters)", len(history), search_s,
             args, best_score, params(best))
    out = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir), "pipeline": "diswot",
           "best": {"genes": best, "args": args, **found[tuple(best.values())], "params": params(best)},
           "override": override, "search_s": search_s,
           "summary": f"diswot: {len(history)} candidates scored in {search_s:.1f} s; the pick "
                      f"({params(best):,} parameters, score {best_score:.4g}) is {run_dir / 'student.yaml'}; "
                      f"distil it with: mmkd run experiment=cifar10_kd '{override}'",
           "candidates": [{"genes": c, "args": architecture(c), **found[tuple(c.values())], "params": params(c)}
                          for c, _ in history]}
    return run.finish(cfg, run_dir, out, t_start, export=False)
