"""Audio encoder: a log-mel front end, optional SpecAugment, and a 2-D CNN over the spectrogram.

Front end (in the model, so raw waveforms go in): the mel power spectrogram
``M = F_mel |STFT_hann(x)|^2`` and ``10 log10(max(M, 1e-10))`` clipped at 80 dB below its maximum
(``torchaudio``'s ``MelSpectrogram`` and ``AmplitudeToDB``). SpecAugment (Park et al., "SpecAugment:
A Simple Data Augmentation Method for Automatic Speech Recognition", Interspeech 2019) zeroes random
bands of ``f ~ U[0, F)`` mel channels and ``t ~ U[0, T)`` frames of the normalised spectrogram, per
example, in training only.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn
from torchaudio import transforms

from mmkd.checks import COUNT, NON_NEGATIVE_INT, PROBABILITY, Each
from mmkd.models import CNN, Classifier
from mmkd.registry import MODELS


class LogMel(nn.Sequential):
    """Waveforms ``[batch, samples]`` or ``[batch, 1, samples]`` -> log-mel ``[batch, 1, n_mels, frames]``
    in dB (``frames = samples // hop_length + 1``)."""

    def __init__(self, sample_rate: int = 8000, n_fft: int = 200, hop_length: int = 80, n_mels: int = 40,
                 f_min: float = 0.0, f_max: Optional[float] = None, top_db: Optional[float] = 80.0):
        super().__init__(transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=hop_length, f_min=f_min,
                                                   f_max=f_max, n_mels=n_mels),
                         transforms.AmplitudeToDB("power", top_db))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x if x.dim() == 3 else x.unsqueeze(1))


class SpecAugment(nn.Module):
    """``num_masks`` frequency masks (widths below ``freq_mask``) and as many time masks (below
    ``time_mask``), drawn independently per example, on ``[batch, 1, freq, time]``; the identity in
    evaluation mode or when both widths are 0."""

    def __init__(self, freq_mask: int = 0, time_mask: int = 0, num_masks: int = 1):
        super().__init__()
        masks: list[nn.Module] = []
        if freq_mask:
            masks.append(transforms.FrequencyMasking(freq_mask, iid_masks=True))
        if time_mask:
            masks.append(transforms.TimeMasking(time_mask, iid_masks=True))
        self.masks = nn.ModuleList(masks * num_masks)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            for mask in self.masks:
                x = mask(x)
        return x


@MODELS.register("audio_cnn", ranges={"channels": Each(COUNT), "dropout": PROBABILITY, "sample_rate": COUNT, "n_fft": COUNT,
                                      "hop_length": COUNT, "n_mels": COUNT, "freq_mask": NON_NEGATIVE_INT,
                                      "time_mask": NON_NEGATIVE_INT, "num_masks": NON_NEGATIVE_INT})
class AudioCNN(Classifier, nn.Module):
    """``frontend`` (log-mel) -> ``norm`` (BatchNorm over the one input channel) -> ``specaug`` ->
    ``features`` (``Conv3x3-BN-ReLU`` blocks, as the core's ``cnn``) -> ``pool`` -> ``head``.

    Feature paths: ``frontend`` (the log-mel spectrogram in dB, ``[batch, 1, n_mels, frames]``),
    ``features`` (the last feature map) and ``pool`` (the embedding ``[batch, channels[-1]]``).
    A :class:`mmkd.models.Classifier` (``num_features`` ``channels[-1]``).

    Args:
        num_classes: classifier outputs.
        in_shape: one item: a waveform ``(samples,)`` or ``(1, samples)``, or a precomputed
            spectrogram ``(1, n_mels, frames)``.
        frontend: compute the log-mel front end from waveforms; ``None`` decides from ``in_shape``
            (waveforms have at most 2 dimensions). Without it the model takes spectrograms as they are.
        sample_rate, n_fft, hop_length, n_mels, f_min, f_max, top_db: the front end (defaults: 40 mel
            bands of 25 ms windows every 10 ms at 8 kHz).
        freq_mask, time_mask, num_masks: SpecAugment (off with 0 widths).
        channels, dropout: the CNN (see :class:`mmkd.models.CNN`).
    """

    def __init__(self, num_classes: int, in_shape: Sequence[int], frontend: Optional[bool] = None,
                 sample_rate: int = 8000, n_fft: int = 200, hop_length: int = 80, n_mels: int = 40,
                 f_min: float = 0.0, f_max: Optional[float] = None, top_db: Optional[float] = 80.0,
                 freq_mask: int = 0, time_mask: int = 0, num_masks: int = 1,
                 channels: Sequence[int] = (32, 64), dropout: float = 0.0):
        super().__init__()
        if frontend is None:
            frontend = len(in_shape) <= 2
        if not frontend and len(in_shape) != 3:
            raise ValueError(f"audio_cnn: frontend=false takes spectrograms (1, n_mels, frames), got in_shape "
                             f"{tuple(in_shape)}; set frontend: true for waveforms")
        self.frontend = LogMel(sample_rate, n_fft, hop_length, n_mels, f_min, f_max, top_db) if frontend else nn.Identity()
        self.norm = nn.BatchNorm2d(1)
        self.specaug = SpecAugment(freq_mask, time_mask, num_masks)
        cnn = CNN(num_classes, (1,), channels, dropout)
        self.features, self.pool, self.head = cnn.features, cnn.pool, cnn.head
        self.num_features = cnn.num_features

    def forward(self, x: Tensor) -> Tensor:
        x = self.frontend(x)
        if x.dim() == 3:  # [batch, n_mels, frames]
            x = x.unsqueeze(1)
        return self.head(self.pool(self.features(self.specaug(self.norm(x)))))
