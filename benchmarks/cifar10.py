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

import torch
from torch import nn

from common import fmt, mean_std, write
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


def teacher_run(args, data: list[str]) -> tuple[Path, dict]:
    """The teacher's run directory (trained now when absent) and its test accuracy and epochs."""
    folder = args.work / f"teacher-{args.teacher}-{args.teacher_epochs}e-{args.per_class}"
    if not (folder / "results.json").is_file():
        print(f"training the teacher {args.teacher} for {args.teacher_epochs} epochs into {folder}", flush=True)
        run(compose(["experiment=cifar10_kd", f"run_dir={folder}", f"teachers.resnet.name={args.teacher}",
                     f"teachers.resnet.epochs={args.teacher_epochs}",
                     f"+teachers.resnet.trainer={{milestones: {scaled(args.teacher_epochs)}}}",
                     "losses.ce.weight=1.0", "~losses.kd", "trainer.max_epochs=1", "baseline=false", *data]))
    results = json.loads((folder / "results.json").read_text())
    row = results["teachers"]["resnet"]
    return folder, {"name": args.teacher, "epochs": args.teacher_epochs, "test_acc": row["test_acc"],
                    "best_epoch": row.get("epoch"), "train_s_per_epoch": statistics.mean(
                        train_seconds(folder / "teachers" / "resnet" / "metrics.csv"))}


def students(args, data: list[str], teacher: Path, plan: list[tuple[str, str, list[str]]]) -> tuple[dict, dict]:
    """Test accuracies and student seconds per epoch of every ``(method, experiment, overrides)`` of
    ``plan`` and every seed; the cached ``kd`` run also trains the CE baseline (``ce``)."""
    acc: dict[str, list[float]] = {}
    sec: dict[str, list[list[float]]] = {}
    warmup = max(1, round(20 * args.epochs / 240))
    base = [f"student.name={args.student}", f"trainer.max_epochs={args.epochs}",
            f"trainer.milestones={scaled(args.epochs)}", *data]
    for seed in range(args.seeds):
        for method, experiment, extra in plan:
            cfg = compose([f"experiment={experiment}", *extra])
            extra = [*([f"teachers.resnet.checkpoint={teacher}", f"teachers.resnet.name={args.teacher}"]
                       if cfg.teachers else []),  # a self-distillation run has none
                     *extra, *([f"losses.dkd.weight.epochs={warmup}"] if "dkd" in cfg.losses else [])]
            r = run(compose([f"experiment={experiment}", f"seed={seed}", f"baseline={method == 'kd'}", *base, *extra]))
            acc.setdefault(method, []).append(r["student"]["test_acc"])
            sec.setdefault(method, []).append(train_seconds(Path(r["run_dir"]) / "student" / "metrics.csv"))
            if method == "kd":
                acc.setdefault("ce", []).append(r["baseline"]["test_acc"])
                sec.setdefault("ce", []).append(train_seconds(Path(r["run_dir"]) / "baseline" / "metrics.csv"))
            print(f"seed {seed} {method}: test acc {r['student']['test_acc']:.4f}, "
                  f"{statistics.mean(sec[method][-1]):.1f} s/epoch", flush=True)
    return acc, sec


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
    p.add_argument("overrides", nargs="*")
    return p


def prepare(p: argparse.ArgumentParser):
    """Parse the options; the shared overrides, and the teacher's run directory and row (trained now
    when absent)."""
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = setting(args)
    return args, data, *teacher_run(args, data)


