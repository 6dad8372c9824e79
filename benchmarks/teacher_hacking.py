"""Teacher hacking at CPU scale ("On Teacher Hacking in Language Model Distillation", Tiapkin et al.,
ICML 2025): an oracle LM, a teacher distilled from it, a student distilled from the teacher; the proxy
metric (student-to-teacher KL) and the golden metric (student-to-oracle KL) tracked over training, for
offline data (a fixed set of oracle samples), offline data four times as diverse (four times the
samples, the same steps), and online data (fresh oracle samples every epoch).

One run (``experiment=lm_shakespeare_fkl``, cached once into ``<work>``) trains the oracle, a 2 x 128
GPT-2 on Tiny Shakespeare's labels (its teacher ``lm``), and distils the teacher, 2 x 64, from it
(its student, forward KL on the corpus). Each study run then distils a 1 x 64 student from that
teacher with forward KL on sequences from the oracle (policy ``sampled``: the first ``--prompt``
characters of training blocks continued to 129 characters at temperature 1): ``offline``
``--count`` sequences drawn once, ``diverse`` 4 x ``--count`` drawn once, ``online`` ``--count`` fresh
ones every epoch; every setting takes the same number of optimizer steps, at a constant learning rate
(AdamW, 2e-3). After every epoch: ``val/tkl`` (proxy) and ``val/golden`` (callback ``golden``) on
Tiny Shakespeare's validation split. Writes ``results/teacher_hacking.{json,md,png}``: per setting and
seed the final and minimum golden metric and the step of the minimum, the proxy on the training sequences (``train/fkl``)
and held out, whether golden rose from its minimum by the end while the training proxy kept falling
(the paper's signature), and the curves.

    MMKD_DATA=../shared/data python benchmarks/teacher_hacking.py [--seeds 3] [--count 64] [--epochs 100]
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

from common import fmt, pyplot, save, write
from lm import finished
from mmkd.cli import compose
from mmkd.run import run

SETTINGS = {"offline": (1, 0), "diverse": (4, 0), "online": (1, 1)}  # (count multiple, every)
LABELS = {"offline": "offline, fixed samples", "diverse": "offline, 4x the samples", "online": "online, fresh samples"}


def common(args) -> list[str]:
    return [f"out_dir={args.work / 'out'}", f"cache_dir={args.work / 'cache'}", f"data_root={args.data}",
            "trainer.progress=off", "baseline=false", "export=[]"]


def trained(cfg) -> dict:
    done = finished(cfg, Path(cfg.out_dir))
    return done if done is not None else run(cfg)


def oracle_and_teacher(args) -> Path:
    """The run whose teacher ``lm`` is the oracle and whose student is the study's teacher."""
    print("the oracle (2 x 128) and the teacher (2 x 64)", flush=True)
    cfg = compose(["experiment=lm_shakespeare_fkl", "name=hacking_oracle", "teachers.lm.args.n_layer=2",
                   "teachers.lm.args.n_embd=128", "teachers.lm.args.n_head=4", f"teachers.lm.epochs={args.oracle_epochs}",
                   "student.args.n_embd=64", f"trainer.max_epochs={args.oracle_epochs}", *common(args)])
    return Path(trained(cfg)["run_dir"])


