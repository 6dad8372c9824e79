"""CIFAR-10 at CPU scale: a teacher trained once, small students with CE and every logit loss we ship,
a live teacher against the augmentation-aware view cache, and the cache's size on disk.

The teacher (``--teacher``, ``--teacher-epochs``) is trained on labels by the ``cifar10_kd``
experiment into ``<work>/teacher-<name>-<epochs>e-<per-class>/`` and loaded from there by every later
invocation. Students (``--student``) train for ``--epochs`` on a training subset of ``--per-class``
images per class (``--val`` of them held out), evaluated on the whole 10,000-image test set, with the
protocol of ``configs/setup/cifar10.yaml`` scaled to the epoch budget (SGD 0.05, the lr times 0.1 at
150/240, 180/240 and 210/240 of the epochs; DKD's 20-of-240-epoch warm-up scaled the same way).
Every cached run shares one view cache under ``<work>/cache`` (the views are seeded by
``augment_seed``, not by the student's seed), so its first run fills it and the others only read it.
A student run whose config equals that of a finished run under ``<work>/out`` is read back, not trained
again, so an interrupted invocation resumes where it stopped.

Timing rows: for teachers of growing size (untrained: time does not depend on the weights), the
student's seconds per epoch with the live teacher, while filling the cache, and reading it. Size rows:
one epoch's cache files, full logits against top-k, for 10 classes and for a 1000-class head.

    MMKD_DATA=../shared/data python benchmarks/cifar10.py [--seeds 3] [--epochs 10] [--per-class 500]
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from common import RESULTS, fmt, mean_std, write
from mmkd import Teacher
from mmkd.cli import compose
from mmkd.modalities.image.folders import ImageDataset
from mmkd.run import run
from mmkd.view_cache import cache_views

LOSSES = {  # method -> (experiment, overrides), each loss at its registered defaults
    "kd": ("cifar10_kd", []),  # CE 0.1 + KD 0.9, T = 4 (mdistiller); the CE baseline trains beside it
    "dkd": ("cifar10_dkd", []),
    **{m: ("cifar10_kd", ["losses.ce.weight=1.0", "~losses.kd", f"+losses.{m}={{weight: 1.0}}"])
       for m in ("nkd", "dist", "bkl")},  # CE + the loss, as their papers train
    "pld": ("cifar10_kd", ["~losses.ce", "~losses.kd", "+losses.pld={weight: 1.0}"]),  # replaces CE + KD
    "sinkd": ("cifar10_kd", ["+losses.sinkd={weight: 0.0008}"]),  # added to CE + KD: 0.001 x beta 0.8 (official)
}
LABELS = {"ce": "CE (labels only)", "kd_live": "KD, live teacher", "kd": "KD, view cache", "dkd": "DKD",
          "nkd": "NKD", "dist": "DIST", "bkl": "BKL", "pld": "PLD (in place of CE + KD)",
          "sinkd": "KD + SinKD"}


def scaled(epochs: int) -> str:
    """The protocol's milestones (150, 180, 210 of 240 epochs) scaled to ``epochs``."""
    return "[" + ",".join(map(str, sorted({max(1, round(m * epochs / 240)) for m in (150, 180, 210)}))) + "]"


def train_seconds(metrics: Path) -> list[float]:
    """``time/train_s`` of every epoch in a stage's ``metrics.csv``."""
    with metrics.open() as f:
        return [float(r["time/train_s"]) for r in csv.DictReader(f)]


def teacher_run(args, data: list[str], experiment: str = "cifar10_kd", prefix: str = "teacher") -> tuple[Path, dict]:
    """The teacher's run directory ``<work>/<prefix>-<name>-<epochs>e-<per-class>`` (trained now when
    absent, by the teacher side of ``experiment``: its teacher losses and callbacks) and its test
    accuracy and epochs."""
    folder = args.work / f"{prefix}-{args.teacher}-{args.teacher_epochs}e-{args.per_class}"
    if not (folder / "results.json").is_file():
        print(f"training the teacher {args.teacher} ({experiment}) for {args.teacher_epochs} epochs into {folder}",
              flush=True)
        run(compose([f"experiment={experiment}", f"run_dir={folder}", f"teachers.resnet.name={args.teacher}",
                     f"teachers.resnet.epochs={args.teacher_epochs}",
                     f"+teachers.resnet.trainer={{milestones: {scaled(args.teacher_epochs)}}}",
                     "losses.ce.weight=1.0", "~losses.kd", "trainer.max_epochs=1", "baseline=false", *data]))
    results = json.loads((folder / "results.json").read_text())
    row = results["teachers"]["resnet"]
    return folder, {"name": args.teacher, "epochs": args.teacher_epochs, "test_acc": row["test_acc"],
                    "best_epoch": row.get("epoch"), "train_s_per_epoch": statistics.mean(
                        train_seconds(folder / "teachers" / "resnet" / "metrics.csv"))}


