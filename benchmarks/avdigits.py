"""Cross-modal baselines on AV-digits: teachers (image, audio, multimodal) and image-only /
audio-only students trained with CE, KD from the multimodal teacher, cross-modal KD, DKD (with
mdistiller's 20-epoch warm-up of its weight, the official procedure, and without) and FitNet.

The teachers are trained once per seed (experiment ``av_teachers``) and loaded by every method's run
through ``teachers.<name>.checkpoint=<that run>``; students train with the experiment configs
``av_<student>_<method>``. These are the baselines MST-Distill must beat.

    MMKD_DATA=../shared/data python benchmarks/avdigits.py [--seeds 3] [overrides ...]
"""
from __future__ import annotations

import argparse
import csv
import logging
import statistics
import tempfile
from pathlib import Path

from common import fmt, write
from mmkd.cli import compose
from mmkd.run import run

METHODS = {"kd_mm": "KD from multimodal", "kd_cross": "KD cross-modal",
           "dkd": "DKD (multimodal), official procedure (weight warmed up over 20 epochs)",
           "dkd_nowarm": "DKD (multimodal), no warm-up", "fitnet": "FitNet (multimodal)"}
VARIANTS = {"dkd_nowarm": ("dkd", ["losses.dkd.weight=1.0"])}  # method -> (experiment's method, overrides)
TEACHER_OF = {("image", "kd_cross"): "audio", ("audio", "kd_cross"): "image"}


def epoch_seconds(metrics: Path) -> float:
    """The mean training time per epoch (``time/train_s``) in a stage's ``metrics.csv``."""
    with metrics.open() as f:
        return statistics.mean(float(r["time/train_s"]) for r in csv.DictReader(f))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", default="avdigits")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    acc: dict[str, list[float]] = {}
    sec: dict[str, list[float]] = {}
    epochs: dict[str, dict[str, int]] = {"teachers": {}, "students": {}}
    with tempfile.TemporaryDirectory() as out:
        common = [f"out_dir={out}", "export=[]", "trainer.tensorboard=false", *args.overrides]
        for seed in range(args.seeds):
            cfg = compose(["experiment=av_teachers", f"seed={seed}", *common])
            pairing_seed = cfg.data.args.get("seed", 0)  # 0: the avdigits default
            epochs["teachers"] = {n: t.epochs or cfg.trainer.max_epochs for n, t in cfg.teachers.items()}
            teachers = run(cfg)
            for name, row in teachers["teachers"].items():
                acc.setdefault(f"teacher {name}", []).append(row["test_acc"])
                sec.setdefault(f"teacher {name}", []).append(
                    epoch_seconds(Path(teachers["run_dir"]) / "teachers" / name / "metrics.csv"))
            for student in ("image", "audio"):
                for method in METHODS:
                    teacher = TEACHER_OF.get((student, method), "fusion")
                    base, extra = VARIANTS.get(method, (method, []))
                    cfg = compose([f"experiment=av_{student}_{base}", f"seed={seed}",
                                   f"teachers.{teacher}.checkpoint={teachers['run_dir']}",
                                   f"baseline={method == 'kd_mm'}", *extra, *common])
                    epochs["students"][cfg.experiment] = cfg.trainer.max_epochs
                    r = run(cfg)
                    acc.setdefault(f"{student} {method}", []).append(r["student"]["test_acc"])
                    sec.setdefault(f"{student} {method}", []).append(
                        epoch_seconds(Path(r["run_dir"]) / "student" / "metrics.csv"))
                    if method == "kd_mm":
                        acc.setdefault(f"{student} ce", []).append(r["baseline"]["test_acc"])
                        sec.setdefault(f"{student} ce", []).append(
                            epoch_seconds(Path(r["run_dir"]) / "baseline" / "metrics.csv"))
                    print(f"seed {seed} {student} {method}: {r['student']['test_acc']:.4f}", flush=True)
    rows = [[f"teacher: {k.split()[1]}", fmt(v, 100), fmt(sec[k], 1, 2)] for k, v in acc.items()
            if k.startswith("teacher")]
    for student in ("image", "audio"):
        for method, label in {"ce": "CE (labels only)", **METHODS}.items():
            key = f"{student} {method}"
            rows.append([f"{student}-only student: {label}", fmt(acc[key], 100), fmt(sec[key], 1, 2)])
    teacher_epochs = ", ".join(f"{n} {e}" for n, e in epochs["teachers"].items())
    student_epochs = sorted(set(epochs["students"].values()))
    write(args.name, {"overrides": args.overrides, "seeds": args.seeds, "epochs": epochs, "pairing_seed": pairing_seed,
                      "test_acc": acc, "train_s_per_epoch": sec},
          ["model", "test accuracy %", "train s / epoch"], rows,
          f"{args.seeds} seeds, mean ± std; AV-digits test split (FSDD takes 0-4, 300 items). Epochs: teachers "
          f"{teacher_epochs}; students (CE baseline included) {', '.join(map(str, student_epochs))}. The AV-digits "
          f"pairing (which MNIST image goes with which recording, data.args.seed={pairing_seed}) is the same for "
          "all seeds: the seeds change initialisation and batch order.")


if __name__ == "__main__":
    main()
