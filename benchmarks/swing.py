"""Swing distillation against KD on AG News with planted canaries: how exposed the canaries are in the
student (Carlini et al.'s exposure, in bits) against its test accuracy, at CPU scale.

The setting (experiment ``agnews_swing``, data set ``agnews_canaries``): 4 sentences (``data.args.canaries``)
of a template and 3 random digits (``data.args.digits``; "my pin is 3 9 1"), each with a random label, are added
``--copies`` times to a ``--limit``-sentence training subset of AG News and flagged private (1) there;
the teacher trains on it with labels, once, into ``<work>/teacher-<epochs>e-<limit>-<copies>c/``, and
memorises them. Students (``--epochs``, every ``--seeds`` seed) distil on the same training set, canary
inputs included, through the distillation term alone (no labels: what a student learns of a canary's
label comes through the teacher):

    kd      Hinton's KD at the config's public temperature T (4)
    swing   the config's swing term: T on public rows, T_priv (32) on private ones, Laplace noise
            (b = 0.05) on the soft targets, fixed per item (its noise_seed is the run's seed)
    swing_noise, swing_temperature (ablations, not run by default): the noise alone (T_priv = T),
            the temperatures alone (no noise)

Exposure: each canary's template filled with every secret of as many digits is scored by the model's
cross-entropy on the canary's label; exposure = log2(#candidates) - log2(rank of the true secret),
averaged over the canaries (log2(10^digits) when the model singles every secret out; about log2 e = 1.44
for secrets it never saw). Accuracy: the whole AG News test subset (``--limit`` sentences). Every run
shares ``<work>/cache`` (the teacher's outputs, computed once); a student run whose config equals that of
a finished run under ``<work>/out`` is read back, not trained again.

The defaults are sized for well under 20 minutes on 2 CPU cores (one teacher of 8 epochs, 6 students of 6
epochs, 4,000 candidates scored per model).

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/swing.py [--seeds 3] [--epochs 6] [--limit 2000]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from cifar10 import finished
from common import fmt, write
from mmkd.build import build_model, load_weights
from mmkd.cli import compose
from mmkd.modalities.canaries import exposures, plant
from mmkd.modalities.text import tokenize
from mmkd.net import Net
from mmkd.run import run

METHODS = ("kd", "swing", "swing_noise", "swing_temperature")
LABELS = {"teacher": "teacher (labels, canaries included)", "kd": "KD", "swing": "Swing",
          "swing_noise": "Swing, noise only (T_priv = T)", "swing_temperature": "Swing, temperatures only (no noise)"}


def method_overrides(method: str, seed: int, cfg) -> list[str]:
    """The overrides of ``agnews_swing`` that make ``method``'s student for ``seed``."""
    args = cfg.losses.swing.args
    if method == "kd":
        return ["~losses.swing", f"+losses.kd={{weight: 1.0, args: {{temperature: {args.temperature}}}}}"]
    own = {"swing": [], "swing_noise": [f"losses.swing.args.private_temperature={args.temperature}"],
           "swing_temperature": ["losses.swing.args.noise_scale=0.0"]}[method]
    return [f"losses.swing.args.noise_seed={seed}", *own]


def canary_tokens(cfg) -> tuple[list, list[dict]]:
    """The canaries the data set plants under ``cfg`` and their candidates' tokens."""
    a = cfg.data.args
    planted = plant(a.canaries, a.digits, 4, a.canary_seed)  # AG News: 4 classes
    tokens = [tokenize(c.candidates(), tokenizer=a.get("tokenizer", "minilm"), max_length=a.max_length)
              for c in planted]
    return planted, tokens


def exposure_of(model: torch.nn.Module, inputs, planted, tokens) -> list[float]:
    """Each canary's exposure under ``model`` (evaluation mode)."""
    model.eval()
    net = Net(model, list(inputs))
    return exposures(lambda b: net(b).logits, planted, tokens)


def teacher_run(args, shared: list[str]) -> tuple[Path, dict]:
    """The teacher's run directory (trained now when absent) and its row: test accuracy and exposures."""
    folder = args.work / f"teacher-{args.teacher_epochs}e-{args.limit}-{args.copies}c"
    overrides = ["experiment=agnews_swing", f"teachers.bert.epochs={args.teacher_epochs}", *shared]
    if not (folder / "results.json").is_file():
        print(f"training the teacher for {args.teacher_epochs} epochs into {folder}", flush=True)
        run(compose([*overrides, f"run_dir={folder}", "~losses.swing", "losses.ce.weight=1.0",
                     "trainer.max_epochs=1"]))
    results = json.loads((folder / "results.json").read_text())
    cfg = compose(overrides)
    meta = json.loads((folder / "data.json").read_text())
    model = build_model(cfg.teachers.bert, meta, "teachers.bert")
    load_weights(model, str(folder), "teachers.bert.checkpoint", "bert")
    exp = exposure_of(model, cfg.teachers.bert.inputs, *canary_tokens(cfg))
    return folder, {"test_acc": results["teachers"]["bert"]["test_acc"], "exposure": exp}


