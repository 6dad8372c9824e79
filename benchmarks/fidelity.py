"""Generalisation against fidelity: does a student that matches its teacher better also generalise
better? The study of Stanton et al., "Does Knowledge Distillation Really Work?" (NeurIPS 2021), at CPU
scale, across teachers of several sizes and qualities.

GLNN (``configs/experiment/g2m_glnn.yaml``) distils GCN teachers on Cora into the same MLP student.
The teachers differ in width (``teachers.gnn.args.hidden``: ``--hidden``) and in quality: trained for
at most ``--teacher-epochs`` epochs each (the shipped cap is 500 with patience 50; fewer epochs give
under-trained teachers). Per teacher and seed, one run reports the teacher's test accuracy, the student's
test accuracy and its fidelity to the teacher on the test nodes (top-1 agreement and mean KL, the
``agree`` and ``tkl`` metrics every distillation run reports). Across all runs the script gives the
Pearson and Kendall correlations of the student's accuracy with its agreement, with its KL, and with
the teacher's accuracy, one table (per teacher, mean ± std over seeds) and one scatter plot
(``results/fidelity.png``). ``--lm`` adds a second panel from ``results/lm.json`` (written by
``lm.py``): the character-level students of one teacher under different divergences, test perplexity
against agreement.

A run whose config equals that of a finished run under ``<work>/out`` is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/fidelity.py [--seeds 3] [--hidden 8 64 256]
        [--teacher-epochs 5 20 500] [--lm]
"""
from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from common import RESULTS, fmt, kendall, pearson, pyplot, save, write
from lm import finished
from mmkd.cli import compose
from mmkd.run import run


def one(args, hidden: int, epochs: int, seed: int) -> dict:
    """The teacher's and the student's test figures of one GLNN run."""
    cfg = compose(["experiment=g2m_glnn", f"teachers.gnn.args.hidden={hidden}", f"teachers.gnn.epochs={epochs}",
                   f"seed={seed}", f"out_dir={args.work / 'out'}", f"cache_dir={args.work / 'cache'}",
                   f"data_root={args.data}", "baseline=false", "export=[]", "trainer.progress=off"])
    done = finished(cfg, args.work / "out")
    if done is None:
        print(f"teacher GCN hidden {hidden}, at most {epochs} epochs, seed {seed}", flush=True)
        done = run(cfg)
    s = done["student"]
    return {"hidden": hidden, "epochs": epochs, "seed": seed, "teacher_acc": done["teachers"]["gnn"]["test_acc"],
            "student_acc": s["test_acc"], "agree": s["test_agree"], "tkl": s["test_tkl"]}


def correlations(xs: dict[str, list[float]], ys: list[float]) -> dict[str, dict[str, float]]:
    """Pearson r and Kendall tau of ``ys`` with each series of ``xs``."""
    return {k: {"pearson": pearson(v, ys), "kendall": kendall(v, ys)} for k, v in xs.items()}


def within(runs: list[dict], key: str) -> float:
    """Pearson r of the student's accuracy with ``key`` across seeds of the same teacher: both centred on
    their teacher's mean, then pooled over teachers."""
    groups = itertools.groupby(sorted(runs, key=lambda r: (r["hidden"], r["epochs"])),
                               key=lambda r: (r["hidden"], r["epochs"]))
    xs, ys = [], []
    for _, rs in groups:
        rs = list(rs)
        mx, my = (sum(r[k] for r in rs) / len(rs) for k in (key, "student_acc"))
        xs += [r[key] - mx for r in rs]
        ys += [r["student_acc"] - my for r in rs]
    return pearson(xs, ys)


