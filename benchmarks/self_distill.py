"""Self-distillation with ground-truth targets (Borup and Andersen, NeurIPS 2021) on the CIFAR-10
setting of ``cifar10.py`` / ``zoo.py``: test accuracy round by round.

``cifar10_self_distill`` with the zoo's student (``--student``, resnet8), training subset
(``--per-class`` images a class, ``--val`` held out, the split of seed 0), epochs a round
(``--epochs``) and scaled protocol; round 0 fits the labels, each later round a fresh student on
``alpha * onehot(y) + (1 - alpha) * softmax(previous round)``. Two settings: the official fixed
``alpha = 0.6`` for ``--rounds`` rounds (the official README's five steps: 4), and ``alpha: auto``
(the closed-form estimate of ``methods/self_distill.py``, one probe student a round) for
``--auto-rounds``. No teacher is trained: each round's teacher is the previous round. A finished run
under ``<work>/out`` is read back, so invocations add seeds (``--first-seed`` splits them across
processes; a final call with ``--seeds`` reads all of them back).

    MMKD_DATA=../shared/data python benchmarks/self_distill.py [--seeds 3] [--epochs 6] [--rounds 4]
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from cifar10 import finished, setting, shortened
from common import fmt, write
from mmkd.cli import compose
from mmkd.run import run


def chain(args, data: list[str], alpha: str, rounds: int, seed: int) -> dict:
    """The results of one self-distillation chain (read back when finished)."""
    extra = [f"student.name={args.student}", f"method.rounds={rounds}", f"method.alpha={alpha}"]
    extra += shortened(compose(["experiment=cifar10_self_distill", *extra]), args.epochs)
    cfg = compose(["experiment=cifar10_self_distill", f"seed={seed}", *data, *extra])
    done = finished(cfg, args.work / "out")
    if done is None:
        print(f"alpha {alpha}, {rounds} rounds, seed {seed}", flush=True)
        done = run(cfg)
    return done


def main() -> None:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=6, help="epochs a round")
    p.add_argument("--per-class", type=int, default=500, help="training images per class (validation included)")
    p.add_argument("--val", type=int, default=500, help="validation images carved from them")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--rounds", type=int, default=4, help="rounds after round 0 at alpha 0.6 (0: none)")
    p.add_argument("--auto-rounds", type=int, default=2, help="rounds after round 0 at alpha auto (0: none)")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "cifar10")
    p.add_argument("--name", default="self_distill")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    data = setting(args)
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    settings = [(a, r) for a, r in (("0.6", args.rounds), ("auto", args.auto_rounds)) if r]
    results: dict[str, list[list[dict]]] = {}
    for alpha, rounds in settings:
        results[alpha] = [chain(args, data, alpha, rounds, s)["rounds"] for s in seeds]
    rows = []
    for alpha, chains in results.items():
        for tau in range(len(chains[0])):
            accs = [c[tau]["test_acc"] for c in chains]
            used = [c[tau]["alpha"] for c in chains]
            gain = [c[tau]["test_acc"] - c[0]["test_acc"] for c in chains]
            rows.append([f"alpha {alpha}", f"{tau}{' (labels)' if tau == 0 else ''}", fmt(accs, 100),
                         "-" if tau == 0 else fmt(gain, 100), fmt(used, 1, 3)])
    minutes = (time.perf_counter() - t0) / 60
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": results, "minutes": minutes},
          ["setting", "round", "test accuracy %", "minus round 0 (points)", "alpha (labels' weight)"], rows,
          f"mean ± std over {args.seeds} seeds; student {args.student}, {args.epochs} epochs a round on "
          f"{10 * args.per_class - args.val} CIFAR-10 training images (split of seed 0), all 10,000 test images; "
          f"MSE of the probabilities to the mixed target (the official loss), a fresh initialisation each round "
          f"(seed + round), the last epoch's model the next teacher. Not the paper's protocol (ResNet-50, Adam, "
          f"75 epochs). This invocation: {minutes:.1f} min (finished runs are read back, not timed again).")


if __name__ == "__main__":
    main()
