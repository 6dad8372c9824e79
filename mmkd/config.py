"""Typed run configs (Hydra structured configs) and their validation.

The schema below is registered with Hydra's ConfigStore as ``base_config``; ``configs/config.yaml``
builds on it and ``configs/experiment/*.yaml`` fill it in. Every value a user can set is here with
its type and default, so a misspelt key or a wrong type is caught before anything runs.
"""
from __future__ import annotations

import importlib
import inspect
import math
import os
import re
import sys
import dataclasses
from dataclasses import dataclass, field, fields, make_dataclass
from importlib import util
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, get_type_hints

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf, open_dict

from mmkd.adapters import ADAPTERS
from mmkd.checks import COUNT, NON_NEGATIVE_INT, POSITIVE, SEED, check_args
from mmkd.io import first_line
from mmkd.registry import CALLBACKS, DATASETS, GRADIENTS, LOSSES, METRICS, MODELS, PIPELINES, POLICIES, ROUTERS, TRANSFORMS
from mmkd.schedules import Schedule
from mmkd.trainer import TrainerConfig, check_config


@dataclass
class DataConfig:
    """A registered data set and its arguments."""

    name: str = "digits"
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """A registered model, the batch keys it reads, and the features it exposes."""

    name: str = MISSING
    args: Dict[str, Any] = field(default_factory=dict)
    inputs: List[str] = field(default_factory=lambda: ["image"])  # batch keys passed to the model
    features: List[str] = field(default_factory=list)


@dataclass
class StudentConfig(ModelConfig):
    """The student: built fresh from the run's seed, or starting from weights (``init``)."""

    init: Optional[str] = None  # a state dict (e.g. an earlier run's student.pt) or a run's best.pt to start from


@dataclass
class TeacherConfig(ModelConfig):
    """A teacher: trained here on labels (``checkpoint: null``) or loaded from a weights file."""

    checkpoint: Optional[str] = None  # a state dict, a run's best.pt, or a run directory
    frozen: bool = True
    cache: bool = True  # cache its outputs (frozen teachers; on augmented data when the views are seeded)
    cache_topk: Optional[int] = None  # augmented-view cache: store the top-k log-probabilities (null: all)
    epochs: Optional[int] = None  # training epochs when trained here (default: trainer.max_epochs);
    # 0: no training, the model is used as built (pretrained or zero-shot, e.g. clip)
    lr: Optional[float] = None  # learning rate when trained here (default: trainer.lr), e.g. to fine-tune
    trainer: Dict[str, Any] = field(default_factory=dict)  # its own fit's settings over trainer.* (patience, ...)
    reuse: bool = True  # load it from the trained-teacher store (mmkd.store) when an identical one was trained
    # the loss terms it trains with, as the student's losses (each a TermConfig; losses of its labels and
    # its own logits): {} is CE alone; e.g. MCMI's {ce: {weight: 1.0}, mcmi: {weight: -0.25}}
    losses: Dict[str, Any] = field(default_factory=dict)
    callbacks: List[PluginConfig] = field(default_factory=list)  # callbacks of its fit (e.g. mcmi_centroids)


@dataclass
class TermConfig:
    """A weighted loss term; ``loss`` defaults to the term's key in ``losses``."""

    loss: Optional[str] = None
    weight: Any = 1.0  # a number, or a schedule: {schedule: warmup, epochs: 20} (mmkd.schedules)
    args: Dict[str, Any] = field(default_factory=dict)
    student: str = "logits"  # or features.<module path> (listed in student.features), or features (all)
    teacher: str = "logits"  # or features.<module path> (listed in each teacher's features), or features (all)
    adapter: Optional[str] = None  # linear | conv | token: a learned projector on the student side
    group: Optional[str] = None  # a batch key (e.g. labelled): mean within each group of rows, summed


@dataclass
class RouterConfig:
    """A registered router and its arguments."""

    name: str = "constant"
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PluginConfig:
    """A registered batch transform, data policy or callback and its arguments."""

    name: str = MISSING
    args: Dict[str, Any] = field(default_factory=dict)


