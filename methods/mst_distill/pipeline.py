"""MST-Distill's three stages as ``mmkd run`` pipelines: ``mst_stage1`` (co-training), ``mst_stage2``
(MaskNets), ``mst_stage3`` (routed distillation), with their options (under ``method``), the checks
that chain a stage to the previous stage's run directory, and stage 3's routing report.

The stages and their losses are described in :mod:`mmkd.methods.mst_distill`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import Dataset

from mmkd import io, run
from mmkd.build import build_model, build_router, build_terms, load_data, load_weights, trainer_config
from mmkd.cache import cache_teacher
from mmkd.callbacks import Callback
from mmkd.config import ConfigError
from mmkd.data import DataSplits, cacheable, loader
from mmkd.distiller import Distiller, Term
from mmkd.losses import kd
from mmkd.methods.mst_distill.cotraining import CoTraining
from mmkd.methods.mst_distill.masknet import specialized_teachers
from mmkd.net import Batch, Net, Teacher, num_params
from mmkd.registry import PIPELINES
from mmkd.report import add_latencies
from mmkd.router import Router
from mmkd.routers.gating import top_k_mask
from mmkd.run import fit
from mmkd.trainer import Module, Trainer, seed_everything, to_device

STAGE1 = {"temperature": 4.0, "kd_weight": 1.0, "detach": False}
STAGE2 = {"stage1": None, "layers": None, "temperature": 4.0, "epochs": None, "dim": 32, "heads": 4}
STAGE3 = {"stage2": None, "init": "stage1"}


def options(cfg: DictConfig, pipeline: str, defaults: Mapping[str, Any], required: Sequence[str] = ()) -> dict:
    """``cfg.method`` over ``defaults``; an unknown or missing key is a one-line :class:`ConfigError`."""
    given = OmegaConf.to_container(cfg.get("method") or {}, resolve=True)
    for key in given:
        if key not in defaults:
            raise ConfigError(f"method.{key}: unknown option of pipeline {pipeline}; valid keys: {', '.join(defaults)}")
    opts = {**defaults, **given}
    for key in required:
        if opts[key] is None:
            raise ConfigError(f"method.{key}: missing; pipeline {pipeline} needs it (see methods/mst_distill/pipeline.py)")
    return opts


def _spec(mc: Any) -> dict:
    """What makes two model configs the same model: name, arguments and inputs."""
    mc = OmegaConf.to_container(mc, resolve=True) if isinstance(mc, DictConfig) else dict(mc)
    return {k: mc.get(k) for k in ("name", "args", "inputs")}


def previous(cfg: DictConfig, path: str, key: str, pipeline: str, needs: Sequence[str]) -> DictConfig:
    """The config of the earlier stage's run in ``path``, checked against ``cfg``: it must be a finished
    ``pipeline`` run (holding ``needs``) on the same data with the same student."""
    where, run_dir = f"{key}={path}", Path(path)
    if not run_dir.is_dir():
        raise ConfigError(f"{where}: no such run directory; run the {pipeline} experiment first and give its run_dir")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{where}: not a run directory (no config.yaml); give the run_dir of a {pipeline} run")
    prev = OmegaConf.load(run_dir / "config.yaml")
    if prev.get("pipeline") != pipeline:
        raise ConfigError(f"{where}: that run's pipeline is {prev.get('pipeline', 'distill')!r}, not {pipeline!r}")
    for what in ("data", "student"):
        if _spec(prev[what]) != _spec(cfg[what]):
            raise ConfigError(f"{where}: that run's {what} {_spec(prev[what])} differs from this config's "
                              f"{_spec(cfg[what])}; give a {pipeline} run with the same {what}")
    missing = [n for n in needs if not (run_dir / n).is_file()]
    if missing:
        raise ConfigError(f"{where}: the run is incomplete (no {', '.join(missing)}); rerun {pipeline}")
    return prev


def start(cfg: DictConfig) -> tuple[Path, DataSplits, dict, Path]:
    """Run directory, data, data description and cache directory; writes config.yaml and data.json."""
    data, meta = load_data(cfg)
    return run.start(cfg, meta), data, meta, run.cache_path(cfg)


def accuracy(cfg: DictConfig, model: nn.Module, keys: Sequence[str], dataset: Dataset) -> float:
    """Test accuracy of ``model`` reading ``keys``."""
    return Trainer(trainer_config(cfg)).evaluate(Distiller(Net(model, keys), [], [Term("ce")]), dataset)["acc"]


def finish(cfg: DictConfig, run_dir: Path, data: DataSplits, results: dict, models: Mapping[str, tuple],
           t_start: float, export: bool) -> dict:
    """Add latencies (``models``: row name -> (model, keys); ``"student"`` for the student) to
    ``results``, then save them and export the student (:func:`mmkd.run.finish`)."""
    add_latencies(results, data, models)
    return run.finish(cfg, run_dir, results, t_start, export)


@PIPELINES.register("mst_stage1")
def stage1(cfg: DictConfig) -> dict[str, Any]:
    """Co-train ``teachers`` (the multimodal and the cross-modal teacher) and the student; write
    ``cotrain/`` (trainer files), ``teachers/<name>/best.pt`` and ``student.pt``.

    The co-trained models are one module, checkpointed together: every member is kept at the epoch
    ``trainer.keep`` picks, the state stages 2 and 3 use: the shipped configs keep the last epoch (the
    official procedure: stage 1 has no validation); ``trainer.keep=best`` keeps the epoch of the
    student's best ``trainer.monitor``."""
    t_start = time.perf_counter()
    opts = options(cfg, "mst_stage1", STAGE1)
    if not isinstance(opts["detach"], bool):
        raise ConfigError(f"method.detach: {opts['detach']!r}; give true (stop the KL targets' gradients) or false")
    if not cfg.teachers or "student" in cfg.teachers:
        raise ConfigError("teachers: mst_stage1 co-trains the listed teachers with the student; list at least one "
                          "teacher, none of them named 'student'")
    run_dir, data, meta, _ = start(cfg)
    models, keys = {}, {}
    for name, tc in cfg.teachers.items():
        seed_everything(cfg.seed)
        models[name], keys[name] = build_model(tc, meta, f"teachers.{name}"), tc.inputs
        if tc.checkpoint:
            load_weights(models[name], tc.checkpoint, f"teachers.{name}.checkpoint", name)
    seed_everything(cfg.seed)
    models["student"], keys["student"] = build_model(cfg.student, meta, "student"), cfg.student.inputs
    co = CoTraining({n: Net(m, keys[n]) for n, m in models.items()}, opts["temperature"], opts["kd_weight"],
                    opts["detach"])
    fitted, test = fit("cotrain", co, data, cfg, run_dir)
    results: dict[str, Any] = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir),
                               "pipeline": "mst_stage1", "teachers": {}}
    for name in cfg.teachers:
        io.save(models[name].state_dict(), run_dir / "teachers" / name / "best.pt")
        results["teachers"][name] = {"test_acc": accuracy(cfg, models[name], keys[name], data.test),
                                     "params": num_params(models[name])}
    io.save(models["student"].state_dict(), run_dir / "student.pt")
    results["student"] = {"val_acc": fitted.metrics["val/acc"], "test_acc": test["acc"],
                          "params": num_params(models["student"])}
    return finish(cfg, run_dir, data, results, {n: (m, keys[n]) for n, m in models.items()}, t_start, True)


