"""Users' own paired data, described by CSV manifests: one row per item, one column per modality.

A manifest names, for every item, an image file (PNG, JPEG, anything Pillow reads), a WAV file, or
a raw text, one column each, plus a label column. Manifests are CSV files, or TSV files (``.tsv``,
``.tab``: tab-separated; or any ``delimiter``). File paths are relative to the CSV's folder. Give
one CSV per split (``train``, ``val``, ``test``) or one CSV with a split column; a CSV path is
relative to the data root. Every file is checked before anything is read, so a missing file is
one error naming it; missing, unreadable or malformed files raise :class:`mmkd.data.DataError`.

Batch keys: an image column ``c`` gives ``c`` (float ``[C, H, W]`` in [0, 1], every image of a column
the same shape); an audio column ``c`` gives ``c`` (log-mel ``[1, n_mels, frames]`` standardised with
the training set's statistics, or the waveform ``[1, samples]``); a text column ``c`` gives
``c_input_ids`` and ``c_attention_mask`` (int64 ``[max_length]``; ``dynamic_padding`` cuts each batch
to its longest text), and ``mmkd predict`` reads raw text for it (recorded in ``text_inputs``).
"""
from __future__ import annotations

import csv as csvlib
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmkd.checks import COUNT, POSITIVE, SEED, Range
from mmkd.config import ConfigError
from mmkd.data import DELIMITERS, DataError, DataSplits, stratified_split
from mmkd.metrics import task_metrics
from mmkd.registry import DATASETS

from . import audio_io
from .text import text_dataset, text_input, tokenize

KINDS = ("image", "audio", "text")
SPLITS = ("train", "val", "test")


class Row(dict):
    """One CSV row; remembers its file and line, to name them in errors and resolve relative paths."""

    def __init__(self, values: dict, path: Path, line: int):
        super().__init__(values)
        self.path, self.line = path, line

    def file(self, column: str) -> Path:
        """The file named in ``column``, relative to the CSV's folder."""
        return self.path.parent / self[column]


