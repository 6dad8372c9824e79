"""MiniPLM's difference sampling on Tiny Shakespeare: a student pre-trained with the plain LM loss on the
half of the training blocks that a teacher finds most likely relative to a small reference LM, against
the same budget of random blocks, with and without token-level KD.

The teacher is ``lm.py``'s (a 6 x 256 GPT-2 trained on labels for ``--teacher-epochs``, trained into
``runs/lm/teacher-<epochs>e`` when absent and shared with ``lm.py``). The reference is a 1 x 128 GPT-2
trained on labels for ``--ref-epochs`` on the first tenth of the training blocks (the paper trains its
104M reference on 5B of its 50B tokens). Every student is the 2 x 128 GPT-2 of
``configs/setup/shakespeare.yaml`` and trains for ``--epochs`` on half of the training blocks:

- random: the LM loss on a random half (policy ``random``, drawn from the seed);
- MiniPLM: the LM loss on the half with the largest ``log p_T - log p_ref`` per character
  (``experiment=lm_shakespeare_miniplm``, policy ``miniplm``); no teacher while it trains;
- KD: forward KL from the teacher (top-k cached) on the same random half as the first row.

Reported over ``--seeds`` seeds: validation and test perplexity, seconds per epoch, and for MiniPLM the
seconds the scoring took (both models over every training block, once: seed 0's run writes
``miniplm_scores.npy`` and the later seeds refine the corpus from it, as other students would).

    MMKD_DATA=../shared/data python benchmarks/miniplm.py [--seeds 3] [--epochs 4] [--teacher-epochs 4]
"""
from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from common import fmt, mean_std, write
from lm import teacher_run, train_seconds, trained

HALF = "policies=[{name: random, args: {fraction: 0.5}}]"
LABELS = {"random": "random half, LM loss", "miniplm": "MiniPLM half, LM loss", "kd": "random half, forward KL"}


def reference(args) -> dict:
    """The reference LM's run: 1 x 128 on the first ``--ref-blocks`` training blocks."""
    return trained(args, ["experiment=lm_shakespeare_ce", "name=miniplm_reference", "student.args.n_layer=1",
                          f"data.args.limit={args.ref_blocks}", f"trainer.max_epochs={args.ref_epochs}"],
                   "the reference LM")


def student(args, method: str, seed: int, teacher: Path, ref: Path, scores: Path | None = None) -> dict:
    base = [f"seed={seed}", f"trainer.max_epochs={args.epochs}"]
    if method == "random":
        overrides = ["experiment=lm_shakespeare_ce", HALF]
    elif method == "kd":
        overrides = ["experiment=lm_shakespeare_fkl", HALF, f"teachers.lm.checkpoint={teacher}"]
    elif scores is None:
        overrides = ["experiment=lm_shakespeare_miniplm", f"policies.0.args.teacher={teacher}",
                     f"policies.0.args.reference={ref}"]
    else:  # the corpus refined once: later seeds read the first one's scores
        overrides = ["experiment=lm_shakespeare_miniplm", "policies.0.args.teacher_name=null",
                     f"policies.0.args.scores={scores}"]
    done = trained(args, [*overrides, *base], f"{method}, seed {seed}")
    stage = Path(done["run_dir"]) / "student"
    with (stage / "metrics.csv").open() as f:
        score = [float(r["miniplm/score_s"]) for r in csv.DictReader(f) if r.get("miniplm/score_s")]
    return {**done["student"], "train_s": statistics.mean(train_seconds(stage)), "score_s": score[0] if score else None,
            "scores": str(stage / "miniplm_scores.npy") if method == "miniplm" else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=4, help="student epochs over its half of the training blocks")
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--ref-epochs", type=int, default=4)
    p.add_argument("--ref-blocks", type=int, default=784, help="the reference's slice: the first BLOCKS blocks")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "lm")
    p.add_argument("--data", default="${oc.env:MMKD_DATA,data}")
    args = p.parse_args()
    args.work = args.work.resolve()
    args.limit = None
    teacher, trow = teacher_run(args)
    done = reference(args)
    ref, ref_row = Path(done["run_dir"]), done["student"]
    data = {"teacher": trow, "reference": ref_row, "epochs": args.epochs, "seeds": args.seeds, "methods": {}}
    rows = []
    for m in ("random", "miniplm", "kd"):
        runs = [student(args, m, 0, teacher, ref)]
        scores = Path(runs[0]["scores"]) if m == "miniplm" else None
        runs += [student(args, m, s, teacher, ref, scores) for s in range(1, args.seeds)]
        data["methods"][m] = runs
        scoring = f"{runs[0]['score_s']:.0f} (seed 0; later seeds reuse its scores)" if m == "miniplm" else ""
        rows.append([LABELS[m], fmt([r["val_ppl"] for r in runs], 1, 3), fmt([r["test_ppl"] for r in runs], 1, 3),
                     f"{mean_std([r['train_s'] for r in runs])[0]:.1f}", scoring])
    notes = (f"Teacher: GPT-2 6 x 256, test perplexity {trow['test_ppl']:.3f}. Reference: GPT-2 1 x 128 on the first "
             f"{args.ref_blocks} training blocks, {args.ref_epochs} epochs: test perplexity "
             f"{ref_row['test_ppl']:.3f}. Students: GPT-2 2 x 128, {args.epochs} epochs on half of the training "
             f"blocks, {args.seeds} seeds (mean ± std). Command: `python benchmarks/miniplm.py --seeds {args.seeds} "
             f"--epochs {args.epochs} --teacher-epochs {args.teacher_epochs}`.")
    write("miniplm", data, ["student", "val ppl", "test ppl", "s / epoch", "scoring s"], rows, notes)


if __name__ == "__main__":
    main()
