"""DisWOT (mmkd.methods.diswot): the relation matrices and distances against naive loops, the
classifier gradient against its closed form, the evolutionary search on a toy score, and the
pipeline's pick, written as a student config that builds."""
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

from mmkd.cli import compose, main
from mmkd.methods.diswot import SPACE, architecture, evolve, gaussian_init, mutate, proxy, signals, teacher_signals
from mmkd.registry import MODELS

TINY = ["data.name=digits", "~data.args.augment", "teachers.resnet.name=resnet8", "method.population=4", "method.iterations=6",
        "method.batch_size=16", "trainer.progress=off"]


def naive_sp(a, b):
    """||normalize_rows(a a^T) - normalize_rows(b b^T)||_F^2 / n^2, in loops."""
    def g(x):
        x = x.flatten(1).tolist()
        m = [[sum(p * q for p, q in zip(x[i], x[j])) for j in range(len(x))] for i in range(len(x))]
        return [[v / math.sqrt(sum(w * w for w in row)) for v in row] for row in m]
    ga, gb = g(a), g(b)
    n = len(ga)
    return sum((ga[i][j] - gb[i][j]) ** 2 for i in range(n) for j in range(n)) / n ** 2


def test_the_proxy_is_sp_on_the_class_gradients_and_the_features():
    """Both distances recomputed in loops from the signals of a re-initialised teacher and of the
    student copy the proxy makes (from the same generator state)."""
    import copy

    t, s = MODELS["resnet8"](num_classes=3, in_shape=(3, 8, 8)), MODELS["cifar_resnet"](3, (3, 8, 8), blocks=[1, 1, 1])
    batch = {"image": torch.randn(6, 3, 8, 8), "label": torch.arange(6) % 3}
    torch.manual_seed(4)
    teacher = teacher_signals(t, batch, ["image"])
    torch.manual_seed(5)
    got = proxy(teacher, s, batch, ["image"])
    torch.manual_seed(4)
    g_t, f_t = signals(gaussian_init(copy.deepcopy(t)), ["image"], "layer3", batch)
    torch.manual_seed(5)
    g_s, f_s = signals(gaussian_init(copy.deepcopy(s)), ["image"], "layer3", batch)
    assert got["semantic"] == pytest.approx(naive_sp(g_t.double(), g_s.double()), rel=1e-9)
    assert got["relation"] == pytest.approx(naive_sp(f_t.double(), f_s.double()), rel=1e-9)
    assert got["score"] == -(got["semantic"] + got["relation"])
    trained = teacher_signals(t, batch, ["image"], init="trained")  # the teacher as it is
    torch.testing.assert_close(trained[0], signals(t, ["image"], "layer3", batch)[0])


def test_the_semantic_signal_is_the_classifier_gradient_of_ce():
    """dCE/dW = (softmax(z) - onehot(y))^T h / B, h the pooled features."""
    torch.manual_seed(0)
    model = MODELS["resnet8"](num_classes=4, in_shape=(3, 8, 8))
    batch = {"image": torch.randn(6, 3, 8, 8), "label": torch.tensor([0, 1, 2, 3, 0, 1])}
    grad, feat = signals(model, ["image"], "layer3", batch)
    h = F.adaptive_avg_pool2d(feat, 1).flatten(1).double()
    z = model.fc(h.float()).double()
    want = (z.softmax(1) - F.one_hot(batch["label"], 4).double()).T @ h / 6
    torch.testing.assert_close(grad.double(), want, rtol=1e-4, atol=1e-6)
    assert feat.shape == (6, 64, 2, 2)


def test_gaussian_init_and_the_proxy_leave_the_models_alone():
    torch.manual_seed(0)
    t, s = MODELS["resnet8"](num_classes=3, in_shape=(3, 8, 8)), MODELS["cifar_resnet"](3, (3, 8, 8), blocks=[1, 1, 1])
    before = [p.clone() for p in (*t.parameters(), *s.parameters())]
    batch = {"image": torch.randn(8, 3, 8, 8), "label": torch.arange(8) % 3}
    got = proxy(teacher_signals(t, batch, ["image"]), s, batch, ["image"])
    assert got["semantic"] > 0 < got["relation"]
    assert all(torch.equal(a, b) for a, b in zip(before, (*t.parameters(), *s.parameters())))
    m = gaussian_init(MODELS["resnet8"](num_classes=3, in_shape=(3, 8, 8)))
    assert abs(float(m.fc.weight.detach().std()) - 1) < 0.2 and float(m.fc.bias.detach().abs().sum()) == 0
    assert float(m.stem[1].weight.detach().min()) == float(m.stem[1].weight.detach().max()) == 1.0


def test_mutate_changes_one_gene():
    rng = random.Random(0)
    c = {g: v[0] for g, v in SPACE.items()}
    for _ in range(50):
        d = mutate(c, SPACE, rng)
        assert sum(d[g] != c[g] for g in SPACE) == 1 and all(d[g] in SPACE[g] for g in SPACE)


