"""HARD's toy claim (Nix et al., arXiv:2305.14890): a shift-robust CNN teacher passes its robustness
to an MLP student with HARD's learned augmentations, not with plain KD.

MNIST (the test set's 10,000 digits as 8,000 / 1,000 / 1,000; ``mnist_kd`` and ``mnist_hard``): the
CNN teacher is trained once a seed (``--teacher-epochs``) and shared by both students of that seed;
the MLP students train ``--epochs`` with CE 0.1 + KD 0.9 (T = 4), HARD's on the real and the
augmented digits. Each model is tested on the test split as it is and with every digit shifted by
up to ``--shift`` pixels (:func:`mmkd.modalities.image.folders.shift`, seeded). Seed 0's grid of
augmented training digits is copied to ``results/<name>_examples.png``. ``--model vae``: HARD-VAE's
latent shifts (the VAE pretrained on the training digits when the fit starts) instead of the warp. A finished run is read back.

    OMP_NUM_THREADS=1 MMKD_DATA=../shared/data python benchmarks/hard.py [--seeds 3] [--epochs 8]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import torch

from cifar10 import finished
from common import RESULTS, fmt, write
from mmkd.cli import compose
from mmkd.export import trained_model
from mmkd.registry import DATASETS
from mmkd.run import run

METHODS = {"kd": ("KD", "mnist_kd"), "hard": ("HARD", "mnist_hard")}


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    right = sum(int((model(images[i:i + 512]).argmax(1) == labels[i:i + 512]).sum()) for i in range(0, len(images), 512))
    return right / len(labels)


def vae_override() -> str:
    """The ``transforms`` override of ``mnist_hard`` with its HARD transform's arguments and ``model: vae``."""
    from omegaconf import OmegaConf

    hard = OmegaConf.to_container(compose(["experiment=mnist_hard"]).transforms[0])
    args = {**hard["args"], "model": "vae"}
    return f"transforms=[{{name: {hard['name']}, args: {{{', '.join(f'{k}: {v}' for k, v in args.items())}}}}}]"


def main() -> None:
    t0 = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--shift", type=int, default=4)
    p.add_argument("--work", type=Path, default=Path(__file__).parent / "runs" / "hard")
    p.add_argument("--name", default="hard", help="results/<name>.json, .md and <name>_examples.png")
    p.add_argument("--model", choices=["warp", "vae"], default="warp",
                   help="HARD's augmentation model: the spatial transformer or latent shifts of a VAE (HARD-VAE)")
    args = p.parse_args()
    work = args.work.resolve()
    root = os.environ.get("MMKD_DATA", "data")
    shared = [f"out_dir={work / 'out'}", f"cache_dir={work / 'cache'}", "trainer.tensorboard=false",
              "trainer.progress=off", "export=[]", f"trainer.max_epochs={args.epochs}",
              f"teachers.cnn.epochs={args.teacher_epochs}"]
    acc: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        plain = DATASETS["mnist"](root=root, split_seed=seed).test
        moved = DATASETS["mnist"](root=root, split_seed=seed, test_shift=args.shift, shift_seed=seed).test
        for m, (label, exp) in METHODS.items():
            own = [vae_override()] if m == "hard" and args.model == "vae" else []
            cfg = compose([f"experiment={exp}", f"seed={seed}", *shared, *own])
            done = finished(cfg, work / "out")
            if done is None:
                print(f"{label}, seed {seed}", flush=True)
                done = run(cfg)
            run_dir = Path(done["run_dir"])
            models = {m: trained_model(run_dir)[0]}
            if m == "kd":
                models["teacher"] = trained_model(run_dir, "cnn")[0]
            for name, model in models.items():
                row = acc.setdefault(name, {"test": [], "shifted": []})
                row["test"].append(accuracy(model, plain.tensors["image"], plain.tensors["label"]))
                row["shifted"].append(accuracy(model, moved.tensors["image"], moved.tensors["label"]))
            if m == "hard" and seed == 0:
                shutil.copy(run_dir / "student" / "hard_examples.png", RESULTS / f"{args.name}_examples.png")
    labels = {"teacher": f"teacher (CNN, {args.teacher_epochs} epochs)", "kd": "MLP, KD",
              "hard": "MLP, HARD" + ("-VAE" if args.model == "vae" else "")}
    rows = [[labels[k], fmt(acc[k]["test"], 100), fmt(acc[k]["shifted"], 100)] for k in ("teacher", "kd", "hard")]
    gain = statistics.mean(acc["hard"]["shifted"]) - statistics.mean(acc["kd"]["shifted"])
    notes = (f"Test accuracy %, mean ± std over {args.seeds} seeds (each seed its own split, teacher and shifts); "
             f"students {args.epochs} epochs, CE 0.1 + KD 0.9 at T = 4; shifted: every test digit moved by up to "
             f"{args.shift} pixels in x and y. HARD minus KD on the shifted digits: {100 * gain:+.2f} points. "
             f"Augmented examples: `results/{args.name}_examples.png`. Took {(time.perf_counter() - t0) / 60:.1f} minutes. "
             f"Command: `python benchmarks/hard.py --name {args.name} --seeds {args.seeds} --epochs {args.epochs} --teacher-epochs "
             f"{args.teacher_epochs} --shift {args.shift}" + (f" --model {args.model}" if args.model != "warp" else "") + "`.")
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "test_acc": acc, "hard_minus_kd_shifted": gain},
          ["model", "test", f"shifted (up to {args.shift} px)"], rows, notes)


if __name__ == "__main__":
    main()
