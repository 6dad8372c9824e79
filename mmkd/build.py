"""Builders: everything a pipeline makes from a run config, by name (timm's ``create_model`` is the
model). ``build_model`` instantiates a registered model for a data set, ``load_data`` a registered
data set, ``build_router`` a router sized for the run, ``build_terms`` the loss terms (with their
adapters), ``build_plugins`` the batch transforms, data policies and callbacks a config lists,
``load_weights`` a state dict or a run's checkpoint, ``trainer_config`` the trainer settings of a run. The ``distill`` pipeline (:mod:`mmkd.run`) and the methods' pipelines use them.
"""
from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mmkd import io
from mmkd.adapters import make_adapter
from mmkd.config import PLUGINS, ConfigError, ModelConfig, owner_args
from mmkd.data import DataError, DataSplits, loader
from mmkd.distiller import SIZES, Term, module_args, pick
from mmkd.net import Net
from mmkd.registry import DATASETS, GRADIENTS, LOSSES, MODELS, ROUTERS
from mmkd.trainer import TrainerConfig

log = logging.getLogger("mmkd")


def create_model(name: str, num_classes: int, in_shape: Any, where: str = "model", **args: Any) -> nn.Module:
    """The registered model ``name`` (timm's ``create_model``), for ``num_classes`` outputs and items of
    ``in_shape``; every model a run builds, models inside other models (``fusion``'s encoders,
    ``dual_head``'s backbone) included, is made here. Its ``args`` are checked against the ranges its
    registration declares; an argument it refuses is a :class:`ConfigError` naming ``<where>.args``."""
    owner_args(f"{where}.args", MODELS, name, args)
    try:
        return MODELS[name](num_classes=num_classes, in_shape=in_shape, **args)
    except (TypeError, ValueError) as e:  # a factory's own refusal of its arguments
        raise ConfigError(f"{where}.args: {io.first_line(e, typed=False)}") from None


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
    model = create_model(mc.name, meta["num_classes"], in_shape, where, **args)
    modules = [n for n, _ in model.named_modules() if n]
    for path in mc.features:
        if path not in modules:
            shown = ", ".join(modules[:12]) + (", ..." if len(modules) > 12 else "")
            raise ConfigError(f"{where}.features: {mc.name} has no sub-module {path!r}; its modules: {shown}")
    return model


def load_data(cfg: DictConfig) -> tuple[DataSplits, dict]:
    """The data set of ``cfg.data`` under ``cfg.data_root``, and its description (``meta``). A data set
    that takes a ``split_seed`` gets the run's ``seed`` unless ``data.args.split_seed`` is set."""
    factory, args = DATASETS[cfg.data.name], dict(cfg.data.args)
    if "split_seed" in inspect.signature(factory).parameters or "split_seed" in DATASETS.meta(cfg.data.name).get("ranges", {}):
        args.setdefault("split_seed", cfg.seed)  # a seed names a split as well as an initialisation
    try:
        inspect.signature(factory).bind(root=cfg.data_root, **args)
    except TypeError as e:
        valid = [p for p in inspect.signature(factory).parameters if p != "root"]
        raise ConfigError(f"data.args: {e} (data set {cfg.data.name!r} takes: {', '.join(valid)})") from None
    try:
        data: DataSplits = factory(root=cfg.data_root, **args)
    except (DataError, ConfigError):  # they name their file or key already
        raise
    except ValueError as e:  # a factory's own refusal of its arguments (a value outside its choices)
        raise ConfigError(f"data.args: {io.first_line(e, typed=False)}") from None
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
            out = Net(student, cfg.student.inputs, cfg.student.features, data.tokens).eval()(next(iter(loader(data.train, 2))))
        args["feature_shapes"] = {p: tuple(f.shape[1:]) for p, f in out.features.items()}
    try:
        return factory(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"router.args: {e}") from None