# the trainer group of a run config: TrainerConfig without its seed (the run's ``seed`` is the one seed)
TrainerSection = make_dataclass("TrainerSection", [
    (f.name, get_type_hints(TrainerConfig)[f.name],
     field(default=f.default) if f.default_factory is dataclasses.MISSING else field(default_factory=f.default_factory))
    for f in fields(TrainerConfig) if f.name != "seed"])
TrainerSection.__doc__ = "How a run trains: :class:`~mmkd.trainer.TrainerConfig` without ``seed`` (the run's ``seed`` is used)."


@dataclass
class RunConfig:
    """One ``mmkd run``: data, teachers, a student, a router, loss terms and the trainer."""

    experiment: str = "quickstart"
    seed: int = 0
    data_root: str = "data"  # where data sets live; MMKD_DATA overrides the default
    out_dir: str = "runs"
    run_dir: Optional[str] = None  # default: <out_dir>/<name>/<date-time>
    name: str = ""  # the run's label (run directory, results.json, the results table); default: the experiment's
    cache_dir: Optional[str] = None  # teacher-output cache; default: <out_dir>/cache
    resume: bool = False  # continue the run in run_dir
    baseline: bool = True  # also train the student on labels alone, from the same initialisation
    export: List[str] = field(default_factory=lambda: ["onnx"])  # onnx | pt2 (alias: torchscript)
    imports: List[str] = field(default_factory=list)  # modules registering custom losses, routers, models, data sets
    pipeline: str = "distill"  # a registered pipeline: distill (teachers, then the student) or a method's stage
    method: Dict[str, Any] = field(default_factory=dict)  # the pipeline's own options (validated by it)
    data: DataConfig = field(default_factory=DataConfig)
    # entries are typed by ``typed_sections`` (TeacherConfig / TermConfig); declared as plain dicts so
    # that new ones can be added from the command line (``losses.hint.loss=mse``)
    teachers: Dict[str, Any] = field(default_factory=dict)
    student: StudentConfig = field(default_factory=lambda: StudentConfig(name="mlp"))
    router: RouterConfig = field(default_factory=RouterConfig)
    losses: Dict[str, Any] = field(default_factory=lambda: {"ce": {}})
    trainer: TrainerSection = field(default_factory=TrainerSection)
    # for the student's stage: batch transforms (mmkd.transforms), data policies (mmkd.policies), callbacks
    transforms: List[PluginConfig] = field(default_factory=list)
    policies: List[PluginConfig] = field(default_factory=list)
    callbacks: List[PluginConfig] = field(default_factory=list)
    backward: Optional[PluginConfig] = None  # a backward rule (mmkd.gradients), e.g. {name: align, args: {...}}


FREE_FORM = ("teachers", "losses", "method", "data.args", "student.args", "router.args")


def _schema() -> DictConfig:
    """The RunConfig schema; sections whose entries are free-form (model and loss arguments) or
    typed later by :func:`typed_sections` accept new keys from the command line without ``+``."""
    node = OmegaConf.structured(RunConfig)
    for path in FREE_FORM:
        OmegaConf.set_struct(OmegaConf.select(node, path), False)
    return node


ConfigStore.instance().store(name="base_config", node=_schema())

EXPORT_FORMATS = ("onnx", "pt2", "torchscript")  # pt2: a torch.export program; torchscript: its alias


def config_dir() -> Path:
    """The folder of the shipped YAML configs (``configs/`` in the repository)."""
    return Path(util.find_spec("mmkd.configs").submodule_search_locations[0])


def experiments() -> list[str]:
    """Names of the shipped experiment configs."""
    return sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))


USER_EXPERIMENT = "_user_"  # the option of the experiment group a user's experiment file is composed as


