"""MST-Distill on AV-digits against the cross-modal baselines, for the image-only and the audio-only
student: stage 1 (co-training), stage 2 (MaskNets), stage 3 with hard top-k routing (the paper's)
and with soft routing, over several seeds; mean ± std and the margin against the best baseline of
``benchmarks/results/avdigits.json`` (written by ``benchmarks/avdigits.py``), when it is there.

Margins are paired by seed (MST-Distill minus the baseline, seed by seed, mean ± std) and called
"within noise" when their mean is smaller than their standard deviation. Every run directory is kept
under ``--out-dir`` (each stage-3 run holds its ``routing.png`` and ``routing.json``); the routing
reports of the first seed are copied to ``results/mst_distill.routing_<student>_<mode>.png``.

    MMKD_DATA=../shared/data python benchmarks/mst_distill.py [--seeds 3] [--stage1-epochs 15]
        [--mask-epochs 3] [--stage3-epochs 30] [--out-dir DIR] [overrides ...]
    python benchmarks/mst_distill.py --collect DIR    # tabulate the finished seeds of an interrupted run
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from common import RESULTS, fmt, mean_std, write
from omegaconf import OmegaConf
from mmkd import io
from mmkd.cli import compose
from mmkd.run import run

BASELINES = {"ce": "CE (labels only)", "kd_mm": "KD from multimodal", "kd_cross": "KD cross-modal",
             "dkd": "DKD (multimodal)", "fitnet": "FitNet (multimodal)"}
MODES = {"hard": "MST-Distill, hard top-1 (paper)", "soft": "MST-Distill, soft routing"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--stage1-epochs", type=int, default=15)
    p.add_argument("--mask-epochs", type=int, default=3)
    p.add_argument("--stage3-epochs", type=int, default=30)
    p.add_argument("--students", nargs="+", default=["image", "audio"])
    p.add_argument("--name", default="mst_distill")
    p.add_argument("--out-dir", help="keep every run directory here (default: a temporary directory)")
    p.add_argument("--collect", metavar="DIR", help="only tabulate the finished runs under DIR "
                   "(the --out-dir of an interrupted benchmark) instead of running")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.collect:
        acc, seeds = collect(Path(args.collect))
        if not seeds:
            raise SystemExit(f"{args.collect}: no seed has finished every stage of every student yet")
        report(args, acc, seeds)
        return
    acc: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out_dir or tmp
        common = [f"out_dir={out}", "export=[]", "trainer.tensorboard=false", *args.overrides]
        for seed in range(args.seeds):
            for student in args.students:
                s1 = run(compose([f"experiment=mst_{student}_stage1", f"seed={seed}",
                                  f"trainer.max_epochs={args.stage1_epochs}", *common]))
                acc.setdefault(f"{student} stage1", []).append(s1["student"]["test_acc"])
                for name, row in s1["teachers"].items():
                    acc.setdefault(f"{student} stage1 teacher {name}", []).append(row["test_acc"])
                s2 = run(compose([f"experiment=mst_{student}_stage2", f"seed={seed}", f"method.stage1={s1['run_dir']}",
                                  f"method.epochs={args.mask_epochs}", *common]))
                for name, row in s2["specialized"].items():
                    acc.setdefault(f"{student} specialized {name}", []).append(row["test_acc"])
                for mode in MODES:
                    s3 = run(compose([f"experiment=mst_{student}_stage3", f"seed={seed}",
                                      f"method.stage2={s2['run_dir']}", f"router.args.mode={mode}",
                                      f"trainer.max_epochs={args.stage3_epochs}", *common]))
                    acc.setdefault(f"{student} mst_{mode}", []).append(s3["student"]["test_acc"])
                    if seed == 0:
                        png = (Path(s3["run_dir"]) / "routing.png").read_bytes()
                        with io.atomic_path(RESULTS / f"{args.name}.routing_{student}_{mode}.png") as tmp:
                            tmp.write_bytes(png)
                    print(f"seed {seed} {student} {mode}: {s3['student']['test_acc']:.4f} "
                          f"(stage-1 student {s1['student']['test_acc']:.4f})", flush=True)
            report(args, acc, seed + 1)  # after every seed, so an interrupted run leaves its table


def collect(out_dir: Path) -> tuple[dict[str, list[float]], int]:
    """Test accuracies of the finished runs under ``out_dir`` (keys as in :func:`main`), keeping the
    seeds for which every stage of every student finished; and the number of those seeds."""
    found: dict[tuple[str, int], dict] = {}
    for path in sorted(out_dir.glob("mst_*_stage*/*/results.json")):
        r = json.loads(path.read_text())
        student, stage = r["experiment"].split("_")[1:3]
        key = stage if stage != "stage3" else f"mst_{OmegaConf.load(path.parent / 'config.yaml').router.args.mode}"
        found.setdefault((student, r["seed"]), {})[key] = r
    students = {s for s, _ in found}
    seeds = sorted(seed for seed in {s for _, s in found}
                   if all(len(found.get((st, seed), {})) == 2 + len(MODES) for st in students))
    acc: dict[str, list[float]] = {}
    for seed in seeds:
        for student in sorted(students):
            runs = found[student, seed]
            acc.setdefault(f"{student} stage1", []).append(runs["stage1"]["student"]["test_acc"])
            for name, row in runs["stage1"]["teachers"].items():
                acc.setdefault(f"{student} stage1 teacher {name}", []).append(row["test_acc"])
            for name, row in runs["stage2"]["specialized"].items():
                acc.setdefault(f"{student} specialized {name}", []).append(row["test_acc"])
            for mode in MODES:
                acc.setdefault(f"{student} mst_{mode}", []).append(runs[f"mst_{mode}"]["student"]["test_acc"])
    return acc, len(seeds)


def baseline_epochs(overrides: list[str]) -> dict[str, int]:
    """The epochs the baselines of ``avdigits.json`` trained for: its configs with its overrides."""
    teachers = compose(["experiment=av_teachers", *overrides])
    student = compose(["experiment=av_image_kd_mm", *overrides])
    return {"teachers": max(t.epochs or teachers.trainer.max_epochs for t in teachers.teachers.values()),
            "students": student.trainer.max_epochs}


def report(args: argparse.Namespace, acc: dict[str, list[float]], seeds: int) -> None:
    """Write the table of ``acc`` (``seeds`` seeds done) with the margins against the best baseline."""
    baseline_file = RESULTS / "avdigits.json"
    stored = json.loads(baseline_file.read_text()) if baseline_file.exists() else {}
    base = stored.get("test_acc", {})
    rows, margins = [], {}
    for student in [s for s in args.students if f"{s} stage1" in acc]:
        for m, label in BASELINES.items():
            if f"{student} {m}" in base:
                rows.append([f"{student}-only: {label} (avdigits.json)", fmt(base[f"{student} {m}"], 100)])
        rows.append([f"{student}-only: stage-1 co-trained student", fmt(acc[f"{student} stage1"], 100)])
        for mode, label in MODES.items():
            rows.append([f"{student}-only: {label}", fmt(acc[f"{student} mst_{mode}"], 100)])
        found = {m: mean_std(base[f"{student} {m}"])[0] for m in BASELINES if f"{student} {m}" in base}
        if found:
            best = max(found, key=found.get)
            for mode in MODES:
                diffs = [100 * (a - b) for a, b in zip(acc[f"{student} mst_{mode}"], base[f"{student} {best}"])]
                mean, std = mean_std(diffs)
                margins[f"{student} {mode}"] = {"best_baseline": best, "paired_diffs_pct_points": diffs,
                                                "margin_pct_points": mean, "std": std, "within_noise": abs(mean) < std}
                print(f"{student}-only, {mode}: {mean:+.2f} ± {std:.2f} points against the best baseline "
                      f"({BASELINES[best]}), paired over {len(diffs)} seeds")
    for key, xs in acc.items():
        if "teacher" in key or "specialized" in key:
            rows.append([key, fmt(xs, 100)])
    margin_text = "; ".join(
        f"{k}: {v['margin_pct_points']:+.2f} ± {v['std']:.2f} vs {v['best_baseline']}"
        + (" (within noise)" if v["within_noise"] else "") for k, v in margins.items()
    ) or "no baseline results (run benchmarks/avdigits.py)"
    epochs = baseline_epochs(stored.get("overrides", [])) if stored else None
    budget = (f"; baselines (avdigits.json, its own runs): teachers {epochs['teachers']}, students {epochs['students']} "
              "epochs from scratch" if epochs else "")
    notes = (f"{seeds} seeds, mean ± std, AV-digits test split. Epochs: stage 1 {args.stage1_epochs} (teachers and "
             f"student co-trained), stage 2 {args.mask_epochs} (the masks together), stage 3 {args.stage3_epochs} (the student "
             f"starts from stage 1's){budget}. Margins against the best baseline by mean, paired by seed "
             f"(mean ± std of the per-seed differences, points): {margin_text}.")
    write(args.name, {"overrides": args.overrides, "seeds": seeds, "epochs": {
        "stage1": args.stage1_epochs, "stage2": args.mask_epochs, "stage3": args.stage3_epochs, "baselines": epochs},
        "test_acc": acc, "margins": margins}, ["model", "test accuracy %"], rows, notes)


if __name__ == "__main__":
    main()
