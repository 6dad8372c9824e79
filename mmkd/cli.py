"""The ``mmkd`` command line.

    mmkd run [--config-dir DIR] [experiment=NAME|PATH.yaml] [key=value ...]
                                                    run an experiment (Hydra overrides); NAME: DIR/experiment/NAME.yaml,
                                                    else DIR/NAME.yaml, else a shipped experiment
    mmkd list [--config-dir DIR] [module=PREFIX] [modules=true]
                                                    registered losses, routers, models, data sets, pipelines, experiments;
                                                    module: only names defined in PREFIX or below it (e.g. mmkd.graphs);
                                                    modules=true: each name as "name (module)"
    mmkd init NAME [--config-dir DIR | dir=DIR]     write a commented starter experiment, NAME.yaml
                                                    (with a folder: DIR/experiment/NAME.yaml); never over a file
    mmkd export run_dir=DIR [format=onnx|pt2]
    mmkd predict run_dir=DIR input=FEATURES.npy|.csv|.pt|.npz [output=preds.csv] [batch_size=N] [format=onnx|pt2]

Errors are one line on stderr, and the exit code tells them apart:

    2  bad input (an unknown key, a wrong type or range, an unknown name, a missing or damaged file,
       a run directory in use, no space left on the disk): nothing was trained on it
    3  the loss became NaN or infinite (the line names the stage, epoch, step and terms)
    4  the run finished and saved its results, but exporting the student failed
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import Sequence

from mmkd.config import ConfigError, config_dir as shipped_config_dir, experiments

log = logging.getLogger("mmkd")
EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_EXPORT = 2, 3, 4


def compose(overrides: Sequence[str], config_dir: str | os.PathLike | None = None):
    """The run config for ``overrides``, composed and validated; raises :class:`ConfigError`.

    ``experiment=`` names a shipped experiment, one in ``config_dir`` (``--config-dir``:
    ``DIR/experiment/NAME.yaml``, else ``DIR/NAME.yaml``; searched first), or is the path of a YAML
    file (a value ending in ``.yaml`` or holding a ``/``). A user's file is composed as the
    experiment group's option :data:`~mmkd.config.USER_EXPERIMENT` (Hydra's ConfigStore), so its
    ``defaults:`` list may name shipped experiments, even one of the same name; ``config_dir`` and the
    file's folder join Hydra's search path (``hydra.searchpath``) for the configs such lists name.

    With ``resume=true`` it is the config stored in the run directory: an override that would
    change it is refused (:data:`RESUME_SAFE` lists the keys that may differ)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mmkd.config import check_names, typed_sections, user_config_dir

    overrides = [_expand_home(line) for line in overrides]
    parsed = parse_overrides(overrides)
    folder = user_config_dir(config_dir) if config_dir is not None else None
    hydra_overrides, name, file, search = _user_experiment(overrides, parsed, folder)
    try:
        with initialize_config_dir(config_dir=str(shipped_config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=hydra_overrides)
        if file is not None:  # the name it was given, not the one of an experiment it starts from
            cfg.experiment = name
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e, overrides, file, search)) from None
    except ValueError as e:  # Hydra: a config group given a number or a mapping (student=3, experiment=2024)
        if "Config group override must be" not in str(e):
            raise
        o = next(o for o in parsed if (shipped_config_dir() / o.key_or_group).is_dir()
                 and not isinstance(o.value(), (str, list)))
        key = o.key_or_group
        raise ConfigError(f"{key}={o.get_value_element_as_str()}: {key} is a config group; give the name of one of "
                          f"its configs ({', '.join(_group_options(key, search))}) or set its keys: "
                          f"{key}.KEY=VALUE") from None
    finally:
        if file is not None:
            _forget_user_experiment()
    for o in parsed:  # `teachers={}` merges into the experiment's teachers: it removes nothing
        key = o.key_or_group
        if not o.is_delete() and o.value() == {} and OmegaConf.select(cfg, key):
            entries = list(OmegaConf.select(cfg, key))
            raise ConfigError(f"{key}={{}}: an override merges into the experiment's {key} ({', '.join(entries)}) "
                              f"and removes nothing; delete entries with {' '.join(f'~{key}.{e}' for e in entries)}")
    if cfg.resume:
        cfg = resumed(cfg, parsed)
    typed_sections(cfg)
    check_names(cfg)
    return cfg


