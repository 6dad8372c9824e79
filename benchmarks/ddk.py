"""DDK on AG News: the distillation data re-mixed by topic towards the topics where the student lags its
teacher most (``lm_agnews_ddk``), against the same KD on the data as it is (``lm_agnews_kd``).

The teacher, a GPT-2 of ``--teacher-layers`` x ``--teacher-width`` (the shipped 4 x 256 takes about 40
minutes on 2 cores; the default here is smaller), is trained on labels once into ``<work>/teacher-...``
and loaded from there by every student (``teachers.lm.checkpoint``); its top-32 next-token
distributions are cached once. Students of ``--student-layers`` x ``--student-width`` train for
``--epochs`` with the configs' loss (CE + 0.2 forward KL at T = 1) and protocol, 3 seeds each, all on
the teacher's split (``data.args.split_seed=0``: the BPE is trained on the training texts). Reported:
each topic's test perplexity and the mean over topics (teacher-forced, :func:`fusion.perplexity`), the
overall validation / test perplexity, and DDK's domain weights per epoch (``ddk/w_<topic>`` in
``metrics.csv``), plotted in ``results/ddk.png``. A finished run is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/ddk.py [--seeds 3] [--epochs 6] [--teacher-epochs 8]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
from pathlib import Path

from common import fmt, pyplot, save, write
from fusion import perplexity, topic
from lm import common, trained
from mmkd.cli import compose
from mmkd.export import trained_model
from mmkd.modalities.lm.corpus import DOMAINS
from mmkd.registry import DATASETS
from mmkd.run import run

METHODS = {"kd": ("KD, data as it is", "lm_agnews_kd"), "ddk": ("DDK, data re-mixed by topic", "lm_agnews_ddk")}


def plot(weights: dict[int, list[dict]], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, dom in enumerate(DOMAINS):
        for seed, rows in weights.items():
            ax.plot([r["epoch"] for r in rows], [r[dom] for r in rows], color=f"C{i}", alpha=0.8,
                    label=dom if seed == 0 else None)
    ax.set(xlabel="epoch", ylabel="domain weight r (next epoch's share)", title="DDK's topic weights")
    ax.legend(fontsize=8)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--teacher-layers", type=int, default=2)
    p.add_argument("--teacher-width", type=int, default=128)
    p.add_argument("--student-layers", type=int, default=1)
    p.add_argument("--student-width", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "ddk")
    p.add_argument("--data", default="${oc.env:MMKD_DATA,data}")
    args = p.parse_args()
    args.work = args.work.resolve()
    # one split for every seed: agnews_lm trains its BPE on the training texts, so another split would give
    # the students another tokenizer than the teacher's (seeds vary the initialisation only)
    shared = ["data.args.split_seed=0", f"teachers.lm.args.n_layer={args.teacher_layers}", f"teachers.lm.args.n_embd={args.teacher_width}",
            "teachers.lm.args.n_head=4"]
    folder = args.work / f"teacher-{args.teacher_layers}x{args.teacher_width}-{args.teacher_epochs}e"
    if not (folder / "results.json").is_file():
        print(f"the teacher ({args.teacher_layers} x {args.teacher_width}, {args.teacher_epochs} epochs)", flush=True)
        run(compose(["experiment=lm_agnews_kd", f"run_dir={folder}", *shared, f"teachers.lm.epochs={args.teacher_epochs}",
                     "trainer.max_epochs=1", "student.args.n_embd=16",  # the run's own student: a placeholder
                     f"cache_dir={args.work / 'cache'}", f"data_root={args.data}",
                     "trainer.progress=off", "baseline=false", "export=[]"]))
    teacher, cfg, _ = trained_model(folder, "lm")
    data = DATASETS[cfg.data.name](root=os.environ.get("MMKD_DATA", "data"), **cfg.data.args)
    tests = [topic(data.test, k) for k in range(len(DOMAINS))]
    t_ppl = [perplexity(teacher, t)[0] for t in tests]
    student = [f"student.args.n_layer={args.student_layers}", f"student.args.n_embd={args.student_width}",
               f"trainer.max_epochs={args.epochs}", f"teachers.lm.checkpoint={folder}", *shared]
    rows, data_out, weights = [], {"teacher_test_ppl": dict(zip(DOMAINS, t_ppl)), "methods": {}}, {}
    for m, (label, exp) in METHODS.items():
        runs = []
        for seed in range(args.seeds):
            done = trained(args, [f"experiment={exp}", f"seed={seed}", *student], f"{m}, seed {seed}")
            model = trained_model(done["run_dir"])[0]
            per = {dom: perplexity(model, t)[0] for dom, t in zip(DOMAINS, tests)}
            runs.append({**done["student"], "test_ppl_topic": per, "mean_topic_ppl": statistics.mean(per.values())})
            if m == "ddk":
                with (Path(done["run_dir"]) / "student" / "metrics.csv").open() as f:
                    weights[seed] = [{"epoch": int(r["epoch"]), **{d: float(r[f"ddk/w_{d}"]) for d in DOMAINS}}
                                     for r in csv.DictReader(f)]
        data_out["methods"][m] = runs
        rows.append([label, *(fmt([r["test_ppl_topic"][d] for r in runs], 1, 2) for d in DOMAINS),
                     fmt([r["mean_topic_ppl"] for r in runs], 1, 2), fmt([r["val_ppl"] for r in runs], 1, 2),
                     fmt([r["test_ppl"] for r in runs], 1, 2)])
    rows.append(["teacher", *(f"{v:.2f}" for v in t_ppl), f"{statistics.mean(t_ppl):.2f}", "", ""])
    data_out["weights"] = weights
    plot(weights, Path(__file__).parent / "results" / "ddk.png")
    final = {d: fmt([w[-1][d] for w in weights.values()], 1, 3) for d in DOMAINS}
    notes = (f"AG News (agnews_lm: BPE 2,048, one text per 64-token block). Teacher GPT-2 {args.teacher_layers} x "
             f"{args.teacher_width}, {args.teacher_epochs} epochs on labels; students {args.student_layers} x "
             f"{args.student_width}, {args.epochs} epochs, CE + 0.2 KL(p_T || p_S) (T = 1), {args.seeds} seeds (mean "
             f"± std). Per-topic columns: teacher-forced test perplexity on that topic's test texts. DDK's weights "
             f"after the last epoch: " + ", ".join(f"{d} {v}" for d, v in final.items()) + " (curves: "
             f"`results/ddk.png`). Command: `python benchmarks/ddk.py --seeds {args.seeds} --epochs {args.epochs} "
             f"--teacher-epochs {args.teacher_epochs}`.")
    write("ddk", data_out, ["student", *DOMAINS, "mean over topics", "val ppl", "test ppl"], rows, notes)


if __name__ == "__main__":
    main()
