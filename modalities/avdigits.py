"""AV-digits: MNIST images paired by label with Free Spoken Digit recordings.

The construction of AV-MNIST (Vielzeuf et al., "CentralNet", ECCV-W 2018, there with TIDIGITS
audio), used by cross-modal distillation papers: an item is an image of a handwritten digit and a
recording of a speaker saying the same digit. Here the images come from the MNIST test set (10,000
images, ``<root>/mnist``) and the recordings from the openly licensed Free Spoken Digit Dataset
(``<root>/fsdd/recordings``, 6 speakers x 10 digits x 50 takes, 8 kHz mono 16-bit WAV).

Splits follow FSDD's official split: takes 0-4 of every speaker and digit are the test set; takes
5-9 are the validation set (10% of the rest, every speaker and digit equally) and takes 10-49 the
training set. Every recording is paired with its own MNIST image of the same digit, drawn without
replacement with ``seed``, so no image appears twice, in particular not in two splits.

The recordings' log-mel features (and waveforms, if asked for) are computed once and cached on
disk (written atomically, keyed by a hash of ``FEATURE_VERSION``, the audio parameters and the
recording files' names, sizes and modification times); later builds read no WAV file. The cache
holds audio only: the pairing is redrawn from ``seed`` on every build, in milliseconds, so changing
the seed reuses it. Missing or malformed files raise :class:`mmkd.data.DataError` naming them.
"""
from __future__ import annotations

import gzip
import logging
import os
import re
import zlib
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mmkd.checks import COUNT, POSITIVE, SEED
from mmkd.config import ConfigError
from mmkd.data import DataError, DataSplits, TensorDictDataset
from mmkd.registry import DATASETS

from . import audio_io
from .disk_cache import cached, default_cache_dir, file_stats

log = logging.getLogger("mmkd")

