"""Predictions from an exported student: raw features in, classes out.

The export directory (``<run_dir>/export/``, written by ``mmkd export``) holds the student
(``student.onnx`` and/or ``student.pt2``) and ``meta.json`` (input shapes and dtypes, class names,
feature preprocessing). :func:`predict` applies the saved preprocessing to raw inputs, runs the student
in batches (onnxruntime or the ``torch.export`` program) and returns class ids, names and probabilities.
It needs no training code, no data set and, for a graph MLP student, no graph: only node features.
A student with several inputs (late fusion; a text model's ``input_ids`` and ``attention_mask``) reads
a ``.npz`` file or a ``.pt`` dict holding one array per input key.
"""
from __future__ import annotations

import csv
import io as _io
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

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


def load_runtime(directory: Path, fmt: str | None,
                 keys: Sequence[str] | None = None) -> Callable[..., np.ndarray]:
    """A function ``(*inputs) -> logits`` running the student exported in ``directory`` as ``fmt``
    (``None``: ONNX if exported, else the ``torch.export`` program); ``inputs`` are arrays in the order
    of ``keys`` (the student's input keys; ONNX inputs are fed by these names)."""
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
        names = [i.name for i in session.get_inputs()]
        by_key = keys is not None and set(names) <= set(keys)

        def run_onnx(*xs: np.ndarray) -> np.ndarray:
            feeds = {n: xs[list(keys).index(n)] for n in names} if by_key else dict(zip(names, xs))
            return session.run(None, feeds)[0]

        return run_onnx
    module = torch.export.load(path).module()

    def run_program(*xs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(*(torch.from_numpy(x) for x in xs)).numpy()

    return run_program


SUFFIXES = (".npy", ".csv", ".pt", ".npz")


def _read(path: Path) -> object:
    """The contents of a ``.npy``, ``.csv``, ``.pt`` or ``.npz`` file (an array, a tensor or a dict)."""
    if not path.is_file():
        raise ConfigError(f"input: no such file {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ConfigError(f"input: {str(path)!r}: unknown file type {suffix!r}; choose from: {', '.join(SUFFIXES)}")
    try:
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                return {k: npz[k] for k in npz.files}
        if suffix == ".csv":
            with path.open() as f:
                header = not _numbers(f.readline())
            return np.loadtxt(path, delimiter=",", ndmin=2, skiprows=int(header), dtype=np.float32)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (ValueError, OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise ConfigError(f"input: cannot read {str(path)!r}: {io.first_line(e, typed=False)}") from None


def _numeric(x: object, where: str) -> np.ndarray:
    """``x`` (an array or tensor of numbers) as a NumPy array of its own dtype."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to_dense().cpu().numpy()
    if not isinstance(x, np.ndarray) or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ConfigError(f"input: {where} holds {getattr(x, 'dtype', type(x).__name__)}, not numbers")
    return x


def load_features(path: str | os.PathLike, key: str | None = None) -> np.ndarray:
    """Raw features from ``.npy``, ``.csv`` (numbers, comma-separated; a header row is skipped),
    ``.pt`` (a tensor, or a dict holding one under ``key``) or ``.npz`` (an array under ``key``), as float32."""
    path = Path(path)
    x = _read(path)
    if isinstance(x, dict):
        if key not in x:
            raise ConfigError(f"input: {str(path)!r} holds a dict without the key {key!r} "
                              f"(it has: {', '.join(map(str, x))})")
        x = x[key]
    return np.asarray(_numeric(x, repr(str(path))), dtype=np.float32)


def load_inputs(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """One array per input key from a ``.npz`` file or a ``.pt`` dict, each of its own dtype
    (integer token ids stay integers); a missing key is a :class:`ConfigError` listing them all."""
    path = Path(path)
    x = _read(path)
    if not isinstance(x, dict):
        raise ConfigError(f"input: {str(path)!r} holds one array, but the student reads {len(keys)} inputs "
                          f"({', '.join(keys)}); save one array per input in a .npz file "
                          f"(np.savez(path, {', '.join(f'{k}=...' for k in keys)})) or a .pt dict")
    return {k: _numeric(v, f"{str(path)!r}[{k!r}]") for k, v in x.items()}


def _numbers(line: str) -> bool:
    """Whether a CSV line is all numbers (not a header)."""
    try:
        [float(v) for v in line.split(",")]
    except ValueError:
        return False
    return True


def _rows(rows: np.ndarray, shown: int = 5) -> str:
    """``"3, 7, 12"`` or ``"3, 7, 12, 15, 20, ..."``: the first ``shown`` row indices."""
    return ", ".join(map(str, rows[:shown].tolist())) + (", ..." if len(rows) > shown else "")


def _check_finite(key: str, x: np.ndarray) -> None:
    """A :class:`ConfigError` naming the rows of ``x`` that hold NaN or infinite values."""
    if not np.issubdtype(x.dtype, np.inexact) or not len(x):
        return
    bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(1))
    if len(bad):
        raise ConfigError(f"input: {len(bad)} of {len(x)} rows of {key!r} hold NaN or infinite values (rows "
                          f"{_rows(bad)}, counting from 0); replace or drop them (e.g. impute missing "
                          "features) and predict again")


def _as_dtype(key: str, x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as the exported student's dtype for ``key``: floats as float32 (the single-input path as
    it always was), integer inputs (token ids, masks) as that integer type."""
    want = np.dtype(dtype)
    if not np.issubdtype(want, np.integer) and want != np.bool_:
        return np.asarray(x, dtype=np.float32)
    if np.issubdtype(x.dtype, np.inexact):
        frac = np.flatnonzero((x.reshape(len(x), -1) % 1 != 0).any(1)) if len(x) else np.zeros(0, int)
        if len(frac):
            raise ConfigError(f"input: {key!r} must hold whole numbers (the student reads {dtype} {key}), but "
                              f"{len(frac)} rows do not (rows {_rows(frac)}, counting from 0); give integer values")
    return np.asarray(x).astype(want)


def predict(path: str | os.PathLike, features: np.ndarray | torch.Tensor | Mapping | str | os.PathLike,
            batch_size: int = 4096, format: str | None = None) -> Predictions:
    """Classify ``features`` with the student exported in ``path`` (a run directory or its
    ``export/``), in batches of ``batch_size`` rows.

    ``features``: raw rows (an array or tensor) or a file for :func:`load_features` for a student with
    one input; for one with several, a dict ``{key: rows}`` or a ``.npz`` / ``.pt`` file holding one
    array per input key (:func:`load_inputs`; integer arrays stay integer). The export's feature
    preprocessing is applied to every batch first; ``format`` picks ``onnx`` or ``pt2`` (default: ONNX
    when exported). Bad input (a missing key, a wrong shape, rows with NaN or infinite values, ...)
    raises :class:`ConfigError`, before the student runs.
    """
    directory = export_dir(path)
    meta = json.loads((directory / "meta.json").read_text())
    shapes = meta["inputs"]
    keys = list(shapes)
    dtypes = {k: (meta.get("dtypes") or {}).get(k, "float32") for k in keys}  # exports before dtypes: floats
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    run = load_runtime(directory, format, keys)
    if isinstance(features, (str, os.PathLike)):
        features = load_features(features, keys[0]) if len(keys) == 1 else load_inputs(features, keys)
    if isinstance(features, Mapping):
        arrays = {str(k): _numeric(v, repr(str(k))) for k, v in features.items()}
        missing = [k for k in keys if k not in arrays]
        if missing:
            raise ConfigError(f"input: missing the student's inputs {', '.join(missing)} (it has: "
                              f"{', '.join(arrays) or 'nothing'}); give one array per input: {', '.join(keys)}")
        arrays = {k: arrays[k] for k in keys}
    elif len(keys) == 1:
        arrays = {keys[0]: _numeric(np.asarray(features) if not isinstance(features, torch.Tensor) else features,
                                    "the features")}
    else:
        raise ConfigError(f"input: the student reads {len(keys)} inputs ({', '.join(keys)}); give a dict, "
                          "a .npz file or a .pt dict holding one array per input")
    for k, x in arrays.items():
        if x.ndim == 0 or tuple(x.shape[1:]) != tuple(shapes[k]):
            want = ", ".join(map(str, ["N", *shapes[k]]))
            raise ConfigError(f"input: expected features of shape [{want}] (the student's {k!r}), "
                              f"got [{', '.join(map(str, x.shape))}]")
    sizes = {k: len(x) for k, x in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"input: the inputs differ in rows ({', '.join(f'{k}: {n}' for k, n in sizes.items())}); "
                          "give every input the same rows")
    for k, x in arrays.items():
        _check_finite(k, x)
    xs = [torch.as_tensor(_as_dtype(k, x, dtypes[k])) for k, x in arrays.items()]
    steps = meta.get("preprocessing", {})
    logits = []
    for i in range(0, sizes[keys[0]], batch_size):
        batch = [preprocess.apply(steps[k], x[i:i + batch_size]) if steps.get(k) else x[i:i + batch_size]
                 for k, x in zip(keys, xs)]
        logits.append(run(*(b.contiguous().numpy() for b in batch)))
    logits = torch.from_numpy(np.concatenate(logits)) if logits else torch.zeros(0, meta["num_classes"])
    probs = logits.double().softmax(1).numpy()
    names = meta["class_names"] or [str(c) for c in range(meta["num_classes"])]
    return Predictions(probs.argmax(1), names, probs)


def write_predictions(pred: Predictions, path: str | os.PathLike) -> Path:
    """Write ``pred`` as CSV to ``path`` atomically; an unwritable path is a one-line :class:`ConfigError`
    naming ``output`` (and leaves nothing behind)."""
    try:
        io.write_text(pred.to_csv(), path)
    except OSError as e:
        raise ConfigError(f"output: cannot write {str(path)!r} ({e.strerror or type(e).__name__}); "
                          "give a path in a writable folder") from None
    return Path(path)
