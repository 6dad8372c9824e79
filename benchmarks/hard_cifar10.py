"""HARD on CIFAR-10: in-domain and out-of-domain accuracy of KD with and without HARD's learned
augmentations (Nix et al., arXiv:2305.14890), on ``cifar10.py``'s setting.

The teacher is ``cifar10.py``'s (trained once into ``<work>``); students ``--student`` train
``--epochs`` with CE 0.1 + KD 0.9 at T = 4 (``cifar10_kd``, the protocol scaled as ``cifar10.py``
does), both with the crops and flips of the setting, the HARD one also with ``transforms: [{name:
hard}]`` (a live teacher). Each is tested on the test split as it is (in-domain), with every image
shifted by up to ``--shift`` pixels (:func:`mmkd.modalities.image.folders.shift`, black in pixel
space) and with Gaussian pixel noise of standard deviation ``--noise`` (in [0, 1] pixel units):
the out-of-domain sets. A finished run is read back, not trained again.

    MMKD_DATA=../shared/data python benchmarks/hard_cifar10.py [--seeds 3] [--epochs 6]
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from cifar10 import arguments, finished, prepare, shortened
from common import fmt, write
from mmkd.build import load_data
from mmkd.cli import compose
from mmkd.data import loader
from mmkd.export import trained_model
from mmkd.modalities.image.folders import shift
from mmkd.run import run

METHODS = {"kd": ("KD", []), "hard": ("KD + HARD", ["+transforms=[{name: hard}]"])}


@torch.no_grad()
def accuracies(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
               std: torch.Tensor, max_shift: int, noise: float, seed: int) -> dict[str, float]:
    """Accuracy on the normalised test ``images`` as they are, shifted, and with pixel noise."""
    g = torch.Generator().manual_seed(seed)
    pixels = images * std + mean
    moved = (shift(pixels, torch.randint(-max_shift, max_shift + 1, (len(images), 2), generator=g)) - mean) / std
    noisy = ((pixels + noise * torch.randn(pixels.shape, generator=g)).clamp(0, 1) - mean) / std
    model.eval()

    def acc(x: torch.Tensor) -> float:
        return sum(int((model(x[i:i + 500]).argmax(1) == labels[i:i + 500]).sum()) for i in range(0, len(x), 500)) / len(x)
    return {"test": acc(images), "shifted": acc(moved), "noisy": acc(noisy)}


def main() -> None:
    t0 = time.perf_counter()
    p = arguments(__doc__, ["kd"], "hard_cifar10")
    p.set_defaults(epochs=6, test_per_class=500)
    p.add_argument("--shift", type=int, default=4)
    p.add_argument("--noise", type=float, default=0.1)
    args, data, teacher, trow = prepare(p)
    base = compose(["experiment=cifar10_kd"])
    common = [f"teachers.resnet.checkpoint={teacher}", f"teachers.resnet.name={args.teacher}",
              f"student.name={args.student}", *shortened(base, args.epochs), *data]
    test = None
    acc: dict[str, dict[str, list[float]]] = {}
    for seed in range(args.seeds):
        for m, (label, extra) in METHODS.items():
            cfg = compose(["experiment=cifar10_kd", f"seed={seed}", "baseline=false", *extra, *common])
            done = finished(cfg, args.work / "out")
            if done is None:
                print(f"{label}, seed {seed}", flush=True)
                done = run(cfg)
            if test is None:
                splits, _ = load_data(cfg)
                batch = next(iter(loader(splits.test, len(splits.test))))
                ds = splits.test
                test = (batch["image"], batch["label"], ds.mean.reshape(1, -1, 1, 1), ds.std.reshape(1, -1, 1, 1))
            got = accuracies(trained_model(done["run_dir"])[0], *test, args.shift, args.noise, seed)
            for k, v in got.items():
                acc.setdefault(m, {}).setdefault(k, []).append(v)
    rows = [[label, *(fmt(acc[m][k], 100) for k in ("test", "shifted", "noisy"))] for m, (label, _) in METHODS.items()]
    notes = (f"Test accuracy %, mean ± std over {args.seeds} seeds; students {args.student}, {args.epochs} epochs on "
             f"{10 * args.per_class - args.val} CIFAR-10 training images (crop + flip), CE 0.1 + KD 0.9 at T = 4, "
             f"from the teacher {args.teacher} ({100 * trow['test_acc']:.2f}%); {10 * args.test_per_class:,} test "
             f"images: as they are, shifted by up to {args.shift} pixels, and with Gaussian pixel noise of std "
             f"{args.noise}. Took {(time.perf_counter() - t0) / 60:.1f} minutes. Command: `python "
             f"benchmarks/hard_cifar10.py --seeds {args.seeds} --epochs {args.epochs}`.")
    write(args.name, {"args": {k: str(v) for k, v in vars(args).items()}, "teacher": trow, "test_acc": acc},
          ["student", "in-domain test", f"shifted (up to {args.shift} px)", f"noise (std {args.noise})"], rows, notes)


if __name__ == "__main__":
    main()
