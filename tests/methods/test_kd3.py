"""KD^3: the selection router, the alignment and contrastive losses, MixDistribution, the shifted pool."""
from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from mmkd.data import TensorDictDataset
from mmkd.distiller import Distiller, Term
from mmkd.methods.kd3 import ContrastHead, KD3Align, KD3Router, MixDistribution, kd3_align, kd3_contrast
from mmkd.modalities.image.corrupt import corrupt
from mmkd.net import Net, Output, Teacher
from mmkd.trainer import Trainer, TrainerConfig


def out(logits) -> Output:
    return Output(torch.tensor(logits, dtype=torch.float32))


def test_the_router_selects_by_the_combined_prediction_and_hands_the_share_to_the_student():
    # teacher confident on rows 0 and 1; the student confident on rows 1 and 2 (log-probabilities)
    log = lambda p: [[math.log(v) for v in row] for row in p]  # noqa: E731
    teacher = out(log([[0.9, 0.1], [0.8, 0.2], [0.5, 0.5]]))
    student = out(log([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]]))
    router = KD3Router(threshold=0.75, start=1.0, end=0.5).eval()  # logs the share in training only
    router.set_progress(0.0)  # alpha 1: the teacher alone, max p = 0.9, 0.8, 0.5
    assert router(student, [teacher], {}).flatten().tolist() == [1.0, 1.0, 0.0]
    router.set_progress(1.0)  # alpha 0.5: max of the means = 0.7, 0.85, 0.7
    assert router(student, [teacher], {}).flatten().tolist() == [0.0, 1.0, 0.0]
    router.set_progress(0.5)  # alpha 0.75: 0.8, 0.825, 0.6
    w = router(student, [teacher, teacher], {})
    assert w.tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0]]  # one share per teacher
    router.train()
    router(student, [teacher], {})
    metrics = {}
    router.on_epoch_end(None, None, metrics)
    assert metrics["kd3/selected"] == pytest.approx(2 / 3)


