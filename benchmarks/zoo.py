"""Every loss of the library on the CIFAR-10 setting of ``cifar10.py``: one table, 3 seeds.

The same teacher (trained once into the work folder that ``cifar10.py`` uses), student, training
subset, epochs and scaled protocol as ``cifar10.py``; each method at the settings of its paper's or
mdistiller's code (the experiment configs ``configs/experiment/cifar10_<method>.yaml``). Every method
reads the teacher from the augmentation-aware view cache (its logits and, for feature methods, the
features the method reads). Columns: test accuracy mean ± std, the student's seconds per epoch, the paper.

    MMKD_DATA=../shared/data python benchmarks/zoo.py [--seeds 3] [--methods kd at ...]
"""
from __future__ import annotations

import statistics
import time

from cifar10 import LOSSES, arguments, prepare, students
from common import fmt, write

ZOO = {  # method -> (experiment, overrides)
    **LOSSES,
    "kd_ls": ("cifar10_kd", ["losses.ce.weight=1.0", "losses.kd.weight=9.0", "losses.kd.args.temperature=2.0",
                             "+losses.kd.args.standardize=true"]),  # the official LS setting for KD
    "dkd_ls": ("cifar10_dkd", ["losses.dkd.args.alpha=9.0", "losses.dkd.args.beta=72.0",
                               "losses.dkd.args.temperature=2.0", "+losses.dkd.args.standardize=true"]),
    "uskd": ("cifar10_uskd", []),
    "taid": ("cifar10_taid", []),
    "ctkd": ("cifar10_ctkd", []),
    **{m: (f"cifar10_{m}", []) for m in ("at", "nst", "pkt", "sp", "rkd", "nd")},
    "fitnet": ("cifar10_kd", ["losses.ce.weight=1.0", "~losses.kd", "+losses.hint={loss: fitnet, weight: 100.0, "
                              "student: features.layer2, teacher: features.layer2, adapter: conv}", "student.features=[layer2]",
                              "teachers.resnet.features=[layer2]"]),  # mdistiller: the middle stage, weight 100
}
PAPERS = {
    "ce": ("CE (labels only)", "-"),
    "kd": ("KD", "Hinton et al. 2015"),
    "dkd": ("DKD", "Zhao et al., CVPR 2022"),
    "nkd": ("NKD", "Yang et al., ICCV 2023"),
    "dist": ("DIST", "Huang et al., NeurIPS 2022"),
    "bkl": ("BKL (Dual-Head KD's logit loss)", "Yang et al. 2025"),
    "pld": ("PLD (in place of CE + KD)", "Bassam et al. 2025"),
    "sinkd": ("KD + SinKD", "Cui et al., LREC-COLING 2024"),
    "kd_ls": ("KD, logit standardisation", "Sun et al., CVPR 2024"),
    "dkd_ls": ("DKD, logit standardisation", "Sun et al., CVPR 2024"),
    "uskd": ("USKD (no teacher)", "Yang et al., ICCV 2023"),
    "taid": ("TAID (t adapted from 0.4)", "Shing et al., ICLR 2025"),
    "ctkd": ("CTKD (learned temperature)", "Li et al., AAAI 2023"),
    "fitnet": ("FitNet (layer2)", "Romero et al., ICLR 2015"),
    "at": ("AT (3 stages)", "Zagoruyko and Komodakis, ICLR 2017"),
    "nst": ("NST (3 stages)", "Huang and Wang 2017"),
    "pkt": ("PKT (embedding)", "Passalis and Tefas, ECCV 2018"),
    "sp": ("SP (layer3)", "Tung and Mori, ICCV 2019"),
    "rkd": ("RKD (embedding)", "Park et al., CVPR 2019"),
    "nd": ("KD++: KD + ND (embedding)", "Wang et al. 2023"),
}


def main() -> None:
    t0 = time.perf_counter()
    args, data, teacher, trow = prepare(arguments(__doc__, list(ZOO), "zoo"))
    plan = [(m, *ZOO[m]) for m in args.methods]
    if "kd" not in args.methods:  # the CE baseline trains beside the cached KD run
        plan.insert(0, ("kd", *ZOO["kd"]))
    acc, sec, _ = students(args, data, teacher, plan)
    rows = [[f"teacher {args.teacher} ({args.teacher_epochs} epochs)", f"{100 * trow['test_acc']:.2f}", "-", "-"]]
    for method in ["ce", *(m for m, *_ in plan)]:
        label, paper = PAPERS[method]
        rows.append([label, fmt(acc[method], 100), fmt([statistics.mean(s) for s in sec[method]], 1, 1), paper])
    minutes = (time.perf_counter() - t0) / 60
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "test_acc": acc,
                      "train_s_per_epoch": sec, "minutes": minutes},
          ["method", "test accuracy %", "student s / epoch", "paper"], rows,
          f"{args.seeds} seeds (mean ± std); student {args.student}, {args.epochs} epochs on "
          f"{10 * args.per_class - args.val} CIFAR-10 training images, all 10,000 test images; teacher "
          f"{args.teacher} ({100 * trow['test_acc']:.2f}%), read from the view cache (logits and features). "
          f"{minutes:.1f} min in all. Not the 240-epoch protocol.")


if __name__ == "__main__":
    main()
