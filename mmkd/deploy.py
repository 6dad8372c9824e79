"""Predictions from an exported single-input student: raw features in, classes out.

The export directory (``<run_dir>/export/``, written by ``mmkd export``) holds the student
(``student.onnx`` and/or ``student.pt2``) and ``meta.json`` (input shape, class names, feature
preprocessing). :func:`predict` applies the saved preprocessing to raw inputs, runs the student in
batches (onnxruntime or the ``torch.export`` program) and returns class ids, names and probabilities.
It needs no training code, no data set and, for a graph MLP student, no graph: only node features.
"""
from __future__ import annotations

import csv
import io as _io
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mmkd import io, preprocess
from mmkd.config import ConfigError

FILES = {"onnx": "student.onnx", "pt2": "student.pt2", "torchscript": "student.pt2"}  # torchscript: alias of pt2


@dataclass
class Predictions:
    """Class ids ``[N]``, their names, and class probabilities ``[N, classes]``."""

    class_ids: np.ndarray
    class_names: list[str]
    probs: np.ndarray

    def to_csv(self) -> str:
        """CSV text: ``row,class_id,class_name,prob_<name>...``, one line per input row."""
        buf = _io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["row", "class_id", "class_name", *(f"prob_{n}" for n in self.class_names)])
        for i, (c, p) in enumerate(zip(self.class_ids, self.probs)):
            w.writerow([i, int(c), self.class_names[c], *(f"{v:.6g}" for v in p)])
        return buf.getvalue()


def export_dir(path: str | os.PathLike) -> Path:
    """The export directory for ``path``: an export directory itself, or a run directory's ``export/``."""
    path = Path(path)
    for d in (path, path / "export"):
        if (d / "meta.json").is_file():
            return d
    if (path / "student.pt").is_file():
        raise ConfigError(f"run_dir: {str(path)!r} has no export; run `mmkd export run_dir={path} format=onnx` first")
    raise ConfigError(f"run_dir: {str(path)!r} is neither a run directory nor an export directory (no meta.json)")


def load_runtime(directory: Path, fmt: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """A function ``features -> logits`` running the student exported in ``directory`` as ``fmt``
    (``None``: ONNX if exported, else the ``torch.export`` program)."""
    if fmt is None:
        fmt = next((f for f in FILES if (directory / FILES[f]).is_file()), None)
        if fmt is None:
            raise ConfigError(f"run_dir: {str(directory)!r} has no {' or '.join(dict.fromkeys(FILES.values()))}; "
                              "export the student with `mmkd export run_dir=... format=onnx`")
    elif fmt not in FILES:
        raise ConfigError(f"format: unknown format {fmt!r}; choose from: {', '.join(FILES)}")
    path = directory / FILES[fmt]
    if not path.is_file():
        raise ConfigError(f"format: {str(directory)!r} has no {FILES[fmt]}; export it with "
                          f"`mmkd export run_dir=... format={fmt}`")
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    module = torch.export.load(path).module()

    def run_program(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(x)).numpy()

    return run_program


def load_features(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Raw features from ``.npy``, ``.csv`` (numbers, comma-separated; a header row is skipped) or
    ``.pt`` (a tensor, or a dict holding one under ``key``), as float32."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"input: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in (".npy", ".csv", ".pt"):
        raise ConfigError(f"input: {str(path)!r}: unknown file type {suffix!r}; choose from: .npy, .csv, .pt")
    try:
        if suffix == ".npy":
            x = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            with path.open() as f:
                header = not _numbers(f.readline())
            x = np.loadtxt(path, delimiter=",", ndmin=2, skiprows=int(header), dtype=np.float32)
        else:
            x = torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise ConfigError(f"input: cannot read {str(path)!r}: {str(e).strip().splitlines()[0]}") from None
    if isinstance(x, dict):
        if key not in x:
            raise ConfigError(f"input: {str(path)!r} holds a dict without the key {key!r} "
                              f"(it has: {', '.join(map(str, x))})")
        x = x[key]
    if isinstance(x, torch.Tensor):
        x = x.to_dense().float().numpy()
    if not isinstance(x, np.ndarray) or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ConfigError(f"input: {str(path)!r} holds {getattr(x, 'dtype', type(x).__name__)}, not numbers")
    return np.asarray(x, dtype=np.float32)


def _numbers(line: str) -> bool:
    """Whether a CSV line is all numbers (not a header)."""
    try:
        [float(v) for v in line.split(",")]
    except ValueError:
        return False
    return True


def predict(path: str | os.PathLike, features: np.ndarray | torch.Tensor | str | os.PathLike,
            batch_size: int = 4096, format: str | None = None) -> Predictions:
    """Classify ``features`` (raw rows, or a file for :func:`load_features`) with the student exported
    in ``path`` (a run directory or its ``export/``), in batches of ``batch_size`` rows.

    The export's feature preprocessing is applied to every batch first; ``format`` picks ``onnx`` or
    ``pt2`` (default: ONNX when exported). Bad input raises :class:`ConfigError`.
    """
    directory = export_dir(path)
    meta = json.loads((directory / "meta.json").read_text())
    if len(meta["inputs"]) != 1:
        raise ConfigError(f"run_dir: the student reads {len(meta['inputs'])} inputs "
                          f"({', '.join(meta['inputs'])}); predict takes one")
    (key, shape), = meta["inputs"].items()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    run = load_runtime(directory, format)
    if isinstance(features, (str, os.PathLike)):
        features = load_features(features, key)
    x = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if tuple(x.shape[1:]) != tuple(shape):
        want = ", ".join(map(str, ["N", *shape]))
        raise ConfigError(f"input: expected features of shape [{want}] (the student's {key!r}), "
                          f"got [{', '.join(map(str, x.shape))}]")
    steps = meta.get("preprocessing", {}).get(key, [])
    logits = [run(preprocess.apply(steps, x[i:i + batch_size]).contiguous().numpy())
              for i in range(0, len(x), batch_size)]
    logits = torch.from_numpy(np.concatenate(logits)) if logits else torch.zeros(0, meta["num_classes"])
    probs = logits.double().softmax(1).numpy()
    names = meta["class_names"] or [str(c) for c in range(meta["num_classes"])]
    return Predictions(probs.argmax(1), names, probs)


def write_predictions(pred: Predictions, path: str | os.PathLike) -> Path:
    """Write ``pred`` as CSV to ``path`` atomically."""
    io.write_text(pred.to_csv(), path)
    return Path(path)