def load_stage1(run_dir: str, prev: DictConfig, meta: dict) -> tuple[dict[str, Teacher], nn.Module]:
    """The frozen teachers and the student of the stage-1 run in ``run_dir`` (config ``prev``)."""
    teachers = {}
    for name, tc in prev.teachers.items():
        model = build_model(tc, meta, f"stage-1 teachers.{name}")
        load_weights(model, str(Path(run_dir) / "teachers" / name / "best.pt"), f"stage-1 teachers.{name}")
        teachers[name] = Teacher(model, tc.inputs, frozen=True)
    student = build_model(prev.student, meta, "stage-1 student")
    load_weights(student, str(Path(run_dir) / "student.pt"), "stage-1 student")
    return teachers, student


def stage1_needs(path: str) -> list[str]:
    """The files a finished stage-1 run in ``path`` holds (its teachers' weights and the student)."""
    conf = Path(path) / "config.yaml"
    names = list(OmegaConf.load(conf).get("teachers") or {}) if conf.is_file() else []
    return ["student.pt", *[f"teachers/{n}/best.pt" for n in names]]


def check_teachers(cfg: DictConfig, prev: DictConfig, where: str) -> None:
    """A later stage takes its teachers from stage 1; teachers listed in ``cfg`` must be the same."""
    if cfg.teachers and {n: _spec(t) for n, t in cfg.teachers.items()} != {n: _spec(t) for n, t in prev.teachers.items()}:
        raise ConfigError(f"{where}: that run's teachers {list(prev.teachers)} differ from this config's "
                          f"{list(cfg.teachers)}; leave teachers empty (they come from stage 1) or list the same")