def user_config_dir(path: str | os.PathLike) -> Path:
    """``--config-dir``: the folder, absolute, if it is one; else a :class:`ConfigError`."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ConfigError(f"--config-dir: no such folder {str(path)!r}")
    if not folder.is_dir():
        raise ConfigError(f"--config-dir: {str(path)!r} is a file; give the folder that holds experiment/NAME.yaml "
                          "or NAME.yaml (or run the file itself: experiment=PATH.yaml)")
    return folder.resolve()


def user_experiments(folder: Path) -> dict[str, Path]:
    """The experiments in a user's config folder, by name: ``folder/experiment/NAME.yaml``, else
    ``folder/NAME.yaml``."""
    found = {p.stem: p for p in sorted(folder.glob("*.yaml")) if p.is_file()}
    found.update({p.stem: p for p in sorted((folder / "experiment").glob("*.yaml")) if p.is_file()})
    return dict(sorted(found.items()))


def is_path(value: str) -> bool:
    """An ``experiment=`` value naming a file rather than an experiment."""
    return value.endswith((".yaml", ".yml")) or "/" in value or os.sep in value


def find_experiment(value: str, folder: Optional[Path]) -> tuple[str, Optional[Path]]:
    """``experiment=value``: its name and the user's file to compose (``None``: a shipped experiment,
    left to Hydra). ``value`` is a path to a YAML file, or a name looked up in ``folder`` (the
    ``--config-dir``), then among the shipped experiments. Raises :class:`ConfigError`."""
    if is_path(value):
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"experiment: no such file {value!r}")
        if not path.is_file():
            raise ConfigError(f"experiment: {value!r} is a folder; give a YAML file, or name one of its experiments: "
                              f"--config-dir {value} experiment=NAME")
        return path.stem, path.resolve()
    if folder is None:
        return value, None
    mine = user_experiments(folder)
    if value in mine:
        return value, mine[value]
    if value in experiments():
        return value, None
    raise ConfigError(f"experiment: unknown experiment {value!r}; choose from: {', '.join(mine) or '(none)'} "
                      f"(in {folder}), {', '.join(experiments())} (shipped)")


def load_experiment(path: Path) -> DictConfig:
    """A user's experiment file as a config (its ``defaults:`` list included); unreadable YAML or a
    file that is not a mapping of config keys is a :class:`ConfigError`."""
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml.YAMLError, UnicodeDecodeError, OSError, OmegaConf's errors
        raise ConfigError(f"experiment: cannot read {str(path)!r}: {first_line(e)}") from None
    if not OmegaConf.is_dict(node):
        raise ConfigError(f"experiment: {str(path)!r} holds a {type(OmegaConf.to_container(node)).__name__}; "
                          "an experiment is a mapping of config keys (data:, teachers:, student:, ...)")
    return node


SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


def check_label(key: str, value: str) -> None:
    """A run label (``name=``) or a new experiment's name: one safe folder name."""
    if not SAFE_NAME.fullmatch(value):
        raise ConfigError(f"{key}={value!r}: give a folder name of at most 128 letters, digits, '.', '_' and '-', "
                          "not starting with '.' or '-' (no '/' or spaces)")


def typed_sections(cfg: DictConfig) -> DictConfig:
    """Give every entry of ``teachers``, ``losses`` and each teacher's ``losses`` its schema (defaults
    filled in, types checked).

    Raises :class:`ConfigError` naming the full key of an unknown key or a value of the wrong type.
    """
    with open_dict(cfg):
        cfg.teachers = typed_entries("teachers", cfg.teachers, TeacherConfig)
        cfg.losses = typed_entries("losses", cfg.losses, TermConfig)
        for name, teacher in cfg.teachers.items():
            with open_dict(teacher):
                teacher.losses = typed_entries(f"teachers.{name}.losses", teacher.losses, TermConfig)
    return cfg


def typed_entries(section: str, entries: Any, schema: type) -> dict:
    """Each entry of the mapping ``entries`` (the config key ``section``) merged into ``schema``."""
    from omegaconf.errors import OmegaConfBaseException

    typed = {}
    for name, entry in entries.items():
        if entry is None:
            raise ConfigError(f"{section}.{name}: null; to drop it, delete it with ~{section}.{name}")
        try:
            typed[name] = OmegaConf.merge(OmegaConf.structured(schema), entry)
        except OmegaConfBaseException as e:
            key = f"{section}.{name}.{e.full_key}" if getattr(e, "full_key", None) else f"{section}.{name}"
            if "not in" in str(e):
                valid = ", ".join(OmegaConf.structured(schema).keys())
                raise ConfigError(f"{key}: unknown config key; valid keys under {section}.{name}: {valid}") from None
            m = re.search(r"Value '([^']*)' .*could not be converted to (\w+)", str(e))
            raise ConfigError(f"{key}: expected {m.group(2).lower()}, got {m.group(1)!r}" if m
                              else f"{key}: {first_line(e, typed=False)}") from None
    return typed


