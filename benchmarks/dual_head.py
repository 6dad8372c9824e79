"""Dual-head students on the AV-digits images, from a CNN teacher trained on every training label (one
per seed, its outputs cached):

* DHO (Kang et al., arXiv:2505.07675), semi-supervised (``--fractions`` of the training labels kept,
  the rest unlabelled): DHO with the official procedure (experiment ``dho_avdigits``: paired labelled /
  unlabelled batches, 0.5 * CE + 0.5 * (KD_L + KD_U), alpha / beta searched every epoch) and our
  variant (one mixed batch, CE + KD, one search after the fit) vs single-head KD vs CE on the labels alone;
* Dual-Head KD (Yang et al., arXiv:2411.08937), fully supervised: the official setting (experiment
  ``dhkd_avdigits``: non-linear auxiliary head, bkl at T = 2, gradient alignment over all parameters),
  without alignment, and with our feature-level alignment, vs single-head KD vs CE.

Every student of a seed is the same ``dual_head`` model from the same initialisation; CE and single-head
KD use its CE head alone (``inference: ce``, the KD term on its logits).

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/dual_head.py [--seeds 3]
        [--parts dho dhkd] [--fractions 0.01 0.1] [--dho OVERRIDE ...] [--name NAME] [overrides ...]

``--dho`` changes the official-procedure DHO rows and their KD / CE baselines only (an ablation): e.g.
``--parts dho --dho data.args.epoch=unlabelled trainer.max_epochs=40 trainer.warmup_epochs=4 --name
dual_head_epochs`` makes an epoch one pass over the unlabelled pool instead of the (tiny) labelled one.
"""
from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from common import fmt, mean_std, write
from mmkd.cli import compose
from mmkd.run import run

SINGLE = ["student.args.inference=ce", "student.features=[]", "backward=null"]
# our DHO variant: labelled and unlabelled items shuffled into one batch, CE + KD, one search after the fit
DHO_OURS = ["data.args.batches=mixed", "student.args.search=end", "losses.ce.weight=1.0", "losses.kd.weight=1.0",
            "losses.kd.group=null", "trainer.max_epochs=40", "trainer.scheduler=cosine", "trainer.warmup_epochs=0"]
KD_FULL = "+losses.kd={weight: 1.0, args: {temperature: 4.0}}"  # the official DHKD script's KD (kd_T = 4)