def _expand_home(line: str) -> str:
    """``experiment=~/my.yaml`` with the home folder spelt out (Hydra's override grammar has no ``~``)."""
    key, sep, value = line.partition("=")
    if key != "experiment" or not value.startswith("~"):
        return line
    return f"experiment={_quote(os.path.expanduser(value))}"


def _quote(value: str) -> str:
    """``value`` as a quoted string of Hydra's override grammar."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # backslashes before a quote double
    return "'" + re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value) + "'"


def _user_experiment(overrides: Sequence[str], parsed: list,
                     folder: Path | None) -> tuple[list[str], str | None, Path | None, list[Path]]:
    """The overrides to compose with, the experiment's name, the user's file it is (``None``: a
    shipped experiment) and the user's folders on the search path. The file is stored in Hydra's
    ConfigStore as the experiment group's option :data:`~mmkd.config.USER_EXPERIMENT`, which
    ``experiment=`` then selects; its folder (or the folder above an ``experiment/`` folder) joins
    ``hydra.searchpath`` after ``folder``."""
    from hydra.core.config_store import ConfigStore

    from mmkd.config import USER_EXPERIMENT, find_experiment, load_experiment

    lines, name, file, search = list(overrides), None, None, [folder] if folder is not None else []
    for i, o in enumerate(parsed):
        value = o.value()
        if o.key_or_group == "experiment" and not o.is_delete() and value is not None and not isinstance(value, (list, dict)):
            name, file = find_experiment(value if isinstance(value, str) else o.get_value_element_as_str(), folder)
            if file is not None:
                node = load_experiment(file)
                ConfigStore.instance().store(group="experiment", name=USER_EXPERIMENT, node=node, package="_global_")
                lines[i] = f"{'+' if o.is_add() else ''}experiment={USER_EXPERIMENT}"
                search.append(file.parent.parent if file.parent.name == "experiment" else file.parent)
    if search:
        given = next((i for i, o in enumerate(parsed) if o.key_or_group == "hydra.searchpath"), None)
        paths = list(dict.fromkeys(f"file://{p}" for p in search))
        if given is None:
            lines.append(f"hydra.searchpath=[{','.join(map(_quote, paths))}]")
        else:  # the user's own entries after these
            value = parsed[given].value()
            lines[given] = f"hydra.searchpath=[{','.join(map(_quote, [*paths, *(value or [])]))}]"
    return lines, name, file, list(dict.fromkeys(search))


def _forget_user_experiment() -> None:
    """Remove the user's file from Hydra's ConfigStore once composed (the store is process-wide)."""
    from hydra.core.config_store import ConfigStore

    from mmkd.config import USER_EXPERIMENT

    ConfigStore.instance().repo.get("experiment", {}).pop(f"{USER_EXPERIMENT}.yaml", None)


# keys a resumed run may change: they cannot change its results
RESUME_SAFE = ("resume", "run_dir", "trainer.progress", "trainer.num_workers", "trainer.tensorboard", "export",
               "trainer.device")


def resumed(cfg, parsed: list):
    """The config stored in ``cfg.run_dir`` with the :data:`RESUME_SAFE` overrides applied; any other
    override that differs from the stored value is refused, naming every such key."""

    from omegaconf import OmegaConf, open_dict

    from mmkd.config import _schema

    path = Path(cfg.run_dir or "") / "config.yaml"
    if not cfg.run_dir or not path.is_file():
        raise ConfigError(f"resume=true: {cfg.run_dir!r} holds no run (no config.yaml); set run_dir to the "
                          "directory of the run to continue")
    stored = OmegaConf.merge(_schema(), OmegaConf.load(path))
    differ = []
    for o in parsed:
        key = o.key_or_group
        new, old = OmegaConf.select(cfg, key), OmegaConf.select(stored, key, default=None)
        if key in RESUME_SAFE or _same(new, old) and not o.is_delete():
            continue
        differ.append(f"{key}={_show(new) if not o.is_delete() else '(deleted)'} (the run has {_show(old)})")
    device = {k: _device(c.trainer.device) for k, c in (("new", cfg), ("old", stored))}
    if any(o.key_or_group == "trainer.device" for o in parsed) and device["new"] != device["old"]:
        differ.append(f"trainer.device={cfg.trainer.device} ({device['new']}; the run trained on {device['old']})")
    if differ:
        raise ConfigError(f"resume=true continues the run as it was started; these overrides would change it: "
                          f"{'; '.join(differ)}. Drop them, or start a new run (another run_dir)")
    with open_dict(stored):
        for key in ["resume", *(o.key_or_group for o in parsed if o.key_or_group in RESUME_SAFE)]:
            OmegaConf.update(stored, key, OmegaConf.select(cfg, key), merge=False)
    return stored


def _same(a, b) -> bool:
    from omegaconf import OmegaConf

    plain = (lambda v: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)
    return plain(a) == plain(b)


def _show(v) -> str:
    from omegaconf import OmegaConf

    return str(OmegaConf.to_container(v) if OmegaConf.is_config(v) else v)


def _device(name: str) -> str:
    """The device ``trainer.device`` resolves to here (``auto``: CUDA when present)."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name.replace("cuda:0", "cuda")


