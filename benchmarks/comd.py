"""CoMD (Li et al., arXiv:2311.08213): both models' accuracy per round of competitive, bidirectional
distillation, on AV-digits (multimodal teacher, image-only student) and on CIFAR-10, against KD from
the round-0 teacher for the same student epochs.

- AV-digits: ``av_image_comd`` (the fusion teacher trained on the labels in round 0 and the student
  ``--av-epochs`` a round, 40 as the config; the teacher's competition phase ``--av-teacher-epochs``).
- CIFAR-10: ``cifar10_comd`` on ``cifar10.py``'s setting: its resnet20 teacher (trained once into
  ``<work>``) as round 0, resnet8 students ``--epochs`` a round (the protocol scaled as ``cifar10.py``
  does, each round's schedule from the start), the teacher's competition phase ``--teacher-phase-epochs``.

``--rounds`` rounds, ``--seeds`` seeds. The KD rows train the same student architecture for
``rounds x`` a round's epochs from the round-0 teacher, which does not change (no competition, no
added items). A finished run is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/comd.py [--seeds 3] [--rounds 3] [--epochs 6]
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from cifar10 import arguments, finished, prepare, shortened
from common import fmt, write
from mmkd.cli import compose
from mmkd.run import run


def comd_rows(results: list[dict]) -> list[dict]:
    """Per round, over seeds: the student's and the teacher's test accuracy, ``beats`` and ``wrong``."""
    out = []
    for r in range(len(results[0]["rounds"])):
        rows = [res["rounds"][r] for res in results]
        one = {"round": r, "teacher": [x["teacher"]["test_acc"] for x in rows if isinstance(x["teacher"], dict)]}
        if r:
            one.update(student=[x["student"]["test_acc"] for x in rows], beats=[x["beats"] for x in rows],
                       wrong=[x["wrong"] for x in rows])
        out.append(one)
    return out


def setting(name: str, results: list[dict], kd: list[float], teacher0: list[float] | None = None) -> list[list[str]]:
    """Table rows of one setting: a row per round, then the KD row."""
    table = []
    for row in comd_rows(results):
        teacher = row["teacher"] or teacher0 or []
        table.append([name, str(row["round"]), fmt(row["student"], 100) if "student" in row else "",
                      fmt(teacher, 100) if teacher else "",
                      fmt(row["beats"], 100) if "beats" in row else "",
                      f"{statistics.mean(row['wrong']):.0f}" if "wrong" in row else ""])
    table.append([name, "KD, same student epochs", fmt(kd, 100), fmt(teacher0 or comd_rows(results)[0]["teacher"], 100),
                  "", ""])
    return table


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, ["kd"], "comd")
    p.set_defaults(epochs=6, test_per_class=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--teacher-phase-epochs", type=int, default=2, help="CIFAR-10: the teacher's epochs a round")
    p.add_argument("--av-teacher-epochs", type=int, default=10, help="AV-digits: the teacher's epochs a round")
    p.add_argument("--av-epochs", type=int, default=40, help="AV-digits: the round-0 teacher's and the student's epochs")
    p.add_argument("--only", choices=["avdigits", "cifar10"], default=None)
    args, data, teacher, trow = prepare(p)
    quiet = ["trainer.tensorboard=false", "trainer.progress=off", "export=[]"]
    out: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    table: list[list[str]] = []
    if args.only in (None, "avdigits"):
        av_out = args.work.parent / "comd_avdigits"
        res, kd = [], []
        for seed in range(args.seeds):
            cfg = compose(["experiment=av_image_comd", f"seed={seed}", f"out_dir={av_out}", f"method.rounds={args.rounds}",
                           f"method.teacher_epochs={args.av_teacher_epochs}", f"trainer.max_epochs={args.av_epochs}",
                           f"teachers.fusion.epochs={args.av_epochs}", *quiet])
            done = finished(cfg, av_out)
            if done is None:
                print(f"AV-digits CoMD, seed {seed}", flush=True)
                done = run(cfg)
            res.append(done)
            epochs = cfg.trainer.max_epochs * args.rounds
            kcfg = compose(["experiment=av_image_kd_mm", f"seed={seed}", f"out_dir={av_out}", "baseline=false",
                            f"teachers.fusion.checkpoint={Path(done['run_dir']) / 'teacher0' / 'student.pt'}",
                            f"trainer.max_epochs={epochs}", *quiet])
            kd.append((finished(kcfg, av_out) or run(kcfg))["student"]["test_acc"])
            print(f"seed {seed} AV-digits: CoMD {done['student']['test_acc']:.4f}, KD {kd[-1]:.4f}", flush=True)
        out["avdigits"] = {"comd": comd_rows(res), "kd": kd}
        table += setting("AV-digits", res, kd)
    if args.only in (None, "cifar10"):
        res, kd = [], []
        base = compose(["experiment=cifar10_comd"])
        common = [f"teachers.resnet.checkpoint={teacher}", f"teachers.resnet.name={args.teacher}",
                  f"student.name={args.student}", *data]
        for seed in range(args.seeds):
            cfg = compose(["experiment=cifar10_comd", f"seed={seed}", f"method.rounds={args.rounds}",
                           f"method.teacher_epochs={args.teacher_phase_epochs}", *common,
                           *shortened(base, args.epochs)])
            done = finished(cfg, args.work / "out")
            if done is None:
                print(f"CIFAR-10 CoMD, seed {seed}", flush=True)
                done = run(cfg)
            res.append(done)
            kbase = compose(["experiment=cifar10_kd"])
            kcfg = compose(["experiment=cifar10_kd", f"seed={seed}", "baseline=false", *common,
                            *shortened(kbase, args.epochs * args.rounds)])
            kd.append((finished(kcfg, args.work / "out") or run(kcfg))["student"]["test_acc"])
            print(f"seed {seed} CIFAR-10: CoMD {done['student']['test_acc']:.4f}, KD {kd[-1]:.4f}", flush=True)
        teacher0 = [trow["test_acc"]] * args.seeds
        out["cifar10"] = {"comd": comd_rows(res), "kd": kd, "teacher": trow}
        table += setting("CIFAR-10", res, kd, teacher0)
    notes = (f"Test accuracy %, mean ± std over {args.seeds} seeds, per round (round 0: the teacher on the labels). "
             "Student beats teacher: the share of training items where the student's cross-entropy of the label is "
             "the lower (after the round's distillation); wrong: the training items the student misclassifies, "
             f"added as perturbed copies for the next round. AV-digits: av_image_comd (fusion teacher, image "
             f"student, {args.av_epochs} epochs a round; the teacher's competition phase {args.av_teacher_epochs} epochs), "
             "300 test items. CIFAR-10: the teacher "
             f"{args.teacher} ({100 * trow['test_acc']:.2f}% on the whole test split) and {args.student} students, "
             f"{args.epochs} epochs a round on {10 * args.per_class - args.val} training images, the teacher's "
             f"competition phase {args.teacher_phase_epochs} epochs, {10 * args.test_per_class:,} test images "
             "(round 0's teacher figure: the whole test split). KD: CE + KD from the round-0 teacher for "
             f"{args.rounds} rounds' student epochs. Took {(time.perf_counter() - t0) / 60:.1f} minutes. Command: "
             f"`python benchmarks/comd.py --seeds {args.seeds} --rounds {args.rounds} --epochs {args.epochs}`.")
    write(args.name, out, ["setting", "round", "student test acc", "teacher test acc", "student beats teacher %",
                           "wrong"], table, notes)


if __name__ == "__main__":
    main()
