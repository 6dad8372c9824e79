"""Shared helpers for the benchmark scripts: mean ± std, result files (JSON + markdown) and figures."""
from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import torch

from mmkd.data import TensorDictDataset

RESULTS = Path(__file__).parent / "results"


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def fmt(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of ``xs`` times ``scale``."""
    m, s = mean_std([x * scale for x in xs])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's correlation coefficient (NaN when either series is constant)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / (sxx * syy) ** 0.5 if sxx and syy else float("nan")


def kendall(xs: list[float], ys: list[float]) -> float:
    """Kendall's tau-b: (concordant - discordant) pairs over the geometric mean of the pairs untied in
    each series (NaN when either series is constant)."""
    c = d = tx = ty = 0
    for i in range(len(xs)):
        for j in range(i + 1, len(xs)):
            s = (xs[i] - xs[j]) * (ys[i] - ys[j])
            c, d = c + (s > 0), d + (s < 0)
            tx, ty = tx + (xs[i] == xs[j] and ys[i] != ys[j]), ty + (ys[i] == ys[j] and xs[i] != xs[j])
    return (c - d) / ((c + d + tx) * (c + d + ty)) ** 0.5 if c + d + tx and c + d + ty else float("nan")


def random_images(n: int, name: str) -> tuple[TensorDictDataset, TensorDictDataset]:
    """``n`` random 1x28x28 images with random labels (timing only), and a 256-item validation set."""
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return (TensorDictDataset(name, image=images, label=labels),
            TensorDictDataset(f"{name}-val", image=images[:256], label=labels[:256]))


def machine() -> str:
    """One line describing where the benchmark ran."""
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {dev}; "
            f"torch {torch.__version__}, Python {sys.version.split()[0]}")


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (imported on first use)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    """Write ``fig`` to ``path`` (tight layout, 120 dpi) and close it."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def write(name: str, data: dict, header: list[str], rows: list[list[str]], notes: str = "") -> None:
    """Write ``results/<name>.json`` and ``results/<name>.md`` and print the table."""
    RESULTS.mkdir(exist_ok=True)
    data = {**data, "machine": machine()}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    md = f"## {name}\n\n{machine()}\n\n" + "\n".join(lines) + ("\n\n" + notes if notes else "") + "\n"
    (RESULTS / f"{name}.md").write_text(md)
    print(md)