class MaskFit(Module):
    """Trains the MaskNets of specialised teachers together, each towards the frozen student.

    ``forward`` returns ``"kd/<name>"`` ``= T^2 KL(p_student || p_masked)`` for each mask (the
    batch mean) and their sum under ``"loss"``: the MaskNets share no parameters, so each one's
    gradient is its own term's, as with the reference code's one optimiser per MaskNet. ``predict``
    returns the masked teachers' mean logits (what the trainer's metrics see). Its callback
    (:class:`ValKL`) adds each epoch's validation KL, by which stage 2 keeps its best epoch.

    Args:
        teachers: specialised teachers whose only trainable parts are their MaskNets.
        names: their names.
        groups: for each, the stage-1 teacher it masks.
        target: the frozen student (or its cached training-set outputs), the training target.
        student: the frozen student itself, the validation target.
        temperature: ``T``.
    """

    def __init__(self, teachers: Sequence[Teacher], names: Sequence[str], groups: Sequence[str],
                 target: nn.Module, student: nn.Module, temperature: float = 4.0):
        super().__init__()
        if not len(teachers) == len(names) == len(groups):
            raise ValueError(f"MaskFit: {len(teachers)} teachers, {len(names)} names, {len(groups)} groups")
        self.teachers, self.names, self.groups = nn.ModuleList(teachers), list(names), list(groups)
        self.target, self.student, self.temperature = target, student, temperature

    def forward(self, batch: Batch) -> dict[str, Tensor]:
        with torch.no_grad():
            target = self.target(batch).logits.float()
        losses = {f"kd/{n}": kd(t(batch).logits.float(), target, temperature=self.temperature)
                  for n, t in zip(self.names, self.teachers)}
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def predict(self, batch: Batch) -> Tensor:
        """The masked teachers' mean logits."""
        return torch.stack([t(batch).logits.float() for t in self.teachers]).mean(0)

    @torch.no_grad()
    def validation_kl(self, dataset: Dataset, device: torch.device, batch_size: int = 256) -> dict[str, float]:
        """On ``dataset``: ``val/kd/<name>``, each mask's mean ``T^2 KL(p_student || p_masked)`` over
        the items, and ``val/kd``, MST-Distill's selection criterion: the sum over the stage-1
        teachers of the mean over their masks (its ``Loss_s2_all``: T-masks' mean + A-masks' mean)."""
        self.eval()
        sums, count = torch.zeros(len(self.teachers), device=device), 0
        for batch in loader(dataset, batch_size):
            batch = to_device(batch, device)
            target = self.student(batch).logits.float()
            sums += torch.stack([kd(t(batch).logits.float(), target, temperature=self.temperature, reduction="sum")
                                 for t in self.teachers])
            count += len(target)
        per_mask = (sums / count).tolist()
        out = {f"val/kd/{n}": v for n, v in zip(self.names, per_mask)}
        by_group: dict[str, list[float]] = {}
        for g, v in zip(self.groups, per_mask):
            by_group.setdefault(g, []).append(v)
        out["val/kd"] = sum(sum(vs) / len(vs) for vs in by_group.values())
        return out

    def callbacks(self) -> list[Callback]:
        return [ValKL()]