def filled_views(cache: Path) -> int:
    """How many views the view caches under ``cache`` hold, over all epochs (the filled masks)."""
    return sum(int(np.load(f).sum()) for f in (cache / "views").glob("*/e*.filled.npy"))


def students(args, data: list[str], teacher: Path, plan: list[tuple[str, str, list[str]]],
             baselines: dict[str, str] | None = None, train: bool = True) -> tuple[dict, dict, dict]:
    """Test accuracies, student seconds per epoch and whether the run computed teacher outputs into
    the view cache (``filled``), of every ``(method, experiment, overrides)`` of ``plan`` and every
    seed (``args.first_seed`` to ``args.first_seed + args.seeds - 1``). A method of ``baselines``
    (default: the cached ``kd``) also trains its student on labels alone, the row named there (``ce``). Each experiment's schedule is scaled to ``args.epochs``: its
    lr milestones, warm-up epochs and the warm-up of its term weights (DKD's, ReviewKD's). With
    ``train=False`` only finished runs are read (a method, seed pair without one is left out)."""
    baselines = {"kd": "ce"} if baselines is None else baselines
    acc: dict[str, list[float]] = {}
    sec: dict[str, list[list[float]]] = {}
    filled: dict[str, list[bool]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for method, experiment, extra in plan:
            cfg = compose([f"experiment={experiment}", *extra])
            extra = [*([f"teachers.resnet.checkpoint={teacher}", f"teachers.resnet.name={args.teacher}"]
                       if cfg.teachers else []),  # a self-distillation run has none
                     f"student.name={args.student}", *extra, *shortened(cfg, args.epochs)]
            cfg = compose([f"experiment={experiment}", f"seed={seed}", f"baseline={method in baselines}", *data, *extra])
            before = filled_views(args.work / "cache")
            r = finished(cfg, args.work / "out") or (run(cfg) if train else None)
            if r is None:
                continue
            filled.setdefault(method, []).append(filled_views(args.work / "cache") > before)
            acc.setdefault(method, []).append(r["student"]["test_acc"])
            sec.setdefault(method, []).append(train_seconds(Path(r["run_dir"]) / "student" / "metrics.csv"))
            if method in baselines:
                acc.setdefault(baselines[method], []).append(r["baseline"]["test_acc"])
                sec.setdefault(baselines[method], []).append(train_seconds(Path(r["run_dir"]) / "baseline" / "metrics.csv"))
            print(f"seed {seed} {method}: test acc {r['student']['test_acc']:.4f}, "
                  f"{statistics.mean(sec[method][-1]):.1f} s/epoch", flush=True)
    return acc, sec, filled


def shortened(cfg, epochs: int) -> list[str]:
    """Overrides that train the experiment ``cfg`` for ``epochs`` with its schedule scaled: the lr
    milestones (:func:`scaled`), the lr warm-up and the warm-up of every term weight, by
    ``epochs / trainer.max_epochs`` (term warm-ups at least one epoch)."""
    scale = epochs / cfg.trainer.max_epochs
    out = [f"trainer.max_epochs={epochs}"]
    if cfg.trainer.scheduler == "step" and cfg.trainer.milestones:
        out.append(f"trainer.milestones={scaled(epochs)}")
    if cfg.trainer.warmup_epochs:
        out.append(f"trainer.warmup_epochs={cfg.trainer.warmup_epochs * scale}")
    for k, t in cfg.losses.items():
        if OmegaConf.is_dict(t.weight) and t.weight.get("schedule") == "warmup":
            out.append(f"losses.{k}.weight.epochs={max(1, round(t.weight.epochs * scale))}")
    return out


def finished(cfg, out: Path) -> dict | None:
    """The results of a finished run under ``out`` (an earlier invocation's) whose config is ``cfg``, its
    run directory aside (a run without ``data.args.split_seed`` had its seed's split); ``None`` when
    there is none, and the run is trained again."""
    import yaml

    want = OmegaConf.to_container(cfg, resolve=True)
    want.pop("run_dir")
    want["data"]["args"].setdefault("split_seed", want["seed"])  # the same default on both sides
    for cfg_file in sorted(out.glob(f"{cfg.experiment}/*/config.yaml")):
        have, results = yaml.safe_load(cfg_file.read_text()), cfg_file.parent / "results.json"
        have["data"]["args"].setdefault("split_seed", have["seed"])  # the default a run resolved (build.load_data)
        if have.pop("run_dir") and have == want and results.is_file():
            return {**json.loads(results.read_text()), "run_dir": str(cfg_file.parent)}
    return None


def collect(args, plan: list[tuple[str, str, list[str]]]) -> tuple[dict, dict, dict, float]:
    """Test accuracies, student seconds per epoch, which runs filled the view cache and the minutes the
    runs took, read back from the run directories of an earlier (e.g. interrupted) invocation under
    ``<work>/out``: each run is matched to the ``plan`` entry with its loss terms and teacher-cache
    setting, runs of other teachers, students or subsets skipped. The first cached method of a
    split filled its view cache: every seed's when the split followed the seed (no
    ``data.args.split_seed`` in the run's config), seed 0's otherwise."""
    import yaml

    def key(cfg) -> tuple:
        return frozenset(cfg["losses"]), bool(cfg["teachers"].get("resnet", {}).get("cache", True))

    wanted = {key(OmegaConf.to_container(compose([f"experiment={e}", *o]))): m for m, e, o in plan}
    found: dict[str, dict[int, tuple]] = {}
    for cfg_file in sorted((args.work / "out").glob("*/*/config.yaml")):
        cfg, run_dir = yaml.safe_load(cfg_file.read_text()), cfg_file.parent
        teacher = cfg["teachers"].get("resnet", {})
        if (cfg["student"]["name"] != args.student or teacher.get("name", args.teacher) != args.teacher
                or teacher.get("epochs", 1) == 0 or cfg["data"]["args"].get("limit_per_class") != args.per_class
                or cfg["trainer"]["max_epochs"] != args.epochs or not (run_dir / "results.json").is_file()):
            continue
        method = wanted.get(key(cfg))
        if method is not None and cfg["seed"] < args.seeds:
            found.setdefault(method, {})[cfg["seed"]] = (run_dir, json.loads((run_dir / "results.json").read_text()))
    acc: dict[str, list[float]] = {}
    sec: dict[str, list[list[float]]] = {}
    filled: dict[str, list[bool]] = {}
    seconds = 0.0
    first_cached = next(m for m, *_ in plan if m != "kd_live")
    for method, *_ in plan:
        runs = found.get(method, {})
        if sorted(runs) != list(range(args.seeds)):
            raise SystemExit(f"--collect: {method} has runs for seeds {sorted(runs)} under {args.work / 'out'}, "
                             f"not 0..{args.seeds - 1}")
        for seed in range(args.seeds):
            run_dir, res = runs[seed]
            per_seed = "split_seed" not in yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["args"]
            filled.setdefault(method, []).append(method == first_cached and (per_seed or seed == 0))
            seconds += res["time_s"]
            acc.setdefault(method, []).append(res["student"]["test_acc"])
            sec.setdefault(method, []).append(train_seconds(run_dir / "student" / "metrics.csv"))
            if "baseline" in res:
                acc.setdefault("ce", []).append(res["baseline"]["test_acc"])
                sec.setdefault("ce", []).append(train_seconds(run_dir / "baseline" / "metrics.csv"))
    return acc, sec, filled, seconds / 60


def timing(args, data: list[str]) -> list[dict]:
    """Student s/epoch with each timing teacher live, filling the cache, and reading it."""
    rows = []
    for name in args.timing_teachers:
        with tempfile.TemporaryDirectory() as tmp:
            common = [f"teachers.resnet.name={name}", "teachers.resnet.epochs=0", f"student.name={args.student}",
                      f"trainer.max_epochs={args.timing_epochs}", "baseline=false", *data,
                      f"data.args.limit_per_class={args.timing_per_class}", "data.args.val_size=100",
                      "data.args.test_limit_per_class=10", f"cache_dir={tmp}"]
            row = {"teacher": name}
            for mode, extra in (("live", ["teachers.resnet.cache=false"]), ("fill", []), ("cached", [])):
                r = run(compose(["experiment=cifar10_kd", *common, *extra]))
                row[mode] = statistics.mean(train_seconds(Path(r["run_dir"]) / "student" / "metrics.csv"))
                row["params"] = r["teachers"]["resnet"]["params"]
            row["speedup"] = row["live"] / row["cached"]
            print(f"timing {name}: live {row['live']:.2f} s/epoch, cached {row['cached']:.2f} "
                  f"({row['speedup']:.2f}x)", flush=True)
            rows.append(row)
    return rows


def sizes(items: int = 512) -> list[dict]:
    """Bytes of one epoch's cache files per view: full logits and top-k, 10 and 1000 classes."""
    rows = []
    x = torch.randint(0, 256, (items, 3, 32, 32), dtype=torch.uint8)
    views = ImageDataset("sizes/train", x, torch.zeros(items, dtype=torch.long), [0.5] * 3, [0.25] * 3,
                         ("crop", "flip"), seed=0)
    for classes in (10, 1000):
        torch.manual_seed(0)
        head = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, classes))
        for topk in (None, 1, 2, 5, 10):
            with tempfile.TemporaryDirectory() as tmp:
                cached = cache_views(Teacher(head, ["image"]), views, tmp, topk)
                for start in range(0, items, 128):
                    batch = views.__getitems__(range(start, min(items, start + 128)))
                    cached({**batch, "epoch": torch.zeros(len(batch["index"]), dtype=torch.long)})
                size = sum(p.stat().st_size for p in cached.folder.glob("e0.*.npy"))
            rows.append({"classes": classes, "topk": topk, "bytes_per_view": size / items})
    for r in rows:
        full = next(f for f in rows if f["classes"] == r["classes"] and f["topk"] is None)
        r["of_full"] = r["bytes_per_view"] / full["bytes_per_view"]
    return rows


