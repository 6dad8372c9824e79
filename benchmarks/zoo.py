"""Every loss of the library on the CIFAR-10 setting of ``cifar10.py``: one table, 3 seeds.

The same teacher (trained once into the work folder that ``cifar10.py`` uses), student, training
subset, epochs and scaled protocol as ``cifar10.py``; each method at the settings of its paper's or
mdistiller's code (the experiment configs ``configs/experiment/cifar10_<method>.yaml``). Every method
reads the teacher from the augmentation-aware view cache (its logits and, for feature methods, the
features the method reads). Columns: test accuracy mean ± std, the number of seeds, the student's seconds
per epoch, the paper. A run whose config equals a finished one under ``<work>/out`` is read back, so
invocations add seeds; ``--only-finished`` renders the table from what exists.

    MMKD_DATA=../shared/data python benchmarks/zoo.py [--seeds 3] [--methods kd at ...]
"""
from __future__ import annotations

import statistics
import time

from cifar10 import LOSSES, arguments, prepare, students
from common import fmt, write

VIT = ["student.name=vit_tiny", "student.args={dim: 96, heads: 3}", "losses.ofa_branches.args.dim=96"]
ZOO = {  # method -> (experiment, overrides)
    **LOSSES,
    "kd_ls": ("cifar10_kd", ["losses.ce.weight=1.0", "losses.kd.weight=9.0", "losses.kd.args.temperature=2.0",
                             "+losses.kd.args.standardize=true"]),  # the official LS setting for KD
    # the official LS setting for DKD (tools/train.py --logit-stand --kd-weight 9): alpha 1 x 9, beta set from
    # the already scaled alpha (9 x 9 = 81), and DKD's own T = 4 kept (--base-temp sets KD's temperature only)
    "dkd_ls": ("cifar10_dkd", ["losses.dkd.args.alpha=9.0", "losses.dkd.args.beta=81.0",
                               "+losses.dkd.args.standardize=true"]),
    "uskd": ("cifar10_uskd", []),
    "taid": ("cifar10_taid", []),
    "ctkd": ("cifar10_ctkd", []),
    "tgeo": ("cifar10_tgeo", []),
    "gld": ("cifar10_gld", []),
    "gld_10k": ("cifar10_gld", ["losses.gld.weight=10000.0"]),
    **{m: (f"cifar10_{m}", []) for m in ("at", "nst", "pkt", "sp", "rkd", "nd", "crd", "ofd", "vid", "kdsvd",
                                         "reviewkd")},
    "fitnet": ("cifar10_kd", ["losses.ce.weight=1.0", "~losses.kd", "+losses.hint={loss: fitnet, weight: 100.0, "
                              "student: features.layer2, teacher: features.layer2, adapter: conv}", "student.features=[layer2]",
                              "teachers.resnet.features=[layer2]"]),  # mdistiller: the middle stage, weight 100
    # across families: a ViT student (width 96) of the CNN teacher, with KD (and CE beside it) and with OFA
    "vit_kd": ("cifar10_ofa", [*VIT, "~losses.ofa", "~losses.ofa_branches", "student.features=[]",
                               "+losses.kd={weight: 1.0, args: {temperature: 4.0}}"]),
    "vit_ofa": ("cifar10_ofa", VIT),
}
BASELINES = {"kd": "ce", "vit_kd": "vit_ce"}  # the run that also trains its student on labels alone
PAPERS = {
    "ce": ("CE (labels only)", "-"),
    "kd": ("KD", "Hinton et al. 2015"),
    "dkd": ("DKD", "Zhao et al., CVPR 2022"),
    "nkd": ("NKD", "Yang et al., ICCV 2023"),
    "dist": ("DIST", "Huang et al., NeurIPS 2022"),
    "bkl": ("BKL (Dual-Head KD's logit loss)", "Yang et al. 2025"),
    "pld": ("PLD (in place of CE + KD)", "Bassam et al. 2025"),
    "sinkd": ("KD + SinKD", "Cui et al., LREC-COLING 2024"),
    "tgeo": ("TGeo-KD (per-sample CE/KD ratio)", "Hu et al., ICLR 2024"),
    "gld": ("KD + GLD (weight 1000)", "Wang et al., NeurIPS 2025"),
    "gld_10k": ("KD + GLD (weight 10000)", "Wang et al., NeurIPS 2025"),
    "crd": ("CRD (embedding, memory banks)", "Tian et al., ICLR 2020"),
    "ofd": ("OFD (3 pre-ReLU stages)", "Heo et al., ICCV 2019"),
    "vid": ("VID (3 stages)", "Ahn et al., CVPR 2019"),
    "kdsvd": ("KDSVD (3 stages)", "Lee et al., ECCV 2018"),
    "reviewkd": ("ReviewKD (3 stages + embedding)", "Chen et al., CVPR 2021"),
    "vit_ce": ("ViT-96 student: CE (labels only)", "-"),
    "vit_kd": ("ViT-96 student: KD", "Hinton et al. 2015"),
    "vit_ofa": ("ViT-96 student: OFA-KD (3 blocks)", "Hao et al., NeurIPS 2023"),
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
    p = arguments(__doc__, list(ZOO), "zoo")
    p.add_argument("--only-finished", action="store_true",
                   help="train nothing: the table from the finished runs under <work>/out (fewer seeds where missing)")
    args, data, teacher, trow = prepare(p)
    plan = [(m, *ZOO[m]) for m in args.methods]
    acc, sec, _ = students(args, data, teacher, plan, BASELINES, train=not args.only_finished)
    rows = [[f"teacher {args.teacher} ({args.teacher_epochs} epochs)", f"{100 * trow['test_acc']:.2f}", "-", "-", "-"]]
    for method in [m for m, *_ in plan for m in ([BASELINES[m]] if m in BASELINES else []) + [m]]:
        if method in acc:
            label, paper = PAPERS[method]
            rows.append([label, fmt(acc[method], 100), str(len(acc[method])),
                         fmt([statistics.mean(s) for s in sec[method]], 1, 1), paper])
    minutes = (time.perf_counter() - t0) / 60
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "test_acc": acc,
                      "train_s_per_epoch": sec, "minutes": minutes},
          ["method", "test accuracy %", "seeds", "student s / epoch", "paper"], rows,
          f"mean ± std over the seeds; student {args.student} (unless named), {args.epochs} epochs on "
          f"{10 * args.per_class - args.val} CIFAR-10 training images, all 10,000 test images; teacher "
          f"{args.teacher} ({100 * trow['test_acc']:.2f}%), read from the view cache (logits and features). "
          f"Each method's schedule scaled to the epochs. Not the 240-epoch protocol.")


if __name__ == "__main__":
    main()