def setting(args) -> list[str]:
    """The overrides every run of the setting shares: data subset, work folders, no export."""
    args.work = args.work.resolve()
    return [f"out_dir={args.work / 'out'}", f"cache_dir={args.work / 'cache'}", f"data.args.cache_dir={args.work / 'images'}",
            f"data.args.limit_per_class={args.per_class}", f"data.args.val_size={args.val}", "export=[]",
            "trainer.tensorboard=false", "trainer.progress=off", *args.overrides]


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, list(LOSSES), "cifar10")
    p.add_argument("--timing-teachers", nargs="*", default=["resnet56", "resnet110", "resnet32x4"])
    p.add_argument("--timing-epochs", type=int, default=2)
    p.add_argument("--timing-per-class", type=int, default=100)
    args, data, teacher, trow = prepare(p)
    t_students = time.perf_counter()
    acc, sec = students(args, data, teacher, [("kd_live", "cifar10_kd", ["teachers.resnet.cache=false"]),
                                              *((m, *LOSSES[m]) for m in args.methods)])
    minutes = (time.perf_counter() - t_students) / 60
    size_rows = sizes()
    time_rows = timing(args, data) if args.timing_teachers else []

    cached_runs = [statistics.mean(s) for s in sec["kd"][1:]] or [statistics.mean(sec["kd"][0])]
    rows = [[f"teacher {args.teacher} ({args.teacher_epochs} epochs)", f"{100 * trow['test_acc']:.2f}",
             f"{trow['train_s_per_epoch']:.1f} (training)"]]
    for method in ["ce", "kd_live", *args.methods]:
        per_run = [statistics.mean(s) for s in sec[method]]
        rows.append([LABELS[method], fmt(acc[method], 100), fmt(per_run, 1, 1)])
    live = [statistics.mean(s) for s in sec["kd_live"]]
    ratio = mean_std(live)[0] / mean_std(cached_runs)[0]
    table2 = "\n".join(["| timing teacher | params | live s/epoch | filling s/epoch | cached s/epoch | live / cached |",
                        "|---|---|---|---|---|---|"] +
                       [f"| {r['teacher']} | {r['params']:,} | {r['live']:.2f} | {r['fill']:.2f} | {r['cached']:.2f} | "
                        f"{r['speedup']:.2f}x |" for r in time_rows])
    table3 = "\n".join(["| classes | stored | bytes / view / epoch | of full logits |", "|---|---|---|---|"] +
                       [f"| {r['classes']} | {'full logits' if r['topk'] is None else 'top-' + str(r['topk'])} | "
                        f"{r['bytes_per_view']:.1f} | {100 * r['of_full']:.1f}% |" for r in size_rows])
    notes = (f"{args.seeds} seeds (mean ± std). Students {args.student}, {args.epochs} epochs on {10 * args.per_class - args.val} "
             f"training images ({args.per_class} per class, {args.val} held out for validation; the kept epoch is the "
             f"best on validation), tested on all 10,000 test images; crop + flip, the view of each item and epoch "
             f"seeded. Teacher {args.teacher}: {args.teacher_epochs} epochs on the same subset, test accuracy "
             f"{100 * trow['test_acc']:.2f}%. The first cached KD run fills the view cache (its s/epoch is "
             f"{statistics.mean(sec['kd'][0]):.1f}); the other {len(cached_runs)} read it: "
             f"{fmt(cached_runs, 1, 1)} s/epoch against {fmt(live, 1, 1)} live, {ratio:.2f}x. "
             f"Student runs took {minutes:.1f} min. Not the 240-epoch protocol.\n\n"
             f"{table2}\n\nTiming: {args.student} student, {args.timing_epochs} epochs on {10 * args.timing_per_class - 100} "
             f"training images, untrained teachers (time does not depend on the weights).\n\n{table3}\n\n"
             "Sizes: one epoch's files (values, indices and the filled mask) per view, from a linear head over seeded "
             "views.")
    write(args.name, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                      "teacher": trow, "test_acc": acc, "train_s_per_epoch": sec, "kd_live_over_cached": ratio,
                      "student_minutes": minutes, "timing": time_rows, "sizes": size_rows,
                      "total_minutes": (time.perf_counter() - t0) / 60},
          ["model", "test accuracy %", "student s / epoch"], rows, notes)


if __name__ == "__main__":
    main()
