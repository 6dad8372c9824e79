"""MixUp and CutMix with KD on the CIFAR-10 setting of ``cifar10.py`` / ``zoo.py``: the KD temperature
against the mixing strength.

The study this grid follows (Choi, Choi, Kim and Jeong, "Understanding the Role of Mixup in Knowledge
Distillation: An Empirical Study", WACV 2023) reads mixup as a smoothing of the targets, which adds to
the smoothing a high KD temperature already gives: the stronger the mixing, the lower the temperature
that works best. Each cell is ``cifar10_kd`` (CE 0.1 + KD 0.9, the zoo's teacher and student) at a
temperature (``--temperatures``), without mixing or with mixed copies of each batch appended
(``cifar10_kd_mixup`` at each ``--mixup`` alpha, ``cifar10_kd_cutmix`` at each ``--cutmix`` alpha;
lam ~ Beta(alpha, alpha); CE on the originals, KD on both; the teacher runs live on the mixed images,
the unmixed cells read it from the view cache). The CE student trains beside the unmixed cell at T = 4
(the zoo's KD run, read back when it exists). A finished run under ``<work>/out`` is read back, so
invocations add seeds (``--first-seed`` splits them across processes).

    MMKD_DATA=../shared/data python benchmarks/mixing.py [--seeds 3] [--epochs 6] [--temperatures 1 4]
"""
from __future__ import annotations

import statistics
import time

from cifar10 import arguments, prepare, students
from common import fmt, write


def grid(temperatures: list[float], mixup: list[float], cutmix: list[float]) -> list[tuple[str, str, list[str]]]:
    """``(cell, experiment, overrides)`` of every mixing (none first) and temperature."""
    mixings = [("none", "cifar10_kd", [])]
    mixings += [(f"mixup {a:g}", "cifar10_kd_mixup", [f"transforms.0.args.alpha={a}"]) for a in mixup]
    mixings += [(f"cutmix {a:g}", "cifar10_kd_cutmix", [f"transforms.0.args.alpha={a}"]) for a in cutmix]
    return [(f"{mix} T{t:g}", experiment, [*extra, f"losses.kd.args.temperature={t}"])
            for mix, experiment, extra in mixings for t in temperatures]


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, ["kd"], "mixing")
    p.set_defaults(epochs=6)
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 4.0])
    p.add_argument("--mixup", type=float, nargs="*", default=[0.2, 1.0], help="mixup alphas (Beta(alpha, alpha))")
    p.add_argument("--cutmix", type=float, nargs="*", default=[1.0], help="CutMix alphas")
    args, data, teacher, trow = prepare(p)
    plan = grid(args.temperatures, args.mixup, args.cutmix)
    acc, sec, _ = students(args, data, teacher, plan, {"none T4": "ce"})  # the zoo's KD run when T = 4 is asked
    mixings = list(dict.fromkeys(cell.rsplit(" ", 1)[0] for cell, *_ in plan))
    rows = []
    if "ce" in acc:
        rows.append(["CE (labels only)", *([fmt(acc["ce"], 100)] + ["-"] * (len(args.temperatures) - 1)),
                     fmt([statistics.mean(s) for s in sec["ce"]], 1, 1)])
    for mix in mixings:
        cells = [f"{mix} T{t:g}" for t in args.temperatures]
        best = max(cells, key=lambda c: statistics.mean(acc[c]))
        label = "KD, no mixing" if mix == "none" else f"KD + {mix.replace(' ', ', alpha ')}"
        rows.append([label,
                     *[f"**{fmt(acc[c], 100)}**" if c == best and len(cells) > 1 else fmt(acc[c], 100) for c in cells],
                     fmt([statistics.mean(s) for c in cells for s in sec[c]], 1, 1)])
    minutes = (time.perf_counter() - t0) / 60
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "test_acc": acc,
                      "train_s_per_epoch": sec, "minutes": minutes},
          ["student", *[f"T = {t:g}" for t in args.temperatures], "student s / epoch"], rows,
          f"test accuracy %, mean ± std over {args.seeds} seeds (bold: the best temperature of a row); student "
          f"{args.student}, {args.epochs} epochs on {10 * args.per_class - args.val} CIFAR-10 training images, all "
          f"10,000 test images; teacher {args.teacher} ({100 * trow['test_acc']:.2f}%); CE 0.1 + KD 0.9; mixed "
          f"copies appended to each batch (KD on them with the teacher live, CE on the originals). The CE row "
          f"does not depend on T. Seconds per epoch: the mean over the row's cells. Not the 240-epoch protocol. "
          f"This invocation: {minutes:.1f} min (finished runs are read back, not timed again).")


if __name__ == "__main__":
    main()