def import_modules(names: Sequence[str]) -> None:
    """Import the modules listed in ``imports`` (their decorators register custom losses, routers,
    models and data sets). The current directory is searched too, as by ``python -m``."""
    if names and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"imports: cannot import {name!r} ({e}); install it or run from the folder "
                              "that holds it") from None


PLUGINS = {"transforms": TRANSFORMS, "policies": POLICIES, "callbacks": CALLBACKS}  # config key -> registry


def check_names(cfg: DictConfig) -> None:
    """Import ``cfg.imports``, then raise :class:`ConfigError` (naming the config key and the fix)
    for anything that would fail later: an unregistered name, a loss argument the loss does not take
    or of the wrong kind (a malformed schedule, a word for a number), a loss term reading features
    its model does not list, an unusable trainer setting, an unknown export format."""
    import_modules(cfg.imports)
    missing = sorted(OmegaConf.missing_keys(cfg))  # e.g. teachers.x.epochs=1 for a teacher the experiment lacks
    if missing:
        raise ConfigError(f"{missing[0]}: missing; give it a value ({missing[0]}=...)")
    if cfg.name:
        check_label("name", cfg.name)
    checks = [("pipeline", PIPELINES, cfg.pipeline), ("data.name", DATASETS, cfg.data.name),
              ("student.name", MODELS, cfg.student.name),
              ("router.name", ROUTERS, cfg.router.name)]
    checks += [(f"teachers.{k}.name", MODELS, t.name) for k, t in cfg.teachers.items()]
    checks += [(f"losses.{k}.loss", LOSSES, t.loss or k) for k, t in cfg.losses.items()]
    checks += [(f"teachers.{n}.losses.{k}.loss", LOSSES, t.loss or k)
               for n, tc in cfg.teachers.items() for k, t in tc.losses.items()]
    plugins = [(f"{key}[{i}]", registry, p) for key, registry in PLUGINS.items() for i, p in enumerate(cfg[key])]
    plugins += [("backward", GRADIENTS, cfg.backward)] if cfg.get("backward") is not None else []
    if plugins and cfg.pipeline != "distill":  # the other pipelines build their stages themselves
        raise ConfigError(f"{plugins[0][0]}: transforms, policies and callbacks apply to the distill pipeline's "
                          f"student stage; pipeline {cfg.pipeline!r} does not take them: remove them")
    for n, tc in cfg.teachers.items():  # what a teacher trains with: the distill pipeline's teacher stages
        own = [f"teachers.{n}.{key}" for key in ("losses", "callbacks") if tc[key]]
        if own and cfg.pipeline != "distill":
            raise ConfigError(f"{own[0]}: a teacher's losses and callbacks apply to the distill pipeline's teacher "
                              f"stages; pipeline {cfg.pipeline!r} does not take them: remove them")
    teacher_plugins = [(f"teachers.{n}.callbacks[{i}]", CALLBACKS, p, list(tc.losses) or ["ce"])
                       for n, tc in cfg.teachers.items() for i, p in enumerate(tc.callbacks)]
    checks += [(f"{where}.name", registry, p.name) for where, registry, p in plugins]
    checks += [(f"{where}.name", registry, p.name) for where, registry, p, _ in teacher_plugins]
    for key, registry, name in checks:
        if name not in registry:
            raise ConfigError(f"{key}: unknown {registry.kind} {name!r}; choose from: {', '.join(registry.names())}")
    for where, mc in [("student", cfg.student), *((f"teachers.{k}", t) for k, t in cfg.teachers.items())]:
        owner_args(f"{where}.args", MODELS, mc.name, mc.args)
    owner_args("data.args", DATASETS, cfg.data.name, cfg.data.args)
    owner_args("router.args", ROUTERS, cfg.router.name, cfg.router.args)
    for where, registry, p, terms in [*((*entry, list(cfg.losses)) for entry in plugins), *teacher_plugins]:
        owner_args(f"{where}.args", registry, p.name, p.args)
        for arg in registry.meta(p.name).get("reads_losses", ()):  # arguments that name loss terms
            names = p.args.get(arg) or []
            for name in [names] if isinstance(names, str) else names:
                if name not in terms:
                    raise ConfigError(f"{where}.args.{arg}: {name!r} is not a loss term; choose from: "
                                      f"{', '.join(terms)}")
    for k, t in cfg.teachers.items():
        if t.epochs is not None and not NON_NEGATIVE_INT.contains(t.epochs):
            raise ConfigError(f"teachers.{k}.epochs={t.epochs!r}; give a whole number of epochs >= 0 "
                              "(0: use the model as built, without training)")
        if t.lr is not None and not POSITIVE.contains(t.lr):
            raise ConfigError(f"teachers.{k}.lr={t.lr!r}; it must be a positive finite number")
        if t.cache_topk is not None and not COUNT.contains(t.cache_topk):
            raise ConfigError(f"teachers.{k}.cache_topk={t.cache_topk!r}; give a whole number >= 1 (null: every class)")
    if not SEED.contains(cfg.seed):
        raise ConfigError(f"seed={cfg.seed!r}; it must be {SEED}")
    for k, t in cfg.losses.items():
        check_weight(f"losses.{k}.weight", t.weight, LOSSES.meta(t.loss or k).get("negative_weight", False), t.loss or k)
        if t.adapter is not None and t.adapter not in ADAPTERS:
            raise ConfigError(f"losses.{k}.adapter: unknown adapter {t.adapter!r}; choose from: {', '.join(ADAPTERS)}")
        for side in ("student", "teacher"):
            if t[side] not in ("logits", "features") and not t[side].startswith("features."):
                raise ConfigError(f"losses.{k}.{side}: {t[side]!r}; give logits, features (all of them) or "
                                  "features.<module path>")
        path = t.student.removeprefix("features.")
        if t.student == "features" and not cfg.student.features:
            raise ConfigError(f"losses.{k}.student: features (all of them), but student.features is empty; list them there")
        if t.student not in ("logits", "features") and path not in cfg.student.features:
            raise ConfigError(f"losses.{k}.student: {path!r} is not among student.features "
                              f"{list(cfg.student.features)}; list it there")
        path = t.teacher.removeprefix("features.")
        for name, teacher in cfg.teachers.items():
            if t.teacher == "features" and not teacher.features:
                raise ConfigError(f"losses.{k}.teacher: features (all of them), but teachers.{name}.features is empty; "
                                  "list them there")
            if t.teacher not in ("logits", "features") and path not in teacher.features:
                raise ConfigError(f"losses.{k}.teacher: {path!r} is not among teachers.{name}.features "
                                  f"{list(teacher.features)}; list it there")
        check_loss_args(k, t.loss or k, t.args)
    for n, tc in cfg.teachers.items():
        check_teacher_losses(f"teachers.{n}.losses", tc)
    try:
        check_config(cfg.trainer)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    monitor = cfg.trainer.monitor
    if monitor not in ("auto", "train/loss") and not (monitor.startswith("val/") and monitor[4:] in METRICS):
        raise ConfigError(f"trainer.monitor={monitor!r}; choose from: auto, train/loss, "
                          f"{', '.join(f'val/{m}' for m in METRICS.names())} (a val/ metric joins trainer.metrics)")
    settings = [f.name for f in fields(TrainerConfig) if f.name != "seed"]  # the run's seed is a teacher's
    for k, t in cfg.teachers.items():
        if unknown := sorted(set(t.trainer) - set(settings)):
            raise ConfigError(f"teachers.{k}.trainer.{unknown[0]}: not a trainer setting; choose from: {', '.join(settings)}")
        try:
            check_config(TrainerConfig(**{**OmegaConf.to_container(cfg.trainer), **OmegaConf.to_container(t.trainer)}))
        except ValueError as e:
            raise ConfigError(f"teachers.{k}.{e}") from None
    for fmt in cfg.export:
        if fmt not in EXPORT_FORMATS:
            raise ConfigError(f"export: unknown format {fmt!r}; choose from: {', '.join(EXPORT_FORMATS)}")


