"""The augmentation-aware teacher cache (mmkd.view_cache): the same losses as a live teacher on the
same seeded views, no teacher forward in a later run, top-k reconstruction, invalidation."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term, Trainer
from mmkd.modalities.image.folders import ImageDataset
from mmkd.routers import ConstantRouter
from mmkd.view_cache import ViewCachedTeacher, cache_views, reconstruct


def images(seed=0, augment=("crop", "flip"), n=24):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    return ImageDataset("toy/train", x, torch.arange(n) % 4, [0.5] * 3, [0.25] * 3, augment, seed=seed)


class Counting(nn.Module):
    """A small CNN teacher that counts its forward calls."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def fit(tmp_path, teacher, name, data, bkl=False):
    torch.manual_seed(2)
    student = Net(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), ["image"])
    terms = [Term("ce"), Term("kd", args={"temperature": 4.0}), *([Term("bkl")] if bkl else [])]
    trainer = Trainer(run_dir=tmp_path / name, max_epochs=3, batch_size=8, tensorboard=False, progress="off", seed=0)
    history = trainer.fit(Distiller(student, [teacher], terms, ConstantRouter()), data, data).history
    return [[h[f"train/{t.name}"] for h in history] for t in terms[1:]]


@pytest.mark.parametrize("topk", [None, 4])  # 4 of 4 classes: the top-k path, nothing left out
def test_cached_views_give_the_live_teachers_losses_and_a_later_run_runs_no_teacher(tmp_path, topk, caplog):
    model = Counting()
    caplog.set_level(logging.INFO, "mmkd")
    bkl = topk is None  # full rows are the logits: a loss that is not shift-invariant sees them too
    live = fit(tmp_path, Teacher(model, ["image"]), "live", images(), bkl)
    model.calls = 0
    first = fit(tmp_path, cache_views(Teacher(model, ["image"]), images(), tmp_path / "cache", topk), "first", images(), bkl)
    assert model.calls == 9  # 3 epochs x 3 batches, each view computed once
    for a, b in zip(first, live, strict=True):
        assert a == pytest.approx(b, rel=2e-3)  # float16 storage
    reports = [r.getMessage() for r in caplog.records if r.getMessage().startswith("view cache: epoch")]
    assert [m.split(":")[1] for m in reports] == [" epoch 0", " epoch 1", " epoch 2"]  # the last epoch too
    assert all("0 of 3 batches' rows read" in m and "24 / 24 views stored" in m for m in reports)
    model.calls = 0
    again = fit(tmp_path, cache_views(Teacher(model, ["image"]), images(), tmp_path / "cache", topk), "again", images(), bkl)
    assert model.calls == 0 and again == first
    files = {p.name for p in next((tmp_path / "cache" / "views").iterdir()).iterdir()}
    per_epoch = ["filled", "logits"] if topk is None else ["filled", "indices", "values"]
    assert files == {"meta.json", *(f"e{e}.{n}.npy" for e in range(3) for n in per_epoch)}


def test_rows_an_interrupted_run_did_not_mark_are_computed_again(tmp_path):
    model = Counting()
    fit(tmp_path, cache_views(Teacher(model, ["image"]), images(), tmp_path / "cache"), "a", images())
    folder = next((tmp_path / "cache" / "views").iterdir())
    import numpy as np
    mask = np.load(folder / "e1.filled.npy", mmap_mode="r+")
    mask[:8] = False  # the first batch's rows of epoch 1 (shuffled order: some batches touch them)
    mask.flush()
    model.calls = 0
    fit(tmp_path, cache_views(Teacher(model, ["image"]), images(), tmp_path / "cache"), "b", images())
    assert 1 <= model.calls <= 3 and np.load(folder / "e1.filled.npy").all()


def test_topk_reconstruction_keeps_the_top_probabilities_and_spreads_the_rest():
    z = torch.randn(5, 10)
    logp = torch.log_softmax(z, 1)
    top = logp.topk(3, 1)
    p = reconstruct(top.values, top.indices, 10).exp()
    torch.testing.assert_close(p.gather(1, top.indices), top.values.exp())
    rest = (1 - top.values.exp().sum(1, keepdim=True)) / 7
    others = torch.ones_like(p, dtype=torch.bool).scatter_(1, top.indices, False)
    torch.testing.assert_close(p[others].view(5, 7), rest.expand(5, 7))
    torch.testing.assert_close(p.sum(1), torch.ones(5))


def test_the_key_covers_weights_data_augmentation_seed_and_topk(tmp_path):
    def folder(model, data, topk=None):
        return cache_views(Teacher(model, ["image"]), data, tmp_path, topk).folder

    model = Counting()
    base = folder(model, images())
    assert folder(model, images()) == base
    other = Counting()
    with torch.no_grad():
        other.net[0].weight.add_(1)
    changed = [folder(other, images()), folder(model, images(seed=1)), folder(model, images(augment=("crop",))),
               folder(model, images(), topk=2), folder(model, images(n=16))]
    assert base not in changed and len(set(changed)) == len(changed)
    with pytest.raises(ValueError, match="does not seed its views"):
        cache_views(Teacher(model, ["image"]), images(seed=None), tmp_path)
    assert isinstance(cache_views(Teacher(model, ["image"]), images(), tmp_path), ViewCachedTeacher)


def test_feature_taps_are_cached_with_the_logits(tmp_path):
    """A teacher with features: both come back from the cache as the live teacher gave them (float16)."""
    model = Counting()
    live = Teacher(model, ["image"], features=["net.0", "net.2"])
    cached = cache_views(Teacher(model, ["image"], features=["net.0", "net.2"]), images(), tmp_path)
    data = images()
    data.set_epoch(1)
    batch = {**data.__getitems__(range(8)), "epoch": torch.ones(8, dtype=torch.long)}
    first, want = cached(batch), live(batch)
    again = cache_views(Teacher(model, ["image"], features=["net.0", "net.2"]), images(), tmp_path)
    model.calls = 0
    hit = again(batch)
    assert model.calls == 0 and set(hit.features) == {"net.0", "net.2"}
    for out in (first, hit):
        torch.testing.assert_close(out.logits, want.logits, rtol=2e-3, atol=2e-3)
        for p in ("net.0", "net.2"):
            torch.testing.assert_close(out.features[p], want.features[p], rtol=2e-3, atol=2e-3)
    assert {f.name for f in cached.folder.iterdir()} == {"meta.json", *(f"e1.{n}.npy" for n in
                                                                        ("logits", "feat0", "feat1", "filled"))}
    assert folder_key(tmp_path, model, []) != cached.folder  # the feature paths are part of the key
    reordered = cache_views(Teacher(model, ["image"], features=["net.2", "net.0"]), images(), tmp_path)(batch)
    assert list(reordered.features) == ["net.2", "net.0"]  # in the teacher's order, not the files' (sorted)
    torch.testing.assert_close(reordered.features["net.2"], want.features["net.2"], rtol=2e-3, atol=2e-3)


def folder_key(root, model, features):
    return cache_views(Teacher(model, ["image"], features=features), images(), root).folder


def test_values_beyond_float16_are_clamped_not_infinite(caplog):
    from mmkd.view_cache import half

    out = half(torch.tensor([[1e6, -2.0, -1e9]]), "logits")
    assert np.isfinite(out).all() and out[0, 0] == np.float16(65504) and out[0, 1] == -2
    assert "beyond float16's range" in caplog.text