def heads(d_s=3, d_t=4, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = KD3Align((d_s,), (d_t,))
    nn.init.normal_(module.project.weight, generator=g)
    s, t = nn.Linear(d_s, classes), nn.Linear(d_t, classes)
    for p in [*s.parameters(), *t.parameters()]:
        nn.init.normal_(p, generator=g)
    module.heads = (s, t)
    return module, s, t


def test_kd3_align_against_loops():
    module, s, t = heads()
    f_s, f_t = torch.randn(6, 3), torch.randn(6, 4)
    P, beta = module.project.weight.detach(), 0.3
    cls = sum((s.weight[c, j] - sum(t.weight[c, k] * P[k, j] for k in range(4))) ** 2
              for c in range(5) for j in range(3)) + sum((s.bias[c] - t.bias[c]) ** 2 for c in range(5))
    want = [sum((sum(P[k, j] * f_s[b, j] for j in range(3)) - f_t[b, k]) ** 2 for k in range(4)) / 4 + beta * cls / 15
            for b in range(6)]
    got = kd3_align(f_s, f_t, module=module, classifier=beta, reduction="none")
    assert torch.allclose(got, torch.stack(want).detach(), atol=1e-5)
    assert torch.allclose(kd3_align(f_s, f_t, module=module, classifier=beta), got.mean())


def test_kd3_align_is_zero_when_the_student_is_the_teacher_read_through_the_projection():
    module, s, t = heads()
    with torch.no_grad():
        s.weight.copy_(t.weight @ module.project.weight)
        s.bias.copy_(t.bias)
    f_s = torch.randn(4, 3)
    f_t = module.project(f_s).detach()
    assert kd3_align(f_s, f_t, module=module).abs().item() < 1e-10
    # and then the logits agree
    assert torch.allclose(s(f_s), t(f_t), atol=1e-5)


def test_kd3_align_trains_the_projection_and_the_student_head_not_the_teacher():
    module, s, t = heads()
    for p in t.parameters():
        p.requires_grad_(False)
    kd3_align(torch.randn(4, 3), torch.randn(4, 4), module=module).backward()
    assert module.project.weight.grad.abs().sum() > 0 and s.weight.grad.abs().sum() > 0
    assert t.weight.grad is None


def test_mixdistribution_copies_carry_the_mixed_statistics():
    x = torch.randn(5, 3, 8, 8) * torch.rand(5, 3, 1, 1) * 3 + torch.randn(5, 3, 1, 1)
    batch = {"image": x, "label": torch.arange(5), "index": torch.arange(5) + 10}
    transform = MixDistribution(alpha=0.3, eps=0.0)
    torch.manual_seed(0)
    got = transform(batch, None, [])
    torch.manual_seed(0)  # the same draws, in the transform's order
    lam = torch.distributions.Beta(0.3, 0.3).sample((5,)).view(-1, 1)
    perm = torch.randperm(5)
    mu, sd = x.mean((2, 3)), x.var((2, 3)).sqrt()
    copies = got["image"][5:]
    assert torch.allclose(copies.mean((2, 3)), lam * mu + (1 - lam) * mu[perm], atol=1e-5)
    assert torch.allclose(copies.var((2, 3)).sqrt(), lam * sd + (1 - lam) * sd[perm], atol=1e-4)
    assert torch.equal(got["image"][:5], x)
    assert got["label"].tolist() == [0, 1, 2, 3, 4, -1, -1, -1, -1, -1]
    assert got["pair"].tolist() == [0, 1, 2, 3, 4] * 2 and got["index"].tolist() == list(range(10, 15)) * 2


def test_kd3_contrast_against_a_loop():
    head = ContrastHead((6,), dim=4)
    f = torch.randn(8, 6)
    pair = torch.tensor([0, 1, 2, 3, 0, 1, 2, 7])  # row 3 and row 7 have no partner
    got = kd3_contrast(f, module=head, batch={"pair": pair}, temperature=0.5, reduction="none")
    z = head(f).detach()
    for i in range(8):
        partners = [j for j in range(8) if j != i and pair[j] == pair[i]]
        if not partners:
            assert got[i] == 0
            continue
        denom = sum(math.exp(float(z[i] @ z[k]) / 0.5) for k in range(8) if k != i)
        assert got[i].item() == pytest.approx(-math.log(math.exp(float(z[i] @ z[partners[0]]) / 0.5) / denom), rel=1e-5)
    mean = kd3_contrast(f, module=head, batch={"pair": pair}, temperature=0.5)
    assert mean.item() == pytest.approx(got.sum().item() / 6, rel=1e-6)


def test_kd3_contrast_is_lower_for_aligned_copies():
    head = ContrastHead((6,), dim=16)
    f = torch.randn(8, 6)
    pair = torch.arange(8) % 4
    aligned = kd3_contrast(torch.cat([f[:4], f[:4]]), module=head, batch={"pair": pair})
    assert aligned < kd3_contrast(f, module=head, batch={"pair": pair})


def test_kd3_contrast_needs_the_pairs():
    with pytest.raises(ValueError, match="mixdist"):
        kd3_contrast(torch.randn(2, 3), module=ContrastHead((3,)), batch={})


class Tiny(nn.Module):
    num_features, classifier_path = 4, "fc"

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.ReLU())
        self.fc = nn.Linear(4, 3)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.body(x))


