"""Image folders: a ``<class>/<file>`` tree (torchvision ``ImageFolder``'s layout) or a zip of one.

:func:`image_folder` lists the images (any format Pillow reads; other files are skipped), decodes them
once into a uint8 tensor ``[N, 3, H, W]`` cached on disk under a key of the files (names, sizes and
modification times for a folder, names, sizes and CRCs for a zip), splits them (a second folder or
zip as the test split, or stratified fractions drawn from ``split_seed``) and serves float images
normalised with the training split's per-channel mean and standard deviation (``normalize: false``:
in [0, 1]). A file that does not decode, or whose size differs from the others (unless ``size``
resizes them all), is a :class:`mmkd.data.DataError` naming it.

Augmentations (``augment``, training split only): ``crop`` (a random crop of the image padded by 4
zero pixels, the CIFAR standard), ``flip`` (a horizontal flip with probability 1/2), ``autoaugment``
(torchvision's AutoAugment, CIFAR-10 policy) and ``trivialaugment`` (TrivialAugmentWide), applied to the
uint8 images of each batch before normalisation. With ``augment_seed`` (default 0) the view of item
``i`` in epoch ``e`` is drawn from a generator seeded by ``(augment_seed, e, i)``: the same in every
run, whatever the batch it falls in, the student's seed or a resumption (the trainer tells the data
set its epoch, :class:`mmkd.data.Epochal`); ``augment_seed: null`` draws from the run's seeded global
generator instead. Seeded views let a frozen teacher's outputs be cached per view (:mod:`mmkd.view_cache`);
with ``augment_seed: null`` a frozen teacher runs live.

``cifar10``: the 50,000 / 10,000 images of ``<data root>/cifar10/{train,test}.zip``, ``val_size``
(5,000) of the training images held out for validation (stratified, ``split_seed``), ``crop`` and
``flip`` by default; ``limit_per_class`` takes a training subset (validation carved from it) and
leaves the 10,000 test images whole unless ``test_limit_per_class`` limits them too.
"""
from __future__ import annotations

import hashlib
import io as _io
import logging
import os
import sys
import zipfile
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.checks import COUNT, NON_NEGATIVE, NON_NEGATIVE_INT, SEED, Fractions, Range
from mmkd.config import ConfigError
from mmkd.data import DataError, DataSplits, Epochal, Fingerprinted, hash_tensors, stratified_split
from mmkd.metrics import task_metrics
from mmkd.modalities.disk_cache import cached, default_cache_dir
from mmkd.modalities.image.corrupt import corrupt as shifted
from mmkd.registry import DATASETS

log = logging.getLogger("mmkd")

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
AUGMENTS = ("crop", "flip", "autoaugment", "trivialaugment")
SPLITS = ("train", "val", "test")


class Source:
    """The images of a folder or zip: ``entries`` (class name, member) sorted, ``stats`` (what a cache
    of them is keyed by) and :meth:`read` (a member's bytes)."""

    def __init__(self, path: Path):
        if not path.exists():
            raise ConfigError(f"data.args.path: no image folder or zip {str(path)!r}; give a <class>/<file> tree "
                              "or a zip of one under the data root")
        self.path, self.zip = path, None
        if path.is_dir():
            files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            info = {f: [(st := os.stat(path / f)).st_size, st.st_mtime_ns] for f in files}
        else:
            try:
                self.zip = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"{path}: not a zip file ({e}); give a folder or a zip of <class>/<file>") from None
            members = [i for i in self.zip.infolist() if not i.is_dir()]
            files = sorted(i.filename for i in members)
            info = {i.filename: [i.file_size, i.CRC] for i in members}
        keep = [f for f in files if Path(f).suffix.lower() in SUFFIXES and len(Path(f).parts) >= 2]
        if not keep:
            raise DataError(f"{path}: no images in <class>/<file> layout (found {len(files)} files); put each "
                            "class's images in a folder named after the class")
        self.entries = [(Path(f).parts[-2], f) for f in keep]
        self.stats = [[f, *info[f]] for f in keep]

    def read(self, member: str) -> bytes:
        return self.zip.read(member) if self.zip else (self.path / member).read_bytes()


