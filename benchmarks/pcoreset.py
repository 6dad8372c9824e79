"""Active distillation (PCoreSet, Kang et al., arXiv:2506.00910): test accuracy against labels used,
for the selection strategies of the pipeline ``active`` under the same budget and the same CE + KD
training every round (``--experiment``, default ``digits_pcoreset``: a CNN teacher, an MLP student,
2 labels per class, then 3 rounds of 20).

- ``pcoreset``: greedy k-center on the previous round's student probabilities (the paper's method);
- ``coreset``: k-center on the student's normalised hidden features (``method.feature``, default
  ``body``, the MLP's hidden layer; ``pool`` for the CIFAR ResNets);
- ``entropy``: the most uncertain items; ``random``: drawn with the seed.

Round 0 is the same for every strategy of a seed (the same stratified initial labels, the same
initialisation, the same teacher), so strategies differ from round 1 on. 3 seeds; a table of
accuracy per round, the mean over the selection rounds (1 on), and ``results/<name>.png`` (accuracy
against labels, mean ± std). A finished run is read back, not trained again.

    OMP_NUM_THREADS=1 python benchmarks/pcoreset.py [--seeds 3] [--name pcoreset] [overrides ...]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

from cifar10 import finished
from common import RESULTS, fmt, mean_std, pyplot, save, write
from mmkd.cli import compose
from mmkd.run import run

STRATEGIES = {"pcoreset": "PCoreSet (k-center, probabilities)", "coreset": "coreset (k-center, features)",
              "entropy": "entropy", "random": "random"}


def plot(curves: dict[str, tuple[list[int], list[list[float]]]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (s, (labels, accs)) in enumerate(curves.items()):
        m = [100 * mean_std(a)[0] for a in accs]
        sd = [100 * mean_std(a)[1] for a in accs]
        ax.plot(labels, m, marker="o", color=f"C{i}", label=s)
        ax.fill_between(labels, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)], color=f"C{i}", alpha=0.15)
    ax.set(xlabel="labelled training items", ylabel="test accuracy %", title="active distillation")
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--experiment", default="digits_pcoreset")
    p.add_argument("--feature", default="body", help="coreset's feature (a module path of the student)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "pcoreset")
    p.add_argument("--name", default="pcoreset")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = args.work.resolve()
    shared = [f"out_dir={work / 'out'}", f"cache_dir={work / 'cache'}", "trainer.tensorboard=false",
              "trainer.progress=off", "export=[]", *args.overrides]
    runs: dict[str, list[dict]] = {}
    for seed in range(args.seeds):
        for s in args.strategies:
            cfg = compose([f"experiment={args.experiment}", f"seed={seed}", f"method.strategy={s}",
                           f"method.feature={args.feature}", *shared])
            done = finished(cfg, work / "out")
            if done is None:
                print(f"{s}, seed {seed}", flush=True)
                done = run(cfg)
            runs.setdefault(s, []).append(done)
    cfg = compose([f"experiment={args.experiment}", *shared])
    labels = [r["labelled"] for r in runs[args.strategies[0]][0]["rounds"]]
    acc = {s: [[r["rounds"][k]["test_acc"] for r in rs] for k in range(len(labels))] for s, rs in runs.items()}
    later = {s: [statistics.mean(r["rounds"][k]["test_acc"] for k in range(1, len(labels))) for r in rs]
             for s, rs in runs.items()}
    rows = [[STRATEGIES[s], *(fmt(a, 100) for a in acc[s]), fmt(later[s], 100)] for s in args.strategies]
    first = json.loads((Path(runs[args.strategies[0]][0]["rounds"][0]["run_dir"]) / "results.json").read_text())
    teacher = fmt([json.loads((Path(r["rounds"][0]["run_dir"]) / "results.json").read_text())["teachers"]
                   [next(iter(first["teachers"]))]["test_acc"] for r in runs[args.strategies[0]]], 100)
    plot({STRATEGIES[s]: (labels, acc[s]) for s in args.strategies}, RESULTS / f"{args.name}.png")
    tc = next(iter(cfg.teachers.values()))
    minutes, epochs = (time.perf_counter() - t0) / 60, tc.epochs
    notes = (f"Test accuracy %, mean ± std over {args.seeds} seeds; `{args.experiment}`: student {cfg.student.name}, "
             f"teacher {tc.name}" + (f" ({teacher}%, loaded: {Path(tc.checkpoint).name}, trained on every training label)" if tc.checkpoint else
                f" ({teacher}%, {epochs} epoch{'s' if epochs != 1 else ''} on every training label)")
             + f", {cfg.trainer.max_epochs} epochs a round on {cfg.losses.ce.weight} CE(labelled) + "
             f"{cfg.losses.kd.weight} KD (T = {cfg.losses.kd.args.temperature}) over the labelled and the "
             f"unlabelled batch; {cfg.method.initial} labels per class, then {cfg.method.rounds} rounds of "
             f"{cfg.method.queries}. Round 0 is the same for every strategy. Plot: `results/{args.name}.png`. "
             f"Took {minutes:.1f} minutes. Command: `python benchmarks/pcoreset.py --seeds {args.seeds}"
             + (f" --experiment {args.experiment}" if args.experiment != "digits_pcoreset" else "")
             + "".join(f" {o}" for o in args.overrides) + "`.")
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "labels": labels, "test_acc": acc,
                      "mean_over_selection_rounds": later, "minutes": minutes},
          ["strategy", *(f"{n} labels" for n in labels), "mean, rounds 1+"], rows, notes)


if __name__ == "__main__":
    main()
