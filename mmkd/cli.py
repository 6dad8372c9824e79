"""The ``mmkd`` command line.

    mmkd run [experiment=NAME] [key=value ...]     run an experiment (Hydra overrides)
    mmkd list [module=PREFIX] [modules=true]        registered losses, routers, models, data sets, pipelines, experiments;
                                                    module: only names defined in PREFIX or below it (e.g. mmkd.graphs);
                                                    modules=true: each name as "name (module)"
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
from typing import Sequence

from mmkd.config import ConfigError, config_dir, experiments

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_EXPORT = 2, 3, 4


def compose(overrides: Sequence[str]):
    """The run config for ``overrides``, composed and validated; raises :class:`ConfigError`.

    With ``resume=true`` it is the config stored in the run directory: an override that would
    change it is refused (:data:`RESUME_SAFE` lists the keys that may differ)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mmkd.config import check_names, typed_sections

    parsed = parse_overrides(overrides)
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e, overrides)) from None
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


# keys a resumed run may change: they cannot change its results
RESUME_SAFE = ("resume", "run_dir", "trainer.progress", "trainer.num_workers", "trainer.tensorboard", "export",
               "trainer.device")


def resumed(cfg, parsed: list):
    """The config stored in ``cfg.run_dir`` with the :data:`RESUME_SAFE` overrides applied; any other
    override that differs from the stored value is refused, naming every such key."""
    from pathlib import Path

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


def _explain(e: Exception, overrides: Sequence[str]) -> str:
    """One line out of Hydra's and OmegaConf's multi-line errors."""
    cause = e.__cause__ or e
    text = str(cause)
    if "Could not find 'experiment/" in str(e):
        name = re.search(r"experiment/([^']*)'", str(e)).group(1)
        return f"experiment: unknown experiment {name!r}; choose from: {', '.join(experiments())}"
    key = getattr(cause, "full_key", None) or ""
    m = re.search(r"Key '([^']+)' (?:is )?not in", text)
    if m:
        full = key or m.group(1)
        parent = full.rpartition(".")[0]
        return f"{full}: unknown config key; valid keys{' under ' + parent if parent else ''}: {', '.join(_schema_keys(parent))}"
    m = re.search(r"Value '([^']*)' (?:of type '(\w+)' )?could not be converted to (\w+)", text)
    if m:
        return f"{key}: expected {m.group(3).lower()}, got {m.group(1)!r}"
    m = re.search(r"mismatched input|no viable alternative|extraneous input", text)
    if m:
        return f"cannot parse the overrides {' '.join(overrides)!r}; write them as key=value"
    first = text.strip().splitlines()[0] if text.strip() else type(cause).__name__
    return f"{key + ': ' if key else ''}{first}"


def _schema_keys(path: str) -> list[str]:
    """The keys of the typed config section at ``path`` ("" for the top level)."""
    from omegaconf import OmegaConf

    from mmkd.config import _schema

    schema = _schema()
    node = OmegaConf.select(schema, path) if path else schema
    return list(node.keys()) if OmegaConf.is_dict(node) else []


def cmd_run(overrides: Sequence[str]) -> int:
    from mmkd.run import ExportFailed, run

    cfg = compose(overrides)
    try:
        results = run(cfg)
    except ExportFailed as e:
        print_results(e.results)  # the run itself finished
        raise
    print_results(results)
    return 0


def print_results(results: dict) -> None:
    """A table of test accuracy, parameters and inference time for teachers and students."""
    from rich.console import Console
    from rich.table import Table

    n = results["latency_batch"]
    table = Table(title=f"{results['experiment']} (seed {results['seed']}) - {results['run_dir']}")
    for col in ("model", "test acc", "params", f"ms / {n} items"):
        table.add_column(col, justify="left" if col == "model" else "right")
    student = results["student"]
    for name, row in results.get("teachers", {}).items():
        table.add_row(f"teacher {name}", f"{row['test_acc']:.4f}", f"{row['params']:,}", f"{row['latency_ms']:.3f}")
    if "baseline" in results:
        table.add_row("student, labels only", f"{results['baseline']['test_acc']:.4f}", f"{student['params']:,}",
                      f"{student['latency_ms']:.3f}")
    table.add_row("student, distilled", f"{student['test_acc']:.4f}", f"{student['params']:,}", f"{student['latency_ms']:.3f}")
    console = Console()
    console.print(table)
    for name, row in results.get("teachers", {}).items():
        console.print(f"student is {row['latency_ms'] / student['latency_ms']:.1f}x faster than teacher {name}; "
                      f"{row['params'] / student['params']:.1f}x fewer parameters")
    console.print(f"exported: {', '.join(results['export']) or 'nothing'}  ({results['time_s']:.1f} s)")


