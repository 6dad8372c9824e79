"""Epoch time of KD with a live teacher vs the teacher-output cache (same student, same batches).

The first (cold) cache build is timed separately: it is one teacher pass over the training set,
paid once and reused by every later epoch and run.

    python benchmarks/cache_speedup.py [--seeds 3] [--epochs 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import fmt, random_images, write
from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.models import CNN, MLP
from mmkd.routers import ConstantRouter


def epoch_seconds(teacher, data, val, epochs, batch_size, device, seed) -> float:
    torch.manual_seed(seed)
    student = Net(MLP(10, (1, 28, 28), hidden=(256,)), ["image"])
    distiller = Distiller(student, [teacher], [Term("ce"), Term("kd")], ConstantRouter())
    with tempfile.TemporaryDirectory() as run_dir:
        result = Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=batch_size, progress="off",
                         tensorboard=False, device=str(device), seed=seed).fit(distiller, data, val)
    return sum(m["time/train_s"] for m in result.history) / epochs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    data, val = random_images(args.n, "cache-bench")
    teacher = Teacher(CNN(10, (1, 28, 28), channels=(32, 64, 128)), ["image"])
    live, cached, build = [], [], []
    for seed in range(args.seeds):
        with tempfile.TemporaryDirectory() as cache:
            t0 = time.perf_counter()
            table = cache_teacher(teacher, data, cache, device=device)
            build.append(time.perf_counter() - t0)
        live.append(epoch_seconds(teacher, data, val, args.epochs, args.batch_size, device, seed))
        cached.append(epoch_seconds(table, data, val, args.epochs, args.batch_size, device, seed))
    speedup = [a / b for a, b in zip(live, cached)]
    write(f"cache_speedup_{device.type}", {"args": vars(args), "live_s": live, "cached_s": cached,
                                           "cache_build_s": build, "speedup": speedup},
          ["teacher", "live teacher s/epoch", "cached s/epoch", "speed-up", "cache build s (once)"],
          [["CNN 32-64-128 -> MLP 784-256-10", fmt(live, 1, 3), fmt(cached, 1, 3), fmt(speedup, 1, 2),
            fmt(build, 1, 3)]],
          f"{args.seeds} seeds x {args.epochs} epochs, {args.n} instances of 1x28x28, batch {args.batch_size}.")


if __name__ == "__main__":
    main()
