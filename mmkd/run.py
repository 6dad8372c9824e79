"""Running an experiment config end to end, and exporting its student.

``run(cfg)``: load the data set; for each teacher, load its checkpoint or train it on labels; cache
frozen teachers' outputs; distil the student through the mixture core; train the same student on
labels alone from the same initialisation (the baseline); evaluate everything on the test split;
export the student; write ``results.json`` and a PNG of the learning curves into the run directory.
"""
from __future__ import annotations

import copy
import inspect
import logging
import os
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmkd import io
from mmkd.cache import cache_teacher
from mmkd.config import ConfigError, ModelConfig
from mmkd.data import DataSplits, loader
from mmkd.adapters import make_adapter
from mmkd.distiller import Distiller, Term, pick
from mmkd.export import export_student
from mmkd.net import Net, Teacher, num_params
from mmkd.registry import DATASETS, MODELS, PIPELINES, ROUTERS
from mmkd.rundir import check_writable, claim
from mmkd.trainer import FitResult, Trainer, TrainerConfig, seed_everything

log = logging.getLogger("mmkd")


def build_model(mc: ModelConfig, meta: dict, where: str) -> nn.Module:
    """Instantiate the registered model ``mc.name`` for a data set described by ``meta`` (a factory
    that takes ``class_names`` gets the data set's unless ``mc.args`` sets them)."""
    shapes = [tuple(meta["shapes"][k]) for k in mc.inputs if k in meta["shapes"]]
    if len(shapes) != len(mc.inputs):
        raise ConfigError(f"{where}.inputs: {list(mc.inputs)} are not all inputs of the data set; "
                          f"choose from: {', '.join(meta['shapes'])}")
    in_shape = shapes[0] if len(shapes) == 1 else dict(zip(mc.inputs, shapes))
    args = dict(mc.args)
    if "class_names" in inspect.signature(MODELS[mc.name]).parameters and meta.get("class_names"):
        args.setdefault("class_names", meta["class_names"])  # e.g. a zero-shot head's prompts
    try:
        model = MODELS[mc.name](num_classes=meta["num_classes"], in_shape=in_shape, **args)
    except TypeError as e:
        raise ConfigError(f"{where}.args: {e}") from None
    modules = [n for n, _ in model.named_modules() if n]
    for path in mc.features:
        if path not in modules:
            shown = ", ".join(modules[:12]) + (", ..." if len(modules) > 12 else "")
            raise ConfigError(f"{where}.features: {mc.name} has no sub-module {path!r}; its modules: {shown}")
    return model


def load_data(cfg: DictConfig) -> tuple[DataSplits, dict]:
    """The data set of ``cfg.data`` under ``cfg.data_root``, and its description (``meta``)."""
    factory, args = DATASETS[cfg.data.name], dict(cfg.data.args)
    try:
        inspect.signature(factory).bind(root=cfg.data_root, **args)
    except TypeError as e:
        valid = [p for p in inspect.signature(factory).parameters if p != "root"]
        raise ConfigError(f"data.args: {e} (data set {cfg.data.name!r} takes: {', '.join(valid)})") from None
    data: DataSplits = factory(root=cfg.data_root, **args)
    return data, data.meta()


def build_router(cfg: DictConfig, meta: dict, student: nn.Module, data: DataSplits,
                 num_teachers: int) -> nn.Module:
    """The router of ``cfg.router`` over ``num_teachers`` teachers. A factory that names a parameter
    ``num_teachers``, ``num_classes`` or ``feature_shapes`` (the shapes, without batch, of the
    student's ``features``) gets it from the run unless ``router.args`` sets it."""
    factory, args = ROUTERS[cfg.router.name], dict(cfg.router.args)
    accepts = inspect.signature(factory).parameters
    if "num_teachers" in accepts:
        args.setdefault("num_teachers", num_teachers)
    if "num_classes" in accepts:
        args.setdefault("num_classes", meta["num_classes"])
    if "feature_shapes" in accepts and "feature_shapes" not in args and cfg.student.features:
        with torch.no_grad():
            out = Net(student, cfg.student.inputs, cfg.student.features).eval()(next(iter(loader(data.train, 2))))
        args["feature_shapes"] = {p: tuple(f.shape[1:]) for p, f in out.features.items()}
    try:
        return factory(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"router.args: {e}") from None


