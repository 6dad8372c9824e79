"""Reading WAV files and turning waveforms into log-mel features, for the audio data sets.

WAV files are read with the standard library's ``wave`` module (integer PCM, any channel count and
rate), so no audio back-end is needed. A recording at another rate than the data set's, or with
more than one channel, is an error unless the loader is asked to convert (``convert=True``, the data
sets' ``convert_audio``): then it is resampled and averaged to mono, with one logged line per data
set saying how many files were converted.
"""
from __future__ import annotations

import logging
import os
import wave
from collections import Counter
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from mmkd.data import DataError

log = logging.getLogger("mmkd")

WIDTHS = (1, 2, 3, 4)  # bytes per sample: 8-, 16-, 24- and 32-bit integer PCM
MAX_CHANNELS = 64
RATES = (1_000, 1_000_000)  # the sample rates accepted, in Hz


class AudioError(DataError):
    """A WAV file that cannot be read or holds an unsupported format; the message names the file."""


def check_header(path: str | os.PathLike, channels: int, width: int, rate: int, frames: int) -> None:
    """Raise :class:`AudioError` for a WAV header no real recording has: a sample width outside
    1-4 bytes, no channel or more than ``MAX_CHANNELS``, no frame, a rate outside ``RATES``."""
    if width not in WIDTHS:
        problem = f"{8 * width}-bit samples"
    elif not 1 <= channels <= MAX_CHANNELS:
        problem = f"{channels} channels (at most {MAX_CHANNELS})"
    elif not RATES[0] <= rate <= RATES[1]:
        problem = f"a sample rate of {rate} Hz (expected {RATES[0]} Hz to {RATES[1]} Hz)"
    elif frames == 0:
        problem = "no audio frames"
    else:
        return
    raise AudioError(f"{path}: damaged or unsupported WAV header: {problem}; "
                     "replace it with an intact 8/16/24/32-bit integer PCM WAV file")


def read_wav(path: str | os.PathLike) -> tuple[Tensor, int]:
    """Read an integer-PCM WAV file (8, 16, 24 or 32 bit).

    Returns float32 samples in [-1, 1] shaped ``[channels, samples]`` and the sample rate. Any failure
    to open or read the file (missing, not a WAV, truncated, float or compressed samples, a damaged
    header: see :func:`check_header`) raises :class:`AudioError` naming the file.
    """
    try:
        with wave.open(os.fspath(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            check_header(path, channels, width, rate, n)
            data = w.readframes(n)
    except AudioError:
        raise
    except Exception as e:  # wave.Error, EOFError, OSError, or whatever a damaged header sets off
        reason = " ".join(str(e).split()) or type(e).__name__
        raise AudioError(f"{path}: not a readable PCM WAV file ({reason}); give 8/16/24/32-bit integer PCM") from None
    if len(data) != n * channels * width:
        raise AudioError(f"{path}: truncated WAV file: its header announces {n} frames, it holds "
                         f"{len(data) // (channels * width)}; replace it with a complete copy")
    raw = np.frombuffer(data, np.uint8)
    if width == 1:  # unsigned
        x = (raw.astype(np.float32) - 128) / 128
    elif width == 3:  # little-endian 24-bit: widen to 32 bits, sign-extend by the arithmetic shift
        b = raw.reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] << 8 | b[:, 1] << 16 | b[:, 2] << 24) >> 8).astype(np.float32) / 2**23
    else:
        x = raw.view(f"<i{width}").astype(np.float32) / 2 ** (8 * width - 1)
    return torch.from_numpy(x.reshape(n, channels).T.copy()), rate


def fix_length(x: Tensor, length: int) -> Tensor:
    """Cut the last dimension of ``x`` to ``length`` samples, or pad it at the end with zeros."""
    return x[..., :length] if x.shape[-1] >= length else torch.nn.functional.pad(x, (0, length - x.shape[-1]))


def load_audios(paths: Sequence[str | os.PathLike], sample_rate: int, length: int,
                convert: bool = False) -> Tensor:
    """Mono waveforms ``[len(paths), length]`` at ``sample_rate``, every recording cut or zero-padded
    at the end to ``length`` samples.

    A file at another rate or with several channels raises :class:`AudioError` naming it, unless
    ``convert``: then it is resampled (``torchaudio.functional.resample``) and averaged to mono, and
    one logged line per conversion says how many files (and the first few) were converted.
    """
    from torchaudio.functional import resample

    out = torch.empty(len(paths), length)
    rates: Counter = Counter()
    resampled, downmixed = [], []
    for i, path in enumerate(paths):
        x, rate = read_wav(path)
        if not convert and (rate != sample_rate or x.shape[0] > 1):
            raise AudioError(f"{path}: {rate} Hz, {x.shape[0]} channel(s); expected {sample_rate} Hz mono: convert "
                             "the file, or set data.args.convert_audio=true to resample and downmix it on loading")
        if x.shape[0] > 1:
            x = x.mean(0, keepdim=True)
            downmixed.append(path)
        if rate != sample_rate:
            x, rates[rate] = resample(x, rate, sample_rate), rates[rate] + 1
            resampled.append(path)
        out[i] = fix_length(x[0], length)
    if resampled:
        log.info("resampled %d of %d WAV files to %d Hz (from %s): %s", len(resampled), len(paths), sample_rate,
                 ", ".join(f"{r} Hz: {c}" for r, c in sorted(rates.items())), first_few(resampled))
    if downmixed:
        log.info("averaged %d of %d multi-channel WAV files to mono: %s", len(downmixed), len(paths),
                 first_few(downmixed))
    return out


def first_few(paths: list, k: int = 3) -> str:
    """The first ``k`` of ``paths``, comma-separated, with ``...`` when there are more."""
    return ", ".join(map(os.fspath, paths[:k])) + (", ..." if len(paths) > k else "")


def log_mel(waves: Tensor, sample_rate: int, n_mels: int, n_fft: int, hop: int,
            chunk: int = 512) -> Tensor:
    """Log-mel spectrograms ``[n, 1, n_mels, frames]`` of waveforms ``[n, samples]``:
    ``log(mel(|STFT|^2) + 1e-6)`` with a Hann window of ``n_fft`` samples every ``hop`` samples
    (``frames = samples // hop + 1``), computed ``chunk`` recordings at a time."""
    from torchaudio.transforms import MelSpectrogram

    mel = MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    with torch.no_grad():
        return torch.cat([(mel(w) + 1e-6).log().unsqueeze(1) for w in waves.split(chunk)])