def arguments(doc: str, methods: list[str], name: str) -> argparse.ArgumentParser:
    """The options of this benchmark and of ``zoo.py``: the setting, the teacher, the student, the methods."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="train seeds first-seed .. first-seed + seeds - 1 (split a table across processes)")
    p.add_argument("--epochs", type=int, default=10, help="student epochs")
    p.add_argument("--per-class", type=int, default=500, help="training images per class (validation included)")
    p.add_argument("--val", type=int, default=500, help="validation images carved from them")
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--teacher-epochs", type=int, default=30)
    p.add_argument("--student", default="resnet8")
    p.add_argument("--methods", nargs="+", default=methods, choices=methods)
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "cifar10",
                   help="the teacher's run, the caches and the students' runs (kept for later invocations)")
    p.add_argument("--name", default=name, help="results/<name>.json and .md")
    p.add_argument("--test-per-class", type=int, default=None,
                   help="test the students on this many images a class (of 1,000; default all)")
    p.add_argument("overrides", nargs="*")
    return p


def prepare(p: argparse.ArgumentParser):
    """Parse the options; the shared overrides (with ``--test-per-class``, after the teacher's run),
    and the teacher's run directory and row (trained now when absent)."""
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = setting(args)
    teacher = teacher_run(args, data)  # tested on the whole test split
    if args.test_per_class:
        data.append(f"data.args.test_limit_per_class={args.test_per_class}")
    return args, data, *teacher


def setting(args) -> list[str]:
    """The overrides every run of the setting shares: data subset, work folders, no export."""
    args.work = args.work.resolve()
    return [f"out_dir={args.work / 'out'}", f"cache_dir={args.work / 'cache'}", f"data.args.cache_dir={args.work / 'images'}",
            f"data.args.limit_per_class={args.per_class}", f"data.args.val_size={args.val}",
            "data.args.split_seed=0",  # the teacher's split for every student seed: one view cache serves them all
            "export=[]",
            "trainer.tensorboard=false", "trainer.progress=off", *args.overrides]


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, list(LOSSES), "cifar10")
    p.add_argument("--timing-teachers", nargs="*", default=["resnet56", "resnet110", "resnet32x4"])
    p.add_argument("--timing-epochs", type=int, default=2)
    p.add_argument("--timing-per-class", type=int, default=100)
    p.add_argument("--report", action="store_true", help="only render results/<name>.json again")
    p.add_argument("--collect", action="store_true",
                   help="read the students' results from the run directories of an earlier invocation, then time")
    args = p.parse_known_args()[0]
    if args.report:
        data = json.loads((RESULTS / f"{args.name}.json").read_text())
        for stale in ("machine", "kd_live_over_cached"):  # written again / replaced by live_over_read
            data.pop(stale, None)
        write(args.name, data, *render(data))
        return
    args, data, teacher, trow = prepare(p)
    t_students = time.perf_counter()
    plan = [("kd_live", "cifar10_kd", ["teachers.resnet.cache=false"]), *((m, *LOSSES[m]) for m in args.methods)]
    if args.collect:
        acc, sec, filled, minutes = collect(args, plan)
    else:
        acc, sec, filled = students(args, data, teacher, plan)
        minutes = (time.perf_counter() - t_students) / 60
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "teacher": trow, "test_acc": acc, "train_s_per_epoch": sec, "filled": filled, "student_minutes": minutes,
              "sizes": sizes(), "timing": timing(args, data) if args.timing_teachers else []}
    result["total_minutes"] = (time.perf_counter() - t0) / 60
    write(args.name, result, *render(result))