class ValKL(Callback):
    """Adds :meth:`MaskFit.validation_kl` on the validation set to each epoch's metrics (before the
    checkpoint reads them)."""

    def on_epoch_end(self, trainer, module: nn.Module, metrics: dict[str, float]) -> None:
        metrics.update(module.validation_kl(trainer.val_data, trainer.device))


def build_specialized(teachers: Mapping[str, Teacher], layers: Mapping[str, Sequence[str]], data: DataSplits,
                      dim: int, heads: int) -> tuple[list[str], list[Teacher]]:
    """Names (``<teacher>@<layer>``) and specialised teachers for ``layers`` (teacher -> layer paths)."""
    for name, paths in layers.items():
        if name not in teachers:
            raise ConfigError(f"method.layers.{name}: not a stage-1 teacher; choose from: {', '.join(teachers)}")
        if not paths:
            raise ConfigError(f"method.layers.{name}: give at least one layer path")
        for p in paths:
            try:
                teachers[name].model.get_submodule(p)
            except AttributeError:
                raise ConfigError(f"method.layers.{name}: teacher {name!r} has no sub-module {p!r}") from None
    batch = next(iter(loader(data.train, 2)))
    spec = specialized_teachers([teachers[n] for n in layers], [list(p) for p in layers.values()], batch, dim, heads)
    return [f"{n}@{p}" for n, paths in layers.items() for p in paths], spec


@PIPELINES.register("mst_stage2")
def stage2(cfg: DictConfig) -> dict[str, Any]:
    """Train one MaskNet per (stage-1 teacher, layer of ``method.layers``) towards the frozen student,
    all together; keep the epoch of the lowest validation criterion ``val/kd`` (MST-Distill's
    selection: one epoch for all masks, whatever ``trainer.monitor`` says); write ``masks/`` (trainer
    files) and ``masks.pt`` (the kept MaskNet states)."""
    t_start = time.perf_counter()
    opts = options(cfg, "mst_stage2", STAGE2, ("stage1", "layers"))
    stage1_dir = str(opts["stage1"])
    prev = previous(cfg, stage1_dir, "method.stage1", "mst_stage1", stage1_needs(stage1_dir))
    check_teachers(cfg, prev, f"method.stage1={stage1_dir}")
    if not isinstance(opts["layers"], dict):
        raise ConfigError(f"method.layers: expected {{teacher: [layer paths]}}, got {opts['layers']!r}")
    run_dir, data, meta, cache_dir = start(cfg)
    teachers, student = load_stage1(stage1_dir, prev, meta)
    seed_everything(cfg.seed)
    names, spec = build_specialized(teachers, opts["layers"], data, opts["dim"], opts["heads"])
    groups = [n for n, paths in opts["layers"].items() for _ in paths]
    device = Trainer(trainer_config(cfg)).device
    live = Teacher(student, prev.student.inputs, frozen=True)
    target = cache_teacher(live, data.train, cache_dir, device=device) if cacheable(data.train) else live
    module = MaskFit(spec, names, groups, target, live, opts["temperature"])
    selecting = OmegaConf.merge(cfg, {"trainer": {"monitor": "val/kd", "mode": "min"}})
    fitted, _ = fit("masks", module, data, selecting, run_dir, opts["epochs"])
    results: dict[str, Any] = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir),
                               "pipeline": "mst_stage2", "teachers": {}, "specialized": {},
                               "selection": {"epoch": fitted.best_epoch, "val_kd": fitted.metrics["val/kd"]}}
    for name, t in zip(names, spec):
        results["specialized"][name] = {"val_kd": fitted.metrics[f"val/kd/{name}"],
                                        "test_acc": accuracy(cfg, t.model, t.keys, data.test),
                                        "mask_params": num_params(t.model.masknet)}
    io.save({"layers": opts["layers"], "dim": opts["dim"], "heads": opts["heads"], "names": names,
             "masks": [t.model.masknet.state_dict() for t in spec]}, run_dir / "masks.pt")
    for name, t in teachers.items():
        results["teachers"][name] = {"test_acc": accuracy(cfg, t.model, t.keys, data.test), "params": num_params(t.model)}
    results["student"] = {"test_acc": accuracy(cfg, student, prev.student.inputs, data.test),
                          "params": num_params(student)}
    models = {n: (t.model, t.keys) for n, t in teachers.items()} | {"student": (student, prev.student.inputs)}
    return finish(cfg, run_dir, data, results, models, t_start, False)


