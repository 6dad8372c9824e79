"""Reports of a run: inference latency of its models and the learning curves of its stages."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from torch import nn

from mmkd import io
from mmkd.data import DataSplits, loader


LATENCY_BATCH = 256  # items of the test split in the batch the run times student and teachers on


def add_latencies(results: dict, data: DataSplits, models: dict[str, tuple[nn.Module, list[str]]]) -> None:
    """Time each model (row name -> (model, input keys); ``"student"`` for the student, the others
    teachers) on the first ``LATENCY_BATCH`` test items, on CPU, into ``results``."""
    results["latency_batch"] = n = min(len(data.test), LATENCY_BATCH)
    batch = next(iter(loader(data.test, n)))
    for name, (model, keys) in models.items():
        row = results["student"] if name == "student" else results["teachers"][name]
        row["latency_ms"] = latency_ms(model.cpu(), [batch[k] for k in keys])


@torch.no_grad()
def latency_ms(model: nn.Module, inputs: list[torch.Tensor], repeats: int = 30, budget_s: float = 5.0) -> float:
    """Median wall time of one forward pass on ``inputs``, in milliseconds: ``repeats`` timed passes
    after a warm-up, fewer (at least 3) once they have taken ``budget_s`` seconds (large teachers)."""
    model.eval()
    model(*inputs)
    times: list[float] = []
    while len(times) < repeats and (len(times) < 3 or sum(times) < budget_s):
        t0 = time.perf_counter()
        model(*inputs)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def plot_curves(run_dir: Path) -> None:
    """Write ``curves.png``: validation accuracy and training loss per epoch, for every stage (no file
    for a run that trained nothing)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = sorted(run_dir.rglob("metrics.csv"))
    if not files:  # a run that trained nothing (a search)
        return
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for path in files:
        rows = list(csv.DictReader(path.open()))
        stage = str(path.parent.relative_to(run_dir))
        epochs = [int(r["epoch"]) for r in rows]
        ax_acc.plot(epochs, [float(r["val/acc"]) for r in rows], label=stage)
        ax_loss.plot(epochs, [float(r["train/loss"]) for r in rows], label=stage)
    ax_acc.set(xlabel="epoch", ylabel="validation accuracy")
    ax_loss.set(xlabel="epoch", ylabel="training loss", yscale="log")
    ax_acc.legend()
    fig.tight_layout()
    with io.atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
