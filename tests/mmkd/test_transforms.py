"""Batch transforms (mmkd.transforms): mixup's copies against the formula with the same random
draws, the Distiller applying transforms in training only, and the cached-teacher guard; cutmix's
boxes against a pixel-by-pixel reference of the same draws, its exact lam, the replace mode, its
refusals, and a Distiller step whose teacher is shown the cut-and-pasted images."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, cache_teacher
from mmkd.checks import POSITIVE
from mmkd.registry import TRANSFORMS
from mmkd.routers import ConstantRouter
from mmkd.transforms import BatchTransform, CutMix, Mixup


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 4, generator=g), "label": torch.randint(0, 3, (n,), generator=g),
            "index": torch.arange(n)}


def test_mixup_appends_mixed_copies_by_the_formula():
    b = batch()
    torch.manual_seed(5)
    out = Mixup(alpha=0.4)(b, None, [])
    torch.manual_seed(5)  # the same draws, in the same order: lam, then the permutation
    lam = float(torch.distributions.Beta(0.4, 0.4).sample())
    perm = torch.randperm(6)
    assert torch.equal(out["x"][:6], b["x"]) and torch.equal(out["label"][:6], b["label"])
    assert torch.allclose(out["x"][6:], lam * b["x"] + (1 - lam) * b["x"][perm])
    assert out["label"][6:].tolist() == [-1] * 6  # label terms see only the originals
    assert torch.equal(out["index"], torch.cat([b["index"], b["index"]]))  # not mixed: an integer entry


def test_mixup_refuses_what_it_cannot_mix():
    with pytest.raises(KeyError, match="mixup.keys: the batch has no image; it has: x, label, index"):
        Mixup(keys=["image"])(batch(), None, [])
    with pytest.raises(ValueError, match="independent instances"):
        Mixup()({**batch(), "edge_index": torch.zeros(2, 1, dtype=torch.long)}, None, [])


class Double(BatchTransform):
    def forward(self, batch, student, teachers):
        assert isinstance(student, Net) and len(teachers) == 1
        return {**batch, "x": 2 * batch["x"]}


def kd(transforms, teachers=None):
    torch.manual_seed(0)
    teacher = Teacher(nn.Linear(4, 3), ("x",))
    return Distiller(Net(nn.Linear(4, 3), ("x",)), teachers or [teacher], [Term("ce"), Term("kd")],
                     ConstantRouter(), transforms=transforms)


def test_transforms_change_training_batches_not_predictions():
    plain, doubled = kd([]), kd([Double()])
    b = batch()
    assert torch.equal(doubled.predict(b), plain.predict(b))
    assert torch.equal(doubled(b)["loss"], plain({**b, "x": 2 * b["x"]})["loss"])
    assert not torch.equal(doubled(b)["loss"], plain(b)["loss"])


def test_a_transform_that_moves_inputs_refuses_a_cached_teacher(tmp_path):
    ds = TensorDictDataset("d", **{k: v for k, v in batch().items() if k != "index"})
    cached = cache_teacher(Teacher(nn.Linear(4, 3), ("x",)), ds, tmp_path)
    kd([Double()], [cached])  # keeps_inputs (the default): allowed
    with pytest.raises(ValueError, match=r"the batch transforms \['Mixup'\] change the teachers' inputs"):
        kd([Mixup()], [cached])


# CutMix (Yun et al., ICCV 2019) and what Mixup and CutMix share (mode, key checks)


def images(n=6, h=8, w=10, seed=0, distinct=False):
    """An image batch [n, 3, h, w] (``distinct``: every pixel value unique), labels, an integer index and
    a non-image float entry."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, 3, h, w, generator=g)
    if distinct:
        image = torch.arange(image.numel()).float().reshape(image.shape)
    return {"image": image, "label": torch.randint(0, 3, (n,), generator=g), "index": torch.arange(n),
            "feat": torch.randn(n, 4, generator=g)}


