"""Modality encoders and multimodal data sets (installed as ``mmkd.modalities``)."""

from . import avdigits  # noqa: F401  (registers the data set)
from . import audio, fusion, image, text, vl  # noqa: F401  (register the encoders)