def parse_overrides(overrides: Sequence[str]) -> list:
    """Hydra's parse of ``overrides``, checked for what composing would accept silently or explain
    badly: two experiments, a schema section deleted, a ``+key`` that is no config key, a
    non-ASCII value without quotes."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from mmkd.config import FREE_FORM

    parser, parsed, seen = OverridesParser.create(), [], {}
    for line in overrides:
        try:
            o, = parser.parse_overrides([line])
        except HydraException:
            if not line.isascii():
                key, _, value = line.partition("=")
                raise ConfigError(f"{line!r}: values with non-ASCII characters must be quoted: "
                                  f"{key}=\"{value}\" (in a shell: '{key}=\"{value}\"')") from None
            raise ConfigError(f"cannot parse the override {line!r}; write it as key=value") from None
        key = o.key_or_group
        free = any(key.startswith(f + ".") for f in FREE_FORM)
        if o.is_delete() and not free:
            raise ConfigError(f"~{key}: only entries of {', '.join(FREE_FORM)} can be deleted; "
                              f"set {key}'s values instead")
        if (o.is_add() or o.is_force_add()) and not free and not _schema_has(key):
            parent = key.rpartition(".")[0]
            raise ConfigError(f"+{key}: unknown config key; valid keys{' under ' + parent if parent else ''}: "
                              f"{', '.join(_schema_keys(parent))}")
        if key in seen and key == "experiment":  # a value given twice: the last wins; a config group: refused
            raise ConfigError(f"{key}: given twice ({seen[key]!r} and {line!r}); give it once")
        seen[key] = line
        parsed.append(o)
    return parsed


def _schema_has(key: str) -> bool:
    from omegaconf import OmegaConf

    from mmkd.config import RunConfig

    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(OmegaConf.structured(RunConfig), parent) if parent else OmegaConf.structured(RunConfig)
    return OmegaConf.is_dict(node) and leaf in node


def _explain(e: Exception, overrides: Sequence[str], file: Path | None = None, search: Sequence[Path] = ()) -> str:
    """One line out of Hydra's and OmegaConf's multi-line errors. ``file`` is the user's experiment
    file (composed as :data:`~mmkd.config.USER_EXPERIMENT`), ``search`` the user's folders on the
    search path: an error inside a config file says which."""
    from mmkd.config import USER_EXPERIMENT

    cause = e.__cause__ or e
    text = str(cause)
    where, inside = "", re.match(r"In '([^']+)': ", text)  # Hydra names the config file it was composing
    if inside:
        text = text[inside.end():]
        source = str(file) if file is not None and inside.group(1) == f"experiment/{USER_EXPERIMENT}" \
            else f"{inside.group(1)}.yaml"
        where = f" (in {source})"
    missing = re.search(r"Could not (?:find|load) '([^']+)'", text)
    chosen = not inside or inside.group(1) == "config"  # the primary config's defaults: experiment=NAME
    if missing and chosen and missing.group(1).startswith("experiment/"):
        name = missing.group(1).removeprefix("experiment/")
        return f"experiment: unknown experiment {name!r}; choose from: {', '.join(experiments())}"
    if missing:  # an entry of a defaults list
        group, _, name = missing.group(1).rpartition("/")
        options = _group_options(group, search)
        return (f"defaults: no config {name!r} in {group + '/' if group else 'the top folder'}{where}; "
                + (f"choose from: {', '.join(options)}" if options else
                   f"no such folder among the shipped configs{' or ' + ', '.join(map(str, search)) if search else ''}"))
    named = re.search(r"full_key: (\S+)", text)
    key = getattr(cause, "full_key", None) or (named.group(1) if named else "")
    m = re.search(r"Key '([^']+)' (?:is )?not in", text)
    if m:
        full = key or m.group(1)
        parent = full.rpartition(".")[0]
        return (f"{full}: unknown config key{where}; valid keys{' under ' + parent if parent else ''}: "
                f"{', '.join(_schema_keys(parent))}")
    m = re.search(r"Value '([^']*)' (?:of type '(\w+)' )?could not be converted to (\w+)", text)
    if m:
        return f"{key}: expected {m.group(3).lower()}, got {m.group(1)!r}{where}"
    m = re.search(r"(\w+) is not a subclass of (\w+)\. value: (.*)", text)
    if m and m.group(2) in SECTIONS:
        return f"{SECTIONS[m.group(2)]}: expected a mapping of its keys, got {m.group(3)}{where}"
    m = re.search(r"mismatched input|no viable alternative|extraneous input", text)
    if m:
        return f"cannot parse the overrides {' '.join(overrides)!r}; write them as key=value"
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    return f"{key + ': ' if key else ''}{first}{where}"


SECTIONS = {"DataConfig": "data", "StudentConfig": "student", "RouterConfig": "router", "TrainerSection": "trainer"}


def _group_options(group: str, search: Sequence) -> list[str]:
    """The configs of ``group`` (``experiment``, ``teacher``, ...) shipped and in the user's folders."""
    folders = [shipped_config_dir(), *map(Path, search)]
    return sorted({p.stem for d in folders for p in (d / group).glob("*.yaml")})


