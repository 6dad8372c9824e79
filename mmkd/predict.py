"""Predictions from an exported student: raw features in, classes out.

The export directory (``<run_dir>/export/``, written by ``mmkd export``) holds the student
(``student.onnx`` and/or ``student.pt2``) and ``meta.json`` (input shapes and dtypes, class names,
feature preprocessing). :func:`predict` applies the saved preprocessing to raw inputs, runs the student
in batches (onnxruntime or the ``torch.export`` program) and returns class ids, names and probabilities.
It needs no training code, no data set and, for a graph MLP student, no graph: only node features.
A student with several inputs (late fusion; a text model's ``input_ids`` and ``attention_mask``) reads
a ``.npz`` file or a ``.pt`` dict holding one array per input key.

A student of a data set that records ``text_inputs`` (raw text -> batch keys, :mod:`mmkd.preprocess`)
also reads raw sentences: a ``.txt`` file (one sentence a line) or a ``.csv`` / ``.tsv`` file with a
header and a column named like the data set's text (e.g. ``text``; ``column`` picks another), or, from
Python, a list of sentences (one text input) or ``{name: sentences}``. The recorded text step
(``tokenize``) makes the student's inputs from them, and then the tensor preprocessing runs as usual.
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
from mmkd.data import read_table

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


TEXT_SUFFIXES = (".txt", ".csv", ".tsv", ".tab")


def text_inputs(directory: Path, meta: Mapping, keys: Sequence[str]) -> dict[str, dict]:
    """The text steps (raw text name -> ``{"op", ..., "keys"}``) that make inputs the student reads,
    from the export's ``meta.json`` or, for an export that does not record them, the run's
    ``data.json`` beside the export folder (``None`` there: none)."""
    steps = meta.get("text_inputs")
    if steps is None:
        data_json = directory.parent / "data.json"
        try:
            steps = json.loads(data_json.read_text()).get("text_inputs") if data_json.is_file() else None
        except (OSError, ValueError, AttributeError):
            steps = None
    return {str(n): dict(s) for n, s in (steps or {}).items()
            if isinstance(s, Mapping) and set(s.get("keys") or []) & set(keys)}


def _first_line(path: Path) -> str:
    try:
        with path.open(encoding="utf-8-sig", errors="replace") as f:
            return f.readline().rstrip("\r\n")
    except OSError as e:
        raise ConfigError(f"input: cannot read {str(path)!r} ({e.strerror or type(e).__name__})") from None


def _reads_text(path: Path, steps: Mapping[str, dict], keys: Sequence[str], column: str | None) -> bool:
    """Whether the file ``path`` holds raw sentences for the student (else numbers, as before): a
    ``.txt`` / ``.tsv`` file, or a ``.csv`` file given a ``column``, whose header names a raw text, or
    that a student reading only text-made inputs could not read as numbers anyway."""
    suffix = path.suffix.lower()
    if not steps or suffix not in TEXT_SUFFIXES or not path.is_file():
        return False
    if suffix != ".csv" or column is not None:
        return True
    first = _first_line(path)
    names = next(iter(csv.reader([first])), [])
    made = {k for s in steps.values() for k in s.get("keys", [])}
    return bool(set(names) & set(steps)) or (not _numbers(first) and set(keys) <= made and len(keys) > 1)


def load_texts(path: str | os.PathLike, names: Sequence[str], column: str | None = None) -> dict[str, list[str]]:
    """Raw sentences per text input ``names``: a ``.txt`` file gives one per line (one text input; row
    ``i`` is line ``i + 1``); a ``.csv`` / ``.tsv`` file with a header gives the column named after each
    input, or ``column`` for a single one. A missing column names the file and lists its columns."""
    path = Path(path)
    if path.suffix.lower() == ".txt":
        if len(names) != 1:
            raise ConfigError(f"input: the student reads {len(names)} texts ({', '.join(names)}); a .txt file holds "
                              f"one; give a .csv or .tsv file with the columns {', '.join(names)}")
        try:
            return {names[0]: path.read_text(encoding="utf-8-sig").splitlines()}
        except UnicodeDecodeError:
            with path.open("rb") as f:
                line = next(n for n, raw in enumerate(f, 1) if not _utf8(raw))
            raise ConfigError(f"input: {path}:{line}: not UTF-8 text; save the sentences as UTF-8") from None
    if column is not None and len(names) != 1:
        raise ConfigError(f"column: the student reads {len(names)} texts ({', '.join(names)}); name the columns "
                          "after them instead of giving column")
    table = read_table(path, header=True)
    out = {}
    for name in names:
        want = column if column is not None else name
        if want not in (table.header or []):
            raise ConfigError(f"input: {path}:1: no column {want!r} (the student's text"
                              f"{'' if column is not None else ' ' + repr(name)}); it has: {', '.join(table.header or [])}"
                              f"{'' if column is not None else '; name the column ' + repr(name) + ' or give column=NAME'}")
        c = table.header.index(want)
        out[name] = [table.cell(i, c, want) for i in range(len(table.rows))]
    return out


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _sentences(x: object) -> bool:
    """Whether ``x`` is a list or tuple of strings (raw sentences)."""
    return isinstance(x, (list, tuple)) and all(isinstance(v, str) for v in x)


def texts_to_inputs(steps: Mapping[str, dict], texts: Mapping[str, Sequence[str]],
                    keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """The student's inputs ``keys`` made from raw ``texts`` (name -> sentences) by the recorded text
    ``steps``; a text the student needs but ``texts`` lacks, or an input no step makes, is a
    :class:`ConfigError`."""
    missing = [n for n in steps if n not in texts]
    if missing:
        raise ConfigError(f"input: missing the student's texts {', '.join(missing)} (given: "
                          f"{', '.join(texts) or 'nothing'})")
    sizes = {n: len(texts[n]) for n in steps}
    if len(set(sizes.values())) > 1:
        raise ConfigError(f"input: the texts differ in rows ({', '.join(f'{n}: {k}' for n, k in sizes.items())})")
    out: dict[str, torch.Tensor] = {}
    for name, step in steps.items():
        try:
            out.update(preprocess.apply_text(step, list(texts[name])))
        except ValueError as e:
            raise ConfigError(f"input: text {name!r}: {io.first_line(e, typed=False)}") from None
    if unmade := [k for k in keys if k not in out]:
        raise ConfigError(f"input: raw text makes {', '.join(out)}, but the student also reads {', '.join(unmade)}; "
                          "give one array per input in a .npz file instead")
    return {k: out[k] for k in keys}


def _check_tokens(arrays: Mapping[str, np.ndarray], steps: Mapping[str, dict]) -> None:
    """Token ids must lie in ``[0, vocab_size)`` of the tokenizer a text step records and masks in
    {0, 1}: a :class:`ConfigError` naming the key, the bound and the rows otherwise (an id past the
    embedding table would fail inside the runtime, or read another row of it)."""
    for step in steps.values():
        vocab = step.get("vocab_size")
        for k in step.get("keys", []):
            x = arrays.get(k)
            if x is None or not len(x) or not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
                continue
            flat = x.reshape(len(x), -1)
            if k.endswith("input_ids") and vocab:
                bad = np.flatnonzero(((flat < 0) | (flat >= vocab)).any(1))
                if len(bad):
                    raise ConfigError(f"input: {k!r} holds token ids outside the student's vocabulary of {vocab} "
                                      f"(ids 0..{vocab - 1}) in {len(bad)} of {len(x)} rows (rows {_rows(bad)}, counting "
                                      f"from 0; ids {flat.min():g}..{flat.max():g}); give ids of its tokenizer "
                                      f"({step.get('tokenizer', 'the one it was trained with')}), or raw sentences")
            elif k.endswith("attention_mask"):
                bad = np.flatnonzero(((flat != 0) & (flat != 1)).any(1))
                if len(bad):
                    raise ConfigError(f"input: {k!r} must hold 0 or 1 (a mask over the tokens), but {len(bad)} of "
                                      f"{len(x)} rows do not (rows {_rows(bad)}, counting from 0)")


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


def predict(path: str | os.PathLike, features: np.ndarray | torch.Tensor | Mapping | Sequence[str] | str | os.PathLike,
            batch_size: int = 4096, format: str | None = None, column: str | None = None) -> Predictions:
    """Classify ``features`` with the student exported in ``path`` (a run directory or its
    ``export/``), in batches of ``batch_size`` rows.

    ``features``: raw rows (an array or tensor) or a file for :func:`load_features` for a student with
    one input; for one with several, a dict ``{key: rows}`` or a ``.npz`` / ``.pt`` file holding one
    array per input key (:func:`load_inputs`; integer arrays stay integer). A student whose data set
    records ``text_inputs`` also takes raw sentences: a ``.txt`` / ``.csv`` / ``.tsv`` file
    (:func:`load_texts`; ``column`` names the CSV column of a single text), a list of sentences or a
    dict ``{text name: sentences}``; the recorded text step makes its inputs. Token ids (given or
    made) are checked against the tokenizer's vocabulary. The export's feature preprocessing is
    applied to every batch first; ``format`` picks ``onnx`` or ``pt2`` (default: ONNX when exported).
    Bad input (a missing key, a wrong shape, rows with NaN or infinite values, ...) raises
    :class:`ConfigError`, before the student runs.
    """
    directory = export_dir(path)
    meta = json.loads((directory / "meta.json").read_text())
    shapes = meta["inputs"]
    keys = list(shapes)
    dtypes = {k: (meta.get("dtypes") or {}).get(k, "float32") for k in keys}  # exports before dtypes: floats
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size: expected a positive integer, got {batch_size!r}")
    run = load_runtime(directory, format, keys)
    steps = text_inputs(directory, meta, keys)
    if isinstance(features, (str, os.PathLike)) and _reads_text(Path(features), steps, keys, column):
        features = load_texts(features, list(steps), column)
    elif isinstance(features, (str, os.PathLike)):
        features = load_features(features, keys[0]) if len(keys) == 1 else load_inputs(features, keys)
    if _sentences(features) or (isinstance(features, Mapping) and features and all(map(_sentences, features.values()))):
        if not steps:
            raise ConfigError(f"input: raw text, but the student reads {', '.join(keys)}, which its data set made "
                              "from no text it recorded; give the inputs as arrays")
        if _sentences(features):
            if len(steps) != 1:
                raise ConfigError(f"input: the student reads {len(steps)} texts ({', '.join(steps)}); give "
                                  "{name: sentences} for each")
            features = {next(iter(steps)): list(features)}
        features = texts_to_inputs(steps, features, keys)
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
    _check_tokens(arrays, steps)
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