def reference_draws(seed, n, h, w, alpha=1.0):
    """The draws CutMix makes after ``torch.manual_seed(seed)``, in its order: lam, the permutation, the
    box centre's row, then its column."""
    torch.manual_seed(seed)
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(n)
    return lam, perm, int(torch.randint(h, ())), int(torch.randint(w, ()))


def reference_mask(h, w, lam, row, col):
    """The pasted pixels, one by one: those within half the cut size (int(side * sqrt(1 - lam)) // 2) of
    the centre, rows [row - ch/2, row + ch/2), columns likewise; the image border clips the box."""
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    mask = torch.zeros(h, w, dtype=torch.bool)
    for r in range(h):
        for c in range(w):
            mask[r, c] = row - ch // 2 <= r < row + ch // 2 and col - cw // 2 <= c < col + cw // 2
    return mask


def test_cutmix_pastes_the_permuted_images_box_drawn_from_the_seeded_generator():
    n, h, w = 6, 8, 10  # H != W: rows and columns must not be swapped
    b = images(n, h, w)
    clipped = interior = 0
    for seed in range(40):
        t = CutMix(alpha=1.0)
        torch.manual_seed(seed)
        out = t(b, None, [])
        lam, perm, row, col = reference_draws(seed, n, h, w)
        mask = reference_mask(h, w, lam, row, col)
        expected = torch.where(mask, b["image"][perm], b["image"])
        assert torch.equal(out["image"][:n], b["image"])  # the originals first, untouched
        assert torch.equal(out["image"][n:], expected)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        if mask.any():
            r0, r1, c0, c1 = t.box
            assert (r0, r1, c0, c1) == (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
            assert torch.equal(out["image"][n:, :, r0:r1, c0:c1], b["image"][perm, :, r0:r1, c0:c1])  # pasted
            clipped += r0 == 0 or c0 == 0 or r1 == h or c1 == w
            interior += 0 < r0 and 0 < c0 and r1 < h and c1 < w
        assert torch.equal(out["image"][n:] * ~mask, b["image"] * ~mask)  # outside the box: unchanged
        assert t.lam == pytest.approx(1 - mask.sum().item() / (h * w))  # lam: the exact kept fraction
        assert out["label"][n:].tolist() == [-1] * n and torch.equal(out["label"][:n], b["label"])
        assert torch.equal(out["feat"], torch.cat([b["feat"], b["feat"]]))  # not an image: copied as x_i
        assert torch.equal(out["index"], torch.cat([b["index"], b["index"]]))
    assert clipped and interior  # both cases were drawn


def test_cutmix_lam_equals_the_pasted_area_fraction_counted_in_pixels():
    n, h, w = 8, 12, 9
    b = images(n, h, w, distinct=True)  # a pasted pixel always differs from the one it covers
    for seed in range(20):
        t = CutMix(alpha=0.5)
        torch.manual_seed(seed)
        out = t(b, None, [])
        _, perm, _, _ = reference_draws(seed, n, h, w, alpha=0.5)
        changed = (out["image"][n:] != b["image"]).all(1)  # [n, h, w]: every channel pasted
        for i in range(n):
            if perm[i] != i:
                assert 1 - changed[i].float().mean().item() == pytest.approx(t.lam)
            else:
                assert not changed[i].any()  # pasted from itself


def test_replace_mode_returns_only_the_mixed_batch():
    n, h, w = 6, 8, 10
    b = images(n, h, w)
    torch.manual_seed(3)
    appended = CutMix(alpha=1.0)(b, None, [])
    torch.manual_seed(3)
    replaced = CutMix(alpha=1.0, mode="replace")(b, None, [])
    assert {k: v.shape[0] for k, v in replaced.items()} == {k: n for k in b}
    for k in b:
        assert torch.equal(replaced[k], appended[k][n:])
    assert replaced["label"].tolist() == [-1] * n
    torch.manual_seed(3)
    mixed = Mixup(alpha=1.0, mode="replace")(b, None, [])
    torch.manual_seed(3)
    assert torch.equal(mixed["image"], Mixup(alpha=1.0)(b, None, [])["image"][n:])


def one_line(excinfo):
    return "\n" not in str(excinfo.value)


def test_cutmix_refuses_what_it_cannot_cut_in_one_line():
    with pytest.raises(ValueError, match=r"cutmix: the batch has no image entry \[B, C, H, W\] to cut "
                                         r"\(it has: x \[6, 4\], label \[6\], index \[6\]\); name the") as e:
        CutMix()(batch(), None, [])
    assert one_line(e)
    with pytest.raises(ValueError, match=r"cutmix.keys: feat has shape \[6, 4\]; cutmix pastes boxes into "
                                         r"image batches \[B, C, H, W\]") as e:
        CutMix(keys=["image", "feat"])(images(), None, [])
    assert one_line(e)
    with pytest.raises(KeyError, match="cutmix.keys: the batch has no photo; it has: image, label, index, feat") as e:
        CutMix(keys=["photo"])(images(), None, [])
    with pytest.raises(ValueError, match=r"cutmix.keys: small is \(4, 4\) pixels but image is \(8, 10\); one box") as e:
        CutMix()({**images(), "small": torch.zeros(6, 1, 4, 4)}, None, [])
    assert one_line(e)
    with pytest.raises(KeyError, match="cutmix.label_key: the batch has no y; it has: image, label, index, feat"):
        CutMix(label_key="y")(images(), None, [])
    with pytest.raises(ValueError, match="cutmix: needs a batch of independent instances"):
        CutMix()({**images(), "edge_index": torch.zeros(2, 1, dtype=torch.long)}, None, [])
    for cls, name in [(CutMix, "cutmix"), (Mixup, "mixup")]:
        with pytest.raises(ValueError, match=f"^{name}.mode='swap'; choose from: append, replace$"):
            cls(mode="swap")
    assert TRANSFORMS["cutmix"] is CutMix and TRANSFORMS.meta("cutmix")["ranges"] == {"alpha": POSITIVE}


def test_a_distiller_step_with_cutmix_shows_the_teacher_the_mixed_images():
    n, h, w = 6, 8, 10
    b = images(n, h, w)
    torch.manual_seed(0)
    student_model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 3))
    teacher_model = nn.Sequential(nn.Flatten(), nn.Linear(3 * h * w, 3))
    seen = {"teacher": [], "student": []}
    teacher_model.register_forward_hook(lambda m, args, out: seen["teacher"].append(args[0].clone()))
    student_model.register_forward_hook(lambda m, args, out: seen["student"].append((args[0].clone(), out)))
    distiller = Distiller(Net(student_model, ("image",)), [Teacher(teacher_model, ("image",))],
                          [Term("ce"), Term("kd")], ConstantRouter(), transforms=[CutMix(alpha=1.0)])
    before = [p.detach().clone() for p in student_model.parameters()]
    optimizer = torch.optim.SGD(distiller.parameters(), lr=0.1)
    torch.manual_seed(11)
    losses = distiller(b)
    losses["loss"].backward()
    optimizer.step()

    torch.manual_seed(11)  # the same draws: the batch the transform made
    expected = CutMix(alpha=1.0)(b, None, [])["image"]
    assert len(seen["teacher"]) == 1 and torch.equal(seen["teacher"][0], expected)  # 2n images, n mixed
    assert not torch.equal(expected[n:], b["image"])
    student_in, student_logits = seen["student"][0]
    assert torch.equal(student_in, expected)
    assert torch.allclose(losses["ce"], F.cross_entropy(student_logits[:n], b["label"]))  # ce: the originals
    assert all(not torch.equal(p, q) for p, q in zip(before, student_model.parameters()))
    assert all(not p.requires_grad for p in teacher_model.parameters())  # the teacher stays frozen