def build_plugins(cfg: DictConfig, key: str, where: str | None = None) -> list:
    """Instances of the registered objects ``cfg[key]`` lists (``key``: ``transforms``, ``policies`` or
    ``callbacks``), each ``{name, args}``; a factory's refusal of its arguments names ``<where>[i].args``
    (``where``: the config key of the list, by default ``key``; ``cfg`` may be a teacher's section).
    The ``callbacks`` end with the backward rule of ``cfg.backward`` (:mod:`mmkd.gradients`; a
    :class:`~mmkd.gradients.BackwardRule` is a callback the trainer finds among them), when one is set."""
    entries = [(f"{where or key}[{i}]", PLUGINS[key], p) for i, p in enumerate(cfg[key])]
    if key == "callbacks" and cfg.get("backward") is not None:
        entries.append(("backward", GRADIENTS, cfg.backward))
    out = []
    for where, registry, p in entries:
        args = OmegaConf.to_container(p.args, resolve=True) if OmegaConf.is_config(p.args) else dict(p.args)
        try:
            out.append(registry[p.name](**args))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}.args: {io.first_line(e, typed=False)}") from None
    return out


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
        raise ConfigError(f"{where}: {path!r} does not fit the model: {io.first_line(e, typed=False)}") from None
    log.info("%s: loaded trained weights from %s (not trained again)", where, path)


def trainer_config(cfg: DictConfig, epochs: int | None = None, lr: float | None = None,
                   data: DataSplits | None = None, teacher: DictConfig | None = None) -> TrainerConfig:
    """The :class:`TrainerConfig` of ``cfg.trainer`` with the run's seed. For a ``teacher``'s fit, its
    ``trainer`` settings replace the run's, and ``epochs`` and ``lr`` (its own) ``max_epochs`` and
    ``lr``. Unless set, the metrics are ``data``'s (:attr:`DataSplits.metrics`)."""
    own = OmegaConf.to_container(teacher.trainer) if teacher is not None else {}
    tc = TrainerConfig(**{**OmegaConf.to_container(cfg.trainer), **own})
    if tc.metrics is None and data is not None:
        tc.metrics = list(data.metrics)
    tc.seed = cfg.seed
    if epochs is not None:
        tc.max_epochs = epochs
    if lr is not None:
        tc.lr = lr
    return tc


def build_terms(cfg: DictConfig, student: Net, teachers: list, data: DataSplits, section: str = "losses") -> list[Term]:
    """The loss terms of ``cfg.losses`` (``section``: their config key, e.g. ``teachers.<name>.losses``
    when ``cfg`` is a teacher's section); adapters are sized by one forward pass on a training batch."""
    terms, outs = [], None
    for k, t in cfg.losses.items():
        if t.group is not None:
            keys = set(next(iter(loader(data.train, 2))))
            if t.group not in keys:
                raise ConfigError(f"{section}.{k}.group={t.group!r} is not an entry of the training batches; "
                                  f"they have: {', '.join(sorted(keys))}")
        adapter, sizes = None, {}
        name = t.loss or k
        wants = module_args(LOSSES.meta(name).get("module")) & set(SIZES) if name in LOSSES else set()
        if t.adapter or wants & {"student_shape", "teacher_shape"}:
            if outs is None:
                with torch.no_grad():
                    batch = next(iter(loader(data.train, 2)))
                    outs = student.eval()(batch), [teacher(batch) for teacher in teachers]
            if t.adapter and not teachers:
                raise ConfigError(f"{section}.{k}.adapter: an adapter maps student to teacher features; there is no teacher")
            try:
                s_shape = shape_of(pick(outs[0], t.student))
                t_shape = shape_of(pick(outs[1][0], t.teacher)) if teachers else None
                adapter = make_adapter(t.adapter, s_shape, t_shape) if t.adapter else None
            except (KeyError, ValueError) as e:
                raise ConfigError(f"{section}.{k}: {e.args[0]}") from None
            sizes = {"student_shape": s_shape, "teacher_shape": t_shape}
        sizes.update(num_items=len(data.train), num_classes=data.num_classes)
        terms.append(Term(name, t.weight, dict(t.args), name=k, student=t.student, teacher=t.teacher, adapter=adapter,
                          group=t.group, sizes={s: v for s, v in sizes.items() if s in wants}))
    return terms


def shape_of(x) -> tuple | list[tuple]:
    """The shape without batch of a tensor, or the list of them for a list of tensors."""
    return [tuple(f.shape[1:]) for f in x] if isinstance(x, list) else tuple(x.shape[1:])
