"""Sweeps: one ``mmkd run`` per combination of swept values, and their summary.

``mmkd run --multirun data.args.split_index=0,1,2 seed=0,1`` (Hydra's sweep syntax: ``a,b,c``,
``range(0,10)``, ``choice(a,b)``, ``glob(...)``) composes and checks every job first, then runs them
one after another, job ``n`` in ``<sweep_dir>/<n>``; ``sweep_dir=DIR`` names the folder (default
``<out_dir>/<name>/multirun-<date-time>``), and ``multirun.yaml`` there lists each job's overrides.
``mmkd summary sweep_dir=DIR`` reads the jobs' ``results.json`` and reports, per model and test
metric, mean ± std over the runs that differ only in :data:`REPLICATES` (a sweep over ``seed`` and
``split_index`` is one group; one that also sweeps ``teacher@teachers.gnn`` has a group per teacher),
printed as a table and written to ``summary.json`` and ``summary.md`` in the sweep folder.
"""
from __future__ import annotations

import itertools
import json
import os
import statistics
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import yaml

from mmkd import io
from mmkd.config import ConfigError

REPLICATES = ("seed", "data.args.split_index", "data.args.split_seed")  # runs of one setting that they vary
MANIFEST = "multirun.yaml"


def expand(overrides: Sequence[str]) -> tuple[list[list[str]], list[str]]:
    """The jobs of a sweep, each a list of plain overrides, and the swept keys; a value that does not
    parse is a :class:`ConfigError`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(f"--multirun: {io.first_line(e, typed=False)}") from None
    axes, swept = [], []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            swept.append(key)
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(job) for job in itertools.product(*axes)], swept


def default_dir(cfg) -> Path:
    """``<out_dir>/<name>/multirun-<date-time>`` of the first job's config."""
    return Path(cfg.out_dir) / (cfg.get("name") or cfg.experiment) / datetime.now().strftime("multirun-%Y%m%d-%H%M%S")


def plan(jobs: list[list[str]], swept: list[str], cfgs: list, sweep_dir: str | None) -> Path:
    """Check the sweep (composed ``cfgs`` of ``jobs``) and write its ``multirun.yaml``; return the
    folder. Each job's ``run_dir`` is set to ``<sweep_dir>/<n>``."""
    for cfg in cfgs:
        if cfg.run_dir:
            raise ConfigError("run_dir: a sweep gives each job its own folder <sweep_dir>/<n>; set sweep_dir=DIR "
                              "instead (or run one job without --multirun)")
        if cfg.resume:
            raise ConfigError("resume=true: resume the jobs of a sweep one at a time: "
                              "mmkd run run_dir=<sweep_dir>/<n> resume=true")
    root = Path(sweep_dir) if sweep_dir else default_dir(cfgs[0])
    if (root / MANIFEST).exists():
        raise ConfigError(f"sweep_dir={str(root)!r} already holds a sweep ({MANIFEST}); choose another folder "
                          f"or summarise it: mmkd summary sweep_dir={root}")
    io.check_writable(root, "sweep_dir")
    for n, cfg in enumerate(cfgs):
        cfg.run_dir = str(root / str(n))
    manifest = {"swept": swept, "jobs": [{"dir": str(n), "overrides": job} for n, job in enumerate(jobs)]}
    io.write_text(yaml.safe_dump(manifest, sort_keys=False), root / MANIFEST)
    return root


def _setting(job: dict, swept: list[str]) -> list[str]:
    """The overrides of ``job`` on swept keys other than :data:`REPLICATES`: what names its group."""
    keys = set(swept) - set(REPLICATES)
    return [o for o in job["overrides"] if o.partition("=")[0].lstrip("+~") in keys]


def summarize(sweep_dir: str | os.PathLike) -> dict[str, Any]:
    """The summary of the sweep in ``sweep_dir`` (see the module docstring), also written to
    ``summary.json`` and ``summary.md`` there."""
    root = Path(sweep_dir)
    try:
        manifest = yaml.safe_load((root / MANIFEST).read_text())
        jobs, swept = manifest["jobs"], manifest["swept"]
    except FileNotFoundError:
        raise ConfigError(f"sweep_dir={str(root)!r} holds no {MANIFEST}; give a folder that "
                          f"mmkd run --multirun wrote") from None
    except (yaml.YAMLError, KeyError, TypeError) as e:
        raise ConfigError(f"{root / MANIFEST}: not a sweep manifest ({io.first_line(e, typed=False)})") from None
    groups: dict[tuple, dict] = {}
    missing = []
    for job in jobs:
        path = root / job["dir"] / "results.json"
        if not path.is_file():
            missing.append(job["dir"])
            continue
        results = json.loads(path.read_text())
        group = groups.setdefault(tuple(_setting(job, swept)), {"runs": [], "models": {}})
        group["runs"].append(job["dir"])
        rows = {**{f"teacher {k}": v for k, v in results.get("teachers", {}).items()},
                **({"student, labels only": results["baseline"]} if "baseline" in results else {}),
                "student, distilled": results["student"]}
        for model, row in rows.items():
            for k, v in row.items():
                if k.startswith("test_") and isinstance(v, (int, float)):
                    group["models"].setdefault(model, {}).setdefault(k[5:], []).append(float(v))
    out = {"sweep_dir": str(root), "swept": swept, "missing": missing, "groups": [
        {"setting": list(setting), "runs": g["runs"],
         "models": {m: {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                            "n": len(v), "values": v} for k, v in ms.items()} for m, ms in g["models"].items()}}
        for setting, g in groups.items()]}
    io.write_json(out, root / "summary.json")
    io.write_text(markdown(out), root / "summary.md")
    return out


def markdown(summary: dict) -> str:
    """The summary as a markdown table: a row per group and model, a column per test metric."""
    metrics = sorted({k for g in summary["groups"] for m in g["models"].values() for k in m if k != "loss"})
    lines = [f"## {summary['sweep_dir']}", "", "| setting | model | runs | " + " | ".join(f"test {m}" for m in metrics) + " |",
             "|" + "---|" * (3 + len(metrics))]
    for g in summary["groups"]:
        for model, ms in g["models"].items():
            cells = [f"{100 * ms[m]['mean']:.2f} ± {100 * ms[m]['std']:.2f}" if m in ms else "-" for m in metrics]
            lines.append(f"| {' '.join(g['setting']) or '-'} | {model} | {len(g['runs'])} | " + " | ".join(cells) + " |")
    note = f"Test metrics (%), mean ± std over the runs of each setting; swept: {', '.join(summary['swept']) or 'nothing'}."
    if summary["missing"]:
        note += f" Jobs without results (unfinished or failed): {', '.join(summary['missing'])}."
    return "\n".join(lines) + "\n\n" + note + "\n"
