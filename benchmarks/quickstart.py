"""The main job (``mmkd run``, the quickstart experiment) over several seeds.

    python benchmarks/quickstart.py [--seeds 3] [overrides ...]

Extra arguments are config overrides (``trainer.device=cuda``, ``trainer.compile=true``, ...).
"""
from __future__ import annotations

import argparse
import logging
import tempfile

from common import fmt, write
from mmkd.cli import compose
from mmkd.run import run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--name", default="quickstart")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    runs = []
    with tempfile.TemporaryDirectory() as out:
        for seed in range(args.seeds):
            # one split for every seed (the seeds vary the initialisation), as the published table
            runs.append(run(compose([f"seed={seed}", "data.args.split_seed=0", f"out_dir={out}",
                                     "trainer.tensorboard=false", *args.overrides])))
            print(f"seed {seed}: {runs[-1]['time_s']:.1f} s", flush=True)
    teacher = [r["teachers"]["cnn"] for r in runs]
    student = [r["student"] for r in runs]
    baseline = [r["baseline"] for r in runs]
    rows = [["teacher (CNN)", fmt([t["test_acc"] for t in teacher], 100), f"{teacher[0]['params']:,}",
             fmt([t["latency_ms"] for t in teacher], 1, 3)],
            ["student, labels only (MLP)", fmt([b["test_acc"] for b in baseline], 100), f"{student[0]['params']:,}",
             fmt([s["latency_ms"] for s in student], 1, 3)],
            ["student, KD (MLP)", fmt([s["test_acc"] for s in student], 100), f"{student[0]['params']:,}",
             fmt([s["latency_ms"] for s in student], 1, 3)]]
    speedup = [t["latency_ms"] / s["latency_ms"] for t, s in zip(teacher, student)]
    write(args.name, {"overrides": args.overrides, "runs": runs},
          ["model", "test accuracy %", "parameters", f"ms / {runs[0]['latency_batch']} test images"], rows,
          f"{args.seeds} seeds (mean ± std); student {fmt(speedup, 1, 1)}x faster than the teacher; "
          f"wall time per run {fmt([r['time_s'] for r in runs], 1, 1)} s.")


if __name__ == "__main__":
    main()
