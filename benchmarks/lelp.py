"""LELP (Loo et al., arXiv:2409.20449) against KD and CE on AG News, a 4-class task where plain KD
gains little: all-MiniLM-L6-v2 fine-tuned on labels as the teacher, a 2-layer BERT of width 128 trained
from scratch as the student.

The teacher (``--teacher-epochs``) is fine-tuned once, with seed 0, by the ``agnews_kd`` experiment's
teacher section, into ``<work>/teacher-minilm-<epochs>e-<limit>/`` and loaded from there by every later
invocation; its logits and sentence embeddings (``pool``) on the training set are cached once under
``<work>/cache``, so no student epoch runs it. Students train for ``--epochs`` on a ``--limit``-sentence
subset of each split (one split for every seed, the teacher's), evaluated on the test subset; for a
seed, the three students start from the same initialisation: CE alone; CE + KD (``agnews_kd``); CE +
LELP (``agnews_lelp``: 4 pseudo-subclasses per class from the teacher's embedding, their head on the
student's). A student whose config and seed match a finished one under ``<work>/out`` is read back, not
trained again. Extra arguments are config overrides applied to teacher and students.

    OMP_NUM_THREADS=2 MMKD_DATA=../shared/data python benchmarks/lelp.py [--seeds 3] [--epochs 5] [--limit 2000]

The default setting is trg_agnews's (benchmarks/trg.py), whose timings there (teacher fine-tuned and
cached in about 10 min, a 5-epoch student in about 100 s, on one core) put it near 25 min on one core
and near 20 on two; a later invocation reuses the teacher and the finished students.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from common import fmt, mean_std, write
from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.build import build_model, build_terms, load_data, trainer_config
from mmkd.cli import compose
from mmkd.net import num_params
from mmkd.routers import ConstantRouter
from mmkd.trainer import seed_everything

EXPERIMENTS = {"ce": "agnews_kd", "kd": "agnews_kd", "lelp": "agnews_lelp"}  # ce: the kd config, CE alone
LABELS = {"ce": "CE (labels only)", "kd": "CE + KD (T = 4)", "lelp": "CE + LELP (4 subclasses, T = 4, beta 0.5)"}


def config(args, method: str, seed: int = 0):
    """The run config of ``method`` (the teacher's for ``"teacher"``) in the benchmark's setting."""
    return compose([f"experiment={EXPERIMENTS.get(method, 'agnews_kd')}", f"seed={seed}",
                    f"data.args.limit={args.limit}", "data.args.split_seed=0", f"trainer.max_epochs={args.epochs}",
                    f"teachers.minilm.epochs={args.teacher_epochs}", *args.overrides])


def teacher(args, cfg, data, meta) -> tuple[Teacher, dict]:
    """The fine-tuned teacher (trained now into ``<work>/teacher-...`` when absent) and its row."""
    tc = cfg.teachers.minilm
    folder = args.work / f"teacher-minilm-{args.teacher_epochs}e-{args.limit}"
    seed_everything(0)
    model = build_model(tc, meta, "teachers.minilm")
    if (folder / "teacher.json").is_file():
        model.load_state_dict(torch.load(folder / "teacher.pt", weights_only=True))
    else:
        print(f"fine-tuning the teacher for {args.teacher_epochs} epoch(s) into {folder}", flush=True)
        t0 = time.perf_counter()
        trainer = Trainer(trainer_config(cfg, tc.epochs, tc.lr, data, teacher=tc), folder / "fit", tensorboard=False,
                          progress="off")
        trainer.fit(Distiller(Net(model, tc.inputs), [], [Term("ce")]), data.train, data.val)  # keeps the best epoch
        acc = trainer.evaluate(Distiller(Net(model, tc.inputs), [], [Term("ce")]), data.test)["acc"]
        torch.save(model.state_dict(), folder / "teacher.pt")
        row = {"test_acc": acc, "params": num_params(model), "train_s": time.perf_counter() - t0}
        (folder / "teacher.json").write_text(json.dumps(row, indent=2) + "\n")
    row = json.loads((folder / "teacher.json").read_text())
    return cache_teacher(Teacher(model, tc.inputs, tc.features), data.train, args.work / "cache"), row


def student(args, method: str, seed: int, cached, data, meta) -> dict:
    """Train (or read back) the ``method`` student of ``seed``; its test accuracy and seconds."""
    cfg = config(args, method, seed)
    key = hashlib.sha256(f"{method}|{OmegaConf.to_yaml(cfg)}".encode()).hexdigest()[:12]
    folder = args.work / "out" / f"{method}-seed{seed}-{key}"
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text())
    t0 = time.perf_counter()
    seed_everything(seed)
    model = build_model(cfg.student, meta, "student")  # the same initialisation for every method of a seed
    net = Net(model, cfg.student.inputs, cfg.student.features)
    teachers = [] if method == "ce" else [cached]
    terms = [Term("ce")] if method == "ce" else build_terms(cfg, net, teachers, data)
    module = Distiller(net, teachers, terms, ConstantRouter() if teachers else None)
    trainer = Trainer(trainer_config(cfg, data=data), folder, tensorboard=False, progress="off")
    trainer.fit(module, data.train, data.val)
    result = {"test_acc": trainer.evaluate(module, data.test)["acc"], "params": num_params(model),
              "run_s": time.perf_counter() - t0}
    (folder / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=5, help="student epochs")
    p.add_argument("--limit", type=int, default=2000, help="sentences kept of each split")
    p.add_argument("--teacher-epochs", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=list(LABELS), choices=list(LABELS))
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "agnews",
                   help="the teacher, its cache and the students' runs (kept for later invocations)")
    p.add_argument("--name", default="lelp", help="results/<name>.json and .md")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    args.work = args.work.resolve()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    cfg = config(args, "teacher")
    data, meta = load_data(cfg)
    cached, trow = teacher(args, cfg, data, meta)
    print(f"teacher: test acc {trow['test_acc']:.4f}", flush=True)
    acc: dict[str, list[float]] = {m: [] for m in args.methods}
    secs: dict[str, list[float]] = {m: [] for m in args.methods}
    params = 0
    for seed in range(args.seeds):
        for method in args.methods:
            r = student(args, method, seed, cached, data, meta)
            acc[method].append(r["test_acc"])
            secs[method].append(r["run_s"])
            params = r["params"]
            print(f"seed {seed} {method}: test acc {r['test_acc']:.4f} ({r['run_s']:.0f} s)", flush=True)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "teacher": trow,
              "student_params": params, "sizes": {k: len(getattr(data, k)) for k in ("train", "val", "test")},
              "max_length": cfg.data.args.max_length,
              "test_acc": acc, "run_s": secs, "total_minutes": (time.perf_counter() - t0) / 60}
    write(args.name, result, *render(result))


def render(r: dict) -> tuple[list[str], list[list[str]], str]:
    """The table's header, rows and notes from a result dict (what :func:`main` writes as JSON)."""
    a, acc, sizes = r["args"], r["test_acc"], r["sizes"]
    ce = mean_std(acc["ce"])[0] if "ce" in acc else None
    rows = [[f"teacher all-MiniLM-L6-v2 ({r['teacher']['params']:,} params, fine-tuned {a['teacher_epochs']} "
             f"epoch(s))", f"{100 * r['teacher']['test_acc']:.2f}", "", "-"]]
    rows += [[f"student: {LABELS[m]}", fmt(runs, 100), fmt(r["run_s"][m], 1, 0),
              "-" if ce is None or m == "ce" else f"{100 * (mean_std(runs)[0] - ce):+.2f}"] for m, runs in acc.items()]
    gap = (f" LELP - KD: {100 * (mean_std(acc['lelp'])[0] - mean_std(acc['kd'])[0]):+.2f} points."
           if {"lelp", "kd"} <= set(acc) else "")
    notes = (f"{a['seeds']} seed(s), mean ± std of test accuracy; one teacher (seed 0) shared by the seeds; for a "
             f"seed every student starts from the same initialisation. AG News cut to {sizes['train']:,} / "
             f"{sizes['val']:,} / {sizes['test']:,} train/val/test sentences (one split, the teacher's), "
             f"{r['max_length']} tokens; students: 2-layer BERT of width 128 ({r['student_params']:,} params) "
             f"from scratch, {a['epochs']} epochs, the best validation epoch kept.{gap} "
             f"Total {r['total_minutes']:.1f} min.")
    return ["model", "test accuracy %", "run s", "minus CE (points)"], rows, notes


if __name__ == "__main__":
    main()