def plot(runs: list[dict], lm: list[dict] | None, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2 if lm else 1, figsize=(10 if lm else 5, 4), squeeze=False)
    ax = axes[0][0]
    hiddens, epochs = sorted({r["hidden"] for r in runs}), sorted({r["epochs"] for r in runs})
    colours, markers = plt.get_cmap("viridis"), "o^sDv"
    for (i, h), (j, e) in itertools.product(enumerate(hiddens), enumerate(epochs)):
        sel = [r for r in runs if r["hidden"] == h and r["epochs"] == e]
        ax.scatter([100 * r["agree"] for r in sel], [100 * r["student_acc"] for r in sel],
                   color=colours(i / max(1, len(hiddens) - 1)), marker=markers[j % len(markers)],
                   label=f"GCN {h}, <= {e} ep")
    ax.set(xlabel="student-teacher agreement on test nodes (%)", ylabel="student test accuracy (%)",
           title="Cora, GLNN: GCN teachers -> MLP")
    ax.legend(fontsize=6, ncol=2)
    if lm:
        ax = axes[0][1]
        for name, rows in itertools.groupby(lm, key=lambda r: r["method"]):
            rows = list(rows)
            ax.scatter([100 * r["agree"] for r in rows], [r["ppl"] for r in rows], label=name)
        ax.set(xlabel="student-teacher agreement on test tokens (%)", ylabel="student test perplexity",
               title="Tiny Shakespeare: one teacher, each divergence")
        ax.legend(fontsize=6)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--hidden", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--teacher-epochs", type=int, nargs="+", default=[5, 20, 500])
    p.add_argument("--lm", action="store_true", help="add the students of results/lm.json as a second panel")
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "fidelity")
    p.add_argument("--data", default="${oc.env:MMKD_DATA,data}")
    args = p.parse_args()
    args.work = args.work.resolve()
    runs = [one(args, h, e, s) for h in args.hidden for e in args.teacher_epochs for s in range(args.seeds)]
    acc = [r["student_acc"] for r in runs]
    data = {"runs": runs, "correlations": correlations(
        {"agreement": [r["agree"] for r in runs], "KL": [r["tkl"] for r in runs],
         "teacher accuracy": [r["teacher_acc"] for r in runs]}, acc),
        "within_teacher": {"agreement": within(runs, "agree"), "KL": within(runs, "tkl")}}
    rows = []
    for h, e in itertools.product(args.hidden, args.teacher_epochs):
        sel = [r for r in runs if r["hidden"] == h and r["epochs"] == e]
        rows.append([f"GCN {h}, <= {e} epochs", fmt([r["teacher_acc"] for r in sel], 100),
                     fmt([r["student_acc"] for r in sel], 100), fmt([r["agree"] for r in sel], 100),
                     fmt([r["tkl"] for r in sel], 1, 4)])
    lm = None
    if args.lm:
        source = json.loads((RESULTS / "lm.json").read_text())["methods"]
        lm = [{"method": m, "ppl": r["test_ppl"], "agree": r["test_agree"], "tkl": r["test_tkl"]}
              for m, rs in source.items() if m != "ce" for r in rs]
        data["lm"] = {"runs": lm, "correlations": correlations(
            {"agreement": [r["agree"] for r in lm], "KL": [r["tkl"] for r in lm]}, [r["ppl"] for r in lm])}
    plot(runs, lm, RESULTS / "fidelity.png")
    lines = [f"student accuracy against {k}: Pearson {v['pearson']:+.2f}, Kendall {v['kendall']:+.2f}"
             for k, v in data["correlations"].items()]
    lines += [f"within a teacher (seeds centred on their teacher's mean), student accuracy against {k}: "
              f"Pearson {v:+.2f}" for k, v in data["within_teacher"].items()]
    if lm:
        lines += [f"LM student perplexity against {k}: Pearson {v['pearson']:+.2f}, Kendall {v['kendall']:+.2f}"
                  for k, v in data["lm"]["correlations"].items()]
    notes = (f"Cora (public split), GLNN students (MLP 128) of GCN teachers; {len(runs)} runs, {args.seeds} seeds a "
             f"teacher (mean ± std). Correlations across all runs:\n\n" + "\n".join(f"- {x}" for x in lines)
             + "\n\nPlot: `results/fidelity.png`. Command: `python benchmarks/fidelity.py --seeds "
             f"{args.seeds} --hidden {' '.join(map(str, args.hidden))} --teacher-epochs "
             f"{' '.join(map(str, args.teacher_epochs))}{' --lm' if args.lm else ''}`.")
    write("fidelity", data, ["teacher", "teacher test acc %", "student test acc %", "agreement %", "KL"], rows,
          notes)


if __name__ == "__main__":
    main()