def test_evolve_finds_the_best_of_a_toy_score_within_the_constraint():
    space = {"a": list(range(10)), "b": list(range(10))}
    calls = []

    def score(c):
        calls.append(c)
        return -((c["a"] - 7) ** 2) - (c["b"] - 2) ** 2

    history = evolve(score, space, population=5, iterations=80, parents=2, valid=lambda c: c["a"] + c["b"] <= 9, seed=0)
    best = max(history, key=lambda cs: cs[1])[0]
    assert best == {"a": 7, "b": 2}
    assert len(calls) == len(history) <= 85 and all(c["a"] + c["b"] <= 9 for c in calls)
    assert len({tuple(c.values()) for c in calls}) == len(calls)  # nothing scored twice
    # the constraint binds: the unconstrained optimum is out of reach, the best valid one is found
    history = evolve(score, space, population=5, iterations=80, parents=2, valid=lambda c: c["a"] <= 4, seed=1)
    assert max(history, key=lambda cs: cs[1])[0] == {"a": 4, "b": 2}


def test_cifar_resnet_is_resnet20_by_default_and_takes_each_stage():
    torch.manual_seed(0)
    a = MODELS["resnet20"](num_classes=10, in_shape=(3, 32, 32))
    torch.manual_seed(0)
    b = MODELS["cifar_resnet"](num_classes=10, in_shape=(3, 32, 32))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    m = MODELS["cifar_resnet"](10, (3, 32, 32), **architecture(
        {"blocks1": 1, "blocks2": 2, "blocks3": 3, "width1": 8, "width2": 16, "width3": 32,
         "kernel1": 5, "kernel2": 3, "kernel3": 3}))
    assert [len(m.layer1), len(m.layer2), len(m.layer3)] == [1, 2, 3]
    assert m.layer1[0].conv1.weight.shape == (8, 8, 5, 5) and m.layer3[0].conv2.weight.shape == (32, 32, 3, 3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="kernels .* odd"):
        MODELS["cifar_resnet"](10, (3, 32, 32), kernels=[3, 4, 3])


def test_the_pipeline_writes_its_pick_as_a_student_config(tmp_path):
    assert main(["run", "experiment=cifar10_diswot", f"out_dir={tmp_path}", "method.max_params=40000", *TINY]) == 0
    (run_dir,) = (tmp_path / "cifar10_diswot").iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    cands = results["candidates"]
    assert 4 <= len(cands) <= 10 and all(c["params"] <= 40000 for c in cands)
    best = max(cands, key=lambda c: c["score"])
    assert results["best"]["args"] == best["args"] and best["score"] == pytest.approx(-(best["semantic"] + best["relation"]))
    student = yaml.safe_load((run_dir / "student.yaml").read_text())["student"]
    assert student["name"] == "cifar_resnet" and student["args"] == best["args"]
    cfg = compose(["experiment=cifar10_kd", "data.name=digits", "~data.args.augment", results["override"]])
    assert cfg.student.name == "cifar_resnet" and dict(cfg.student.args) == {k: list(v) for k, v in best["args"].items()}
    # the same seed scores the same candidates the same
    assert main(["run", "experiment=cifar10_diswot", f"out_dir={tmp_path / 'again'}", "method.max_params=40000", *TINY]) == 0
    (again,) = (tmp_path / "again" / "cifar10_diswot").iterdir()
    assert json.loads((again / "results.json").read_text())["candidates"] == cands


@pytest.mark.parametrize("override, match", [
    ("method.population=0", "method.population=0; give a whole number >= 1"),
    ("+method.generations=3", "method.generations: unknown option of pipeline diswot"),
    ("method.teacher_init=trained", "method.teacher_init=trained needs teachers.resnet.checkpoint"),
    ("method.max_params=-5", "method.max_params=-5; give a whole number"),
    ("+method.space={blocks1: [0, 1]}", "method.space.blocks1=[0, 1]; give a list of whole numbers >= 1"),
    ("+method.space={depth: [1]}", "method.space: unknown gene 'depth'; the genes are: blocks1"),
    ("+method.space={kernel2: [3, 4]}", "method.space.kernel2=[3, 4]: kernel sizes must be odd"),
    ("method.max_params=1000", "method.max_params=1000: no candidate of method.space found with so few parameters"),
])
def test_bad_options_exit_2_before_anything_is_written(tmp_path, capsys, override, match):
    code = main(["run", "experiment=cifar10_diswot", f"out_dir={tmp_path}", *TINY, override])
    assert code == 2 and match in capsys.readouterr().err and not (tmp_path / "cifar10_diswot").exists()


def test_a_partial_space_keeps_the_other_genes_defaults(tmp_path):
    assert main(["run", "experiment=cifar10_diswot", f"out_dir={tmp_path}", *TINY,
                 "+method.space={blocks1: [1], blocks2: [1], blocks3: [1], kernel1: [3]}"]) == 0
    (run_dir,) = (tmp_path / "cifar10_diswot").iterdir()
    cands = json.loads((run_dir / "results.json").read_text())["candidates"]
    assert all(c["args"]["blocks"] == [1, 1, 1] and c["args"]["kernels"][0] == 3 for c in cands)
    assert len({tuple(c["args"]["widths"]) for c in cands}) > 1  # the widths still vary