def check_teacher_losses(section: str, tc: Any) -> None:
    """The loss terms a teacher trains with (``section``: ``teachers.<name>.losses``): losses of its
    labels and its own logits, nothing read from a teacher."""
    for k, t in tc.losses.items():
        loss = t.loss or k
        if LOSSES.meta(loss)["teacher"]:
            raise ConfigError(f"{section}.{k}: loss {loss!r} reads a teacher; a teacher trains on its labels and its "
                              "own logits (e.g. ce, mcmi)")
        if t.teacher != "logits":
            raise ConfigError(f"{section}.{k}.teacher: {t.teacher!r}; a teacher's own loss terms read no teacher: "
                              "remove it")
        if t.adapter is not None:
            raise ConfigError(f"{section}.{k}.adapter: an adapter maps student to teacher features; a teacher's own "
                              "loss terms take none: remove it")
        check_weight(f"{section}.{k}.weight", t.weight, LOSSES.meta(loss).get("negative_weight", False), loss)
        if t.student != "logits":
            raise ConfigError(f"{section}.{k}.student: {t.student!r}; a teacher's own loss terms read its logits")
        check_loss_args(k, loss, t.args, section)


def check_weight(key: str, weight: Any, negative: bool, loss: str) -> None:
    """A term's weight: a finite number (or a schedule of them) >= 0 unless ``negative`` allows it."""
    if OmegaConf.is_config(weight):
        weight = OmegaConf.to_container(weight)
    try:
        weight = Schedule.parse(weight, key)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if isinstance(weight, Schedule):
        low, high = weight.bounds()
        shown = weight.describe()
    elif isinstance(weight, (int, float)) and not isinstance(weight, bool):
        low = high = weight
        shown = repr(weight)
    else:
        raise ConfigError(f"{key}={weight!r}; give a number or a schedule such as {{schedule: warmup, epochs: 20}}")
    if not (math.isfinite(low) and math.isfinite(high)) or (low < 0 and not negative):
        raise ConfigError(f"{key}={shown}; it must be a finite number >= 0 "
                          f"(loss {loss!r} has no meaning with a negative weight)")


