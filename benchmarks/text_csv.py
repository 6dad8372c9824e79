"""Your own data: AG News read from its TSV file by the ``text_csv`` loader, as a user's own file would
be (``examples/agnews_csv.yaml``); KD from a linear probe on frozen all-MiniLM-L6-v2 embeddings into a
small BERT trained from scratch, against the same student on labels alone, several seeds.

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/text_csv.py [--seeds 3] [overrides ...]

The teacher is trained once (seed 0) and loaded from that run by the later seeds, so each seed differs
in the student's initialisation and data order only; the split (80/10/10 of ``dev.tsv``, stratified)
is ``split_seed``'s. The probe's first epoch embeds every training and validation sentence once (the
frozen encoder's feature store, kept on disk under the cache folder); its later epochs run only the
classifier: the table's last line compares the two epoch times, read from the teacher's
``metrics.csv``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import tempfile
from pathlib import Path

from common import fmt, write
from mmkd.cli import compose
from mmkd.run import run

CONFIG = Path(__file__).resolve().parent.parent / "examples" / "agnews_csv.yaml"


def epoch_times(run_dir: str) -> tuple[float, list[float]]:
    """The teacher's first training epoch time and those of its later epochs (``time/train_s``)."""
    with open(Path(run_dir) / "teachers" / "minilm" / "metrics.csv") as f:
        times = [float(r["time/train_s"]) for r in csv.DictReader(f)]
    return times[0], times[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", default="text_csv")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for seed in range(args.seeds):
            keep = [f"teachers.minilm.checkpoint={runs[0]['run_dir']}"] if runs else []
            # one split for every seed: the seed-0 teacher serves them all, so no seed's test rows trained it
            runs.append(run(compose([f"experiment={CONFIG}", f"seed={seed}", "data.args.split_seed=0", f"out_dir={out}",
                                     "trainer.tensorboard=false", *keep, *args.overrides])))
            print(f"seed {seed}: {runs[-1]['time_s']:.1f} s", flush=True)
        first, later = epoch_times(runs[0]["run_dir"])
    teacher = runs[0]["teachers"]["minilm"]
    kd, ce = [r["student"]["test_acc"] for r in runs], [r["baseline"]["test_acc"] for r in runs]
    rows = [["teacher: MiniLM linear probe (frozen)", f"{100 * teacher['test_acc']:.2f}", f"{teacher['params']:,}",
             f"{teacher['latency_ms']:.1f}"],
            ["student, labels only (BERT 2x64)", fmt(ce, 100), f"{runs[0]['student']['params']:,}",
             fmt([r["student"]["latency_ms"] for r in runs], 1, 1)],
            ["student, KD (BERT 2x64)", fmt(kd, 100), f"{runs[0]['student']['params']:,}",
             fmt([r["student"]["latency_ms"] for r in runs], 1, 1)]]
    gain = [a - b for a, b in zip(kd, ce)]
    write(args.name, {"overrides": args.overrides, "runs": runs, "teacher_epoch_s": {"first": first, "later": later}},
          ["model", "test accuracy %", "parameters", f"ms / {runs[0]['latency_batch']} test sentences"], rows,
          f"{args.seeds} seeds (mean ± std; the teacher trained once, seed 0); KD - labels: {fmt(gain, 100)} points. "
          f"Teacher's first epoch (embeds every sentence): {first:.1f} s; later epochs (classifier on stored "
          f"embeddings): {fmt(later, 1, 3)} s. Wall time per run {fmt([r['time_s'] for r in runs], 1, 1)} s.")


if __name__ == "__main__":
    main()