def decode(source: Source, size: Sequence[int] | None) -> Tensor:
    """Every image of ``source`` as uint8 ``[N, 3, H, W]`` (RGB), resized to ``size`` (H, W) if given; a
    progress bar on a terminal, a log line every tenth otherwise."""
    from PIL import Image, UnidentifiedImageError

    out, shape, n = [], None, len(source.entries)
    bar = _progress(n, f"decoding {n} images of {source.path.name}")
    for i, (_, member) in enumerate(source.entries):
        where = f"{source.path}:{member}" if source.zip else str(source.path / member)
        try:
            with Image.open(_io.BytesIO(source.read(member))) as im:
                im = im.convert("RGB")
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(im.height, im.width, 3)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise DataError(f"{where}: not an image Pillow can read ({type(e).__name__}); remove or "
                            "replace the file") from None
        if shape is None:
            shape = x.shape
        elif x.shape != shape:
            raise DataError(f"{where}: {x.shape[1]}x{x.shape[0]} pixels, the first image has {shape[1]}x{shape[0]}; "
                            "give images of one size or set data.args.size=[H,W] to resize them all")
        out.append(x.permute(2, 0, 1))
        bar(i + 1)
    return torch.stack(out)


def _progress(total: int, what: str) -> Callable[[int], None]:
    """``advance(done)``: a rich bar on a terminal, else an INFO line at every tenth; nothing for
    fewer than 1,000 items (a second or so)."""
    if total < 1000:
        return lambda done: None
    if sys.stderr.isatty():
        from rich.progress import Progress

        progress = Progress(transient=True)
        task = progress.add_task(what, total=total)
        progress.start()

        def advance(done: int) -> None:
            progress.update(task, completed=done)
            if done == total:
                progress.stop()
        return advance
    step = max(1, total // 10)
    return lambda done: log.info("%s: %d / %d", what, done, total) if done % step == 0 or done == total else None


class ImageDataset(Epochal, Fingerprinted):
    """uint8 images ``[N, 3, H, W]`` and labels, served as float images normalised by ``mean`` / ``std``
    (per channel, on the [0, 1] scale) under ``image``, augmented by ``augment``, each item's view
    seeded by ``(seed, epoch, item)`` unless ``seed`` is ``None`` (see the module docstring)."""

    def __init__(self, name: str, images: Tensor, labels: Tensor, mean: Sequence[float], std: Sequence[float],
                 augment: Sequence[str] = (), seed: int | None = None):
        self.name, self.images, self.labels, self.augment = name, images, labels, tuple(augment)
        self.seed, self.epoch = seed, 0
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.deterministic = not self.augment
        self._policy = None
        if {"autoaugment", "trivialaugment"} & set(self.augment):
            from torchvision.transforms import v2

            self._policy = (v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10) if "autoaugment" in self.augment
                            else v2.TrivialAugmentWide())

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def plain(self) -> "ImageDataset":
        """The same images and labels without augmentation (e.g. to score or select training items
        as a model sees them at test time)."""
        return ImageDataset(f"{self.name}/plain", self.images, self.labels, self.mean.flatten().tolist(),
                            self.std.flatten().tolist())

    @property
    def reproducible(self) -> bool:
        return bool(self.augment) and self.seed is not None

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[0] for k, v in self.__getitems__([i]).items()}

    def __getitems__(self, ids: Sequence[int]) -> dict[str, Tensor]:
        idx = torch.as_tensor(ids, dtype=torch.long)
        x = self.images[idx]
        if self.augment:
            x = self._augment(x, idx) if self.seed is not None else self._augment_batch(x)
        image = (x.float() / 255 - self.mean) / self.std
        batch = {"image": image, "label": self.labels[idx], "index": idx}
        if self.reproducible:
            batch["epoch"] = torch.full_like(idx, self.epoch)
        return batch

    def _augment_batch(self, x: Tensor) -> Tensor:
        """The batch's views from the global generator."""
        if self._policy is not None:
            x = torch.stack([self._policy(im) for im in x])
        if "crop" in self.augment:
            x = random_crop(x, 4)
        if "flip" in self.augment:
            flip = torch.rand(len(x)) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x

    def _augment(self, x: Tensor, idx: Tensor) -> Tensor:
        """Each item's view from a generator seeded by ``(seed, epoch, item)``."""
        out = []
        for im, i in zip(x, idx.tolist()):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, self.epoch, i))
                out.append(self._augment_batch(im[None])[0])
        return torch.stack(out)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}|{self.augment}|{self.seed}|{self.mean.flatten().tolist()}|"
                           f"{self.std.flatten().tolist()}".encode())
        hash_tensors(h, {"images": self.images, "labels": self.labels})
        return h.hexdigest()


def view_seed(seed: int, epoch: int, item: int) -> int:
    """The seed of item ``item``'s view in ``epoch``: distinct for every triple, the same on every machine."""
    return (((seed * 1_000_003) ^ epoch) * 2_000_003 + item) % (2**63 - 1)