FEATURE_VERSION = 1  # part of the cache key: raise it when a change to the feature code changes the features
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEST_TAKES, VAL_TAKES = range(0, 5), range(5, 10)
SPLITS = ("train", "val", "test")
_NAME = re.compile(r"(\d)_([A-Za-z]+)_(\d+)\.wav")
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read a (gzipped) IDX file: 2 zero bytes, a type code, the number of dimensions, the sizes as
    big-endian int32, then the values in C order (LeCun et al., the MNIST format). A file that cannot
    be read or is not a complete IDX file raises :class:`DataError` naming it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: unreadable ({e}); replace it with a complete copy of the file") from None
    ndim = data[3] if len(data) >= 4 else 0
    if len(data) < 4 + 4 * ndim or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad header {data[:4].hex()}); replace it with the original file")
    shape = tuple(np.frombuffer(data, ">i4", ndim, 4).tolist())
    dtype = np.dtype(_IDX_TYPES[data[2]])
    values = np.frombuffer(data, dtype, (len(data) - 4 - 4 * ndim) // dtype.itemsize, 4 + 4 * ndim)
    if values.size != int(np.prod(shape)) or len(data) != 4 + 4 * ndim + values.nbytes:
        raise DataError(f"{path}: IDX header announces shape {shape}, the file holds {values.size} values; "
                        "replace it with a complete copy")
    return torch.from_numpy(values.reshape(shape).astype(dtype.newbyteorder("=")))


def recordings(folder: str | os.PathLike) -> list[tuple[str, int, str, int]]:
    """The FSDD recordings in ``folder`` as ``(file name, digit, speaker, take)``, sorted by digit,
    speaker and take; files not named ``{digit}_{speaker}_{take}.wav`` are ignored."""
    found = [(m[0], int(m[1]), m[2], int(m[3])) for m in map(_NAME.fullmatch, os.listdir(folder)) if m]
    return sorted(found, key=lambda r: r[1:])


def split_of(take: int) -> str:
    """The split a recording belongs to, from its take number."""
    return "test" if take in TEST_TAKES else "val" if take in VAL_TAKES else "train"


def limit(recs: list[tuple[str, int, str, int]], k: int) -> list[tuple[str, int, str, int]]:
    """At most ``k`` of ``recs`` per split and digit: the lowest takes, every speaker in turn."""
    count: Counter = Counter()
    keep = set()
    for r in sorted(recs, key=lambda r: (r[3], r[2])):
        if count[split_of(r[3]), r[1]] < k:
            count[split_of(r[3]), r[1]] += 1
            keep.add(r)
    return [r for r in recs if r in keep]


@DATASETS.register("avdigits", ranges={"seed": SEED, "sample_rate": COUNT, "seconds": POSITIVE, "n_mels": COUNT,
                                    "n_fft": COUNT, "hop": COUNT, "limit_per_class": COUNT})
def avdigits(root: str | os.PathLike = "data", seed: int = 0, sample_rate: int = 8000, seconds: float = 1.0,
             n_mels: int = 40, n_fft: int = 200, hop: int = 80, waveform: bool = False,
             limit_per_class: int | None = None, cache_dir: str | os.PathLike | None = None,
             convert_audio: bool = False) -> DataSplits:
    """MNIST images paired by label with spoken digits (FSDD): 2,400 / 300 / 300 train/val/test items.

    Args:
        root: the data root holding ``mnist/`` and ``fsdd/recordings/``.
        seed: draws which MNIST image goes with which recording.
        sample_rate, seconds: the recordings' rate (FSDD's is 8 kHz) and the length they are cut or
            zero-padded to at the end (1 s keeps 2,980 of FSDD's 3,000 recordings whole).
        n_mels, n_fft, hop: log-mel features (defaults: 40 bands, 25 ms windows every 10 ms at 8 kHz,
            101 frames a second), standardised with the training set's mean and standard deviation
            (recorded in ``preprocessing["audio"]``: raw audio inputs are :func:`audio_io.log_mel` features).
        waveform: also give each item its waveform (``audio_wave``).
        limit_per_class: keep at most this many recordings of each digit in each split (the lowest
            takes, every speaker in turn), for quick runs.
        cache_dir: where the audio features are cached (default ``~/.cache/mmkd``); never the data root.
        convert_audio: resample recordings at another rate than ``sample_rate`` and average
            multi-channel ones to mono; without it such a recording is an error naming it.

    Items: ``{"image": float [1, 28, 28] in [0, 1], "audio": float [1, n_mels, frames],
    "label": int64}``, plus ``"audio_wave": float [1, samples]`` with ``waveform``, and where each
    item came from: ``"mnist_index"`` (its image in the MNIST test set), ``"speaker"`` (index into
    the sorted speaker names) and ``"take"``.
    """
    root = Path(root)
    mnist, folder = root / "mnist", root / "fsdd" / "recordings"
    missing = [str(mnist / f) for f in MNIST_FILES if not (mnist / f).is_file()]
    if missing or not folder.is_dir() or not recordings(folder):
        raise DataError(
            f"avdigits: missing {', '.join(missing) or folder}; expected {' and '.join(MNIST_FILES)} in "
            f"{mnist} and FSDD's {{digit}}_{{speaker}}_{{take}}.wav files in {folder} (set data_root or MMKD_DATA)")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache_dir.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"data.args.cache_dir: {str(cache_dir)!r} lies inside the data root {str(root)!r}, "
                          "which is read-only; choose another cache_dir")

    recs = recordings(folder)
    if limit_per_class is not None:
        recs = limit(recs, limit_per_class)
    files = file_stats(folder, [r[0] for r in recs])
    wave_params = {"version": FEATURE_VERSION, "sample_rate": sample_rate, "seconds": seconds,
                   "convert": convert_audio}
    length = round(seconds * sample_rate)
    waves = cache(lambda: audio_io.load_audios([folder / r[0] for r in recs], sample_rate, length, convert_audio))
    logmel = cached("logmel", {**wave_params, "n_mels": n_mels, "n_fft": n_fft, "hop": hop}, files,
                    lambda: audio_io.log_mel(waves(), sample_rate, n_mels, n_fft, hop), cache_dir, "avdigits")

    images, labels = read_idx(mnist / MNIST_FILES[0]), read_idx(mnist / MNIST_FILES[1]).long()
    if images.shape[1:] != (28, 28):
        raise DataError(f"{mnist / MNIST_FILES[0]}: images of shape {tuple(images.shape)}; expected [N, 28, 28] "
                        "(replace it with the MNIST test images)")
    if len(images) != len(labels):
        raise DataError(f"{mnist / MNIST_FILES[1]}: {len(labels)} labels for the {len(images)} images of "
                        f"{MNIST_FILES[0]}; replace both with the MNIST test set's files")
    digit = torch.tensor([r[1] for r in recs])
    g = torch.Generator().manual_seed(seed)
    image_of = torch.empty(len(recs), dtype=torch.long)
    for d in range(10):
        rec_idx, img_idx = (digit == d).nonzero().flatten(), (labels == d).nonzero().flatten()
        if len(rec_idx) > len(img_idx):
            raise DataError(f"avdigits: {len(rec_idx)} recordings of the digit {d} but only {len(img_idx)} "
                            f"MNIST images of it in {mnist / MNIST_FILES[0]}; lower limit_per_class")
        image_of[rec_idx] = img_idx[torch.randperm(len(img_idx), generator=g)[:len(rec_idx)]]

    speakers = sorted({r[2] for r in recs})
    split = [split_of(r[3]) for r in recs]
    rows = {s: torch.tensor([i for i, t in enumerate(split) if t == s], dtype=torch.long) for s in SPLITS}
    empty = [s for s in SPLITS if not len(rows[s])]
    if empty:
        raise DataError(f"avdigits: no recordings in {folder} for the {empty[0]} split "
                        "(takes 0-4 are the test split, 5-9 validation, the others training)")
    train_mel = logmel[rows["train"]]
    mean, std = train_mel.mean().item(), train_mel.std().item()
    tensors = {"image": images[image_of].unsqueeze(1).float() / 255, "audio": (logmel - mean) / std,
               "label": digit, "mnist_index": image_of, "take": torch.tensor([r[3] for r in recs]),
               "speaker": torch.tensor([speakers.index(r[2]) for r in recs])}
    if waveform:
        tensors["audio_wave"] = cached("wave", wave_params, files, waves, cache_dir, "avdigits").unsqueeze(1)
    sets = [TensorDictDataset(f"avdigits/{s}", **{k: v[rows[s]] for k, v in tensors.items()}) for s in SPLITS]
    shapes = {"image": (1, 28, 28), "audio": tuple(tensors["audio"].shape[1:])}
    if waveform:
        shapes["audio_wave"] = tuple(tensors["audio_wave"].shape[1:])
    log.info("avdigits: %s train/val/test items, audio %s", "/".join(str(len(s)) for s in sets), shapes["audio"])
    return DataSplits(*sets, num_classes=10, shapes=shapes, class_names=list(CLASS_NAMES),
                      preprocessing={"audio": [{"op": "standardize", "mean": [mean], "std": [std]}]})
