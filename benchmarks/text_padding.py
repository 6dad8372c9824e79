"""Epoch time of a small BERT student with batches padded to ``max_length`` vs to their longest sentence.

Two sets from AG News (``<data root>/agnews/dev.tsv``): its first ``--n`` sentences cut to their first
``--words`` words (short texts, read through the ``text_csv`` data set from a TSV file written to a
temporary folder), and the same sentences whole (the ``agnews`` data set). Both are stored padded to
``--max-length`` tokens; ``dynamic_padding`` cuts each batch to its longest sentence. The student is
``text_transformer`` (width 128, 2 layers, 2 heads: the student of ``trg_agnews``) trained with CE.
Every seed trains both paddings from the same initialisation on the same batches; the table gives the
training time per epoch, the validation pass, the mean batch width and the validation accuracy.

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/text_padding.py [--seeds 3] [--epochs 2]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import fmt, write
from mmkd import Distiller, Net, Term, Trainer
from mmkd.data import loader
from mmkd.modalities.agnews import read_tsv
from mmkd.registry import DATASETS, MODELS

KEYS = {"short": ["text_input_ids", "text_attention_mask"], "full": ["input_ids", "attention_mask"]}


def datasets(root: Path, tmp: Path, args, dynamic: bool) -> dict:
    """The short and full sets, as the registered data sets build them."""
    texts, labels = read_tsv(root / "agnews" / "dev.tsv")
    names = ["World", "Sports", "Business", "Sci/Tech"]
    short = tmp / "agnews_short.tsv"
    if not short.exists():
        with open(short, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["text", "label"])
            for t, y in zip(texts[:args.n], labels[:args.n].tolist()):
                w.writerow([" ".join(t.split()[:args.words]), names[y]])
    common = {"max_length": args.max_length, "dynamic_padding": dynamic}
    return {"short": DATASETS["text_csv"](root=tmp, file=short.name, fractions=[0.8, 0.1, 0.1], **common),
            "full": DATASETS["agnews"](root=root, limit=int(args.n * 0.8), **common)}


def run(data, keys, args, seed: int, device: str) -> dict:
    torch.manual_seed(seed)
    model = MODELS["text_transformer"](num_classes=data.num_classes, in_shape=dict.fromkeys(keys, (args.max_length,)),
                                       hidden=128, layers=2, heads=2)
    module = Distiller(Net(model, keys), [], [Term("ce")])
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(run_dir=run_dir, max_epochs=args.epochs, batch_size=args.batch_size, progress="off",
                          tensorboard=False, device=device, seed=seed, lr=1e-3)
        result = trainer.fit(module, data.train, data.val)
        t0 = time.perf_counter()
        trainer.evaluate(module, data.val)
        eval_s = time.perf_counter() - t0
    widths = [b[keys[0]].shape[1] for b in loader(data.train, args.batch_size)]
    return {"train_s": statistics.mean(m["time/train_s"] for m in result.history), "eval_s": eval_s,
            "width": statistics.mean(widths), "val_acc": result.history[-1]["val/acc"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n", type=int, default=1280, help="sentences of dev.tsv (80/10/10 train/val/test)")
    p.add_argument("--words", type=int, default=12, help="words kept of each sentence in the short set")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    root = Path(os.environ.get("MMKD_DATA", "data"))
    out: dict = {"args": vars(args), "short": {"fixed": [], "dynamic": []}, "full": {"fixed": [], "dynamic": []}}
    with tempfile.TemporaryDirectory() as tmp:
        sets = {mode: datasets(root, Path(tmp), args, mode == "dynamic") for mode in ("fixed", "dynamic")}
        for seed in range(args.seeds):
            for name in ("short", "full"):
                for mode in ("fixed", "dynamic"):
                    r = run(sets[mode][name], KEYS[name], args, seed, args.device)
                    out[name][mode].append(r)
                    print(f"seed {seed} {name:5s} {mode:7s} {r['train_s']:.3f} s/epoch, eval {r['eval_s']:.3f} s, "
                          f"width {r['width']:.1f}, val acc {r['val_acc']:.4f}", flush=True)
    rows = []
    for name, what in (("short", f"AG News, first {args.words} words"), ("full", "AG News, whole sentences")):
        f, d = out[name]["fixed"], out[name]["dynamic"]
        speed = [a["train_s"] / b["train_s"] for a, b in zip(f, d)]
        out[name]["speedup"] = speed
        out[name]["eval_speedup"] = [a["eval_s"] / b["eval_s"] for a, b in zip(f, d)]
        rows.append([what, f"{d[0]['width']:.1f} / {f[0]['width']:.0f}",
                     fmt([r["train_s"] for r in f], 1, 3), fmt([r["train_s"] for r in d], 1, 3), fmt(speed, 1, 2),
                     fmt(out[name]["eval_speedup"], 1, 2),
                     fmt([r["val_acc"] for r in f], 100, 2), fmt([r["val_acc"] for r in d], 100, 2)])
    n_train = int(args.n * 0.8)
    write(f"text_padding_{torch.device(args.device).type}", out,
          ["set", "mean batch width (dynamic / fixed)", "fixed padding s/epoch", "dynamic padding s/epoch",
           "speed-up", "validation pass speed-up", "val acc % (fixed)", "val acc % (dynamic)"], rows,
          f"{args.seeds} seeds x {args.epochs} epochs (mean ± std), {n_train} training sentences, batch "
          f"{args.batch_size}, stored width {args.max_length} tokens; text_transformer 128 wide, 2 layers, CE. "
          "Accuracies differ only through dropout draws (their masks are drawn for the batch's width).")


if __name__ == "__main__":
    main()