def study(args, base: Path, setting: str, seed: int) -> list[dict]:
    times, every = SETTINGS[setting]
    epochs = args.epochs // times
    model = f"model: '{base}', model_name: lm"
    cfg = compose([
        "experiment=lm_shakespeare_fkl", f"name=hacking_{setting}", f"seed={seed}", "teachers.lm.cache=false",
        f"teachers.lm.checkpoint={base / 'student' / 'best.pt'}", "teachers.lm.args.n_layer=2",
        "teachers.lm.args.n_embd=64", "teachers.lm.args.n_head=4", "student.args.n_layer=1", "student.args.n_embd=64",
        f"policies=[{{name: sampled, args: {{{model}, count: {times * args.count}, prompt: {args.prompt}, "
        f"every: {every}, seed: {seed}}}}}]", f"callbacks=[{{name: golden, args: {{{model}}}}}]",
        "trainer.metrics=[ppl,acc,tkl]", f"trainer.max_epochs={epochs}", "trainer.scheduler=none",
        "trainer.warmup_epochs=0", *common(args)])
    print(f"{setting}, seed {seed}", flush=True)
    done = trained(cfg)
    with (Path(done["run_dir"]) / "student" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = -(-times * args.count // cfg.trainer.batch_size)
    return [{"step": int(r["epoch"]) * steps, "train_proxy": float(r["train/fkl"]), "proxy": float(r["val/tkl"]),
             "golden": float(r["val/golden"])} for r in rows]


def hacked(curve: list[dict]) -> bool:
    """The paper's signature: after the golden metric's minimum, golden rose (it ended more than 1% above
    the minimum) while the proxy the student optimises (its KL from the teacher on its training
    sequences) kept falling (it ended below its value at golden's minimum)."""
    low = min(range(len(curve)), key=lambda i: curve[i]["golden"])
    return curve[-1]["golden"] > 1.01 * curve[low]["golden"] and curve[-1]["train_proxy"] < curve[low]["train_proxy"]


def plot(curves: dict[str, list[list[dict]]], path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), sharey=True, squeeze=False)
    for ax, (setting, runs) in zip(axes[0], curves.items()):
        for i, curve in enumerate(runs):
            steps = [c["step"] for c in curve]
            for key, colour, label in (("train_proxy", "tab:cyan", "proxy, training sequences"),
                                       ("proxy", "tab:blue", "proxy: KL(teacher || student), held out"),
                                       ("golden", "tab:red", "golden: KL(oracle || student), held out")):
                ax.plot(steps, [c[key] for c in curve], color=colour, alpha=0.8, label=label if i == 0 else None)
        ax.set(title=LABELS[setting], xlabel="optimizer steps")
    axes[0][0].set_ylabel("mean KL per token, validation (nats)")
    axes[0][0].legend(fontsize=7)
    save(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--count", type=int, default=64, help="sequences of the offline set (and of each online draw)")
    p.add_argument("--epochs", type=int, default=100, help="epochs over the offline set (the diverse set: a quarter)")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--oracle-epochs", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "teacher_hacking")
    p.add_argument("--data", default="${oc.env:MMKD_DATA,data}")
    args = p.parse_args()
    args.work = args.work.resolve()
    base = oracle_and_teacher(args)
    curves = {s: [study(args, base, s, seed) for seed in range(args.seeds)] for s in SETTINGS}
    rows = []
    for s, runs in curves.items():
        low = [min(c["golden"] for c in r) for r in runs]
        at = [min(r, key=lambda c: c["golden"])["step"] for r in runs]
        rows.append([LABELS[s], fmt([r[-1]["train_proxy"] for r in runs], 1, 4), fmt([r[-1]["proxy"] for r in runs], 1, 4),
                     fmt([min(c["proxy"] for c in r) for r in runs], 1, 4), fmt([r[-1]["golden"] for r in runs], 1, 4),
                     fmt(low, 1, 4), fmt([float(a) for a in at], 1, 0), f"{sum(hacked(r) for r in runs)} of {len(runs)}"])
    plot(curves, Path(__file__).parent / "results" / "teacher_hacking.png")
    notes = (f"Oracle GPT-2 2 x 128, teacher 2 x 64 distilled from it, student 1 x 64 distilled from the teacher (forward "
             f"KL, live teacher); {args.count} offline sequences of {args.prompt} prompt + {129 - args.prompt} sampled "
             f"characters, {args.epochs} epochs ({args.seeds} seeds, mean ± std). Proxy: KL(teacher || student) per token, "
             f"on the training sequences (the epoch's mean, as trained) and on the validation split; golden: "
             f"KL(oracle || student) on the validation split. Hacked: after golden's minimum, golden rose by more than 1% "
             f"while the training proxy kept falling. Curves: `results/teacher_hacking.png`. "
             f"Command: `python benchmarks/teacher_hacking.py --seeds {args.seeds} --count {args.count} --epochs "
             f"{args.epochs}`.")
    write("teacher_hacking", {"curves": curves, "count": args.count, "epochs": args.epochs}, [
        "data", "final proxy (train)", "final proxy (held out)", "min proxy (held out)", "final golden", "min golden",
        "step of min golden", "hacked"], rows, notes)


if __name__ == "__main__":
    main()