def test_a_kd3_fit_finds_the_classifiers_and_logs_the_selected_share():
    torch.manual_seed(0)
    teacher = Teacher(Tiny(), keys=["image"], features=["body"])
    student = Net(Tiny(), keys=["image"], features=["body"])
    terms = [Term("kd"), Term("kd3_align", student="features.body", teacher="features.body",
                              sizes={"student_shape": (4,), "teacher_shape": (4,)}),
             Term("kd3_contrast", weight=0.1, student="features.body", sizes={"student_shape": (4,)})]
    module = Distiller(student, [teacher], terms, router=KD3Router(threshold=0.0), transforms=[MixDistribution()])
    data = TensorDictDataset("toy", image=torch.randn(24, 1, 3, 4), label=torch.randint(0, 3, (24,)))
    trainer = Trainer(TrainerConfig(max_epochs=2, batch_size=8, progress="off", tensorboard=False))
    history = trainer.fit(module, data, data).history
    assert [h["kd3/selected"] for h in history] == [1.0, 1.0]  # threshold 0: everything
    align = module.loss_modules["kd3_align"]
    assert align.heads[0] is student.model.fc and align.heads[1] is teacher.model.fc
    assert "kd3_align.heads" not in "".join(module.state_dict())  # the classifiers are the models' own


def test_kd3_align_refuses_a_model_without_a_linear_classifier():
    teacher = Teacher(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), keys=["image"])
    module = Distiller(Net(Tiny(), keys=["image"], features=["body"]), [teacher],
                       [Term("kd3_align", student="features.body", teacher="logits",
                             sizes={"student_shape": (4,), "teacher_shape": (3,)})],
                       router=KD3Router())
    with pytest.raises(ValueError, match="teacher .* no linear classifier"):
        module.loss_modules["kd3_align"].on_fit_start(None, module)


def test_corrupt_is_seeded_per_item_and_zero_strength_is_the_identity():
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    assert torch.equal(corrupt(images, 0.0), images)
    a = corrupt(images, 1.0, seed=3)
    assert not torch.equal(a, images) and a.dtype == torch.uint8
    assert torch.equal(corrupt(images[2:], 1.0, seed=3, first=2), a[2:])  # an item's draw is its own
    assert not torch.equal(corrupt(images, 1.0, seed=4), a)
    # a stronger shift moves the pixels further
    far = lambda s: (corrupt(images, s, seed=3).float() - images.float()).abs().mean()  # noqa: E731
    assert far(0.3) < far(1.0)


@pytest.mark.skipif("MMKD_DATA" not in os.environ, reason="needs MMKD_DATA (CIFAR-10 under it)")
def test_the_shifted_pool_holds_other_images_and_keeps_the_test_split(tmp_path):
    from mmkd.registry import DATASETS

    root = os.environ["MMKD_DATA"]
    args = dict(root=root, val_size=10, limit_per_class=4, test_limit_per_class=1, cache_dir=tmp_path)
    plain = DATASETS["cifar10"](**args)
    pool = DATASETS["cifar10"](**args, offset_per_class=4, corrupt=1.0)
    clean_pool = DATASETS["cifar10"](**args, offset_per_class=4)
    first = DATASETS["cifar10"](**{**args, "limit_per_class": 8})
    assert torch.equal(pool.test.images, plain.test.images)
    train = lambda d: torch.cat([d.train.images, d.val.images])  # noqa: E731
    assert not any((train(plain) == im).all((1, 2, 3)).any() for im in train(clean_pool))  # disjoint images
    assert all((train(first) == im).all((1, 2, 3)).any() for im in train(clean_pool))  # images 5 .. 8 a class
    assert pool.train.fingerprint != clean_pool.train.fingerprint
    assert (pool.train.images.float() - clean_pool.train.images.float()).abs().mean() > 10


@pytest.mark.skipif("MMKD_DATA" not in os.environ, reason="needs MMKD_DATA (CIFAR-10 under it)")
def test_cifar10_kd3_runs(run_experiment):
    from tests.reference import TINY_CIFAR10

    run_dir, results = run_experiment("cifar10_kd3", *TINY_CIFAR10, "data.args.offset_per_class=3")
    assert 0 <= results["student"]["test_acc"] <= 1
    header = (run_dir / "student" / "metrics.csv").read_text().splitlines()[0]
    assert "kd3/selected" in header and "train/kd3_contrast" in header