def crop(x: Tensor, pad: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Each image ``n`` of ``x`` (``[B, C, H, W]``) padded by ``pad`` zero pixels a side, then cropped
    back to ``H x W`` from row ``dy[n]`` and column ``dx[n]`` of the padded image (``0 .. 2 pad``)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy.view(b, 1) + torch.arange(h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


def random_crop(x: Tensor, pad: int) -> Tensor:
    """Each image of ``x`` (``[B, C, H, W]``) padded by ``pad`` zero pixels a side, then cropped back to
    ``H x W`` at a uniformly random offset."""
    dy, dx = torch.randint(0, 2 * pad + 1, (2, len(x)))
    return crop(x, pad, dy, dx)


def shift(x: Tensor, offsets: Tensor) -> Tensor:
    """Each image of ``x`` (``[B, C, H, W]``) moved by ``offsets[n] = (dx, dy)`` pixels (right, down),
    zeros moved in (a crop of the padded image, :func:`crop`)."""
    pad = int(offsets.abs().max()) if len(offsets) else 0
    return crop(x, pad, pad - offsets[:, 1], pad - offsets[:, 0])


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation of uint8 images on the [0, 1] scale, accumulated in
    float64 over chunks (no float copy of the whole set)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for part in images.split(chunk):
        x = part.double()
        total += x.sum((0, 2, 3))
        squares += x.square().sum((0, 2, 3))
    n = images.numel() / images.shape[1]
    mean = total / n
    std = (squares / n - mean.square()).clamp_min(0).sqrt()
    return (mean / 255).tolist(), (std / 255).tolist()


def _load(path: Path, size, cache_dir: Path, limit_per_class: int | None,
          offset_per_class: int = 0) -> tuple[Tensor, list[str], list[str]]:
    """Images (decoded or from the cache), their class names and the sorted class list; of each class
    the images ``offset_per_class + 1 ..`` (at most ``limit_per_class`` of them) in member order."""
    source = Source(path)
    if limit_per_class is not None or offset_per_class:
        seen: Counter[str] = Counter()
        pick = []
        for i, (c, _) in enumerate(source.entries):
            seen[c] += 1
            if offset_per_class < seen[c] <= offset_per_class + (limit_per_class or len(source.entries)):
                pick.append(i)
        source.entries = [source.entries[i] for i in pick]
        source.stats = [source.stats[i] for i in pick]
    images = cached("images", {"size": list(size) if size else None, "path": path.name}, source.stats,
                    lambda: decode(source, size), cache_dir, "image_folder")
    return images, [c for c, _ in source.entries], sorted({c for c, _ in source.entries})


@DATASETS.register("image_folder", ranges={"split_seed": SEED, "augment_seed": SEED, "fractions": Fractions(),
                                           "val_fraction": Range(0, 1, low_open=True, high_open=True),
                                           "limit_per_class": COUNT, "test_limit_per_class": COUNT,
                                           "offset_per_class": NON_NEGATIVE_INT, "corrupt": NON_NEGATIVE,
                                           "corrupt_seed": SEED})
def image_folder(root: str, path: str, test_path: str | None = None, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                 val_fraction: float = 0.1, split_seed: int = 0, size: Sequence[int] | None = None,
                 augment: Sequence[str] = (), augment_seed: int | None = 0, cache_dir: str | os.PathLike | None = None,
                 limit_per_class: int | None = None, test_limit_per_class: int | None = None,
                 normalize: bool = True, offset_per_class: int = 0, corrupt: float = 0.0,
                 corrupt_seed: int = 0) -> DataSplits:
    """Train/val/test splits of the images at ``path`` (a folder or zip under the data root, see the
    module docstring): with ``test_path`` that folder or zip is the test split and ``val_fraction`` of
    ``path`` (stratified) the validation split; without, ``fractions`` split ``path`` three ways.
    ``size`` (H, W) resizes every image; ``limit_per_class`` keeps the first images of each class of
    ``path`` (a training subset), ``test_limit_per_class`` those of ``test_path`` (default: all).
    ``normalize``: standardise each channel with the training split's statistics (the default), or
    serve pixels in ``[0, 1]`` (``false``: for a model that normalises its own input, e.g. ``clip``).
    ``offset_per_class`` skips the first images of each class of ``path`` (images no other run of the
    same ``limit_per_class`` saw); ``corrupt`` shifts the images of ``path`` (train and validation, and
    test without ``test_path``) by :func:`mmkd.modalities.image.corrupt.corrupt` at that strength,
    seeded by ``corrupt_seed``."""
    if unknown := [a for a in augment if a not in AUGMENTS]:
        raise ConfigError(f"data.args.augment: unknown augmentation {unknown[0]!r}; choose from: {', '.join(AUGMENTS)}")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    images, names, classes = _load(Path(root) / path, size, folder, limit_per_class, offset_per_class)
    images = shifted(images, corrupt, corrupt_seed)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[c] for c in names])
    if test_path is not None:
        test_images, test_names, test_classes = _load(Path(root) / test_path, size, folder, test_limit_per_class)
        if unknown := sorted(set(test_classes) - set(classes)):
            raise DataError(f"{Path(root) / test_path}: class {unknown[0]!r} is not among the training classes "
                            f"({', '.join(classes)})")
        if test_images.shape[1:] != images.shape[1:]:
            raise DataError(f"{Path(root) / test_path}: images of {tuple(test_images.shape[1:])}, the training "
                            f"images are {tuple(images.shape[1:])}; set data.args.size=[H,W]")
        train, val = stratified_split(labels, [1 - val_fraction, val_fraction], split_seed)
        parts = {"train": (images[train], labels[train]), "val": (images[val], labels[val]),
                 "test": (test_images, torch.tensor([index[c] for c in test_names]))}
    else:
        cut = stratified_split(labels, list(fractions), split_seed)
        parts = {s: (images[i], labels[i]) for s, i in zip(SPLITS, cut)}
    channels = images.shape[1]
    mean, std = channel_stats(parts["train"][0]) if normalize else ([0.0] * channels, [1.0] * channels)
    tag = f"image_folder/{Path(path).name}/{split_seed}" + (f"/corrupt{corrupt}-{corrupt_seed}" if corrupt else "")
    sets = [ImageDataset(f"{tag}/{s}", *parts[s], mean, std, *((augment, augment_seed) if s == "train" else ()))
            for s in SPLITS]
    log.info("image_folder: %s: %d classes, %d / %d / %d images of %s, augment %s", path, len(classes),
             *(len(d) for d in sets), "x".join(map(str, images.shape[1:])), list(augment) or "none")
    return DataSplits(*sets, num_classes=len(classes), shapes={"image": tuple(images.shape[1:])}, class_names=classes,
                      preprocessing={"image": [{"op": "standardize_channels", "mean": [255 * m for m in mean],
                                                "std": [255 * s for s in std]}]},  # on 0-255 pixels
                      metrics=task_metrics(labels, len(classes)))