def _schema_keys(path: str) -> list[str]:
    """The keys of the typed config section at ``path`` ("" for the top level)."""
    from omegaconf import OmegaConf

    from mmkd.config import _schema

    schema = _schema()
    node = OmegaConf.select(schema, path) if path else schema
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def cmd_run(overrides: Sequence[str], config_dir: str | None = None, multirun: bool = False) -> int:
    from mmkd.run import ExportFailed, run

    sweep_dir = [o.partition("=")[2] for o in overrides if o.startswith("sweep_dir=")]
    overrides = [o for o in overrides if not o.startswith("sweep_dir=")]
    if sweep_dir and not multirun:
        raise ConfigError("sweep_dir: names the folder of a sweep; add --multirun (or give run_dir for one run)")
    if multirun:
        from mmkd import sweep

        jobs, swept = sweep.expand(overrides)
        cfgs = [compose(job, config_dir) for job in jobs]  # every job checked before anything runs
        root = sweep.plan(jobs, swept, cfgs, sweep_dir[-1] if sweep_dir else None)
        log.info("sweep of %d jobs (swept: %s) in %s", len(jobs), ", ".join(swept) or "nothing", root)
    else:
        cfgs = [compose(overrides, config_dir)]
    for cfg in cfgs:
        try:
            results = run(cfg)
        except ExportFailed as e:
            print_results(e.results)  # the run itself finished
            raise
        print_results(results)
    if multirun:
        print_summary(sweep.summarize(root))
    return 0


def cmd_summary(args: Sequence[str]) -> int:
    from mmkd import sweep

    opts = _options(args, ("sweep_dir",), ("sweep_dir",), "mmkd summary sweep_dir=DIR")
    print_summary(sweep.summarize(opts["sweep_dir"]))
    return 0


