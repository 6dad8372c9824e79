"""The trained-teacher store: a teacher that ``mmkd run`` trains on labels, trained once.

A teacher is stored under a key of everything that decides its weights: its model config (name,
arguments, inputs; its loss terms and callbacks when it has its own, ``teachers.<name>.losses`` and
``.callbacks``) and module tree, its trainer config (all but the settings that cannot change the
weights: :data:`NEUTRAL`; the seed included), and the fingerprints of the training and validation data
sets. A later run (of any experiment or pipeline) whose teacher has the same key loads the stored
weights instead of training, and logs the file it read; ``teachers.<name>.reuse=false`` opts out.
A teacher trained on a data set without a fingerprint has no key and is trained each time.

An entry ``<cache_dir>/teachers/<key>.pt`` holds what the teacher's stage wrote to its ``best.pt``
(the weights of the kept epoch and its metrics), with a size and SHA-256 index
(:func:`mmkd.io.save_checked`); it is read without pickle, and a damaged entry is trained again
with a warning.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from torch import nn
from torch.utils.data import Dataset

from mmkd import io
from mmkd.data import Fingerprinted
from mmkd.trainer import TrainerConfig

log = logging.getLogger("mmkd")

NEUTRAL = ("progress", "tensorboard", "num_workers", "finite_check_every")  # trainer keys outside the key


def teacher_key(spec: Mapping[str, Any], model: nn.Module, trainer: TrainerConfig,
                data: Sequence[Dataset]) -> str | None:
    """The store key of a teacher built from ``spec`` (name, args, inputs) as ``model`` and trained
    with ``trainer`` on ``data`` (training and validation sets); ``None`` when a data set has no
    fingerprint (:class:`mmkd.data.Fingerprinted`). Sampled neighbourhoods and random augmentations
    are drawn from the seeded generators, so the seed in ``trainer`` fixes them."""
    if not all(isinstance(d, Fingerprinted) for d in data):
        return None
    fields = {k: v for k, v in dataclasses.asdict(trainer).items() if k not in NEUTRAL}
    text = json.dumps({"model": spec, "tree": repr(model), "trainer": fields,
                       "data": [d.fingerprint for d in data]}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def entry(root: str | os.PathLike, key: str) -> Path:
    """Where the teacher of ``key`` is stored under ``root`` (the run's cache folder)."""
    return Path(root) / "teachers" / f"{key}.pt"


def load(root: str | os.PathLike, key: str, stage_dir: Path) -> dict | None:
    """The stored checkpoint of ``key`` (``{"epoch", "model", "metrics"}``), also written to
    ``stage_dir/best.pt`` so the run directory holds its teacher as if trained there; ``None`` on a
    miss or a damaged entry."""
    path = entry(root, key)
    state = io.load_checked(path, log)
    if state is None:
        return None
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict) and isinstance(state.get("metrics"), dict)):
        log.warning("%s: not a stored teacher; training the teacher again", path)
        return None
    io.save(state, stage_dir / "best.pt")
    return state


def save(root: str | os.PathLike, key: str, stage_dir: Path) -> Path:
    """Store the teacher that ``stage_dir/best.pt`` holds under ``key``; return the entry's path."""
    path = entry(root, key)
    io.save_checked(io.load(stage_dir / "best.pt", "the trained teacher"), path)
    return path