def owner_args(where: str, registry: Any, name: str, args: Any) -> None:
    """``args`` of the registered ``name`` against the ranges its registration declares
    (:mod:`mmkd.checks`); any number must be finite. A schedule mapping (``{schedule: ...}``) is
    checked by the values it takes."""
    if OmegaConf.is_config(args):
        args = OmegaConf.to_container(args)
    try:
        args = {k: Schedule.parse(v, f"{where}.{k}") for k, v in args.items()}
        check_args(where, registry.meta(name).get("ranges", {}), args)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def check_loss_args(term: str, loss: str, args: Any, section: str = "losses") -> None:
    """``<section>.<term>.args`` (``losses``, or a teacher's ``teachers.<name>.losses``) must name
    keyword arguments of the loss, with numbers (or schedules) where the loss's default is a number."""
    params = inspect.signature(LOSSES[loss]).parameters
    named = {n: p for n, p in list(params.items())[3:] if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    named.pop("reduction", None)
    named.pop("batch", None)  # given by the mixture core
    if named.pop("module", None) is not None:  # the term's learned module; its factory's arguments instead
        factory = LOSSES.meta(loss)["module"]
        named.update({n: q for n, q in inspect.signature(factory).parameters.items()
                      if q.kind in (q.KEYWORD_ONLY, q.POSITIONAL_OR_KEYWORD)})
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for a, v in args.items():
        key = f"{section}.{term}.args.{a}"
        if a not in named and not takes_any:
            raise ConfigError(f"{key}: loss {loss!r} has no argument {a!r}; it takes: {', '.join(named) or 'none'}")
        try:
            v = Schedule.parse(v, key)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        default = named[a].default if a in named else None
        number = isinstance(default, (int, float)) and not isinstance(default, bool)
        if number and (isinstance(v, bool) or not isinstance(v, (int, float, Schedule))):
            raise ConfigError(f"{key}: expected a number, got {v!r}")
        owner_args(f"{section}.{term}.args", LOSSES, loss, {a: v})


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the fix."""