def render(r: dict) -> tuple[list[str], list[list[str]], str]:
    """The table's header, rows and notes from a result dict (what :func:`main` writes as JSON); it adds
    ``live_over_read``."""
    a, trow, acc, sec = r["args"], r["teacher"], r["test_acc"], r["train_s_per_epoch"]
    per_run = {m: [statistics.mean(s) for s in runs] for m, runs in sec.items()}
    read = [t for m, fl in r["filled"].items() if m != "kd_live" for t, f in zip(per_run[m], fl) if not f]
    fill = [t for m, fl in r["filled"].items() if m != "kd_live" for t, f in zip(per_run[m], fl) if f]
    live = per_run["kd_live"]
    ratio = r["live_over_read"] = mean_std(live)[0] / mean_std(read)[0]
    rows = [[f"teacher {a['teacher']} ({a['teacher_epochs']} epochs)", f"{100 * trow['test_acc']:.2f}",
             f"{trow['train_s_per_epoch']:.1f} (its training)"]]
    rows += [[LABELS[m], fmt(acc[m], 100), fmt(per_run[m], 1, 1)] for m in ["ce", "kd_live", *a["methods"]]]
    table2 = "\n".join(["| timing teacher | params | live s/epoch | filling s/epoch | cached s/epoch | live / cached |",
                        "|---|---|---|---|---|---|"] +
                       [f"| {t['teacher']} | {t['params']:,} | {t['live']:.2f} | {t['fill']:.2f} | {t['cached']:.2f} | "
                        f"{t['speedup']:.2f}x |" for t in r["timing"]])
    table3 = "\n".join(["| classes | stored | bytes / view / epoch | of full logits |", "|---|---|---|---|"] +
                       [f"| {z['classes']} | {'full logits' if z['topk'] is None else 'top-' + str(z['topk'])} | "
                        f"{z['bytes_per_view']:.1f} | {100 * z['of_full']:.1f}% |" for z in r["sizes"]])
    notes = (f"{a['seeds']} seeds (mean ± std). Students {a['student']}, {a['epochs']} epochs on "
             f"{10 * a['per_class'] - a['val']} training images ({a['per_class']} per class, {a['val']} held out for "
             f"validation; the kept epoch is the best on validation), tested on all 10,000 test images; crop + flip, "
             f"the view of each item and epoch seeded. Teacher {a['teacher']}: {a['teacher_epochs']} epochs on the same "
             f"subset, test accuracy {100 * trow['test_acc']:.2f}%. Student s/epoch: live teacher {fmt(live, 1, 1)}; "
             f"cached runs that computed the teacher's outputs into the view cache {fmt(fill, 1, 1) if fill else '-'} "
             f"({len(fill)} runs); "
             f"cached runs that read it {fmt(read, 1, 1)} ({len(read)} runs): {ratio:.2f}x faster than live. Student "
             f"runs took {r['student_minutes']:.1f} min. Not the 240-epoch protocol.\n\n"
             f"{table2}\n\nTiming: {a['student']} student, {a['timing_epochs']} epochs on "
             f"{10 * a['timing_per_class'] - 100} training images, untrained teachers (time does not depend on the "
             f"weights).\n\n{table3}\n\nSizes: one epoch's files (values, indices and the filled mask) per view, "
             "from a linear head over seeded views.")
    return ["model", "test accuracy %", "student s / epoch"], rows, notes


if __name__ == "__main__":
    main()
