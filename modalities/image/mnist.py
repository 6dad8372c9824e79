"""MNIST from the test set's IDX files (``<root>/mnist/t10k-*-idx*-ubyte.gz``, 10,000 digits): train,
validation and test splits drawn from it, stratified with ``split_seed``, and a shifted test split
for robustness to translation (the toy setting of HARD, Nix et al., arXiv:2305.14890).

``test_shift: s`` moves every test image by an integer offset ``(dx, dy)``, each uniform in
``[-s, s]`` and drawn per image from a generator seeded with ``shift_seed`` (the same offsets every
time), the pixels moved out dropped and those moved in black. Items: ``{"image": float [1, 28, 28]
in [0, 1], "label": int64}``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import torch

from mmkd.checks import COUNT, SEED, Fractions
from mmkd.data import DataError, DataSplits, TensorDictDataset, stratified_split
from mmkd.metrics import task_metrics
from mmkd.modalities.avdigits import MNIST_FILES, read_idx
from mmkd.modalities.image.folders import shift
from mmkd.registry import DATASETS

log = logging.getLogger("mmkd")


@DATASETS.register("mnist", ranges={"split_seed": SEED, "fractions": Fractions(), "test_shift": COUNT,
                                    "shift_seed": SEED})
def mnist(root: str | os.PathLike = "data", fractions: Sequence[float] = (0.8, 0.1, 0.1), split_seed: int = 0,
          test_shift: int | None = None, shift_seed: int = 0) -> DataSplits:
    """The MNIST test set's 10,000 digits as train / validation / test splits (``fractions``,
    stratified), the test images shifted by up to ``test_shift`` pixels (module docstring)."""
    folder = Path(root) / "mnist"
    if missing := [str(folder / f) for f in MNIST_FILES if not (folder / f).is_file()]:
        raise DataError(f"mnist: missing {', '.join(missing)}; put the MNIST test set's IDX files there "
                        "(set data_root or MMKD_DATA)")
    images, labels = read_idx(folder / MNIST_FILES[0]), read_idx(folder / MNIST_FILES[1]).long()
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise DataError(f"{folder}: {tuple(images.shape)} images and {len(labels)} labels; expected [N, 28, 28] "
                        "images and as many labels (replace them with the MNIST test set's files)")
    x = images.unsqueeze(1).float() / 255
    parts = stratified_split(labels, list(fractions), split_seed)
    sets = {s: (x[i], labels[i]) for s, i in zip(("train", "val", "test"), parts)}
    name = "mnist"
    if test_shift:
        g = torch.Generator().manual_seed(shift_seed)
        test_x, test_y = sets["test"]
        offsets = torch.randint(-test_shift, test_shift + 1, (len(test_x), 2), generator=g)
        sets["test"] = (shift(test_x, offsets), test_y)
        name = f"mnist/shift{test_shift}_{shift_seed}"
    data = [TensorDictDataset(f"{'mnist' if s != 'test' else name}/{split_seed}/{s}", image=xs, label=ys)
            for s, (xs, ys) in sets.items()]
    log.info("mnist: %d / %d / %d train/val/test images%s", *(len(d) for d in data),
             f", test shifted by up to {test_shift} px" if test_shift else "")
    return DataSplits(*data, num_classes=10, shapes={"image": (1, 28, 28)}, class_names=[str(i) for i in range(10)],
                      preprocessing={"image": [{"op": "standardize_channels", "mean": [0.0], "std": [255.0]}]}, metrics=task_metrics(labels, 10))
