"""PGKD (Di Palo et al., EMNLP 2024) on AG News with 1% and 10% of the labels, against CE and KD on the
labelled data alone, and the student's speed against the teacher's.

Per label fraction (``--per-class``: 22 and 225 sentences a class, 1% and 10% of the 9,000 training
sentences; validation, 1,001, whole; a seeded ``--test-limit`` subset of the 7,600 test sentences) and
seed:

- ``agnews_low_kd``: MiniLM fine-tuned on the labelled sentences (``--teacher-epochs``; once, by the
  seed-0 run, and shared by the seeds), then a 2-layer
  BERT of width 128 from scratch on CE + KD (T = 4), and, from the same initialisation, on CE alone (the
  run's baseline); ``--epochs`` student epochs;
- the writer (seed 0, once per fraction): ``lm_agnews_writer``, a class-conditional GPT-2 (2 x 128) on
  every training text (the unlabelled ones included) prefixed with the seed-0 teacher's predicted
  topic, so that no label beyond the fraction's reaches it;
- ``agnews_pgkd`` with that run's teacher and the writer: cycle 0 is the CE student; up to ``--cycles``
  cycles of ``--per-cycle`` texts each, early stopping after 2 cycles without a better validation
  accuracy.

Speed: the student's and the teacher's median forward time on a batch of 256 test sentences on one CPU
thread (the runs' ``latency_ms``). Every seed has the same labelled sentences, validation split and test
subset (``data.args.split_seed=0``); the seeds change the students' initialisation, the batch order and
the writer's samples. A finished run under ``<work>`` is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/pgkd.py [--seeds 3] [--per-class 22 225]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cifar10 import finished
from common import fmt, write
from mmkd.build import load_data
from mmkd.cli import compose
from mmkd.data import loader
from mmkd.export import trained_model
from mmkd.net import Net
from mmkd.run import run

QUIET = ["trainer.tensorboard=false", "trainer.progress=off", "export=[]"]


def done_or_run(cfg, out: Path, what: str) -> dict:
    """The results of the finished run of ``cfg`` under ``out``, else of running it now."""
    res = finished(cfg, out)
    if res is None:
        print(what, flush=True)
        res = run(cfg)
    return res


@torch.no_grad()
def predictions(kd_dir: str, max_length: int, root: str) -> np.ndarray:
    """The teacher of the run ``kd_dir``'s top class on every sentence of AG News's whole training split."""
    model, cfg, _ = trained_model(kd_dir, "minilm")
    full = compose(["experiment=agnews_low_kd", "data.args.per_class=null", f"data.args.max_length={max_length}",
                    f"data_root={root}"])
    data, _ = load_data(full)
    net = Net(model, list(cfg.teachers.minilm.inputs)).eval()
    return torch.cat([net(b).logits.argmax(1) for b in loader(data.train, 256)]).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--per-class", type=int, nargs="+", default=[22, 225])
    p.add_argument("--epochs", type=int, nargs="+", default=[30, 10], help="student epochs, per fraction")
    p.add_argument("--teacher-epochs", type=int, nargs="+", default=[10, 3], help="per fraction")
    p.add_argument("--test-limit", type=int, default=2000, help="test sentences (a seeded random subset)")
    p.add_argument("--writer-epochs", type=int, default=8)
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--per-cycle", type=int, default=200)
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "pgkd")
    p.add_argument("--name", default="pgkd")
    args = p.parse_args()
    work = args.work.resolve()
    t0 = time.perf_counter()
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "fractions": {}}
    table = []
    for per_class, epochs, t_epochs in zip(args.per_class, args.epochs, args.teacher_epochs):
        folder = work / f"per_class{per_class}"
        common = [f"data.args.per_class={per_class}", f"data.args.limit={args.test_limit}", "data.args.split_seed=0",
                  f"trainer.max_epochs={epochs}", f"teachers.minilm.epochs={t_epochs}", f"out_dir={folder}", *QUIET]
        rows: dict[str, list] = {k: [] for k in ("teacher", "ce", "kd", "pgkd", "cycles", "generated", "on_target",
                                                  "t_ms", "s_ms", "pgkd_min")}
        writer = teacher = None
        for seed in range(args.seeds):
            shared = [] if teacher is None else [f"teachers.minilm.checkpoint={teacher}"]
            kd_cfg = compose(["experiment=agnews_low_kd", f"seed={seed}", *common, *shared])
            kd = done_or_run(kd_cfg, folder, f"{per_class}/class, seed {seed}: CE and KD")
            if teacher is None:
                teacher = Path(kd["run_dir"]) / "teachers" / "minilm" / "best.pt"
                labels = folder / "teacher_predictions.npy"
                if not labels.is_file():
                    np.save(labels, predictions(kd["run_dir"], kd_cfg.data.args.max_length, kd_cfg.data_root))
                w_cfg = compose(["experiment=lm_agnews_writer", "seed=0", f"data.args.prefix_labels={labels}",
                                 f"trainer.max_epochs={args.writer_epochs}", f"out_dir={folder}", *QUIET])
                writer = done_or_run(w_cfg, folder, f"{per_class}/class: the writer")
            pg_cfg = compose(["experiment=agnews_pgkd", f"seed={seed}", *common,
                              f"teachers.minilm.checkpoint={teacher}",
                              f"method.generator={writer['run_dir']}", f"method.cycles={args.cycles}",
                              f"method.per_cycle={args.per_cycle}"])
            pg = done_or_run(pg_cfg, folder, f"{per_class}/class, seed {seed}: PGKD")
            gen = [c for c in pg["cycles"][1:] if "generated" in c]
            rows["teacher"].append(kd["teachers"]["minilm"]["test_acc"])
            rows["ce"].append(kd["baseline"]["test_acc"])
            rows["kd"].append(kd["student"]["test_acc"])
            rows["pgkd"].append(pg["student"]["test_acc"])
            rows["cycles"].append(pg["best_cycle"])
            rows["generated"].append(sum(c["generated"] for c in gen[:pg["best_cycle"]]))
            rows["on_target"].append(statistics.mean(c["on_target"] for c in gen) if gen else float("nan"))
            rows["t_ms"].append(kd["teachers"]["minilm"]["latency_ms"])
            rows["s_ms"].append(kd["student"]["latency_ms"])
            rows["pgkd_min"].append(pg["time_s"] / 60)
            print(f"{per_class}/class seed {seed}: teacher {rows['teacher'][-1]:.4f}, CE {rows['ce'][-1]:.4f}, "
                  f"KD {rows['kd'][-1]:.4f}, PGKD {rows['pgkd'][-1]:.4f} (best cycle {pg['best_cycle']})", flush=True)
        out["fractions"][str(per_class)] = {**rows, "writer": {k: writer["student"].get(k) for k in ("val_ppl", "test_ppl")}}
        labelled = 4 * per_class
        speed = statistics.mean(t / s for t, s in zip(rows["t_ms"], rows["s_ms"]))
        table.append([f"{labelled} ({100 * labelled / 9000:.2g}%)", fmt(rows["teacher"], 100), fmt(rows["ce"], 100),
                      fmt(rows["kd"], 100), fmt(rows["pgkd"], 100), f"{statistics.mean(rows['cycles']):.1f}",
                      f"{statistics.mean(rows['generated']):.0f}", f"{100 * statistics.mean(rows['on_target']):.1f}",
                      f"{statistics.mean(rows['t_ms']):.1f} / {statistics.mean(rows['s_ms']):.1f} ({speed:.1f}x)"])
    notes = (f"AG News test accuracy % ({args.test_limit:,} test sentences), mean ± std over {args.seeds} seeds. "
             f"Teacher (one per fraction, seed 0): all-MiniLM-L6-v2 fine-tuned on the labelled sentences ({', '.join(map(str, args.teacher_epochs))} "
             "epochs); students: a 2-layer BERT of width 128 from scratch "
             f"({', '.join(map(str, args.epochs))} epochs), the epoch of best validation accuracy kept. KD: CE + KD "
             "(T = 4) on the labelled sentences. PGKD: CE on the labelled sentences plus the texts written by a "
             f"class-conditional GPT-2 (2 x 128, {args.writer_epochs} epochs on the training texts prefixed with the "
             f"teacher's predicted topic) and labelled by the teacher; up to {args.cycles} cycles of "
             f"{args.per_cycle} texts for the 2 classes of lowest validation F1, half of them from a hard negative's "
             "first 4 words; kept cycle and its generated texts: means; on target: the share of texts the teacher "
             "labels with the class they were written for. Speed: median forward ms on 256 test sentences, "
             f"one CPU thread (teacher / student, ratio). Took {(time.perf_counter() - t0) / 60:.1f} minutes. "
             f"Command: `python benchmarks/pgkd.py --seeds {args.seeds} --per-class {' '.join(map(str, args.per_class))}`.")
    write(args.name, out, ["labelled sentences", "teacher", "CE", "KD", "PGKD", "kept cycle", "texts added",
                           "on target %", "ms / 256: teacher / student"], table, notes)


if __name__ == "__main__":
    main()