def students(args, shared: list[str], teacher: Path) -> dict[str, dict[str, list]]:
    """Per method: the test accuracy, the mean exposure and the canaries' exposures of every seed."""
    out = {m: {"test_acc": [], "exposure": [], "exposures": []} for m in args.methods}
    base = compose(["experiment=agnews_swing", *shared])
    planted, tokens = canary_tokens(base)
    for seed in range(args.seeds):
        for method in args.methods:
            cfg = compose(["experiment=agnews_swing", f"seed={seed}", f"teachers.bert.checkpoint={teacher}",
                           f"trainer.max_epochs={args.epochs}", *method_overrides(method, seed, base), *shared])
            r = finished(cfg, args.work / "out") or run(cfg)
            meta = json.loads((Path(r["run_dir"]) / "data.json").read_text())
            model = build_model(cfg.student, meta, "student")
            load_weights(model, str(Path(r["run_dir"]) / "student.pt"), "student")
            exp = exposure_of(model, cfg.student.inputs, planted, tokens)
            row = out[method]
            row["test_acc"].append(r["student"]["test_acc"])
            row["exposures"].append(exp)
            row["exposure"].append(statistics.mean(exp))
            print(f"seed {seed} {method}: test acc {r['student']['test_acc']:.4f}, exposure "
                  f"{statistics.mean(exp):.2f} ({', '.join(f'{e:.2f}' for e in exp)})", flush=True)
    return out


def main() -> None:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6, help="student epochs")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--limit", type=int, default=2000, help="AG News sentences per split (training before canaries)")
    p.add_argument("--copies", type=int, default=10, help="copies of each canary in the training split")
    p.add_argument("--methods", nargs="+", default=["kd", "swing"], choices=METHODS)
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "swing",
                   help="the teacher's run, the teacher-output cache and the students' runs (kept for later runs)")
    p.add_argument("--name", default="swing", help="results/<name>.json and .md")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (e.g. data.args.digits=2)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.work = args.work.resolve()
    shared = [f"out_dir={args.work / 'out'}", f"cache_dir={args.work / 'cache'}", f"data.args.limit={args.limit}",
              f"data.args.copies={args.copies}", "trainer.tensorboard=false", "trainer.progress=off", *args.overrides]
    teacher, trow = teacher_run(args, shared)
    print(f"teacher: test acc {trow['test_acc']:.4f}, exposure {statistics.mean(trow['exposure']):.2f}", flush=True)
    t_students = time.perf_counter()
    rows = students(args, shared, teacher)
    cfg = compose(["experiment=agnews_swing", *shared])
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "setting": OmegaConf.to_container(OmegaConf.create(
                  {"data": cfg.data.args, "swing": cfg.losses.swing.args, "teacher": cfg.teachers.bert.args,
                   "student": cfg.student.args})),
              "teacher": trow, "students": rows, "student_minutes": (time.perf_counter() - t_students) / 60,
              "total_minutes": (time.perf_counter() - t0) / 60}
    write(args.name, result, *render(result))


def render(r: dict) -> tuple[list[str], list[list[str]], str]:
    """The table's header, rows and notes from a result dict (what :func:`main` writes as JSON)."""
    a, s, t = r["args"], r["setting"], r["teacher"]
    rows = [[LABELS["teacher"], f"{100 * t['test_acc']:.2f}", f"{statistics.mean(t['exposure']):.2f}",
             ", ".join(f"{e:.2f}" for e in t["exposure"])]]
    for m, row in r["students"].items():
        per_canary = [fmt([seed[k] for seed in row["exposures"]]) for k in range(len(row["exposures"][0]))]
        rows.append([LABELS[m], fmt(row["test_acc"], 100), fmt(row["exposure"]), ", ".join(per_canary)])
    d, sw = s["data"], s["swing"]
    notes = (f"{a['seeds']} seeds (mean ± std). AG News: {a['limit']} training sentences plus {d['canaries']} "
             f"canaries x {a['copies']} copies (private = 1), {a['limit']} test sentences, {d['max_length']} tokens. "
             f"Exposure in "
             f"bits over {10 ** d['digits']:,} candidates per canary (maximum {d['digits'] * math.log2(10):.2f}; "
             f"about 1.44 for a secret never seen). Teacher: BERT {s['teacher']}, {a['teacher_epochs']} epochs on "
             f"labels. Students: BERT {s['student']}, {a['epochs']} epochs on the same training set through the "
             f"distillation term alone (no labels), the final epoch's weights. KD: T = {sw['temperature']}. Swing: "
             f"T = {sw['temperature']} public, {sw['private_temperature']} private, {sw['noise']} noise of scale "
             f"{sw['noise_scale']} on the soft targets, fixed per item (noise_seed = the seed). Students took "
             f"{r['student_minutes']:.1f} min, everything {r['total_minutes']:.1f} min.")
    if {"kd", "swing"} <= set(r["students"]):
        kd, sw_ = (statistics.mean(r["students"][m]["exposure"]) for m in ("kd", "swing"))
        notes += f" Swing's mean exposure is {100 * (1 - sw_ / kd):.0f}% below KD's (the paper's measure)."
    return ["model", "test accuracy %", "exposure (bits, mean of the canaries)", "exposure of each canary"], rows, notes


if __name__ == "__main__":
    main()