def print_summary(summary: dict) -> None:
    """The sweep summary's table (:func:`mmkd.sweep.summarize`), and where it was written."""
    from rich.console import Console
    from rich.table import Table

    metrics = sorted({k for g in summary["groups"] for m in g["models"].values() for k in m if k != "loss"})
    table = Table(title=f"sweep {summary['sweep_dir']} (swept: {', '.join(summary['swept']) or 'nothing'})")
    for col in ("setting", "model", "runs", *(f"test {m}" for m in metrics)):
        table.add_column(col, justify="left" if col in ("setting", "model") else "right")
    for g in summary["groups"]:
        for model, ms in g["models"].items():
            table.add_row(" ".join(g["setting"]) or "-", model, str(len(g["runs"])),
                          *(f"{ms[m]['mean']:.4f} ± {ms[m]['std']:.4f}" if m in ms else "-" for m in metrics))
    console = Console()
    console.print(table)
    if summary["missing"]:
        console.print(f"jobs without results: {', '.join(summary['missing'])}")
    console.print(f"summary: {Path(summary['sweep_dir']) / 'summary.json'}, summary.md")


def print_results(results: dict) -> None:
    """A table of the test metrics (all but the loss), parameters and inference time for teachers and
    students; a run without a student prints its ``summary`` line."""
    from rich.console import Console
    from rich.table import Table

    if "student" not in results:  # a pipeline that trains no student (a search)
        Console().print(results.get("summary") or f"results: {Path(results['run_dir']) / 'results.json'}")
        return
    n = results["latency_batch"]
    title = results.get("name") or results["experiment"]
    table = Table(title=f"{title} (seed {results['seed']}) - {results['run_dir']}")
    names = [m for m in results.get("metrics", ["acc"]) if m != "loss"] or ["loss"]
    for col in ("model", *(f"test {m}" for m in names), "params", f"ms / {n} items"):
        table.add_column(col, justify="left" if col == "model" else "right")
    student = results["student"]

    def row(label: str, scores: dict, size: dict) -> None:
        table.add_row(label, *(f"{scores[f'test_{m}']:.4f}" if f"test_{m}" in scores else "-" for m in names),
                      f"{size['params']:,}", f"{size['latency_ms']:.3f}")

    for name, r in results.get("teachers", {}).items():
        row(f"teacher {name}", r, r)
    if "baseline" in results:
        row("student, labels only", results["baseline"], student)
    row("student, distilled", student, student)
    console = Console()
    console.print(table)
    for name, r in results.get("teachers", {}).items():
        console.print(f"student is {r['latency_ms'] / student['latency_ms']:.1f}x faster than teacher {name}; "
                      f"{r['params'] / student['params']:.1f}x fewer parameters")
    console.print(f"exported: {', '.join(results['export']) or 'nothing'}  ({results['time_s']:.1f} s)")


def cmd_list(args: Sequence[str], config_dir: str | None = None) -> int:
    from mmkd.config import user_config_dir, user_experiments
    from mmkd.registry import (CALLBACKS, DATASETS, GRADIENTS, LOSSES, METRICS, MODELS, PIPELINES, POLICIES, ROUTERS,
                               TRANSFORMS)

    opts = _options(args, ("module", "modules"), (), "mmkd list [--config-dir DIR] [module=PREFIX] [modules=true]")
    folder = user_config_dir(config_dir) if config_dir is not None else None
    show = opts.get("modules", "false")
    if show not in ("true", "false"):
        raise ConfigError(f"modules: expected true or false, got {show!r}")
    prefix = opts.get("module")
    registries = {"losses": LOSSES, "routers": ROUTERS, "models": MODELS, "datasets": DATASETS, "pipelines": PIPELINES,
                  "transforms": TRANSFORMS, "policies": POLICIES, "callbacks": CALLBACKS, "backward": GRADIENTS,
                  "metrics": METRICS}
    lines = []
    for title, reg in registries.items():
        names = [n for n in reg.names() if prefix is None or f"{reg.module(n)}.".startswith(f"{prefix}.")]
        if names or prefix is None:  # a filtered listing leaves out the kinds it empties
            lines.append(f"{title}: {', '.join(f'{n} ({reg.module(n)})' if show == 'true' else n for n in names)}")
    if prefix is None:  # experiments are config files, defined in no module
        lines.append(f"experiments: {', '.join(experiments())}")
        if folder is not None:
            lines.append(f"experiments in {config_dir}: {', '.join(user_experiments(folder))}")
    elif not lines:
        prefixes = sorted({".".join(r.module(n).split(".")[:2]) for r in registries.values() for n in r.names()})
        raise ConfigError(f"module={prefix}: no registered name is defined in it or below it; "
                          f"choose from: {', '.join(prefixes)}")
    print("\n".join(lines))
    return 0