LABELS = {  # key -> (row label, official procedure or our variant)
    "ce": ("CE (labelled only)", "baseline"), "kd": ("single-head KD", "baseline"),
    "dho": ("DHO", "official procedure"), "dho_ours": ("DHO, mixed batch + one search at the end", "our variant"),
    "full ce": ("CE", "baseline"), "full kd": ("single-head KD", "baseline"),
    "full dhkd_align": ("Dual-Head KD + gradient alignment over all parameters", "official procedure"),
    "full dhkd": ("Dual-Head KD, no alignment", "official, --not_ga"),
    "full dhkd_features": ("Dual-Head KD + alignment on the shared features", "our variant"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--parts", nargs="+", choices=["dho", "dhkd"], default=["dho", "dhkd"])
    p.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    p.add_argument("--dho", nargs="*", default=[], metavar="OVERRIDE",
                   help="config overrides for the official-procedure DHO rows and their KD / CE baselines only "
                        "(an ablation, e.g. data.args.epoch=unlabelled trainer.max_epochs=40)")
    p.add_argument("--name", default="dual_head")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    acc: dict[str, list[float]] = {}
    picked: dict[str, list[list[float]]] = {}
    start = time.perf_counter()

    def record(key: str, value: float, seed: int) -> None:
        acc.setdefault(key, []).append(value)
        print(f"seed {seed} {key}: {100 * value:.2f}", flush=True)

    def alpha_beta(key: str, r: dict, seed: int) -> None:
        state = torch.load(Path(r["run_dir"]) / "student.pt")
        picked.setdefault(key, []).append([round(state["alpha"].item(), 2), state["beta"].item()])
        print(f"seed {seed} {key}: alpha {state['alpha'].item():.2f}, beta {state['beta'].item()}", flush=True)

    with tempfile.TemporaryDirectory() as out:
        common = [f"out_dir={out}", "export=[]", "trainer.tensorboard=false", "trainer.progress=off", *args.overrides]
        for seed in range(args.seeds):
            # the teacher (all training labels), Dual-Head KD (official setting) and CE on all labels
            first = run(compose(["experiment=dhkd_avdigits", f"seed={seed}", "baseline=true", *common]))
            record("teacher", first["teachers"]["cnn"]["test_acc"], seed)
            teacher = [f"teachers.cnn.checkpoint={first['run_dir']}"]
            if "dhkd" in args.parts:
                record("full ce", first["baseline"]["test_acc"], seed)
                record("full dhkd_align", first["student"]["test_acc"], seed)
                for key, extra in (("full dhkd", ["backward=null"]),
                                   ("full dhkd_features", ["backward=null", "student.args.align=features"])):
                    r = run(compose(["experiment=dhkd_avdigits", f"seed={seed}", *extra, "baseline=false",
                                     *teacher, *common]))
                    record(key, r["student"]["test_acc"], seed)
                r = run(compose(["experiment=dhkd_avdigits", f"seed={seed}", "~losses.bkl", *SINGLE, KD_FULL,
                                 "baseline=false", *teacher, *common]))
                record("full kd", r["student"]["test_acc"], seed)
            if "dho" in args.parts:
                for frac in args.fractions:
                    data = [f"data.args.fraction={frac}", f"data.args.seed={seed}"]
                    for key, extra in (("dho", args.dho), ("dho_ours", DHO_OURS)):
                        r = run(compose(["experiment=dho_avdigits", f"seed={seed}", *data, *extra, *teacher,
                                         "baseline=false", *common]))
                        record(f"{frac} {key}", r["student"]["test_acc"], seed)
                        alpha_beta(f"{frac} {key}", r, seed)
                    r = run(compose(["experiment=dho_avdigits", f"seed={seed}", *data, *SINGLE, *args.dho,
                                     "losses.kd.student=logits", "baseline=true", *teacher, *common]))
                    record(f"{frac} kd", r["student"]["test_acc"], seed)
                    record(f"{frac} ce", r["baseline"]["test_acc"], seed)
    report(args, acc, picked, (time.perf_counter() - start) / 60)


def report(args: argparse.Namespace, acc: dict[str, list[float]], picked: dict[str, list[list[float]]],
           minutes: float) -> None:
    dho = compose(["experiment=dho_avdigits", *args.overrides, *args.dho])
    dhkd = compose(["experiment=dhkd_avdigits", *args.overrides])
    rows = [["both", "teacher: CNN, all training labels", "", fmt(acc["teacher"], 100), ""]]
    for frac in args.fractions if "dho" in args.parts else []:
        setting = f"semi-supervised, {100 * frac:g}% labels"
        for method in ("ce", "kd", "dho", "dho_ours"):
            ab = ", ".join(f"{a:g} / {b:g}" for a, b in picked.get(f"{frac} {method}", []))
            rows.append([setting, *LABELS[method], fmt(acc[f"{frac} {method}"], 100), ab])
    if "dhkd" in args.parts:
        for method in ("ce", "kd", "dhkd_align", "dhkd", "dhkd_features"):
            rows.append(["fully supervised", *LABELS[f"full {method}"], fmt(acc[f"full {method}"], 100), ""])
    margins = {}
    for key in acc:
        setting, method = key.split(" ", 1) if " " in key else (None, key)
        if method in ("dho", "dho_ours", "dhkd", "dhkd_align", "dhkd_features"):
            for base in ("ce", "kd"):
                margins[f"{key} - {base}"] = 100 * (mean_std(acc[key])[0] - mean_std(acc[f"{setting} {base}"])[0])
    t, td, teacher = dho.trainer, dhkd.trainer, dhkd.teachers.cnn
    labels = ", ".join(f"{100 * f:g}%: {10 * max(1, round(240 * f))}" for f in args.fractions)
    epoch_end = {"shorter": "shorter pool, the labelled one", "labelled": "labelled pool",
                 "unlabelled": "unlabelled pool"}[dho.data.args.get("epoch") or "shorter"]
    notes = (
        (f"Ablation: the DHO rows and their KD / CE baselines with {' '.join(args.dho)}. " if args.dho else "")
        + f"{len(acc['teacher'])} seeds (mean ± std of test accuracy, AV-digits test split, 300 images; image key "
        f"only). The teacher (CNN {list(teacher.args.channels)}, {teacher.epochs} epochs) is trained on all 2,400 "
        "training labels once per seed; it stands in for DHO's zero-shot vision-language teacher. Students: "
        f"`dual_head` on an MLP {list(dho.student.args.backbone.args.hidden)} backbone, AdamW, "
        "the same initialisation for every method of a seed. DHO rows (official procedure): every step one "
        f"labelled and one unlabelled batch of {t.batch_size} (an epoch ends with the {epoch_end}), "
        f"{t.max_epochs} epochs, lr {t.lr} with a linear warm-up over {t.warmup_epochs:g} epochs and linear decay, "
        f"weight decay {t.weight_decay}; loss {dho.losses.ce.weight} * CE (labelled rows) + "
        f"{dho.losses.kd.weight} * (KD_L + KD_U), each KD the mean over its own batch (kl at T = "
        f"{dho.losses.kd.args.temperature}, T^2-scaled); alpha / beta searched on the validation split (300 "
        "labelled images) after every epoch and the "
        "epoch of the best searched accuracy kept. Our DHO variant: one batch of labelled and unlabelled items "
        "mixed, CE weight 1, KD weight 1 over the mixed batch, 40 epochs, cosine schedule (the earlier config), "
        "one search after the fit. Single-head KD and CE in "
        "the semi-supervised rows use "        "the official DHO data (paired batches) and loss weights. Semi-supervised: a stratified labelled subset "
        f"drawn with the run's seed (240 training images per class; labels kept: {labels}), the other training "
        f"images unlabelled. Dual-Head KD rows: {td.max_epochs} epochs, batch {td.batch_size}, lr {td.lr}, weight "
        f"decay {td.weight_decay}; CE weight {dhkd.losses.ce.weight} on the main head, bkl at T = "
        f"{dhkd.losses.bkl.args.temperature}, weight {dhkd.losses.bkl.weight}, on the non-linear auxiliary head "
        f"({dhkd.student.args.aux_head}: Linear-Dropout-BatchNorm-ReLU-Linear, 200 units); single-head KD: kl at "
        "T = 4, weight 1 (the official script's kd_T). The official scripts' learning rates (DHO: AdamW lr 1e-3 "
        "on a pretrained ResNet-18; Dual-Head KD: SGD lr 0.05, 240 epochs on CIFAR-100) "
        "are not used: they belong to other models and data. Margins (mean, points): "
        + "; ".join(f"{k} {v:+.2f}" for k, v in margins.items()) + f". Total wall time {minutes:.1f} min.")
    write(args.name, {"overrides": args.overrides, "dho_overrides": args.dho, "seeds": len(acc["teacher"]), "fractions": args.fractions,
                      "test_acc": acc, "dho_alpha_beta": picked, "margins_pct_points": margins,
                      "wall_min": minutes},
          ["setting", "method", "procedure", "test accuracy %", "DHO alpha / beta per seed"], rows, notes)


if __name__ == "__main__":
    main()
