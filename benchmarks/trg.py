"""TRG (token-level relationship graphs, Zhang et al., arXiv:2306.12442) against logit KD, FitNet and
CE alone, for an image student (AV-digits: CNN teacher -> narrower CNN) and a text student (AG News:
fine-tuned all-MiniLM-L6-v2 -> 2-layer BERT of width 128 trained from scratch), several seeds.

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/trg.py [--seeds 3] [--tasks avdigits agnews] [--update]

Everything comes from the experiments ``trg_avdigits`` and ``trg_agnews`` (data, teacher, student,
trainer, the TRG terms); extra arguments are config overrides applied to both. Each task's teacher is
trained (MiniLM: fine-tuned) once, with seed 0, and shared by every student seed; its logits and token
features on the training set are cached once, so no student epoch runs the teacher. For a seed, the
students of all methods start from the same initialisation and see the same batches. Methods: CE;
logit KD (CE + the config's ``kd`` term); FitNet (CE + the hint loss on the same token features TRG
reads, through the same kind of learned projector, weight 1); TRG (every term of the config: CE, KD,
local, global, contextual); TRG without KD (the same minus the logit KD term: the token terms' own share).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time

from omegaconf import OmegaConf

from common import RESULTS, fmt, mean_std, write
from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.build import build_model, build_terms, load_data, trainer_config
from mmkd.cli import compose
from mmkd.config import TermConfig
from mmkd.net import num_params
from mmkd.routers import ConstantRouter
from mmkd.trainer import seed_everything

TASKS = {"avdigits": ("image", "conv"), "agnews": ("text", "token")}  # student modality, projector
METHODS = {"ce": "CE", "kd": "logit KD", "fitnet": "FitNet", "trg": "TRG", "trg_nokd": "TRG without KD"}


def method_losses(cfg, method: str, adapter: str):
    """The ``losses`` section of ``method``, as a config ``build_terms`` reads."""
    keep = {"ce": ["ce"], "kd": ["ce", "kd"], "fitnet": ["ce"], "trg": list(cfg.losses),
            "trg_nokd": [k for k in cfg.losses if k != "kd"]}[method]
    losses = {k: cfg.losses[k] for k in keep}
    if method == "fitnet":
        trg = cfg.losses.trg_local
        losses["fitnet"] = OmegaConf.structured(TermConfig(student=trg.student, teacher=trg.teacher, adapter=adapter))
    return OmegaConf.create({"losses": losses})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--name", default="trg")
    p.add_argument("--update", action="store_true", help="keep the other tasks' rows of an existing results file")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as out:
        for task in args.tasks:
            t0 = time.perf_counter()
            cfg = compose([f"experiment=trg_{task}", *args.overrides])
            data, meta = load_data(cfg)
            (name, tc), = cfg.teachers.items()
            seed_everything(0)
            model = build_model(tc, meta, f"teachers.{name}")
            trainer = Trainer(trainer_config(cfg, tc.epochs, tc.lr), f"{out}/{task}/teacher", tensorboard=False,
                              progress="off")
            trainer.fit(Distiller(Net(model, tc.inputs), [], [Term("ce")]), data.train, data.val)
            teacher = Teacher(model, tc.inputs, tc.features)
            row = {"teacher": tc.name, "teacher_params": num_params(model), "student": cfg.student.name,
                   "teacher_test_acc": trainer.evaluate(Distiller(teacher, [], [Term("ce")]), data.test)["acc"],
                   "sizes": {"train": len(data.train), "val": len(data.val), "test": len(data.test)},
                   "test_acc": {m: [] for m in METHODS}, "run_s": {m: [] for m in METHODS}}
            cached = cache_teacher(teacher, data.train, f"{out}/cache")
            row["teacher_s"] = time.perf_counter() - t0
            print(f"{task}: teacher {tc.name} test acc {row['teacher_test_acc']:.4f} "
                  f"(trained and cached in {row['teacher_s']:.0f} s)", flush=True)
            for seed in range(args.seeds):
                scfg = copy.deepcopy(cfg)
                scfg.seed = seed
                seed_everything(seed)
                student = build_model(cfg.student, meta, "student")
                init = copy.deepcopy(student.state_dict())
                row["student_params"] = num_params(student)
                for method in METHODS:
                    t1 = time.perf_counter()
                    student.load_state_dict(init)
                    net = Net(student, cfg.student.inputs, cfg.student.features)
                    teachers = [] if method == "ce" else [cached]
                    terms = build_terms(method_losses(cfg, method, TASKS[task][1]), net, teachers, data)
                    module = Distiller(net, teachers, terms, ConstantRouter() if teachers else None)
                    trainer = Trainer(trainer_config(scfg), f"{out}/{task}/{seed}/{method}", tensorboard=False,
                                      progress="off")
                    trainer.fit(module, data.train, data.val)
                    acc = trainer.evaluate(module, data.test)["acc"]
                    row["test_acc"][method].append(acc)
                    row["run_s"][method].append(time.perf_counter() - t1)
                    print(f"{task} seed {seed} {method}: test acc {acc:.4f} ({row['run_s'][method][-1]:.0f} s)",
                          flush=True)
            row["task_s"] = time.perf_counter() - t0
            results[task] = row
    if args.update and (RESULTS / f"{args.name}.json").exists():  # keep the tasks not run this time
        kept = json.loads((RESULTS / f"{args.name}.json").read_text())["tasks"]
        results = {t: results.get(t, kept.get(t)) for t in TASKS if t in results or t in kept}
    report(args.name, args.overrides, args.seeds, results, sum(r["task_s"] for r in results.values()))


def report(name: str, overrides: list[str], seeds: int, results: dict[str, dict], total: float) -> None:
    """Write ``results/<name>.json`` and ``.md`` from the per-task results."""
    header = ["student", "teacher test acc %", *(f"{v} test acc %" for v in METHODS.values()),
              "TRG - best of CE, KD, FitNet"]
    rows = []
    for task, r in results.items():
        acc = r["test_acc"]
        gap = mean_std(acc["trg"])[0] - max(mean_std(acc[m])[0] for m in ("ce", "kd", "fitnet"))
        rows.append([f"{TASKS[task][0]}: {task}, {r['student']} ({r['student_params']:,} params) "
                     f"<- {r['teacher']} ({r['teacher_params']:,})", f"{100 * r['teacher_test_acc']:.2f}",
                     *(fmt(acc[m], 100) for m in METHODS), f"{100 * gap:+.2f}"])
    sizes = "; ".join(f"{t}: {r['sizes']['train']:,} / {r['sizes']['val']:,} / {r['sizes']['test']:,} "
                      f"train/val/test" for t, r in results.items())
    write(name, {"overrides": overrides, "seeds": seeds, "tasks": results, "time_s": total}, header, rows,
          f"{seeds} seeds, mean ± std of test accuracy; one teacher per task (seed 0), shared by the seeds. "
          f"{sizes}. Total {total / 60:.1f} min on one core.\n\n"
          "Sized for one CPU core (the shipped configs): AV-digits students train 20 epochs (the AV-digits "
          "set-up's 40 halved), the teacher 20. AG News is cut to a 2,000-sentence random subset of the "
          "training and test splits (validation: all 1,001) and 64 tokens (93% of the sentences whole); "
          "MiniLM is fine-tuned for 1 epoch (lr 1e-4); the students train 5 epochs (lr 1e-3, batch 32); "
          "the 16 token positions per sentence are drawn among its real tokens (mask: attention_mask).")


if __name__ == "__main__":
    main()
