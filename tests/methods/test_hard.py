"""HARD (mmkd.methods.hard) and the MNIST data set it is shown on (mmkd.modalities.image.mnist): the
warp's bounds and its shift against pixel arithmetic, one augmentation step against the objective
recomputed by hand, the batch the transform returns, exact resume of the augmentation model's
optimizer, and a run of mnist_hard on a small MNIST written here."""
import copy
import gzip
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkd.cli import main
from mmkd.methods.hard import VAE, Hard, LatentShift, Warp
from mmkd.modalities.image.folders import shift
from mmkd.net import Net, Teacher
from mmkd.registry import DATASETS


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", n) for n in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def small_mnist(tmp_path):
    """300 seeded random 28x28 'digits' (a bright square whose place depends on the label)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 30)
    images = rng.integers(0, 40, (300, 28, 28))
    for i, y in enumerate(labels):
        r, c = 4 + 2 * (y // 5) * 4, 4 + (y % 5) * 4
        images[i, r:r + 6, c:c + 6] = 250
    write_idx(tmp_path / "data" / "mnist" / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "data" / "mnist" / "t10k-labels-idx1-ubyte.gz", labels)
    return tmp_path / "data"


def test_shift_moves_pixels_and_fills_black():
    x = torch.arange(2 * 1 * 5 * 6, dtype=torch.float32).view(2, 1, 5, 6) + 1
    out = shift(x, torch.tensor([[2, -1], [0, 0]]))
    for yy in range(5):
        for xx in range(6):
            src_y, src_x = yy + 1, xx - 2
            want = x[0, 0, src_y, src_x] if 0 <= src_y < 5 and 0 <= src_x < 6 else 0.0
            assert out[0, 0, yy, xx] == want
    assert torch.equal(out[1], x[1])


def test_mnist_splits_and_its_shifted_test_split(small_mnist):
    d = DATASETS["mnist"](root=str(small_mnist), fractions=(0.6, 0.2, 0.2))
    moved = DATASETS["mnist"](root=str(small_mnist), fractions=(0.6, 0.2, 0.2), test_shift=3, shift_seed=1)
    assert [len(s) for s in (d.train, d.val, d.test)] == [180, 60, 60]
    assert torch.bincount(d.train.tensors["label"]).tolist() == [18] * 10
    assert torch.equal(moved.train.tensors["image"], d.train.tensors["image"])
    g = torch.Generator().manual_seed(1)
    offsets = torch.randint(-3, 4, (60, 2), generator=g)
    torch.testing.assert_close(moved.test.tensors["image"], shift(d.test.tensors["image"], offsets))
    assert moved.test.name != d.test.name and d.test.tensors["image"].max() <= 1.0
    with pytest.raises(Exception, match="mnist: missing"):
        DATASETS["mnist"](root=str(small_mnist / "nowhere"))


def test_warp_stays_within_its_bounds_and_zero_bounds_are_the_identity():
    torch.manual_seed(0)
    w = Warp(0.3, 0.1, 0.25, init_std=5.0)  # large weights: saturated, at the bounds
    x = torch.rand(64, 1, 28, 28)
    p = w.params(x, torch.randn(64, 8))
    assert p[:, 0].abs().max() <= 0.3 and p[:, 1].abs().max() <= 0.1 and p[:, 2:].abs().max() <= 0.25
    assert p[:, 2:].abs().max() > 0.2  # and they are reached
    torch.testing.assert_close(Warp(0.0, 0.0, 0.0)(x), x, atol=1e-5, rtol=0)


def test_a_warp_of_shift_t_moves_the_image_by_t_half_widths():
    w = Warp(0.0, 0.0, 1.0)
    with torch.no_grad():
        w.net[-1].weight.zero_()
        w.net[-1].bias.copy_(torch.tensor([0.0, 0.0, float(torch.atanh(torch.tensor(4 / 28))), 0.0]))
    x = torch.rand(2, 1, 28, 28)
    out = w(x)  # shift tx = 4/28 of half the width: 2 pixels; sampling at x + 2 moves the content left
    torch.testing.assert_close(out[..., :26], x[..., 2:], atol=1e-5, rtol=0)


def models():
    torch.manual_seed(0)
    teacher = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), ["image"])
    student = Net(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), ["image"])
    return teacher, student


def reference_step(ref: nn.Module, params: list, x: torch.Tensor, teacher, student) -> None:
    """One Adam step (lr 0.05) of ``params`` of the augmentation model ``ref`` on
    0.7 KL(p_T(x) || p_T(x')) - 2^2 KL(p_T^2(x') || p_S^2(x')), written out."""
    xa = ref(x)
    t_real, t_aug, s_aug = teacher.model(x), teacher.model(xa), student.model(xa)
    constraint = F.kl_div(t_aug.log_softmax(1), t_real.softmax(1).detach(), reduction="batchmean")
    gap = 4.0 * F.kl_div((s_aug / 2).log_softmax(1), (t_aug / 2).softmax(1), reduction="batchmean")
    opt = torch.optim.Adam(params, lr=0.05)
    (0.7 * constraint - gap).backward()
    opt.step()


def test_one_step_follows_the_objective():
    """The augmentation model's update is one Adam step on
    lambda KL(p_T(x) || p_T(x')) - tau^2 KL(p_T^tau(x') || p_S^tau(x')), recomputed here."""
    teacher, student = models()
    batch = {"image": torch.rand(16, 1, 8, 8), "label": torch.arange(16) % 5}
    hard = Hard(lr=0.05, weight=0.7, temperature=2.0)
    ref = Warp(*hard.warp.bounds)
    ref.load_state_dict(hard.warp.state_dict())
    torch.manual_seed(3)
    hard.step(batch, student, [teacher])
    assert all(p.grad is None for p in (*student.parameters(), *teacher.parameters()))  # G's step alone
    torch.manual_seed(3)
    reference_step(ref, list(ref.parameters()), batch["image"], teacher, student)
    for a, b in zip(hard.warp.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_steps_raise_the_disagreement_without_the_constraint():
    teacher, student = models()
    x = torch.zeros(32, 1, 8, 8)  # a 3 x 3 square in 16 places
    for i in range(32):
        x[i, 0, i % 4 + 1:i % 4 + 4, (i // 4) % 4 + 1:(i // 4) % 4 + 4] = 1
    hard = Hard(lr=0.01, weight=0.0)
    torch.manual_seed(0)
    gaps = [hard.step({"image": x, "label": torch.arange(32) % 5}, student, [teacher]) for _ in range(40)]
    assert min(gaps[-10:]) > 2 * gaps[0]


@pytest.mark.parametrize("mode", ["append", "replace"])
def test_the_returned_batch(mode):
    teacher, student = models()
    batch = {"image": torch.rand(6, 1, 8, 8), "label": torch.arange(6) % 5}
    out = Hard(mode=mode)(batch, student, [teacher])
    if mode == "append":
        assert torch.equal(out["image"][:6], batch["image"]) and torch.equal(out["label"][:6], batch["label"])
        assert (out["label"][6:] == -1).all() and out["image"].shape == (12, 1, 8, 8)
    else:
        assert (out["label"] == -1).all() and out["image"].shape == (6, 1, 8, 8)
    assert not out["image"].requires_grad


def test_the_optimizer_state_resumes_exactly():
    teacher, student = models()
    batch = {"image": torch.rand(8, 1, 8, 8), "label": torch.arange(8) % 5}
    a = Hard(lr=0.05)
    torch.manual_seed(0)
    a.step(batch, student, [teacher])
    b = Hard(lr=0.05)
    b.load_state_dict(a.state_dict())
    for h in (a, b):
        torch.manual_seed(1)
        h.step(batch, student, [teacher])
    for p, q in zip(a.warp.parameters(), b.warp.parameters()):
        assert torch.equal(p, q)
    c = Hard(lr=0.05)  # the weights alone, without the optimizer's state: the second step differs
    c.warp.load_state_dict(b.warp.state_dict())
    d = Hard(lr=0.05)
    d.load_state_dict(b.state_dict())
    for h in (c, d):
        torch.manual_seed(2)
        h.step(batch, student, [teacher])
    assert not all(torch.equal(p, q) for p, q in zip(c.warp.parameters(), d.warp.parameters()))


def test_mnist_hard_runs_and_draws_its_examples(small_mnist, tmp_path):
    code = main(["run", "experiment=mnist_hard", f"data_root={small_mnist}", f"out_dir={tmp_path / 'out'}",
                 "trainer.max_epochs=2", "teachers.cnn.epochs=1", "trainer.batch_size=32", "trainer.progress=off",
                 "trainer.tensorboard=false", "export=[]", "data.args.fractions=[0.6,0.2,0.2]"])
    assert code == 0
    (run_dir,) = (tmp_path / "out" / "mnist_hard").iterdir()
    assert (run_dir / "student" / "hard_examples.png").stat().st_size > 1000
    header, *rows = (run_dir / "student" / "metrics.csv").read_text().splitlines()
    assert "hard/gap" in header.split(",") and len(rows) == 2
    assert 0 <= json.loads((run_dir / "results.json").read_text())["student"]["test_acc"] <= 1


def test_bad_hard_args_exit_2(small_mnist, tmp_path, capsys):
    code = main(["run", "experiment=mnist_hard", f"data_root={small_mnist}", f"out_dir={tmp_path / 'out'}",
                 "transforms.0.args.max_shift=2.0"])
    assert code == 2 and "max_shift" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- HARD-VAE: latent shifts of a VAE
def test_a_zero_latent_shift_is_the_identity_and_shifts_stay_bounded():
    torch.manual_seed(0)
    shift = LatentShift(channels=1, latent=4, max_latent=0.5)
    x = torch.rand(3, 1, 8, 8)
    nn.init.zeros_(shift.net[-1].weight)
    torch.testing.assert_close(shift(x), x, atol=1e-6, rtol=0)  # x + D(mu) - D(mu), not the VAE's reconstruction
    nn.init.normal_(shift.net[-1].weight, std=10.0)  # saturated: every latent unit moved by +-0.5
    mu = shift.vae.encode(x)[0]
    z = torch.randn(3, shift.noise, *mu.shape[2:])
    d = shift.max_latent * torch.tanh(shift.net(torch.cat([mu, z], 1)))
    assert d.abs().max() <= 0.5 and d.abs().max() > 0.49
    torch.testing.assert_close(shift(x, z), x + shift.vae.decode(mu + d) - shift.vae.decode(mu))
    with pytest.raises(ValueError, match="args.channels"):
        shift(torch.rand(2, 3, 8, 8))


def test_the_vae_pretrains_then_freezes_and_a_resume_does_not_train_it_again():
    from mmkd.data import TensorDictDataset

    torch.manual_seed(0)
    images = torch.zeros(64, 1, 8, 8)
    for i in range(64):
        images[i, 0, i % 5:i % 5 + 3, (i // 5) % 5:(i // 5) % 5 + 3] = 1
    data = TensorDictDataset("squares", image=images, label=torch.zeros(64, dtype=torch.long))
    hard = Hard(model="vae", latent=4, vae_epochs=150)

    class Stub:
        train_data = data

    hard.on_fit_start(Stub(), None)
    assert bool(hard.warp.ready) and not any(p.requires_grad for p in hard.warp.vae.parameters())
    with torch.no_grad():
        fresh = VAE(1, 4).loss(images, 1e-2)
        assert hard.warp.vae.loss(images, 1e-2) < 0.5 * fresh  # it learned the squares
    resumed = Hard(model="vae", latent=4, vae_epochs=150)
    resumed.load_state_dict(hard.state_dict())

    class NoData:
        @property
        def train_data(self):
            raise AssertionError("a resumed fit must not pretrain again")

    resumed.on_fit_start(NoData(), None)
    assert all(torch.equal(p, q) for p, q in zip(hard.parameters(), resumed.parameters()))


def test_a_vae_step_follows_the_objective():
    """As for the warp: one Adam step of C_phi on L_G, the VAE untouched."""
    teacher, student = models()
    batch = {"image": torch.rand(16, 1, 8, 8), "label": torch.arange(16) % 5}
    hard = Hard(model="vae", latent=4, lr=0.05, weight=0.7, temperature=2.0)
    hard.warp.freeze()
    ref = copy.deepcopy(hard.warp)
    vae = copy.deepcopy(hard.warp.vae.state_dict())
    torch.manual_seed(3)
    hard.step(batch, student, [teacher])
    torch.manual_seed(3)
    reference_step(ref, list(ref.net.parameters()), batch["image"], teacher, student)
    for a, b in zip(hard.warp.net.parameters(), ref.net.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(torch.equal(v, hard.warp.vae.state_dict()[k]) for k, v in vae.items())


def test_vae_weights_load_from_a_state_dict(tmp_path):
    vae = VAE(1, 4)
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    hard = Hard(model="vae", latent=4, vae=str(tmp_path / "vae.pt"))
    assert bool(hard.warp.ready) and all(torch.equal(p, q) for p, q in zip(vae.parameters(), hard.warp.vae.parameters()))
    with pytest.raises(ValueError, match="model: vae"):
        Hard(vae=str(tmp_path / "vae.pt"))
