"""The ``mmkd`` command line.

    mmkd run [experiment=NAME] [key=value ...]     run an experiment (Hydra overrides)
    mmkd list                                       registered losses, routers, models, data sets, pipelines, experiments
    mmkd export run_dir=DIR [format=onnx|pt2]
    mmkd predict run_dir=DIR input=FEATURES.npy|.csv|.pt [output=preds.csv] [batch_size=N] [format=onnx|pt2]

Bad input (an unknown key, a wrong type, an unknown name, a missing file) prints one line naming
the key and the valid choices, and exits with code 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Sequence

from mmkd.config import ConfigError, config_dir, experiments

EXIT_BAD_INPUT = 2


def compose(overrides: Sequence[str]):
    """The run config for ``overrides``, composed and validated; raises :class:`ConfigError`."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from mmkd.config import check_names, typed_sections

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_explain(e, overrides)) from None
    typed_sections(cfg)
    check_names(cfg)
    return cfg


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

    from mmkd.config import RunConfig

    schema = OmegaConf.structured(RunConfig)
    return list((OmegaConf.select(schema, path) if path else schema).keys())


def cmd_run(overrides: Sequence[str]) -> int:
    from mmkd.run import run

    cfg = compose(overrides)
    results = run(cfg)
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


def cmd_list() -> int:
    from mmkd.registry import DATASETS, LOSSES, MODELS, PIPELINES, ROUTERS

    for title, names in (("losses", LOSSES.names()), ("routers", ROUTERS.names()), ("models", MODELS.names()),
                         ("datasets", DATASETS.names()), ("pipelines", PIPELINES.names()),
                         ("experiments", experiments())):
        print(f"{title}: {', '.join(names)}")
    return 0


def cmd_export(args: Sequence[str]) -> int:
    from mmkd.run import export_student

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

    usage = "mmkd predict run_dir=DIR input=FEATURES.npy|.csv|.pt [output=preds.csv] [batch_size=N] [format=onnx|pt2]"
    opts = _options(args, ("run_dir", "input", "output", "batch_size", "format"), ("run_dir", "input"), usage)
    batch_size = opts.get("batch_size", "4096")
    if not batch_size.isdigit() or int(batch_size) < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    pred = predict(opts["run_dir"], opts["input"], int(batch_size), opts.get("format"))
    path = write_predictions(pred, opts.get("output", "preds.csv"))
    print(f"{len(pred.class_ids)} predictions -> {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmkd", description="Knowledge distillation across graphs and modalities.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run an experiment: mmkd run [experiment=NAME] [key=value ...]").add_argument(
        "overrides", nargs="*")
    sub.add_parser("list", help="registered losses, routers, models, data sets and experiments")
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
    from mmkd.registry import UnknownName

    try:
        if args.command == "run":
            return cmd_run(args.overrides)
        if args.command == "list":
            return cmd_list()
        if args.command == "predict":
            return cmd_predict(args.options)
        return cmd_export(args.options)
    except (ConfigError, UnknownName, DataError) as e:
        print(f"mmkd: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        logger.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