@torch.no_grad()
def routing_report(router: Router, student: Net, teachers: Sequence[nn.Module], names: Sequence[str],
                   dataset: Dataset, class_names: Sequence[str], run_dir: Path, label_key: str = "label") -> dict:
    """How the router uses each teacher, per class, on ``dataset``. Writes ``routing.json`` with

    - ``fraction[c][t]``: the fraction of class ``c``'s instances whose ``k`` largest weights include
      teacher ``t`` (``router.k``; 1 for routers without one), and
    - ``mean_weight[c][t]``: teacher ``t``'s mean weight on class ``c``,
    - ``overall``: both over all classes,

    and ``routing.png``, a classes x teachers heat map of what the router's ``mode`` trains with: the
    picks for ``hard`` and ``topk``, the weights for ``soft`` (and for routers without a mode)."""
    router.eval()
    student.eval()
    mode, k = router.mode, router.k
    counts, weights = torch.zeros(len(class_names), len(names)), torch.zeros(len(class_names), len(names))
    device = next(student.parameters()).device
    for batch in loader(dataset, 256):
        batch = {key: v.to(device) for key, v in batch.items()}
        w = router(student(batch), [t(batch) for t in teachers], batch).float()
        router.pop_aux_losses()
        y = batch[label_key]
        labelled = y >= 0
        counts.index_add_(0, y[labelled].cpu(), top_k_mask(w, k)[labelled].float().cpu())
        weights.index_add_(0, y[labelled].cpu(), w[labelled].cpu())
    n = counts.sum(1, keepdim=True).clamp(min=1) / k
    total = n.sum().clamp(min=1)
    report = {"teachers": list(names), "classes": list(class_names), "mode": mode, "k": k,
              "counts": counts.tolist(), "fraction": (counts / n).tolist(), "mean_weight": (weights / n).tolist(),
              "overall": {"fraction": (counts.sum(0) / total).tolist(), "mean_weight": (weights.sum(0) / total).tolist()}}
    io.write_json(report, run_dir / "routing.json")
    if mode == "soft":
        shown, title = weights / n, "soft routing: mean weight of each teacher"
    else:
        shown, title = counts / n, f"{mode} top-{k} routing: fraction of instances routed to each teacher"
    plot_routing(shown, names, class_names, title, run_dir / "routing.png")
    return report


