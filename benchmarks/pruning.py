"""Data pruning with KD on CIFAR-10 ("Distilling the Knowledge in Data Pruning", Ben-Baruch et al.,
arXiv:2403.07854): the training set pruned to a fraction, randomly or by a score, and the student trained
on what is kept with labels alone (CE) or with KD from a teacher trained on the full data.

The setting is ``cifar10.py``'s (its teacher, trained once into ``<work>``, and its students, view
cache and schedule scaled to ``--epochs``); the kept items train for the same number of epochs as the
full set. Scores, computed once for every seed (the training split is the teacher's):

- EL2N: the students of ``--el2n-models`` runs of ``cifar10_ce`` trained ``--el2n-epochs`` epochs
  (seeds 100, 101, ...), through the ``el2n`` policy;
- forgetting: one ``cifar10_ce`` run of the full schedule (seed 100) with the ``forgetting`` callback,
  its ``forgetting_scores.npy`` read by the ``prune`` policy.

Both keep the hardest items (the methods' default). Table 1: kept fraction x {random, EL2N,
forgetting} x {CE, KD (CE 0.1 + KD 0.9, T = 4)}. Table 2, the KD weight under random pruning: CE
weight 1 - alpha, KD weight alpha in {0, 0.5, 0.9, 1}, for each fraction; the paper finds the best alpha grows as the
kept fraction shrinks. ``--random-kd`` runs KD under random pruning alone (no scores, no CE runs, no
table 2): with another ``--teacher`` and ``--name``, the paper's third finding, that a smaller teacher
can help at low fractions, against table 1's KD-random column (read from ``results/pruning.json``). A
finished run is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/pruning.py [--seeds 3] [--epochs 6] [--no-alpha]
    MMKD_DATA=../shared/data python benchmarks/pruning.py --random-kd --teacher resnet8 --name pruning_resnet8
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from cifar10 import arguments, finished, prepare, shortened, students
from common import RESULTS, fmt, mean_std, write
from mmkd.cli import compose
from mmkd.run import run

FRACTIONS = (0.1, 0.3, 0.5)
SELECTIONS = {"random": "random", "el2n": "EL2N", "forgetting": "forgetting"}
ALPHAS = (0.5, 0.9, 1.0)  # KD weight; 0.9 is cifar10_prune_kd's


def scoring_run(args, data: list[str], seed: int, epochs: int, extra: list[str]) -> Path:
    """The run directory of a ``cifar10_ce`` run of the setting's student (trained now when absent)."""
    base = compose(["experiment=cifar10_ce"])
    cfg = compose(["experiment=cifar10_ce", f"seed={seed}", f"student.name={args.student}", *data,
                   *shortened(base, epochs), *extra])
    r = finished(cfg, args.work / "out") or run(cfg)
    return Path(r["run_dir"])


def policy(selection: str, fraction: float, el2n_runs: list[Path], forgetting: Path) -> str:
    """The ``policies`` override that keeps ``fraction`` of the training items by ``selection``."""
    if selection == "random":
        args = f"fraction: {fraction}"
    elif selection == "el2n":
        args = f"runs: [{', '.join(repr(str(r)) for r in el2n_runs)}], fraction: {fraction}"
    else:
        args = f"scores: {str(forgetting)!r}, fraction: {fraction}"
    return f"policies=[{{name: {'prune' if selection == 'forgetting' else selection}, args: {{{args}}}}}]"