def cmd_list(args: Sequence[str]) -> int:
    from mmkd.registry import CALLBACKS, DATASETS, LOSSES, METRICS, MODELS, PIPELINES, POLICIES, ROUTERS, TRANSFORMS

    opts = _options(args, ("module", "modules"), (), "mmkd list [module=PREFIX] [modules=true]")
    show = opts.get("modules", "false")
    if show not in ("true", "false"):
        raise ConfigError(f"modules: expected true or false, got {show!r}")
    prefix = opts.get("module")
    registries = {"losses": LOSSES, "routers": ROUTERS, "models": MODELS, "datasets": DATASETS, "pipelines": PIPELINES,
                  "transforms": TRANSFORMS, "policies": POLICIES, "callbacks": CALLBACKS, "metrics": METRICS}
    lines = []
    for title, reg in registries.items():
        names = [n for n in reg.names() if prefix is None or f"{reg.module(n)}.".startswith(f"{prefix}.")]
        if names or prefix is None:  # a filtered listing leaves out the kinds it empties
            lines.append(f"{title}: {', '.join(f'{n} ({reg.module(n)})' if show == 'true' else n for n in names)}")
    if prefix is None:  # experiments are config files, defined in no module
        lines.append(f"experiments: {', '.join(experiments())}")
    elif not lines:
        prefixes = sorted({".".join(r.module(n).split(".")[:2]) for r in registries.values() for n in r.names()})
        raise ConfigError(f"module={prefix}: no registered name is defined in it or below it; "
                          f"choose from: {', '.join(prefixes)}")
    print("\n".join(lines))
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
    from mmkd.deploy import predict, write_predictions
    from mmkd.io import check_writable

    usage = ("mmkd predict run_dir=DIR input=FEATURES.npy|.csv|.pt|.npz [output=preds.csv] [batch_size=N] "
             "[format=onnx|pt2]")
    opts = _options(args, ("run_dir", "input", "output", "batch_size", "format"), ("run_dir", "input"), usage)
    batch_size = opts.get("batch_size", "4096")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    output = check_writable(opts.get("output", "preds.csv"), "output", file=True)  # before the model runs
    pred = predict(opts["run_dir"], opts["input"], int(batch_size), opts.get("format"))
    path = write_predictions(pred, output)
    print(f"{len(pred.class_ids)} predictions -> {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkd", description="Knowledge distillation across graphs and modalities.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run an experiment: mmkd run [experiment=NAME] [key=value ...]").add_argument(
        "overrides", nargs="*")
    sub.add_parser("list", help="registered losses, routers, models, data sets and experiments: mmkd list "
                   "[module=PREFIX] [modules=true]").add_argument("options", nargs="*")
    sub.add_parser("export", help="export a run's student: mmkd export run_dir=DIR format=onnx|pt2").add_argument(
        "options", nargs="*")
    sub.add_parser("predict", help="classify raw features with a run's exported student: mmkd predict run_dir=DIR "
                   "input=FEATURES [output=preds.csv] [batch_size=N] [format=onnx|pt2]").add_argument(
        "options", nargs="*")
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
            return cmd_run(args.overrides)
        if args.command == "list":
            return cmd_list(args.options)
        if args.command == "predict":
            return cmd_predict(args.options)
        return cmd_export(args.options)
    except (ConfigError, UnknownName, DataError, NoSpace, NonFiniteLoss, ExportFailed) as e:
        print(f"mmkd: error: {e}", file=sys.stderr)
        return {NonFiniteLoss: EXIT_DIVERGED, ExportFailed: EXIT_EXPORT}.get(type(e), EXIT_BAD_INPUT)
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
