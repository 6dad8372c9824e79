"""Modality encoders and multimodal data sets (installed as ``mmkd.modalities``)."""

from . import agnews, avdigits, canaries, lm, manifest, text_files  # noqa: F401  (register the data sets)
from . import audio, fusion, image, text, vl  # noqa: F401  (register the encoders)