def read_csv(path: Path, needed: list[str], delimiter: str | None = None) -> list[Row]:
    """The rows of the UTF-8 CSV file ``path`` (fields separated by ``delimiter``, by default a tab for
    ``.tsv`` / ``.tab`` files and a comma for any other); raises :class:`DataError` if it is missing, not
    UTF-8 or not CSV, or lacks a column in ``needed``."""
    if not path.is_file():
        raise DataError(f"manifest: no such CSV file {str(path)!r} (a relative path is taken from the data root)")
    delimiter = delimiter or DELIMITERS.get(path.suffix.lower(), ",")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csvlib.DictReader(f, delimiter=delimiter)
            missing = [c for c in needed if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: no column {missing[0]!r}; it has: {', '.join(reader.fieldnames or [])}")
            return [Row(r, path, n) for n, r in enumerate(reader, 2)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason}, byte {e.object[e.start]:#04x}); "
                        "save the CSV as UTF-8") from None
    except csvlib.Error as e:
        raise DataError(f"{path}: not a readable CSV file ({e})") from None


def read_image(path: Path) -> Tensor:
    """An image file as float ``[C, H, W]`` in [0, 1]: grey-scale images (8 or 16 bit) give one
    channel, every other 8-bit mode (palette, RGB, RGBA, CMYK...) three RGB channels."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            if img.mode in ("I", "F"):
                raise DataError(f"{path}: unsupported image mode {img.mode!r} (32-bit); save it as 8- or 16-bit")
            if img.mode.startswith("I;16"):
                return torch.from_numpy(np.asarray(img, np.float32) / 65535)[None]
            x = np.asarray(img.convert("L" if img.mode in ("1", "L", "LA") else "RGB"), np.float32) / 255
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({e}); give a PNG, JPEG or other file Pillow reads") from None
    return torch.from_numpy(x[None] if x.ndim == 2 else x.transpose(2, 0, 1).copy())


def images(rows: list[Row], column: str, shape: tuple[int, ...] | None) -> Tensor:
    """The images of ``column``, all of shape ``shape`` (default: the first image's shape)."""
    out = []
    for r in rows:
        x = read_image(r.file(column))
        shape = shape or tuple(x.shape)
        if tuple(x.shape) != shape:
            raise DataError(f"{r.file(column)}: image of shape {tuple(x.shape)} in column {column!r}; expected "
                            f"{shape} like the others (resize the images to one size)")
        out.append(x)
    return torch.stack(out)


def class_names(labels: list[str]) -> list[str]:
    """The sorted distinct non-empty labels, in numeric order when all are integers."""
    names = sorted({s for s in labels if s != ""})
    if all(s.lstrip("-").isdigit() for s in names):
        names.sort(key=int)
    return names


@DATASETS.register("manifest", ranges={"val_fraction": Range(0, 1, low_open=True, high_open=True), "split_seed": SEED,
                                    "sample_rate": COUNT, "seconds": POSITIVE, "n_mels": COUNT, "n_fft": COUNT, "hop": COUNT})
def manifest(root: str | os.PathLike = "data", columns: dict[str, str] | None = None, label: str = "label",
             train: str | None = None, val: str | None = None, test: str | None = None,
             csv: str | None = None, split_column: str = "split", val_fraction: float = 0.1,
             split_seed: int = 0, sample_rate: int = 16000, seconds: float = 1.0, n_mels: int = 64,
             n_fft: int = 400, hop: int = 160, waveform: bool = False, tokenizer: str = "minilm",
             max_length: int = 128, convert_audio: bool = False, delimiter: str | None = None,
             dynamic_padding: bool = False) -> DataSplits:
    """Paired image / audio / text items listed in CSV manifests.

    Args:
        root: the data root; relative CSV paths start there.
        columns: ``{column: "image" | "audio" | "text"}``, the modality of each input column.
        label: the label column; class names are its sorted distinct values, and an empty cell
            marks an unlabelled item (label -1).
        train, val, test: one CSV per split; without ``val``, a stratified ``val_fraction`` of
            ``train`` (drawn with ``split_seed``) is the validation set.
        csv, split_column: instead, one CSV whose ``split_column`` says train, val or test.
        sample_rate, seconds: the WAV files' rate (a file at another rate or with several channels
            is an error unless ``convert_audio``) and the length they are cut or zero-padded to at the end.
        n_mels, n_fft, hop: log-mel features of the audio (defaults: 25 ms windows every 10 ms at 16 kHz).
        waveform: give audio columns as waveforms ``[1, samples]`` instead of log-mel features.
        tokenizer, max_length: for text columns (see :func:`mmkd.modalities.text.tokenize`).
        convert_audio: resample WAV files at another rate than ``sample_rate`` and average
            multi-channel ones to mono (logged), instead of raising an error naming the file.
        delimiter: the manifests' field separator (default: tab for ``.tsv`` / ``.tab``, else comma).
        dynamic_padding: cut the token ids and masks of each batch to its longest text
            (:class:`mmkd.modalities.text.TextDataset`).
    """
    if delimiter is not None and len(delimiter) != 1:
        raise ConfigError(f"data.args.delimiter: give one character, got {delimiter!r}")
    if not columns or any(k not in KINDS for k in columns.values()):
        raise ConfigError(f"data.args.columns: map each input column to one of {', '.join(KINDS)}; got {columns!r}")
    root = Path(root)
    needed = [*columns, label]
    if csv is not None:
        rows = read_csv(root / csv, [*needed, split_column], delimiter)
        bad = next((r for r in rows if r[split_column] not in SPLITS), None)
        if bad is not None:
            raise DataError(f"{bad.path}:{bad.line}: {split_column} is {bad[split_column]!r}; "
                            f"expected one of {', '.join(SPLITS)}")
        parts = {s: [r for r in rows if r[split_column] == s] for s in SPLITS}
    elif train is not None and test is not None:
        parts = {s: read_csv(root / p, needed, delimiter) for s, p in (("train", train), ("val", val), ("test", test)) if p}
    else:
        raise ConfigError("data.args: give the manifest's train and test CSV files (and optionally val), "
                          "or csv with a split column")
    names = class_names([r[label] for rows in parts.values() for r in rows])
    index = {n: i for i, n in enumerate(names)}
    labels = {s: torch.tensor([index.get(r[label], -1) for r in rows], dtype=torch.long) for s, rows in parts.items()}
    if not parts.get("val"):
        keep, held = stratified_split(labels["train"], [1 - val_fraction, val_fraction], split_seed)
        parts["train"], parts["val"] = [parts["train"][i] for i in keep], [parts["train"][i] for i in held]
        labels["train"], labels["val"] = labels["train"][keep], labels["train"][held]
    for s in SPLITS:
        if not parts.get(s):
            source = csv or {"train": train, "val": val or train, "test": test}[s]
            raise DataError(f"manifest: the {s} split has no rows; add some to {str(root / source)!r}")
    for rows in parts.values():
        for r in rows:
            for c, kind in columns.items():
                if kind != "text" and not r.file(c).is_file():
                    raise DataError(f"{r.path}:{r.line}: column {c!r}: no such file {str(r.file(c))!r} "
                                    "(paths are relative to the CSV's folder)")

    tensors: dict[str, dict[str, Tensor]] = {s: {} for s in SPLITS}
    shapes, preprocessing, text_inputs = {}, {}, {}
    for c, kind in columns.items():
        if kind == "image":
            for s in SPLITS:
                tensors[s][c] = images(parts[s], c, shapes.get(c))
                shapes[c] = tuple(tensors[s][c].shape[1:])
        elif kind == "audio":
            length = round(seconds * sample_rate)
            waves = {s: audio_io.load_audios([r.file(c) for r in parts[s]], sample_rate, length, convert_audio)
                     for s in SPLITS}
            if waveform:
                feats = {s: w.unsqueeze(1) for s, w in waves.items()}
            else:
                mels = {s: audio_io.log_mel(w, sample_rate, n_mels, n_fft, hop) for s, w in waves.items()}
                mean, std = mels["train"].mean().item(), mels["train"].std().item()
                feats = {s: (m - mean) / std for s, m in mels.items()}
                preprocessing[c] = [{"op": "standardize", "mean": [mean], "std": [std]}]
            for s in SPLITS:
                tensors[s][c] = feats[s]
            shapes[c] = tuple(feats["train"].shape[1:])
        else:
            for s in SPLITS:
                tokens = tokenize([r[c] for r in parts[s]], tokenizer=tokenizer, max_length=max_length)
                tensors[s][f"{c}_input_ids"] = tokens["input_ids"]
                tensors[s][f"{c}_attention_mask"] = tokens["attention_mask"]
            shapes[f"{c}_input_ids"] = shapes[f"{c}_attention_mask"] = (max_length,)
            text_inputs[c] = text_input(f"{c}_", tokenizer, max_length)
    sets = [text_dataset(f"manifest/{s}", dynamic_padding, **tensors[s], label=labels[s]) for s in SPLITS]
    return DataSplits(*sets, num_classes=len(names), shapes=shapes, class_names=names, preprocessing=preprocessing,
                      text_inputs=text_inputs, metrics=task_metrics(torch.cat(list(labels.values())), len(names)))
