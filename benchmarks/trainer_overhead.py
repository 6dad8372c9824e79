"""Time per student step: mmkd's Trainer (KD through a cached teacher) vs a plain PyTorch CE loop.

Both train the same student on the same batches (same loader, sampler and seed) in the same process;
the rounds alternate between the two to cancel drift. The trainer's time is its training loop only
(``time/train_s``: forward, the CE + KD mixture, backward, step, NaN check, schedule), excluding the
per-epoch evaluation and checkpoint, which the plain loop does not do. Two more columns separate
the framework's overhead from the KD term's own cost: the student trained with CE alone through the
trainer, and a plain loop that adds the same KD term by hand (cached teacher logits, ``mmkd.losses.kd``).

    python benchmarks/trainer_overhead.py [--rounds 5] [--epochs 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from common import fmt, random_images, write
from mmkd import Distiller, Net, Teacher, Term, Trainer, cache_teacher
from mmkd.data import EpochSampler, loader
from mmkd.losses import kd as kd_loss
from mmkd.models import CNN, MLP
from mmkd.routers import ConstantRouter


def plain_loop(model, data, batch_size, epochs, lr, device, teacher_logits=None) -> float:
    """Seconds per step of the hand-written loop: CE, plus KD (T = 4) on ``teacher_logits`` when given."""
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sampler = EpochSampler(len(data), seed=0)
    batches = loader(data, batch_size, sampler)
    steps, t0 = 0, time.perf_counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for batch in batches:
            x, y = batch["image"].to(device), batch["label"].to(device)
            z = model(x)
            loss = F.cross_entropy(z, y)
            if teacher_logits is not None:
                loss = loss + kd_loss(z, teacher_logits[batch["index"].to(device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def trainer_loop(model, teacher, terms, data, val, batch_size, epochs, lr, device, **extra) -> float:
    """Seconds per step of Trainer.fit's training loop."""
    distiller = Distiller(Net(model, ["image"]), [teacher] if teacher else [], terms,
                          ConstantRouter() if teacher else None)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(run_dir=run_dir, max_epochs=epochs, batch_size=batch_size, lr=lr, scheduler="none",
                          progress="off", tensorboard=False, device=str(device), **extra)
        result = trainer.fit(distiller, data, val)
    steps = epochs * -(-len(data) // batch_size)
    return sum(m["time/train_s"] for m in result.history) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--n", type=int, default=8192, help="training instances (random 1x28x28 images)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile in the trainer")
    p.add_argument("--precision", default="auto")
    args = p.parse_args()
    device = torch.device(args.device)
    data, val = random_images(args.n, "overhead")
    with tempfile.TemporaryDirectory() as cache:
        teacher = cache_teacher(Teacher(CNN(10, (1, 28, 28)), ["image"]), data, cache, device=device)
        students = {"MLP 784-512-512-10": lambda: MLP(10, (1, 28, 28), hidden=(512, 512)),
                    "CNN 32-64": lambda: CNN(10, (1, 28, 28), channels=(32, 64))}
        rows, out = [], {}
        extra = {"compile": args.compile, "precision": args.precision}
        logits = teacher.logits.to(device)
        for name, make in students.items():
            plain, plain_kd, kd, ce = [], [], [], []
            for r in range(args.rounds):
                torch.manual_seed(r)
                init = make().state_dict()
                runs = [("plain", lambda m: plain_loop(m, data, args.batch_size, args.epochs, 1e-3, device)),
                        ("plain_kd", lambda m: plain_loop(m, data, args.batch_size, args.epochs, 1e-3, device, logits)),
                        ("kd", lambda m: trainer_loop(m, teacher, [Term("ce"), Term("kd")], data, val,
                                                      args.batch_size, args.epochs, 1e-3, device, **extra)),
                        ("ce", lambda m: trainer_loop(m, None, [Term("ce")], data, val, args.batch_size,
                                                      args.epochs, 1e-3, device, **extra))]
                for label, fn in (runs if r % 2 == 0 else runs[::-1]):
                    m = make()
                    m.load_state_dict(init)
                    {"plain": plain, "plain_kd": plain_kd, "kd": kd, "ce": ce}[label].append(fn(m))
            ratio_kd = [k / p for k, p in zip(kd, plain)]
            ratio_ce = [c / p for c, p in zip(ce, plain)]
            ratio_same = [k / p for k, p in zip(kd, plain_kd)]
            ratio_term = [k / p for k, p in zip(plain_kd, plain)]  # the KD term's own cost, no framework
            ratios = {"ratio_kd": ratio_kd, "ratio_ce": ratio_ce, "ratio_kd_vs_plain_kd": ratio_same,
                      "ratio_plain_kd_vs_plain": ratio_term}
            out[name] = {"plain_ms": plain, "plain_kd_ms": plain_kd, "trainer_kd_ms": kd, "trainer_ce_ms": ce,
                         **ratios, "medians": {k: statistics.median(v) for k, v in ratios.items()}}
            rows.append([name, fmt(plain, 1e3, 3), fmt(kd, 1e3, 3), with_median(ratio_kd), fmt(ce, 1e3, 3),
                         with_median(ratio_ce), fmt(plain_kd, 1e3, 3), with_median(ratio_term), with_median(ratio_same)])
    write(f"trainer_overhead_{device.type}" + ("_compile" if args.compile else ""),
          {"args": vars(args), "results": out},
          ["student", "plain CE loop ms/step", "Trainer CE+KD (cached) ms/step", "ratio",
           "Trainer CE ms/step", "ratio", "plain CE+KD loop ms/step", "plain CE+KD / plain CE",
           "Trainer CE+KD / plain CE+KD"], rows,
          f"{args.rounds} rounds x {args.epochs} epochs, {args.n} instances, batch {args.batch_size}; "
          "ratios per round, mean ± std (median). Target: Trainer CE+KD / plain CE <= 1.05.")


def with_median(ratios: list[float]) -> str:
    """``mean ± std (median)`` of per-round ratios."""
    return f"{fmt(ratios, 1, 3)} ({statistics.median(ratios):.3f})"


if __name__ == "__main__":
    main()
