"""Modality encoders and multimodal data sets (installed as ``mmkd.modalities``)."""