def weights(alpha: float) -> list[str]:
    """The loss overrides of KD weight ``alpha`` (CE weight ``1 - alpha``; CE left out at 1)."""
    return ["~losses.ce", "losses.kd.weight=1.0"] if alpha == 1 else \
        [f"losses.ce.weight={round(1 - alpha, 6)}", f"losses.kd.weight={alpha}"]


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, ["kd"], "pruning")
    p.set_defaults(epochs=6, test_per_class=500)
    p.add_argument("--el2n-models", type=int, default=3, help="briefly trained models EL2N averages over")
    p.add_argument("--el2n-epochs", type=int, default=2)
    p.add_argument("--no-alpha", action="store_true", help="leave out table 2 (the KD weight)")
    p.add_argument("--random-kd", action="store_true", help="only KD under random pruning (e.g. another teacher)")
    args, data, teacher, trow = prepare(p)
    if args.random_kd:
        return random_kd(args, data, teacher, trow, t0)

    print("scoring the training set", flush=True)
    el2n_runs = [scoring_run(args, data, 100 + m, args.el2n_epochs, []) for m in range(args.el2n_models)]
    forgetting = scoring_run(args, data, 100, args.epochs, ["callbacks=[{name: forgetting}]"])
    forgetting = forgetting / "student" / "forgetting_scores.npy"
    score_minutes = (time.perf_counter() - t0) / 60

    main_plan = [("ce_1.0", "cifar10_ce", []), ("kd_1.0", "cifar10_prune_kd", ["policies=[]"])]
    for f in FRACTIONS:
        for s in SELECTIONS:
            pol = policy(s, f, el2n_runs, forgetting)
            main_plan += [(f"ce_{s}_{f}", "cifar10_ce", [pol]), (f"kd_{s}_{f}", "cifar10_prune_kd", [pol])]
    alpha_plan = [(f"a{a}_{f}", "cifar10_prune_kd", [*weights(a), policy("random", f, [], forgetting) if f < 1
                                                     else "policies=[]"])
                  for f in (*FRACTIONS, 1.0) for a in ALPHAS if a != 0.9]
    acc, sec, _ = students(args, data, teacher, main_plan, baselines={})
    if not args.no_alpha:
        a2, s2, _ = students(args, data, teacher, alpha_plan, baselines={})
        acc, sec = {**acc, **a2}, {**sec, **s2}

    def cell(method: str) -> str:
        return fmt(acc[method], 100) if method in acc else "-"

    def full(method: str) -> str:  # the 100% runs: the same in every selection's column
        return method.replace("_random_1.0", "_1.0").replace("_el2n_1.0", "_1.0").replace("_forgetting_1.0", "_1.0")

    rows = [[f"{round(100 * f)}%", *(cell(full(f"{loss}_{s}_{f}")) for loss in ("ce", "kd") for s in SELECTIONS)]
            for f in (*FRACTIONS, 1.0)]
    header = ["kept", *(f"{loss} {label}" for loss in ("CE", "KD") for label in SELECTIONS.values())]

    def alpha_acc(a: float, f: float) -> list[float] | None:
        key = ("ce_1.0" if f == 1 else f"ce_random_{f}") if a == 0 else \
              (("kd_1.0" if f == 1 else f"kd_random_{f}") if a == 0.9 else f"a{a}_{f}")
        return acc.get(key)

    best, table2 = {}, ["| kept | " + " | ".join(f"alpha {a}" for a in (0.0, *ALPHAS)) + " | best alpha |",
                        "|---|" + "---|" * (len(ALPHAS) + 2)]
    for f in (*FRACTIONS, 1.0):
        got = {a: alpha_acc(a, f) for a in (0.0, *ALPHAS)}
        have = {a: mean_std(v)[0] for a, v in got.items() if v}
        best[f] = max(have, key=have.get) if have else None
        table2.append(f"| {round(100 * f)}% | " + " | ".join(fmt(v, 100) if v else "-" for v in got.values())
                      + f" | {best[f]} |")
    gaps = {}
    for f in FRACTIONS:
        for loss in ("ce", "kd"):
            if all(f"{loss}_{s}_{f}" in acc for s in SELECTIONS):
                rand = mean_std(acc[f"{loss}_random_{f}"])[0]
                gaps[f"{loss}_{f}"] = 100 * (rand - max(mean_std(acc[f"{loss}_{s}_{f}"])[0] for s in ("el2n", "forgetting")))
    per_epoch = {m: statistics.mean(statistics.mean(s) for s in runs) for m, runs in sec.items()}
    minutes = (time.perf_counter() - t0) / 60
    notes = (f"test accuracy %, mean ± std over {args.seeds} seeds; student {args.student}, {args.epochs} epochs on the "
             f"kept part of {10 * args.per_class - args.val} CIFAR-10 training images (the same epochs for every "
             f"fraction), {10 * args.test_per_class:,} test images; teacher {args.teacher} ({100 * trow['test_acc']:.2f}%, "
             f"{args.teacher_epochs} epochs on the full {10 * args.per_class - args.val}). KD: CE 0.1 + KD 0.9 at "
             f"T = 4. EL2N from {args.el2n_models} students of {args.el2n_epochs} epochs; forgetting from one "
             f"{args.epochs}-epoch CE run; both keep the hardest items. Random minus the better score "
             f"(points): " + ", ".join(f"{k.replace('_', ' at ')}: {v:+.2f}" for k, v in gaps.items())
             + ".\n\nKD weight under random pruning (CE weight 1 - alpha):\n\n" + "\n".join(table2))
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "test_acc": acc,
                      "train_s_per_epoch": per_epoch, "random_minus_best_score": gaps,
                      "best_alpha": {str(f): a for f, a in best.items()}, "scoring_minutes": score_minutes,
                      "minutes": minutes}, header, rows, notes)


def random_kd(args, data: list[str], teacher: Path, trow: dict, t0: float) -> None:
    """KD under random pruning with ``args.teacher``, beside table 1's KD-random column when there is one."""
    plan = [("kd_1.0", "cifar10_prune_kd", ["policies=[]"])] + \
           [(f"kd_random_{f}", "cifar10_prune_kd", [policy("random", f, [], Path())]) for f in FRACTIONS]
    acc, sec, _ = students(args, data, teacher, plan, baselines={})
    main_file = RESULTS / "pruning.json"
    ref = json.loads(main_file.read_text()) if main_file.is_file() else None
    ref_name = f"{ref['teacher']['name']} ({100 * ref['teacher']['test_acc']:.2f}%)" if ref else None
    rows = []
    for f in (*FRACTIONS, 1.0):
        key = "kd_1.0" if f == 1 else f"kd_random_{f}"
        mine = acc.get(key)
        theirs = ref["test_acc"].get(key) if ref else None
        diff = f"{100 * (mean_std(mine)[0] - mean_std(theirs)[0]):+.2f}" if mine and theirs else "-"
        rows.append([f"{round(100 * f)}%", fmt(mine, 100) if mine else "-", fmt(theirs, 100) if theirs else "-", diff])
    notes = (f"KD (CE 0.1 + KD 0.9, T = 4) under random pruning, test accuracy %, mean ± std over {args.seeds} seeds; "
             f"student {args.student}, {args.epochs} epochs on the kept part, {10 * args.test_per_class:,} test images. "
             f"Teacher {args.teacher}: {100 * trow['test_acc']:.2f}% ({args.teacher_epochs} epochs on the full "
             f"{10 * args.per_class - args.val}); the other column is `results/pruning.json`'s"
             f"{' teacher ' + ref_name if ref else ' (absent)'}. Took {(time.perf_counter() - t0) / 60:.1f} minutes.")
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "test_acc": acc,
                      "reference": ref["test_acc"] if ref else None,
                      "train_s_per_epoch": {m: statistics.mean(statistics.mean(s) for s in r) for m, r in sec.items()}},
          ["kept", f"KD random, teacher {args.teacher}", f"KD random, teacher {ref_name or '-'}", "difference (points)"],
          rows, notes)


if __name__ == "__main__":
    main()