STARTER = """\
# @package _global_
# {name}: a starter experiment written by `mmkd init`. Run it with
#   {command}
# and override any key on the command line (trainer.max_epochs=5 seed=1). `mmkd list` names the
# registered losses, models, routers, data sets, transforms, policies and callbacks. The first line
# lets other experiment files start from this one (defaults: [{name}]).

name: ""                        # the run's label (run directory, results.json); "": the experiment's name
seed: 0                         # the one seed of the run (initialisation, data order)
# data_root: /path/to/data      # where data sets live; default: $MMKD_DATA, else data/

data:
  name: digits                  # a registered data set (digits: scikit-learn's, nothing to download)
  args: {{}}                      # its own arguments, e.g. {{fractions: [0.7, 0.15, 0.15], split_seed: 0}}

teachers:                       # trained here on labels first, or loaded (checkpoint: a .pt or a run directory)
  cnn:
    name: cnn
    inputs: [image]             # the batch keys the model reads
    args: {{channels: [32, 64, 128], dropout: 0.1}}
    epochs: 40                  # its training epochs (default: trainer.max_epochs; 0: use it as built)
    # checkpoint: runs/teacher/<date-time>

student:
  name: mlp
  inputs: [image]
  args: {{hidden: [64], dropout: 0.1}}

router:                         # how the teachers are weighed per sample: constant, confidence, ...
  name: constant
  args: {{}}

losses:                         # weighted terms; a term's loss is its key unless `loss:` names another
  ce: {{weight: 1.0}}             # cross-entropy on the labels
  kd: {{weight: 1.0, args: {{temperature: 4.0}}}}   # Hinton's KD on the teachers' softened outputs

trainer:
  max_epochs: 100
  batch_size: 64
  optimizer: adamw              # adamw | adam | sgd
  lr: 3.0e-3
  weight_decay: 1.0e-4
  scheduler: cosine             # cosine | step | none
  device: auto                  # auto | cpu | cuda | cuda:N

# for the student's stage: batch transforms, data policies between epochs, callbacks; each {{name, args}}
transforms: []                  # e.g. [{{name: mixup, args: {{alpha: 0.2}}}}]
policies: []                    # e.g. [{{name: hardest, args: {{fraction: 0.5}}}}]
callbacks: []

baseline: true                  # also train the student on labels alone, from the same initialisation
export: [onnx]                  # onnx | pt2
"""


def cmd_init(args: Sequence[str], config_dir: str | None = None) -> int:
    """``mmkd init NAME [dir=DIR]``: write the :data:`STARTER` experiment, never over a file."""
    from mmkd import io
    from mmkd.config import check_label

    usage = "mmkd init NAME [--config-dir DIR | dir=DIR]"
    names = [a for a in args if "=" not in a]
    opts = _options([a for a in args if "=" in a], ("dir",), (), usage)
    if len(names) != 1:
        raise ConfigError(f"init: give one experiment name ({'got ' + ', '.join(names) if names else 'none given'}); "
                          f"{usage}")
    if config_dir is not None and "dir" in opts:
        raise ConfigError(f"dir: given with --config-dir; give the folder once: {usage}")
    name = names[0].removesuffix(".yaml")
    check_label("init: NAME", name)
    folder = config_dir if config_dir is not None else opts.get("dir")
    if folder is None:
        path, command = Path(f"{name}.yaml"), f"mmkd run experiment={name}.yaml"
    else:
        path, command = Path(folder) / "experiment" / f"{name}.yaml", f"mmkd run --config-dir {folder} experiment={name}"
    if path.exists():
        raise ConfigError(f"init: {str(path)!r} exists; give another name or remove the file")
    io.check_writable(path, "init", file=True)
    io.write_text(STARTER.format(name=name, command=command), path)
    print(f"wrote {path}; run it with: {command}")
    return 0