@DATASETS.register("cifar10", ranges={"split_seed": SEED, "augment_seed": SEED, "val_size": COUNT,
                                      "limit_per_class": COUNT, "test_limit_per_class": COUNT,
                                      "offset_per_class": NON_NEGATIVE_INT, "corrupt": NON_NEGATIVE, "corrupt_seed": SEED})
def cifar10(root: str, val_size: int = 5000, split_seed: int = 0, augment: Sequence[str] = ("crop", "flip"),
            augment_seed: int | None = 0, cache_dir: str | os.PathLike | None = None,
            limit_per_class: int | None = None, test_limit_per_class: int | None = None,
            normalize: bool = True, offset_per_class: int = 0, corrupt: float = 0.0,
            corrupt_seed: int = 0) -> DataSplits:
    """CIFAR-10 from ``<root>/cifar10/train.zip`` and ``test.zip`` (see the module docstring); the
    last three arguments are :func:`image_folder`'s (a shifted pool of training images; the test split
    stays as it is)."""
    train = Path(root) / "cifar10" / "train.zip"
    if not train.is_file():
        raise ConfigError(f"cifar10: no {str(train)!r}; put CIFAR-10's train.zip and test.zip (<class>/<file> "
                          "inside) there or set data_root / MMKD_DATA")
    if offset_per_class + (limit_per_class or 0) > 5000 or offset_per_class >= 5000:
        raise ConfigError(f"data.args.offset_per_class={offset_per_class}: CIFAR-10 has 5000 training images a class; "
                          f"with limit_per_class={limit_per_class} keep offset + limit at most 5000")
    per_class = min(limit_per_class or 5000, 5000 - offset_per_class)
    if val_size >= 10 * per_class:
        raise ConfigError(f"data.args.val_size={val_size}: the training split has {10 * per_class} images; "
                          "hold out fewer")
    return image_folder(root, "cifar10/train.zip", "cifar10/test.zip", val_fraction=val_size / (10 * per_class),
                        split_seed=split_seed, augment=augment, augment_seed=augment_seed, cache_dir=cache_dir,
                        limit_per_class=limit_per_class, test_limit_per_class=test_limit_per_class,
                        normalize=normalize, offset_per_class=offset_per_class, corrupt=corrupt,
                        corrupt_seed=corrupt_seed)
