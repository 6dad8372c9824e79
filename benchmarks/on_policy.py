"""On-policy distillation on Tiny Shakespeare: GKD's student-generated data against supervised KD, and
MGSR's sequence correction (DAC-KL on the student's samples, with and without it).

A 2 x 128 character-level GPT-2 trained on labels for ``--teacher-epochs`` (``lm_shakespeare_ce``,
cached into ``<work>``) is the teacher of 1 x 64 students, each trained for ``--epochs`` on the
training blocks with the protocol of ``configs/setup/shakespeare.yaml``:

- labels: the LM loss alone (no teacher);
- supervised KD: GKD's generalised JSD (beta 0.5) on the corpus's blocks (lambda 0; teacher cached);
- GKD: the same loss, a batch replaced by the student's continuations of its first half with
  probability lambda = 0.5 (``lm_shakespeare_gkd``; teacher live);
- DAC-KL on samples: DAC-KL with lambda = 0.5, the samples uncorrected;
- MGSR: the same with each sample corrected once by the teacher (``lm_shakespeare_mgsr``).

GKD's and MGSR's claims are about what the student generates, so besides validation / test perplexity
each student continues the first ``--prompt`` characters of every test block (temperature 1, seeded)
and the teacher judges the continuation: its negative log-likelihood per sampled character, and the
reverse KL ``KL(p_S || p_T)`` per sampled position (the quantity on-policy training lowers where the
student goes). Mean ± std over ``--seeds`` seeds; a finished run is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/on_policy.py [--seeds 3] [--first-seed 0] [--epochs 2] [--teacher-epochs 4]
"""
from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from common import fmt, write
from lm import train_seconds, trained
from mmkd.export import trained_model
from mmkd.modalities.lm.on_policy import OnPolicy
from mmkd.net import Net
from mmkd.registry import DATASETS

TEACHER = ["teachers.lm.args.n_layer=2", "teachers.lm.args.n_embd=128", "teachers.lm.args.n_head=4",
           "teachers.lm.args.dropout=0.0"]
METHODS = {  # method -> (label, overrides)
    "ce": ("labels only (CE)", ["experiment=lm_shakespeare_ce"]),
    "sup": ("supervised KD (GJSD, lambda 0)", ["experiment=lm_shakespeare_gjsd"]),
    "gkd": ("GKD (GJSD, lambda 0.5)", ["experiment=lm_shakespeare_gkd"]),
    "dac": ("DAC-KL on student samples", ["experiment=lm_shakespeare_mgsr", "name=lm_shakespeare_dac_samples",
                                          "transforms.0.args.correct=false"]),
    "mgsr": ("MGSR (DAC-KL on corrected samples)", ["experiment=lm_shakespeare_mgsr"]),
}


def judged(run_dir: str, teacher: torch.nn.Module, blocks, prompt: int, seed: int) -> dict:
    """The teacher's verdict on the student's continuations of every block: its NLL per sampled
    character and ``KL(p_S || p_T)`` per sampled position (nats)."""
    student = trained_model(run_dir)[0]
    batch = blocks.__getitems__(list(range(len(blocks))))
    nets = [Net(m, ["input_ids"], tokens="mask") for m in (student, teacher)]
    new = OnPolicy(lambda_=1.0, prompt=prompt, seed=seed)(batch, nets[0], nets[1:])
    with torch.no_grad():
        log_t, log_s = (F.log_softmax(m(new["input_ids"])[new["mask"]].float(), -1) for m in (teacher, student))
    nll = -log_t.gather(1, new["label"][:, None]).mean()
    return {"sample_nll": float(nll), "sample_rkl": float((log_s.exp() * (log_s - log_t)).sum(-1).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from here (to split one table's runs across processes; a final call reads them back)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--teacher-epochs", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64, help="characters of each test block the students continue")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "on_policy")
    p.add_argument("--data", default="${oc.env:MMKD_DATA,data}")
    p.add_argument("--name", default="on_policy", help="the results' name (results/<name>.{json,md})")
    args = p.parse_args()
    args.work = args.work.resolve()
    t_done = trained(args, ["experiment=lm_shakespeare_ce", "name=on_policy_teacher",
                            f"trainer.max_epochs={args.teacher_epochs}"], "the teacher (2 x 128)")
    t_run = Path(t_done["run_dir"])
    teacher, cfg, _ = trained_model(t_run)
    blocks = DATASETS[cfg.data.name](root=os.environ.get("MMKD_DATA", "data"), **cfg.data.args).test
    t_row = {k: t_done["student"][k] for k in ("val_ppl", "test_ppl")}
    t_row.update(judged(str(t_run), teacher, blocks, args.prompt, 0))
    rows, data = [], {"teacher": t_row, "epochs": args.epochs, "seeds": args.seeds, "methods": {}}
    student = ["student.args.n_layer=1", "student.args.n_embd=64", f"trainer.max_epochs={args.epochs}"]
    for m in args.methods:
        label, overrides = METHODS[m]
        kd = [] if m == "ce" else [f"teachers.lm.checkpoint={t_run / 'student' / 'best.pt'}", *TEACHER]
        runs = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            done = trained(args, [*overrides, f"seed={seed}", *student, *kd], f"{m}, seed {seed}")
            runs.append({**done["student"], **judged(done["run_dir"], teacher, blocks, args.prompt, seed),
                         "train_s": statistics.mean(train_seconds(Path(done["run_dir"]) / "student"))})
        data["methods"][m] = runs
        rows.append([label, *(fmt([r[k] for r in runs], 1, 3) for k in ("val_ppl", "test_ppl", "sample_nll",
                                                                          "sample_rkl")),
                     f"{statistics.mean(r['train_s'] for r in runs):.1f}"])
    rows.append(["teacher (2 x 128, its own samples)", f"{t_row['val_ppl']:.3f}", f"{t_row['test_ppl']:.3f}",
                 f"{t_row['sample_nll']:.3f}", "0", ""])
    notes = (f"Teacher: GPT-2 2 x 128 on labels for {args.teacher_epochs} epochs; students: 1 x 64, {args.epochs} "
             f"epochs, {args.seeds} seeds (mean ± std). Sample NLL / RKL: each student continues the first "
             f"{args.prompt} characters of all {len(blocks)} test blocks to 128 (temperature 1, seeded by the "
             f"student's seed); the teacher's NLL per sampled character and KL(p_S || p_T) per sampled position, "
             f"nats (lower: the teacher finds the student's text likelier). Command: `python benchmarks/on_policy.py "
             f"--seeds {args.seeds} --epochs {args.epochs} --teacher-epochs {args.teacher_epochs}"
             f"{' --methods ' + ' '.join(args.methods) if args.methods != list(METHODS) else ''}"
             f"{f' --name {args.name}' if args.name != 'on_policy' else ''}`.")
    write(args.name, data, ["student", "val ppl", "test ppl", "sample NLL (teacher)", "sample KL(S || T)",
                              "s / epoch"], rows, notes)


if __name__ == "__main__":
    main()