def plot_routing(freq: Tensor, names: Sequence[str], class_names: Sequence[str], title: str, path: Path) -> None:
    """A heat map of ``freq`` (classes x teachers, values in [0, 1]), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 0.4 * len(class_names) + 2))
    im = ax.imshow(freq.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="specialised teacher", ylabel="class", title=title)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


@PIPELINES.register("mst_stage3")
def stage3(cfg: DictConfig) -> dict[str, Any]:
    """Distil the student from the routed, frozen specialised teachers of the stage-2 run in
    ``method.stage2`` with the config's loss terms and router; write ``student/`` (trainer files),
    ``student.pt``, the routing report and the export."""
    t_start = time.perf_counter()
    opts = options(cfg, "mst_stage3", STAGE3, ("stage2",))
    if opts["init"] not in ("stage1", "scratch"):
        raise ConfigError(f"method.init: {opts['init']!r}; choose from: stage1 (the co-trained student), scratch")
    stage2_dir = str(opts["stage2"])
    prev2 = previous(cfg, stage2_dir, "method.stage2", "mst_stage2", ["masks.pt"])
    stage1_dir = str(prev2.method.stage1)
    prev1 = previous(cfg, stage1_dir, f"method.stage2={stage2_dir}: its method.stage1", "mst_stage1",
                     stage1_needs(stage1_dir))
    check_teachers(cfg, prev1, f"method.stage2={stage2_dir}")
    run_dir, data, meta, cache_dir = start(cfg)
    teachers, stage1_student = load_stage1(stage1_dir, prev1, meta)
    masks = io.load(Path(stage2_dir) / "masks.pt", "the MaskNet states of stage 2",
                    f"rerun stage 2 (the run of method.stage2={stage2_dir}) to write it again")
    names, spec = build_specialized(teachers, masks["layers"], data, masks["dim"], masks["heads"])
    if masks["names"] != names:
        raise ConfigError(f"method.stage2={stage2_dir}: its masks {masks['names']} do not match the teachers' layers "
                          f"{names}; rerun stage 2 on its stage-1 run")
    for name, t, state in zip(names, spec, masks["masks"]):
        try:
            t.model.masknet.load_state_dict(state)
        except RuntimeError as e:
            raise ConfigError(f"method.stage2={stage2_dir}: mask {name} does not fit its teacher "
                              f"({io.first_line(e, typed=False)}); rerun stage 2 on its stage-1 run") from None
    live = [Teacher(t.model, t.keys, frozen=True) for t in spec]
    device = Trainer(trainer_config(cfg)).device
    used = [cache_teacher(t, data.train, cache_dir, device=device) if cacheable(data.train) else t for t in live]
    seed_everything(cfg.seed)
    student = build_model(cfg.student, meta, "student")
    if opts["init"] == "stage1":
        student.load_state_dict(stage1_student.state_dict())
    router = build_router(cfg, meta, student, data, len(spec))
    student_net = Net(student, cfg.student.inputs, cfg.student.features)
    terms = build_terms(cfg, student_net, used, data)
    fitted, test = fit("student", Distiller(student_net, used, terms, router), data, cfg, run_dir)
    io.save(student.state_dict(), run_dir / "student.pt")
    results: dict[str, Any] = {"experiment": cfg.experiment, "seed": cfg.seed, "run_dir": str(run_dir),
                               "pipeline": "mst_stage3", "teachers": {}, "specialized": {}}
    results["student"] = {"val_acc": fitted.metrics["val/acc"], "test_acc": test["acc"], "params": num_params(student)}
    for name, t in zip(names, live):
        results["specialized"][name] = {"test_acc": accuracy(cfg, t.model, t.keys, data.test)}
    for name, t in teachers.items():
        results["teachers"][name] = {"test_acc": accuracy(cfg, t.model, t.keys, data.test), "params": num_params(t.model)}
    report = routing_report(router.to(device), student_net.to(device), [t.to(device) for t in live], names,
                            data.test, meta["class_names"], run_dir)
    results["routing"] = {key: report[key] for key in ("mode", "k", "overall")}
    models = {n: (t.model, t.keys) for n, t in teachers.items()} | {"student": (student, cfg.student.inputs)}
    return finish(cfg, run_dir, data, results, models, t_start, True)
