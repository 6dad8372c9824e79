"""The ``distill`` pipeline: an experiment config end to end, and the run directory's life cycle.

``run(cfg)``: load the data set; for each teacher, load its checkpoint or train it on labels; cache
frozen teachers' outputs; distil the student through the mixture core; train the same student on
labels alone from the same initialisation (the baseline); evaluate everything on the test split;
export the student; write ``results.json`` and a PNG of the learning curves into the run directory.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmkd import io, store
from mmkd.build import build_model, build_plugins, build_router, build_terms, load_data, load_weights, trainer_config
from mmkd.cache import cache_teacher
from mmkd.config import ConfigError
from mmkd.callbacks import Callback
from mmkd.data import DataSplits, cacheable
from mmkd.distiller import Distiller, Term
from mmkd.export import export_student
from mmkd.net import Net, Teacher, num_params
from mmkd.generate import write_samples
from mmkd.metrics import FIDELITY
from mmkd.models import Generative
from mmkd.registry import PIPELINES
from mmkd.report import add_latencies, plot_curves
from mmkd.rundir import claim
from mmkd.trainer import FitResult, Trainer, seed_everything
from mmkd.token_cache import cache_tokens
from mmkd.view_cache import cache_views, reproducible

log = logging.getLogger("mmkd")


def fit(name: str, module: Distiller, data: DataSplits, cfg: DictConfig, run_dir: Path,
        epochs: int | None = None, lr: float | None = None,
        callbacks: Sequence[Callback] = ()) -> tuple[FitResult, dict[str, float]]:
    """Train ``module`` as stage ``name`` (in ``run_dir/name``, with ``callbacks``) and evaluate it on
    the test split (with the fidelity metrics, :data:`mmkd.metrics.FIDELITY`, when it has teachers)."""
    log.info("stage %s", name)
    trainer = Trainer(trainer_config(cfg, epochs, lr, data), run_dir / name, resume=cfg.resume, stage=name,
                      cache_dir=cache_path(cfg))
    result = trainer.fit(module, data.train, data.val, callbacks)
    return result, trainer.evaluate(module, data.test, FIDELITY if isinstance(module, Distiller) and len(module.teachers) else ())


def train_teacher(name: str, tc: DictConfig, model: nn.Module, data: DataSplits, cfg: DictConfig,
                  run_dir: Path) -> dict[str, float]:
    """Train teacher ``name`` on labels as stage ``teachers/<name>`` (its ``trainer`` settings over the
    run's; its ``losses``, by default CE alone, and its ``callbacks``), or load it from the
    trained-teacher store (:mod:`mmkd.store`) when an identical teacher was trained before; return the
    kept epoch's metrics."""
    stage = f"teachers/{name}"
    tcfg = trainer_config(cfg, tc.epochs, tc.lr, data, teacher=tc)
    spec = {"name": tc.name, "args": OmegaConf.to_container(tc.args), "inputs": list(tc.inputs)}
    for own in ("losses", "callbacks"):  # in the key only when set: a CE-only teacher keeps the key it had
        if tc[own]:
            spec[own] = OmegaConf.to_container(tc[own], resolve=True)
    train = data.labelled if data.labelled is not None else data.train  # labels alone: the labelled items suffice
    key = store.teacher_key(spec, model, tcfg, [train, data.val]) if tc.reuse else None
    hit = store.load(cache_path(cfg), key, run_dir / stage) if key else None
    net = Net(model, tc.inputs, tokens=data.tokens)
    terms = build_terms(tc, net, [], data, f"teachers.{name}.losses") if tc.losses else [Term("ce")]
    callbacks = build_plugins(tc, "callbacks", f"teachers.{name}.callbacks")
    module = Distiller(net, [], terms)
    if hit is not None:
        module.load_state_dict(hit["model"])
        log.info("teachers.%s: loaded from the trained-teacher store, %s (same model, trainer, data and seed; "
                 "teachers.%s.reuse=false trains it again)", name, store.entry(cache_path(cfg), key), name)
        return hit["metrics"]
    log.info("stage %s", stage)
    trainer = Trainer(tcfg, run_dir / stage, resume=cfg.resume, stage=stage, cache_dir=cache_path(cfg))
    fitted = trainer.fit(module, train, data.val, callbacks)
    if key and trainer.is_main:
        log.info("teachers.%s: stored as %s", name, store.save(cache_path(cfg), key, run_dir / stage))
    return fitted.metrics


def scores(test: dict[str, float], fitted: dict[str, float] | None = None) -> dict[str, float]:
    """A results row: ``val_<metric>`` of the kept epoch's metrics ``fitted`` and ``test_<metric>``."""
    row = {f"val_{k[4:]}": v for k, v in (fitted or {}).items() if k.startswith("val/")}
    return {**row, **{f"test_{k}": v for k, v in test.items()}}


def label(cfg: DictConfig) -> str:
    """The run's name: ``name``, by default the experiment's."""
    return cfg.get("name") or cfg.experiment


def default_run_dir(cfg: DictConfig) -> str:
    """``<out_dir>/<name>/<date-time>`` (``name``: the run's label, by default the experiment's name)."""
    return os.path.join(cfg.out_dir, label(cfg), datetime.now().strftime("%Y%m%d-%H%M%S"))


class ExportFailed(RuntimeError):
    """The run finished and its ``results`` are saved, but exporting the student failed."""

    def __init__(self, message: str, results: dict[str, Any]):
        super().__init__(message)
        self.results = results


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the experiment described by ``cfg`` through its pipeline (``cfg.pipeline``, registered in
    :data:`~mmkd.registry.PIPELINES`; default ``distill``); return (and save) its results.

    The run directory (``cfg.run_dir``, set here to a new dated folder when empty) is held
    exclusively for the run (:func:`mmkd.rundir.claim`); with ``resume`` it must hold a run.
    """
    if not cfg.run_dir:
        cfg.run_dir = default_run_dir(cfg)
    if cfg.resume and not (Path(cfg.run_dir) / "config.yaml").is_file():
        raise ConfigError(f"resume=true: {cfg.run_dir!r} holds no run; set run_dir to an existing run directory")
    io.check_writable(cfg.run_dir, "run_dir")
    io.check_writable(cache_path(cfg), "cache_dir")
    with claim(cfg.run_dir, resume=cfg.resume):
        return PIPELINES[cfg.get("pipeline") or "distill"](cfg)


def cache_path(cfg: DictConfig) -> Path:
    """The teacher-output cache folder: ``cache_dir``, by default ``<out_dir>/cache``."""
    return Path(cfg.cache_dir or os.path.join(cfg.out_dir, "cache"))


def start(cfg: DictConfig, meta: dict, tokenizer: Any = None) -> Path:
    """The run directory, once the config has been checked: ``config.yaml``, ``data.json`` and the
    data set's ``tokenizer`` (``tokenizer.json``, read by ``mmkd generate`` and later runs) are written
    there (a resumed run keeps the ones it started with)."""
    run_dir = Path(cfg.run_dir)
    if not cfg.resume:
        io.write_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
        io.write_json(meta, run_dir / "data.json")
        if tokenizer is not None:
            tokenizer.save(run_dir / "tokenizer.json")
    return run_dir


def finish(cfg: DictConfig, run_dir: Path, results: dict[str, Any], t_start: float, export: bool = True) -> dict:
    """Write ``results.json`` (the run's ``name`` first) and ``curves.png``, then export the student
    (``cfg.export``) and record the files in ``results.json``. A failed export keeps the results and
    raises :class:`ExportFailed`."""
    named = {"name": label(cfg), **results}  # first in results.json
    results.clear()
    results.update(named)
    results["export"] = []
    results["time_s"] = time.perf_counter() - t_start
    io.write_json(results, run_dir / "results.json")
    plot_curves(run_dir)
    if not (export and cfg.export):
        return results
    try:
        results["export"] = [str(p) for p in export_student(run_dir, cfg.export)]
    except Exception as e:  # the run's results are saved: report the export in one line
        results["export_error"] = io.first_line(e)
        io.write_json(results, run_dir / "results.json")
        log.debug("export failed", exc_info=True)
        raise ExportFailed(f"export failed ({results['export_error']}); the run's results are in "
                           f"{run_dir / 'results.json'}; retry with: mmkd export run_dir={run_dir}", results) from e
    io.write_json(results, run_dir / "results.json")
    return results


@PIPELINES.register("distill")
def distill(cfg: DictConfig) -> dict[str, Any]:
    """The default pipeline: train or load the teachers, distil the student, train the baseline."""
    t_start = time.perf_counter()
    cache_dir = cache_path(cfg)
    data, meta = load_data(cfg)
    ce = [Term("ce")]
    device = Trainer(trainer_config(cfg)).device

    # build (and load) every model before training anything, so a bad config fails at once
    teacher_models = {}
    for name, tc in cfg.teachers.items():
        seed_everything(cfg.seed)
        teacher_models[name] = build_model(tc, meta, f"teachers.{name}")
        if tc.checkpoint:
            load_weights(teacher_models[name], tc.checkpoint, f"teachers.{name}.checkpoint", name)
    seed_everything(cfg.seed)
    student = build_model(cfg.student, meta, "student")
    if cfg.student.init:  # e.g. the student of an earlier round (CoMD), which this run trains on
        load_weights(student, cfg.student.init, "student.init")
    init = copy.deepcopy(student.state_dict())
    router = build_router(cfg, meta, student, data, len(cfg.teachers)) if cfg.teachers else None
    transforms, policies, callbacks = (build_plugins(cfg, k) for k in ("transforms", "policies", "callbacks"))
    run_dir = start(cfg, meta, data.tokenizer)

    results: dict[str, Any] = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir),
                               "metrics": trainer_config(cfg, data=data).metrics}
    teachers = []
    for name, tc in cfg.teachers.items():
        model, fitted = teacher_models[name], None
        if not tc.checkpoint and tc.epochs != 0:  # epochs: 0 uses the model as built (pretrained)
            fitted = train_teacher(name, tc, model, data, cfg, run_dir)
        teacher = Teacher(model, tc.inputs, tc.features, frozen=tc.frozen, tokens=data.tokens)
        test = Trainer(trainer_config(cfg, data=data)).evaluate(Distiller(teacher, [], ce), data.test)
        row = {**scores(test, fitted), "params": num_params(model)}
        if tc.frozen and tc.cache and all(t.keeps_inputs for t in transforms):
            if data.tokens is not None and cacheable(data.train):  # sequences: top-k per token, sharded
                teacher = cache_tokens(teacher, data.train, cache_dir, tc.cache_topk, device=device)
            elif cacheable(data.train):
                teacher = cache_teacher(teacher, data.train, cache_dir, device=device)
            elif reproducible(data.train):  # seeded augmentation: each view once
                teacher = cache_views(teacher, data.train, cache_dir, tc.cache_topk)
        teachers.append(teacher)
        results.setdefault("teachers", {})[name] = row

    student_net = Net(student, cfg.student.inputs, cfg.student.features, data.tokens)
    terms = build_terms(cfg, student_net, teachers, data)
    distiller = Distiller(student_net, teachers, terms, router, transforms=transforms)
    fitted, test = fit("student", distiller, data, cfg, run_dir, callbacks=[*policies, *callbacks])
    results["student"] = {**scores(test, fitted.metrics), "params": num_params(student)}
    io.save(student.state_dict(), run_dir / "student.pt")
    if isinstance(student, Generative) and data.tokenizer is not None:
        results["samples"] = str(write_samples(student, data.tokenizer, data.test, run_dir / "samples.txt"))

    if cfg.baseline:
        baseline = build_model(cfg.student, meta, "student")
        baseline.load_state_dict(init)
        fitted, test = fit("baseline", Distiller(Net(baseline, cfg.student.inputs, tokens=data.tokens), [], ce), data,
                           cfg, run_dir)
        results["baseline"] = scores(test, fitted.metrics)

    add_latencies(results, data, {"student": (student, cfg.student.inputs),
                                  **{n: (m, cfg.teachers[n].inputs) for n, m in teacher_models.items()}})
    return finish(cfg, run_dir, results, t_start)
