"""Reading WAV files and turning waveforms into log-mel features, for the audio data sets.

WAV files are read with the standard library's ``wave`` module (integer PCM, any channel count and
rate), so no audio back-end is needed. Recordings at another rate are resampled and multi-channel
ones averaged to mono, with one logged line per data set saying how many files were converted.
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

log = logging.getLogger("mmkd")


class AudioError(ValueError):
    """A WAV file that cannot be read or holds an unsupported format; the message names the file."""


def read_wav(path: str | os.PathLike) -> tuple[Tensor, int]:
    """Read an integer-PCM WAV file (8, 16, 24 or 32 bit).

    Returns float32 samples in [-1, 1] shaped ``[channels, samples]`` and the sample rate. A file
    that is not a WAV, is truncated, or holds float or compressed samples raises :class:`AudioError`.
    """
    try:
        with wave.open(os.fspath(path), "rb") as w:
            channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
            data = w.readframes(n)
    except (wave.Error, EOFError) as e:
        raise AudioError(f"{path}: not a readable PCM WAV file ({e}); give 8/16/24/32-bit integer PCM") from None
    if len(data) != n * channels * width:
        raise AudioError(f"{path}: truncated WAV file: its header announces {n} frames, it holds "
                         f"{len(data) // max(channels * width, 1)}")
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


def load_audios(paths: Sequence[str | os.PathLike], sample_rate: int, length: int) -> Tensor:
    """Mono waveforms ``[len(paths), length]`` at ``sample_rate``: files at another rate are
    resampled (``torchaudio.functional.resample``), multi-channel files averaged to mono, then every
    recording is cut or zero-padded at the end to ``length`` samples."""
    from torchaudio.functional import resample

    out = torch.empty(len(paths), length)
    rates: Counter = Counter()
    downmixed = 0
    for i, path in enumerate(paths):
        x, rate = read_wav(path)
        if x.shape[0] > 1:
            x, downmixed = x.mean(0, keepdim=True), downmixed + 1
        if rate != sample_rate:
            x, rates[rate] = resample(x, rate, sample_rate), rates[rate] + 1
        out[i] = fix_length(x[0], length)
    if rates:
        log.info("resampled %d of %d WAV files to %d Hz (from %s)", sum(rates.values()), len(paths),
                 sample_rate, ", ".join(f"{r} Hz: {c}" for r, c in sorted(rates.items())))
    if downmixed:
        log.info("averaged %d of %d multi-channel WAV files to mono", downmixed, len(paths))
    return out


def log_mel(waves: Tensor, sample_rate: int, n_mels: int, n_fft: int, hop: int,
            chunk: int = 512) -> Tensor:
    """Log-mel spectrograms ``[n, 1, n_mels, frames]`` of waveforms ``[n, samples]``:
    ``log(mel(|STFT|^2) + 1e-6)`` with a Hann window of ``n_fft`` samples every ``hop`` samples
    (``frames = samples // hop + 1``), computed ``chunk`` recordings at a time."""
    from torchaudio.transforms import MelSpectrogram

    mel = MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop, n_mels=n_mels)
    with torch.no_grad():
        return torch.cat([(mel(w) + 1e-6).log().unsqueeze(1) for w in waves.split(chunk)])
