"""Image folders and CIFAR-10 (mmkd.modalities.image.folders): folders and zips decode to the same
pixels, splits and classes, the disk cache, bad files, augmentations."""
from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.data import DataError
from mmkd.modalities.image import folders
from mmkd.modalities.image.folders import channel_stats, random_crop
from mmkd.registry import DATASETS

CLASSES = ("cat", "dog", "emu")


def make_folder(root: Path, per_class=8, size=(8, 8)) -> dict[str, np.ndarray]:
    """PNG images ``root/<class>/<n>.png`` of seeded random pixels, and a README that is skipped."""
    rng = np.random.default_rng(0)
    pixels = {}
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for n in range(per_class):
            a = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{n}.png")
            pixels[f"{c}/{n}.png"] = a
    (root / "README.txt").write_text("not an image")
    return pixels


def zip_of(folder: Path, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for f in sorted(folder.rglob("*")):
            if f.is_file():
                z.write(f, f.relative_to(folder).as_posix())
    return path


def test_folder_and_zip_decode_to_the_same_pixels_and_splits(tmp_path):
    pixels = make_folder(tmp_path / "imgs")
    zip_of(tmp_path / "imgs", tmp_path / "imgs.zip")
    kw = dict(fractions=(0.5, 0.25, 0.25), cache_dir=tmp_path / "cache")
    a = DATASETS["image_folder"](root=str(tmp_path), path="imgs", **kw)
    b = DATASETS["image_folder"](root=str(tmp_path), path="imgs.zip", **kw)
    assert a.class_names == list(CLASSES) and a.num_classes == 3 and a.shapes == {"image": (3, 8, 8)}
    assert [len(d) for d in (a.train, a.val, a.test)] == [12, 6, 6]
    for s in ("train", "val", "test"):
        assert torch.equal(getattr(a, s).images, getattr(b, s).images)
        assert torch.bincount(getattr(a, s).labels, minlength=3).tolist() == [len(getattr(a, s)) // 3] * 3
    everything = torch.cat([a.train.images, a.val.images, a.test.images])
    assert sorted(map(bytes, everything.permute(0, 2, 3, 1).numpy())) == sorted(map(bytes, pixels.values()))
    mean, std = channel_stats(a.train.images)
    x = a.train.images.double() / 255
    assert mean == pytest.approx(x.mean((0, 2, 3)).tolist()) and std == pytest.approx(x.std((0, 2, 3), correction=0).tolist())
    item = a.train[0]  # normalised with the training split's statistics
    want = (a.train.images[0].float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(item["image"], want)
    from mmkd.preprocess import apply  # what mmkd predict repeats on raw 0-255 pixels
    torch.testing.assert_close(apply(a.preprocessing["image"], a.train.images[:1].float())[0], want, rtol=1e-5, atol=1e-5)


def test_normalize_false_serves_pixels_in_0_1(tmp_path):
    make_folder(tmp_path / "imgs")
    d = DATASETS["image_folder"](root=str(tmp_path), path="imgs", fractions=(0.5, 0.25, 0.25),
                                 cache_dir=tmp_path / "cache", normalize=False)
    torch.testing.assert_close(d.test[1]["image"], d.test.images[1].float() / 255)
    assert d.preprocessing["image"][0]["mean"] == [0.0] * 3 and d.preprocessing["image"][0]["std"] == [255.0] * 3


def test_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch, caplog):
    make_folder(tmp_path / "imgs")
    DATASETS["image_folder"](root=str(tmp_path), path="imgs", cache_dir=tmp_path / "cache")
    monkeypatch.setattr(folders, "decode", lambda *a: pytest.fail("decoded again"))
    DATASETS["image_folder"](root=str(tmp_path), path="imgs", cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "imgs" / "cat" / "0.png")  # a changed file
    os.utime(tmp_path / "imgs" / "cat" / "0.png", ns=(1, 1))
    with caplog.at_level(logging.INFO, logger="mmkd"):
        d = DATASETS["image_folder"](root=str(tmp_path), path="imgs", cache_dir=tmp_path / "cache")
    assert any("built the images cache of 24 files" in r.getMessage() for r in caplog.records)
    assert (torch.cat([d.train.images, d.val.images, d.test.images]) == 0).all((1, 2, 3)).sum() == 1


def test_bad_files_are_named(tmp_path, capsys):
    make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "dog" / "9.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"imgs/dog/9.jpg: not an image Pillow can read"):
        DATASETS["image_folder"](root=str(tmp_path), path="imgs", cache_dir=tmp_path / "cache")
    code = main(["run", f"data_root={tmp_path}", "data.name=image_folder", "+data.args.path=imgs",
                 f"+data.args.cache_dir={tmp_path / 'cache'}", "teachers.cnn.inputs=[image]",
                 "student.inputs=[image]", f"out_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "9.jpg: not an image Pillow can read" in err, err
    (tmp_path / "imgs" / "dog" / "9.jpg").unlink()
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(tmp_path / "imgs" / "dog" / "9.png")
    with pytest.raises(DataError, match=r"9.png: 8x6 pixels, the first image has 8x8; .* data.args.size"):
        DATASETS["image_folder"](root=str(tmp_path), path="imgs", cache_dir=tmp_path / "cache")
    d = DATASETS["image_folder"](root=str(tmp_path), path="imgs", cache_dir=tmp_path / "cache", size=[4, 4])
    assert d.shapes == {"image": (3, 4, 4)}
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'; choose from: crop, flip"):
        DATASETS["image_folder"](root=str(tmp_path), path="imgs", augment=["rotate"])
    with pytest.raises(ConfigError, match="no image folder or zip"):
        DATASETS["image_folder"](root=str(tmp_path), path="nothing")


def test_random_crop_is_a_window_of_the_padded_image_and_flip_mirrors():
    x = torch.randint(0, 256, (5, 3, 6, 7), dtype=torch.uint8)
    torch.manual_seed(0)
    out = random_crop(x, 2)
    torch.manual_seed(0)
    dy, dx = torch.randint(0, 5, (2, 5))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(5):
        assert torch.equal(out[i], padded[i, :, dy[i]:dy[i] + 6, dx[i]:dx[i] + 7])
    d = folders.ImageDataset("t", x, torch.zeros(5, dtype=torch.long), [0, 0, 0], [1, 1, 1], ["flip"])
    assert not d.deterministic and folders.ImageDataset("t", x, torch.zeros(5), [0] * 3, [1] * 3).deterministic
    torch.manual_seed(1)
    got = d.__getitems__(range(5))["image"]
    torch.manual_seed(1)
    flip = torch.rand(5) < 0.5
    for i in range(5):
        assert torch.equal(got[i], (x[i].flip(-1) if flip[i] else x[i]).float() / 255)


@pytest.mark.slow
def test_cifar10_from_the_shared_zips(tmp_path):
    if "MMKD_DATA" not in os.environ:
        pytest.skip("set MMKD_DATA to the data root (for example ../shared/data)")
    data_root = Path(os.environ["MMKD_DATA"])
    d = DATASETS["cifar10"](root=str(data_root), val_size=50, limit_per_class=20, cache_dir=tmp_path)
    assert d.class_names == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert [len(s) for s in (d.train, d.val, d.test)] == [150, 50, 10_000] and d.shapes == {"image": (3, 32, 32)}
    assert torch.bincount(d.test.labels).tolist() == [1000] * 10  # a training subset; the test split whole
    small = DATASETS["cifar10"](root=str(data_root), val_size=50, limit_per_class=20, test_limit_per_class=3,
                                cache_dir=tmp_path)
    assert len(small.test) == 30 and torch.equal(small.test.images, d.test.images.view(10, 1000, 3, 32, 32)[:, :3].flatten(0, 1))
    assert d.train.augment == ("crop", "flip") and d.val.deterministic and d.test.deterministic
    with zipfile.ZipFile(data_root / "cifar10" / "train.zip") as z:
        names = [n for n in z.namelist() if n.endswith(".jpg")]
    assert len(names) == 50_000 and all(sum(n.startswith(c + "/") for n in names) == 5000 for c in d.class_names)


def test_seeded_views_are_rebuilt_whatever_the_batch_and_change_with_the_epoch():
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    make = lambda seed: folders.ImageDataset("t", x, torch.zeros(6, dtype=torch.long), [0.5] * 3, [0.25] * 3,  # noqa: E731
                                             ["crop", "flip", "trivialaugment"], seed=seed)
    a, b = make(7), make(7)
    torch.manual_seed(0)
    first = a.__getitems__([0, 1, 2, 3, 4, 5])["image"]
    torch.manual_seed(123)  # the global generator does not matter
    again = torch.cat([b.__getitems__([4, 5])["image"], b.__getitems__([0, 1, 2, 3])["image"]])
    assert torch.equal(first, again[[2, 3, 4, 5, 0, 1]])
    a.set_epoch(1)
    later = a.__getitems__(range(6))["image"]
    assert not torch.equal(first, later) and torch.equal(later, (b.set_epoch(1), b.__getitems__(range(6)))[1]["image"])
    assert not torch.equal(first, make(8).__getitems__(range(6))["image"])  # another augment_seed, other views
    assert make(7).fingerprint != make(8).fingerprint


def test_the_trainer_tells_an_epochal_data_set_its_epoch(tmp_path):
    from mmkd import Distiller, Net, Term, Trainer
    from mmkd.data import Epochal, TensorDictDataset

    class Seen(Epochal, TensorDictDataset):
        epochs: list

        def set_epoch(self, epoch):
            self.epochs.append(epoch)

    data = Seen("seen", x=torch.randn(8, 4), label=torch.arange(8) % 2)
    data.epochs = []
    Trainer(run_dir=tmp_path, max_epochs=3, batch_size=4, tensorboard=False, progress="off").fit(
        Distiller(Net(torch.nn.Linear(4, 2), ["x"]), [], [Term("ce")]), data, data)
    assert data.epochs == [0, 1, 2]
