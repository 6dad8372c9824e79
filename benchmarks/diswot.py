"""DisWOT on CIFAR-10 (Dong et al., CVPR 2023): does the training-free proxy rank distilled students?

On ``cifar10.py``'s setting (its teacher, trained once into ``<work>``, and its KD protocol scaled to
``--epochs``), the pipeline ``diswot`` (``experiment=cifar10_diswot``: 20 + 100 candidates of the
``cifar_resnet`` space under ``--max-params``) searches once and writes its pick. Then ``--candidates``
architectures drawn at random from the same space and constraint (seeded), plus the pick, are each
scored by the proxy and trained with KD from the teacher (CE 0.1 + KD 0.9, T = 4; ``--seeds`` seeds a
candidate). Reported: Kendall's tau between the distilled test accuracy and the DisWOT score, each
of its two terms, and the parameter count (a baseline proxy); the pick's rank; and the search's time
against training the candidates (the paper: at least 180x faster). A finished run is read back.

    MMKD_DATA=../shared/data python benchmarks/diswot.py [--candidates 12] [--epochs 6]
"""
from __future__ import annotations

import random
import statistics
import time

from cifar10 import arguments, finished, prepare, students
from common import fmt, kendall, write
from mmkd.build import load_data
from mmkd.cli import compose
from mmkd.methods.diswot import SPACE, Scorer, architecture, options
from mmkd.run import run


def override(c: dict) -> str:
    a = architecture(c)
    return f"student={{name: cifar_resnet, inputs: [image], args: {{blocks: {a['blocks']}, widths: {a['widths']}, kernels: {a['kernels']}}}}}"


def search_overrides(args, data: list[str]) -> list[str]:
    return ["experiment=cifar10_diswot", f"teachers.resnet.name={args.teacher}", f"method.max_params={args.max_params}", *data]


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, ["kd"], "diswot")
    p.set_defaults(epochs=6, test_per_class=500, seeds=1)
    p.add_argument("--candidates", type=int, default=12, help="random candidates trained besides the pick")
    p.add_argument("--max-params", type=int, default=300_000)
    args, data, teacher, trow = prepare(p)
    search = compose(search_overrides(args, data))
    done = finished(search, args.work / "out")
    if done is None:
        print("searching", flush=True)
        done = run(search)
    search_s = done["search_s"]
    scorer = Scorer(search, options(search), *load_data(search))
    rng, picked = random.Random(0), {tuple(done["best"]["genes"].values()): done["best"]["genes"]}
    while len(picked) < args.candidates + 1:
        c = {g: rng.choice(v) for g, v in SPACE.items()}
        if scorer.params(c) <= args.max_params:
            picked.setdefault(tuple(c.values()), c)
    cands = list(picked.values())
    t_score = time.perf_counter()
    scores = [scorer(c) for c in cands]
    score_s = (time.perf_counter() - t_score) / len(cands)
    trained = compose([*search_overrides(args, data), f"teachers.resnet.checkpoint={teacher}", "method.teacher_init=trained"])
    ours = Scorer(trained, options(trained), *load_data(trained))  # the trained teacher: our option
    scores_trained = [ours(c) for c in cands]
    plan = [(f"c{i}", "cifar10_kd", [override(c)]) for i, c in enumerate(cands)]
    acc, sec, _ = students(args, data, teacher, plan, baselines={})
    rows, table = [], []
    for i, (c, sc, st) in enumerate(zip(cands, scores, scores_trained)):
        a = architecture(c)
        table.append({"args": a, "params": scorer.params(c), **sc, "trained_score": st["score"],
                      "test_acc": statistics.mean(acc[f"c{i}"]), "test_acc_seeds": acc[f"c{i}"],
                      "train_s": statistics.mean(sum(s) for s in sec[f"c{i}"]), "pick": i == 0})
    by_acc = sorted(table, key=lambda r: -r["test_acc"])
    for r in by_acc:
        a = r["args"]
        rows.append([("**pick** " if r["pick"] else "") + f"blocks {a['blocks']}, widths {a['widths'][1:]}, kernels {a['kernels']}",
                     f"{r['params']:,}", f"{r['score']:.4f}", f"{r['semantic']:.4f}", f"{r['relation']:.4f}",
                     fmt(r["test_acc_seeds"], 100)])
    accs = [r["test_acc"] for r in table]
    tau = {k: kendall([(-1 if k in ("semantic", "relation") else 1) * r[k] for r in table], accs)
           for k in ("score", "semantic", "relation", "params", "trained_score")}
    rank = 1 + [r["pick"] for r in by_acc].index(True)
    per_seed = [kendall([r["score"] for r in table], [r["test_acc_seeds"][s] for r in table]) for s in range(args.seeds)]
    seeds_note = (f" Over the seeds one at a time, the DisWOT score's tau is {fmt(per_seed, 1, 3)}." if args.seeds > 1 else "")
    train_s = statistics.mean(r["train_s"] for r in table)
    n_scored = len(done["candidates"])
    notes = (f"{len(table)} candidates ({args.candidates} drawn at random from the space under {args.max_params:,} "
             f"parameters, and the search's pick), each trained {args.seeds} time(s) (seeds 0 to {args.seeds - 1}; accuracy mean ± std) with KD from the teacher {args.teacher} "
             f"({100 * trow['test_acc']:.2f}%) for {args.epochs} epochs on {10 * args.per_class - args.val} CIFAR-10 "
             f"training images; test accuracy on {10 * args.test_per_class:,} test images. Score = -(semantic + "
             f"relation) at Gaussian initialisation on one batch of 64 (higher: expected to distil better). "
             f"Kendall's tau against the distilled (mean) accuracy: DisWOT score {tau['score']:+.3f}, semantic term "
             f"{tau['semantic']:+.3f}, relation term {tau['relation']:+.3f}, parameter count {tau['params']:+.3f}; the score against the "
             f"trained teacher (`method.teacher_init=trained`, our option) {tau['trained_score']:+.3f}. "
             f"The pick ranks {rank} of {len(table)} by accuracy. Time: the search scored {n_scored} candidates in "
             f"{search_s:.1f} s ({search_s / n_scored:.3f} s each; {score_s:.3f} s each here); training one "
             f"candidate took {train_s:.1f} s ({train_s / (search_s / n_scored):.0f}x a proxy evaluation; the whole "
             f"search {n_scored * train_s / search_s:.0f}x faster than training its {n_scored} candidates).{seeds_note} Took "
             f"{(time.perf_counter() - t0) / 60:.1f} minutes. Command: `python benchmarks/diswot.py --candidates "
             f"{args.candidates} --epochs {args.epochs} --seeds {args.seeds}`.")
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "search": {
        "run_dir": done["run_dir"], "search_s": search_s, "scored": n_scored, "best": done["best"]},
        "candidates": table, "kendall_tau": tau, "kendall_tau_per_seed": per_seed, "pick_rank": rank, "train_s_mean": train_s,
        "proxy_s_mean": search_s / n_scored}, ["candidate", "params", "score", "semantic", "relation", "test acc %"],
          rows, notes)


if __name__ == "__main__":
    main()
