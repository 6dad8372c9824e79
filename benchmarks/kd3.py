"""KD^3 on CIFAR-10: distillation from a shifted, unlabelled pool (Tang et al., ICCV 2023) against
plain KD on the same pool, with two ablations.

The teacher is ``cifar10.py``'s (trained once into ``<work>`` on the first ``--per-class`` training
images of each class). The pool is the next ``--per-class`` images of each class, which the teacher
never saw, under ``cifar10_pool_kd``'s strong corruptions and colour shifts (``--corrupt``;
``modalities/image/corrupt.py``); no run reads its labels (the kept epoch is the one of the lowest
training loss). Students ``--student`` train ``--epochs`` (the protocol scaled as ``cifar10.py``
does) with:

- KD: ``cifar10_pool_kd`` (KD alone, T = 4);
- KD + selection: the same with KD^3's router (instances selected by the combined prediction);
- KD^3 without MixDistribution: selection + the alignment of weighted features and classifiers;
- KD^3: ``cifar10_kd3`` (all three parts).

Each is tested on CIFAR-10's own test split (``--test-per-class`` images a class). The teacher's
accuracy on the pool (with the labels no run sees) says how far the pool is shifted, and on the
instances the router selects at the start (the teacher's prediction alone) how well the selection
finds where the teacher is right. A finished run is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/kd3.py [--seeds 3] [--epochs 10]
"""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path

import torch

from cifar10 import arguments, finished, prepare, shortened, train_seconds
from common import fmt, write
from mmkd.build import load_data
from mmkd.cli import compose
from mmkd.data import loader
from mmkd.export import trained_model
from mmkd.run import run

SELECT = "router={name: kd3, args: {threshold: 0.5, start: 1.0, end: 0.5}}"
METHODS = {  # method -> (label, experiment, overrides)
    "kd": ("KD", "cifar10_pool_kd", []),
    "select": ("KD + selection", "cifar10_pool_kd", [SELECT]),
    "no_mix": ("KD^3 without MixDistribution", "cifar10_kd3", ["transforms=[]", "~losses.kd3_contrast"]),
    "kd3": ("KD^3", "cifar10_kd3", []),
}


@torch.no_grad()
def teacher_on_pool(teacher_dir: Path, cfg, threshold: float = 0.5) -> dict[str, float]:
    """The teacher's accuracy on the pool's training images (their true labels), on those whose top
    probability reaches ``threshold`` (what the router keeps at the start) and on the rest."""
    model = trained_model(teacher_dir, "resnet")[0]
    splits, _ = load_data(cfg)
    ds = splits.train.plain()
    right, top = [], []
    for batch in loader(ds, 500):
        p = model(batch["image"]).softmax(1)
        right.append(p.argmax(1) == batch["label"])
        top.append(p.max(1).values)
    right, top = torch.cat(right).float(), torch.cat(top)
    keep = top >= threshold
    return {"pool_acc": float(right.mean()), "selected_share": float(keep.float().mean()),
            "selected_acc": float(right[keep].mean()), "rest_acc": float(right[~keep].mean())}


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, list(METHODS), "kd3")
    p.set_defaults(epochs=10, test_per_class=500)
    p.add_argument("--corrupt", type=float, default=1.0, help="the pool's shift strength")
    args, data, teacher, trow = prepare(p)
    common = [f"teachers.resnet.checkpoint={teacher}", f"teachers.resnet.name={args.teacher}",
              f"student.name={args.student}", f"data.args.offset_per_class={args.per_class}",
              f"data.args.corrupt={args.corrupt}", *data]
    acc: dict[str, list[float]] = {}
    sec: dict[str, list[float]] = {}
    selected: dict[str, list[tuple[float, float]]] = {}
    pool = None
    for seed in range(args.seeds):
        for m, (label, experiment, extra) in METHODS.items():
            base = compose([f"experiment={experiment}", *extra])
            cfg = compose([f"experiment={experiment}", f"seed={seed}", *extra, *common, *shortened(base, args.epochs)])
            if pool is None:
                pool = teacher_on_pool(teacher, cfg)
                print(f"teacher on the pool: {pool}", flush=True)
            done = finished(cfg, args.work / "out")
            if done is None:
                print(f"{label}, seed {seed}", flush=True)
                done = run(cfg)
            acc.setdefault(m, []).append(done["student"]["test_acc"])
            metrics = Path(done["run_dir"]) / "student" / "metrics.csv"
            sec.setdefault(m, []).append(statistics.mean(train_seconds(metrics)))
            if m != "kd":
                with metrics.open() as f:
                    share = [float(r["kd3/selected"]) for r in csv.DictReader(f)]
                selected.setdefault(m, []).append((share[0], share[-1]))
            print(f"seed {seed} {m}: test acc {acc[m][-1]:.4f}, {sec[m][-1]:.1f} s/epoch", flush=True)
    rows = []
    for m, (label, _, _) in METHODS.items():
        share = selected.get(m)
        cell = (f"{100 * statistics.mean(s[0] for s in share):.1f} -> {100 * statistics.mean(s[1] for s in share):.1f}"
                if share else "")
        rows.append([label, fmt(acc[m], 100), f"{statistics.mean(sec[m]):.1f}", cell])
    gain = 100 * (statistics.mean(acc["kd3"]) - statistics.mean(acc["kd"]))
    notes = (f"Test accuracy % on {10 * args.test_per_class:,} CIFAR-10 test images, mean ± std over {args.seeds} "
             f"seeds; students {args.student}, {args.epochs} epochs on a pool of {10 * args.per_class - args.val} "
             f"unlabelled CIFAR-10 training images the teacher never saw (each class's images {args.per_class + 1}-"
             f"{2 * args.per_class}), shifted at strength {args.corrupt}; teacher {args.teacher} "
             f"({100 * trow['test_acc']:.2f}% on the whole test split, {trow['epochs']} epochs on the first "
             f"{10 * args.per_class - args.val}). The teacher on the pool (true labels): "
             f"{100 * pool['pool_acc']:.2f}%; on the {100 * pool['selected_share']:.1f}% whose top probability "
             f"reaches 0.5 (the router's start) {100 * pool['selected_acc']:.2f}%, on the rest "
             f"{100 * pool['rest_acc']:.2f}%. Selected: the router's share of the training rows, first -> last "
             f"epoch. KD^3 minus KD: {gain:+.2f} points. Took {(time.perf_counter() - t0) / 60:.1f} minutes. "
             f"Command: `python benchmarks/kd3.py --seeds {args.seeds} --epochs {args.epochs}`.")
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "pool": pool,
                      "test_acc": acc, "s_per_epoch": sec, "selected": selected},
          ["student", "test acc (CIFAR-10)", "s / epoch", "selected % (first -> last epoch)"], rows, notes)


if __name__ == "__main__":
    main()