def load_weights(model: nn.Module, path: str, where: str, teacher: str | None = None) -> None:
    """Load a plain state dict, or the student of a trainer checkpoint (``best.pt``/``last.pt``).

    For a teacher, ``path`` may also be the directory of an earlier run that trained a teacher of
    the same name: its ``teachers/<name>/best.pt`` is loaded (how stages chain through run directories).
    """
    if teacher and os.path.isdir(path):
        stage = os.path.join(path, "teachers", teacher, "best.pt")
        if not os.path.isfile(stage):
            raise ConfigError(f"{where}: run directory {path!r} has no teachers/{teacher}/best.pt; "
                              f"give the run that trained teacher {teacher!r}, or a weights file")
        path = stage
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file {path!r}; give a state dict, a run's best.pt or a run directory")
    fix = f"give {where} a state dict saved with torch.save(model.state_dict(), path), or a run's best.pt"
    state = io.load(path, f"the weights for {where}", fix)  # weights_only: a checkpoint cannot run code
    if not isinstance(state, dict):
        from mmkd.data import DataError

        raise DataError(f"{path}: holds a {type(state).__name__}, not a state dict; {fix}")
    if "model" in state:
        state = {k.removeprefix("student.model."): v for k, v in state["model"].items()
                 if k.startswith("student.model.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"{where}: {path!r} does not fit the model: {str(e).splitlines()[0]}") from None


def trainer_config(cfg: DictConfig, epochs: int | None = None, lr: float | None = None) -> TrainerConfig:
    tc = TrainerConfig(**OmegaConf.to_container(cfg.trainer))
    tc.seed = cfg.seed
    if epochs is not None:
        tc.max_epochs = epochs
    if lr is not None:
        tc.lr = lr
    return tc


def fit(name: str, module: Distiller, data: DataSplits, cfg: DictConfig, run_dir: Path,
        epochs: int | None = None, lr: float | None = None) -> tuple[FitResult, dict[str, float]]:
    """Train ``module`` as stage ``name`` (in ``run_dir/name``) and evaluate it on the test split.

    In between, a student model with a ``calibrate(val_dataset, keys, label_key) -> dict`` method picks
    its inference settings on the validation split; the dict lands in the metrics as ``calibrated/<key>``
    and its ``acc`` (the calibrated model's validation accuracy), if given, replaces ``val/acc``.
    """
    log.info("stage %s", name)
    trainer = Trainer(trainer_config(cfg, epochs, lr), run_dir / name, resume=cfg.resume, stage=name)
    result = trainer.fit(module, data.train, data.val)
    net = getattr(module, "student", None)
    calibrate = getattr(getattr(net, "model", None), "calibrate", None)
    if callable(calibrate):  # inference settings the model picks on the validation split (e.g. DHO's alpha, beta)
        picked = calibrate(data.val, net.keys, getattr(module, "label_key", "label"))
        log.info("stage %s: calibrated on the validation split: %s", name, picked)
        result.metrics.update({f"calibrated/{k}": v for k, v in picked.items()})
        result.metrics["val/acc"] = picked.get("acc", result.metrics["val/acc"])
    return result, trainer.evaluate(module, data.test)


def build_terms(cfg: DictConfig, student: Net, teachers: list, data: DataSplits) -> list[Term]:
    """The loss terms of ``cfg.losses``; adapters are sized by one forward pass on a training batch."""
    terms, outs = [], None
    for k, t in cfg.losses.items():
        adapter = None
        if t.adapter:
            if outs is None:
                with torch.no_grad():
                    batch = next(iter(loader(data.train, 2)))
                    outs = student.eval()(batch), [teacher(batch) for teacher in teachers]
            if not teachers:
                raise ConfigError(f"losses.{k}.adapter: an adapter maps student to teacher features; there is no teacher")
            try:
                s_shape, t_shape = (pick(o, side).shape[1:] for o, side in ((outs[0], t.student), (outs[1][0], t.teacher)))
                adapter = make_adapter(t.adapter, s_shape, t_shape)
            except (KeyError, ValueError) as e:
                raise ConfigError(f"losses.{k}: {e.args[0]}") from None
        terms.append(Term(t.loss or k, t.weight, dict(t.args), name=k, student=t.student, teacher=t.teacher, adapter=adapter))
    return terms


LATENCY_BATCH = 256  # items of the test split in the batch the run times student and teachers on


def add_latencies(results: dict, data: DataSplits, models: dict[str, tuple[nn.Module, list[str]]]) -> None:
    """Time each model (row name -> (model, input keys); ``"student"`` for the student, the others
    teachers) on the first ``LATENCY_BATCH`` test items, on CPU, into ``results``."""
    results["latency_batch"] = n = min(len(data.test), LATENCY_BATCH)
    batch = next(iter(loader(data.test, n)))
    for name, (model, keys) in models.items():
        row = results["student"] if name == "student" else results["teachers"][name]
        row["latency_ms"] = latency_ms(model.cpu(), [batch[k] for k in keys])


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: list[torch.Tensor], repeats: int = 30, budget_s: float = 5.0) -> float:
    """Median wall time of one forward pass on ``inputs``, in milliseconds: ``repeats`` timed passes
    after a warm-up, fewer (at least 3) once they have taken ``budget_s`` seconds (large teachers)."""
    model.eval()
    model(*inputs)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        t0 = time.perf_counter()
        model(*inputs)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def default_run_dir(cfg: DictConfig) -> str:
    return os.path.join(cfg.out_dir, cfg.experiment, datetime.now().strftime("%Y%m%d-%H%M%S"))


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
    check_writable(cfg.run_dir, "run_dir")
    check_writable(cache_path(cfg), "cache_dir")
    with claim(cfg.run_dir, resume=cfg.resume):
        return PIPELINES[cfg.get("pipeline") or "distill"](cfg)


def cache_path(cfg: DictConfig) -> Path:
    """The teacher-output cache folder: ``cache_dir``, by default ``<out_dir>/cache``."""
    return Path(cfg.cache_dir or os.path.join(cfg.out_dir, "cache"))


def start(cfg: DictConfig, meta: dict) -> Path:
    """The run directory, once the config has been checked: ``config.yaml`` and ``data.json`` are
    written there (a resumed run keeps the ones it started with)."""
    run_dir = Path(cfg.run_dir)
    if not cfg.resume:
        io.write_text(OmegaConf.to_yaml(cfg, resolve=True), run_dir / "config.yaml")
        io.write_json(meta, run_dir / "data.json")
    return run_dir


def finish(cfg: DictConfig, run_dir: Path, results: dict[str, Any], t_start: float, export: bool = True) -> dict:
    """Write ``results.json`` and ``curves.png``, then export the student (``cfg.export``) and record
    the files in ``results.json``. A failed export keeps the results and raises :class:`ExportFailed`."""
    results["export"] = []
    results["time_s"] = time.perf_counter() - t_start
    io.write_json(results, run_dir / "results.json")
    plot_curves(run_dir)
    if not (export and cfg.export):
        return results
    try:
        results["export"] = [str(p) for p in export_student(run_dir, cfg.export)]
    except Exception as e:  # the run's results are saved: report the export in one line
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        results["export_error"] = f"{type(e).__name__}: {text}"
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
    init = copy.deepcopy(student.state_dict())
    router = build_router(cfg, meta, student, data, len(cfg.teachers)) if cfg.teachers else None
    run_dir = start(cfg, meta)

    results: dict[str, Any] = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir)}
    teachers = []
    for name, tc in cfg.teachers.items():
        model, row = teacher_models[name], {}
        if not tc.checkpoint and tc.epochs != 0:  # epochs: 0 uses the model as built (pretrained)
            fitted, _ = fit(f"teachers/{name}", Distiller(Net(model, tc.inputs), [], ce), data, cfg, run_dir,
                            tc.epochs, tc.lr)
            row["val_acc"] = fitted.metrics["val/acc"]
        teacher = Teacher(model, tc.inputs, tc.features, frozen=tc.frozen)
        row["test_acc"] = Trainer(trainer_config(cfg)).evaluate(Distiller(teacher, [], ce), data.test)["acc"]
        row["params"] = num_params(model)
        if tc.frozen and tc.cache and getattr(data.train, "deterministic", False):
            teacher = cache_teacher(teacher, data.train, cache_dir, device=device)
        teachers.append(teacher)
        results.setdefault("teachers", {})[name] = row

    student_net = Net(student, cfg.student.inputs, cfg.student.features)
    terms = build_terms(cfg, student_net, teachers, data)
    distiller = Distiller(student_net, teachers, terms, router)
    fitted, test = fit("student", distiller, data, cfg, run_dir)
    results["student"] = {"val_acc": fitted.metrics["val/acc"], "test_acc": test["acc"], "params": num_params(student)}
    io.save(student.state_dict(), run_dir / "student.pt")

    if cfg.baseline:
        baseline = build_model(cfg.student, meta, "student")
        baseline.load_state_dict(init)
        fitted, test = fit("baseline", Distiller(Net(baseline, cfg.student.inputs), [], ce), data, cfg, run_dir)
        results["baseline"] = {"val_acc": fitted.metrics["val/acc"], "test_acc": test["acc"]}

    add_latencies(results, data, {"student": (student, cfg.student.inputs),
                                  **{n: (m, cfg.teachers[n].inputs) for n, m in teacher_models.items()}})
    return finish(cfg, run_dir, results, t_start)


def plot_curves(run_dir: Path) -> None:
    """Write ``curves.png``: validation accuracy and training loss per epoch, for every stage."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for path in sorted(run_dir.rglob("metrics.csv")):
        rows = list(csv.DictReader(path.open()))
        stage = str(path.parent.relative_to(run_dir))
        epochs = [int(r["epoch"]) for r in rows]
        ax_acc.plot(epochs, [float(r["val/acc"]) for r in rows], label=stage)
        ax_loss.plot(epochs, [float(r["train/loss"]) for r in rows], label=stage)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.legend()
    fig.tight_layout()
    with io.atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