def cmd_export(args: Sequence[str]) -> int:
    from mmkd.export import export_student

    opts = {"format": "onnx"}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in ("run_dir", "format"):
            raise ConfigError(f"{arg!r}: unknown export option; valid keys: run_dir, format")
        opts[key] = value
    if "run_dir" not in opts:
        raise ConfigError("run_dir: missing; mmkd export run_dir=DIR [format=onnx|pt2]")
    for path in export_student(opts["run_dir"], [opts["format"]]):
        print(path)
    return 0


def _options(args: Sequence[str], valid: Sequence[str], required: Sequence[str], usage: str) -> dict[str, str]:
    """``key=value`` arguments as a dict; an unknown key or a missing required one is an error."""
    opts = {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in valid:
            raise ConfigError(f"{arg!r}: unknown option; valid keys: {', '.join(valid)}")
        opts[key] = value
    for key in required:
        if key not in opts:
            raise ConfigError(f"{key}: missing; {usage}")
    return opts


def cmd_predict(args: Sequence[str]) -> int:
    from mmkd.predict import predict, write_predictions
    from mmkd.io import check_writable

    usage = ("mmkd predict run_dir=DIR input=FEATURES.npy|.csv|.pt|.npz|SENTENCES.txt [column=TEXT_COLUMN] "
             "[output=preds.csv] [batch_size=N] [format=onnx|pt2]")
    opts = _options(args, ("run_dir", "input", "column", "output", "batch_size", "format"), ("run_dir", "input"), usage)
    batch_size = opts.get("batch_size", "4096")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    output = check_writable(opts.get("output", "preds.csv"), "output", file=True)  # before the model runs
    pred = predict(opts["run_dir"], opts["input"], int(batch_size), opts.get("format"), column=opts.get("column"))
    path = write_predictions(pred, output)
    print(f"{len(pred.class_ids)} predictions -> {path}")
    return 0


def _number(opts: dict, key: str, default: str, kind=float):
    try:
        return kind(opts.get(key, default))
    except ValueError:
        raise ConfigError(f"{key}: expected {'an integer' if kind is int else 'a number'}, got {opts[key]!r}") from None


def cmd_generate(args: Sequence[str]) -> int:
    from mmkd.generate import generate
    from mmkd.io import check_writable, write_text

    usage = ("mmkd generate run_dir=DIR prompt=TEXT [max_new_tokens=200] [temperature=0 (greedy)] [top_p=1] "
             "[seed=0] [output=FILE]")
    opts = _options(args, ("run_dir", "prompt", "max_new_tokens", "temperature", "top_p", "seed", "output"),
                    ("run_dir", "prompt"), usage)
    output = check_writable(opts["output"], "output", file=True) if "output" in opts else None
    samples = generate(opts["run_dir"], [opts["prompt"].replace("\\n", "\n")], _number(opts, "max_new_tokens", "200", int),
                       _number(opts, "temperature", "0"), _number(opts, "top_p", "1"), _number(opts, "seed", "0", int))
    text = samples[0].prompt + samples[0].text
    if output is not None:
        write_text(text, output)
    print(text)
    return 0


CONFIG_DIR_COMMANDS = ("run", "list", "init")


def split_config_dir(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """``argv`` without ``--config-dir DIR`` (also ``--config-dir=DIR``, ``-cd DIR``), which may stand
    anywhere after the command, and that ``DIR``; given twice, without a folder or to another command it
    is a :class:`ConfigError`."""
    rest, found, args = [], [], iter(argv)
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag not in ("--config-dir", "-cd"):
            rest.append(arg)
            continue
        if not eq:
            value = next(args, None)
            if not value or value.startswith("-") or "=" in value:  # an override, not a folder
                raise ConfigError(f"{flag}: give a folder: {flag} DIR (a folder with '=' in its name: "
                                  f"{flag}=DIR)")
        found.append(value)
    if len(found) > 1:
        raise ConfigError(f"--config-dir: given {len(found)} times ({', '.join(map(repr, found))}); give one folder")
    if found and (not rest or rest[0] not in CONFIG_DIR_COMMANDS):
        raise ConfigError(f"--config-dir: only for mmkd {', '.join(CONFIG_DIR_COMMANDS)}")
    return rest, found[0] if found else None


def main(argv: Sequence[str] | None = None) -> int:
    try:
        argv, config_dir = split_config_dir(sys.argv[1:] if argv is None else argv)
    except ConfigError as e:
        print(f"mmkd: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    parser = argparse.ArgumentParser(prog="mmkd", description="Knowledge distillation across graphs and modalities.")
    sub = parser.add_subparsers(dest="command", required=True)
    dir_help = ("a folder of your own experiments (DIR/experiment/NAME.yaml or DIR/NAME.yaml), searched before the "
                "shipped ones; it may stand anywhere among the arguments")
    cmd = sub.add_parser("run", help="run an experiment: mmkd run [--config-dir DIR] [--multirun [sweep_dir=DIR]] "
                         "[experiment=NAME|PATH.yaml] [key=value ...] (with --multirun, key=a,b,c runs one job each)")
    cmd.add_argument("overrides", nargs="*")
    # for --help only: main() takes --multirun / -m out of argv first, so it may stand among the overrides
    cmd.add_argument("--multirun", "-m", action="store_true", help="one run per combination of swept values")
    cmd.add_argument("--config-dir", "-cd", metavar="DIR", help=dir_help)
    cmd = sub.add_parser("list", help="registered losses, routers, models, data sets and experiments: mmkd list "
                         "[--config-dir DIR] [module=PREFIX] [modules=true]")
    cmd.add_argument("options", nargs="*")
    cmd.add_argument("--config-dir", "-cd", metavar="DIR", help=dir_help)
    cmd = sub.add_parser("init", help="write a commented starter experiment: mmkd init NAME [--config-dir DIR | "
                         "dir=DIR] (NAME.yaml, or DIR/experiment/NAME.yaml)")
    cmd.add_argument("options", nargs="*")
    cmd.add_argument("--config-dir", "-cd", metavar="DIR", help="write DIR/experiment/NAME.yaml")
    sub.add_parser("export", help="export a run's student: mmkd export run_dir=DIR format=onnx|pt2").add_argument(
        "options", nargs="*")
    sub.add_parser("summary", help="mean ± std of a sweep's runs: mmkd summary sweep_dir=DIR").add_argument(
        "options", nargs="*")
    sub.add_parser("predict", help="classify raw features with a run's exported student: mmkd predict run_dir=DIR "
                   "input=FEATURES [output=preds.csv] [batch_size=N] [format=onnx|pt2]").add_argument(
        "options", nargs="*")
    sub.add_parser("generate", help="continue a prompt with a run's language-model student: mmkd generate "
                   "run_dir=DIR prompt=TEXT [max_new_tokens=200] [temperature=0] [top_p=1] [seed=0] "
                   "[output=FILE]").add_argument("options", nargs="*")
    multirun = bool(argv) and argv[0] == "run" and any(a in ("--multirun", "-m") for a in argv)
    argv = [a for a in argv if not (multirun and a in ("--multirun", "-m"))]  # anywhere among the overrides
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()  # for this call only: a second main() in one process adds no duplicate
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("mmkd")
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("MMKD_LOG", "INFO"))
    from mmkd.data import DataError
    from mmkd.io import NoSpace
    from mmkd.registry import UnknownName
    from mmkd.run import ExportFailed
    from mmkd.trainer import NonFiniteLoss

    try:
        if args.command == "run":
            return cmd_run(args.overrides, config_dir, multirun)
        if args.command == "list":
            return cmd_list(args.options, config_dir)
        if args.command == "init":
            return cmd_init(args.options, config_dir)
        if args.command == "summary":
            return cmd_summary(args.options)
        if args.command == "predict":
            return cmd_predict(args.options)
        if args.command == "generate":
            return cmd_generate(args.options)
        return cmd_export(args.options)
    except (ConfigError, UnknownName, DataError, NoSpace, NonFiniteLoss, ExportFailed) as e:
        print(f"mmkd: error: {e}", file=sys.stderr)
        return {NonFiniteLoss: EXIT_DIVERGED, ExportFailed: EXIT_EXPORT}.get(type(e), EXIT_BAD_INPUT)
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
