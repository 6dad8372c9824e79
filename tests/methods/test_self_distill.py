"""Self-distillation with ground-truth targets (mmkd.methods.self_distill, mmkd.losses.self.gt_mix): the
mixed target against a naive loop and the official two-term loss, the closed-form alpha against a
brute-force grid on kernel ridge regression, the options' one-line errors, and the rounds chained
through their run directories by one ``mmkd run``."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmkd.cli import compose, main
from mmkd.config import ConfigError
from mmkd.losses import ce, gt_labels, gt_mix, kd
from mmkd.methods.self_distill import optimal_alpha, options


# ---------------------------------------------------------------- the mixed target
def naive_gt_mix(s: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor, alpha: float, criterion: str) -> torch.Tensor:
    """Per instance, in float64 with python loops: q = alpha onehot(y) + (1 - alpha) softmax(t), then
    mean_c (softmax(s)_c - q_c)^2 or -sum_c q_c log softmax(s)_c."""
    out = []
    for b, (row, label) in enumerate(zip(s.double().tolist(), y.tolist())):
        ps = [math.exp(v) / sum(math.exp(u) for u in row) for v in row]
        trow = t[b].double().tolist() if t is not None else None
        pt = [math.exp(v) / sum(math.exp(u) for u in trow) for v in trow] if trow else [0.0] * len(row)
        q = [alpha * (c == label) + (1 - alpha) * pt[c] for c in range(len(row))]
        if criterion == "mse":
            out.append(sum((p - qc) ** 2 for p, qc in zip(ps, q)) / len(row))
        else:
            out.append(-sum(qc * math.log(p) for p, qc in zip(ps, q)))
    return torch.tensor(out, dtype=torch.float64)


def logits(seed: int = 0, b: int = 6, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 2, torch.randint(0, c, (b,), generator=g)


@pytest.mark.parametrize("criterion", ["mse", "ce"])
@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_gt_mix_matches_a_naive_loop(criterion, alpha):
    s, t, y = logits()
    per = gt_mix(s, t, y, alpha=alpha, criterion=criterion, reduction="none")
    torch.testing.assert_close(per.double(), naive_gt_mix(s, t, y, alpha, criterion), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gt_mix(s, t, y, alpha=alpha, criterion=criterion), per.mean())
    torch.testing.assert_close(gt_mix(s, t, y, alpha=alpha, criterion=criterion, reduction="sum"), per.sum())


def test_round_zeros_loss_is_gt_mix_at_alpha_one_and_ce_for_the_ce_criterion():
    s, t, y = logits(1)
    torch.testing.assert_close(gt_labels(s, None, y, reduction="none").double(), naive_gt_mix(s, None, y, 1.0, "mse"))
    assert torch.equal(gt_labels(s, None, y, reduction="none"), gt_mix(s, t, y, alpha=1.0, reduction="none"))
    torch.testing.assert_close(gt_labels(s, None, y, criterion="ce"), ce(s, None, y))
    # alpha = 0 and a student that predicts the teacher: the mse loss is 0; alpha = 1 ignores the teacher
    assert gt_mix(t, t, y, alpha=0.0).abs().max() < 1e-9
    assert torch.equal(gt_mix(s, t, y, alpha=1.0), gt_mix(s, t + torch.randn_like(t), y, alpha=1.0))


def test_gt_mix_has_the_gradient_of_the_official_two_term_loss_and_of_ce_plus_kd():
    s, t, y = logits(2, b=8, c=4)
    a = 0.35
    p_t, onehot = t.softmax(1), F.one_hot(y, 4).float()

    def grad(loss_fn):
        z = s.clone().requires_grad_()
        value = loss_fn(z)
        (g,) = torch.autograd.grad(value, z)
        return value.detach(), g

    # official self_distiller.py: alpha * mse(softmax(z), y) + (1 - alpha) * mse(softmax(z), softmax(z_t))
    official, g_official = grad(lambda z: a * F.mse_loss(z.softmax(1), onehot) + (1 - a) * F.mse_loss(z.softmax(1), p_t))
    mine, g_mine = grad(lambda z: gt_mix(z, t, y, alpha=a))
    torch.testing.assert_close(g_mine, g_official)
    torch.testing.assert_close(official - mine, a * (1 - a) * (onehot - p_t).pow(2).mean())  # a constant of z
    # cross-entropy to the mix = alpha * ce + (1 - alpha) * kd(T = 1), up to (1 - alpha) H(p_t)
    both, g_both = grad(lambda z: a * ce(z, None, y) + (1 - a) * kd(z, t, temperature=1.0))
    mine, g_mine = grad(lambda z: gt_mix(z, t, y, alpha=a, criterion="ce"))
    torch.testing.assert_close(g_mine, g_both)
    entropy = -(p_t * p_t.log()).sum(1).mean()
    torch.testing.assert_close(mine - both, (1 - a) * entropy)
    assert entropy > 0.1  # so the values do differ: kd's value is not the mixture's
    # the teacher is read, never differentiated
    z_t = t.clone().requires_grad_()
    gt_mix(s.requires_grad_(), z_t, y, alpha=a).backward()
    assert z_t.grad is None


@pytest.mark.parametrize("criterion", ["mse", "ce"])
def test_gt_mix_gradcheck(criterion):
    s, t, y = logits(3, b=4, c=3)
    z = s.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: gt_mix(z, t.double(), y, alpha=0.4, criterion=criterion), (z,))


def test_gt_mix_refuses_unlabelled_items():
    s, t, y = logits()
    y[0] = -1
    with pytest.raises(ValueError, match="every item needs its label"):
        gt_mix(s, t, y)


@pytest.mark.parametrize("override, message", [
    ("losses.gt_mix.args.alpha=1.5", "losses.gt_mix.args.alpha=1.5; it must be a number in [0, 1]"),
    ("losses.gt_mix.args.criterion=kl", "losses.gt_mix.args.criterion='kl'; choose from: mse, ce"),
])
def test_bad_loss_arguments_are_refused_before_anything_runs(override, message):
    with pytest.raises(ConfigError) as e:
        compose([override])
    assert str(e.value) == message


# ---------------------------------------------------------------- the closed-form alpha
def test_optimal_alpha_by_hand():
    f1, f0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    # d = f1 - f0 = (1, -1); t - f0 = (0.7, -0.7): <., d> = 1.4, |d|^2 = 2
    assert optimal_alpha(f1, f0, torch.tensor([[0.7, 0.3]], dtype=torch.float64)) == pytest.approx(0.7, abs=1e-12)
    assert optimal_alpha(f1, f0, torch.tensor([[1.5, -0.5]], dtype=torch.float64)) == 1.0  # 1.5, clipped
    assert optimal_alpha(f1, f0, torch.tensor([[-0.2, 1.2]], dtype=torch.float64)) == 0.0  # -0.2, clipped
    same = torch.tensor([[0.3, 0.7]], dtype=torch.float64)
    assert optimal_alpha(f1, f1, same) == 1.0  # f1 = f0: alpha changes nothing


def rbf(a: torch.Tensor, b: torch.Tensor, gamma: float) -> torch.Tensor:
    return torch.exp(-gamma * (a[:, None] - b[None, :]) ** 2)


def test_optimal_alpha_is_the_grid_optimum_of_kernel_ridge_self_distillation():
    """The paper's model: round tau's fit A (alpha y + (1 - alpha) yhat^(tau-1)), A = K (K + lambda I)^-1,
    predicted on held-out points; the estimate from the fit to the labels (round 0's) and the fit to
    the previous round's predictions must be the alpha of a brute-force grid, round after round."""
    g = torch.Generator().manual_seed(0)
    x, xv = torch.rand(25, generator=g, dtype=torch.float64), torch.rand(60, generator=g, dtype=torch.float64)
    y = torch.sin(2 * math.pi * x) + 0.4 * torch.randn(25, generator=g, dtype=torch.float64)
    yv = torch.sin(2 * math.pi * xv) + 0.4 * torch.randn(60, generator=g, dtype=torch.float64)
    gamma, lam = 80.0, 1e-3  # under-regularised: distillation's added regularisation pays
    inv = torch.linalg.inv(rbf(x, x, gamma) + lam * torch.eye(25, dtype=torch.float64))
    train_fit, val_fit = rbf(x, x, gamma) @ inv, rbf(xv, x, gamma) @ inv  # targets -> fits on train / val points
    prev = train_fit @ y  # round 0
    grid = torch.linspace(0, 1, 20_001, dtype=torch.float64)
    interior = 0
    for tau in range(1, 5):
        f1, f0 = val_fit @ y, val_fit @ prev  # alpha = 1 (round 0's fit again) and alpha = 0
        alpha = optimal_alpha(f1, f0, yv)
        targets = grid[:, None] * y + (1 - grid[:, None]) * prev  # [grid, train]
        errors = ((targets @ val_fit.T - yv) ** 2).sum(1)
        best = grid[errors.argmin()].item()
        assert alpha == pytest.approx(best, abs=5e-5), tau
        mine = ((val_fit @ (alpha * y + (1 - alpha) * prev) - yv) ** 2).sum()
        assert mine <= errors.min() + 1e-12
        interior += 0 < alpha < 1
        prev = train_fit @ (alpha * y + (1 - alpha) * prev)
    assert interior >= 2  # not only clipped estimates


# ---------------------------------------------------------------- the options
@pytest.fixture(scope="module")
def cfg():
    return compose(["experiment=digits_self_distill"])


@pytest.mark.parametrize("method, message", [
    ({"rounds": 0}, "method.rounds=0; give a whole number of distillation rounds >= 1"),
    ({"rounds": 2.5}, "method.rounds=2.5; give a whole number"),
    ({"rounds": True}, "method.rounds=True; give a whole number"),
    ({"rounds": None}, "method.rounds=None; give a whole number"),
    ({"alpha": 1.5}, "method.alpha=1.5; give the labels' weight: a number in [0, 1], auto"),
    ({"alpha": -0.1}, "method.alpha=-0.1; give the labels' weight"),
    ({"alpha": "sometimes"}, "method.alpha='sometimes'; give the labels' weight"),
    ({"alpha": None}, "method.alpha=None; give the labels' weight"),
    ({"alpha": [0.5, 0.5]}, "method.alpha=[0.5, 0.5]; give the labels' weight: a number in [0, 1], auto (the "
                            "closed-form estimate), or a list of 3 of them, one per round (method.rounds=3)"),
    ({"alpha": [0.5, "auto", 2]}, "method.alpha=[0.5, 'auto', 2]; give the labels' weight"),
    ({"criterion": "kl"}, "method.criterion='kl'; choose from: mse, ce"),
    ({"init": "old"}, "method.init='old'; choose from: new"),
    ({"steps": 3}, "method.steps: unknown option of pipeline self_distill; valid keys: rounds, alpha, criterion, init"),
])
def test_bad_options_are_one_line_errors(cfg, method, message):
    bad = copy.deepcopy(cfg)
    bad.method.update(method)
    with pytest.raises(ConfigError) as e:
        options(bad)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_options_take_one_alpha_per_round(cfg):
    c = copy.deepcopy(cfg)
    assert options(c)["alpha"] == [0.6, 0.6, 0.6]
    c.method.update(alpha=[1, "auto", 0])
    assert options(c)["alpha"] == [1.0, "auto", 0.0]
    c.method.update(alpha="auto", rounds=2)
    assert options(c)["alpha"] == ["auto", "auto"]


def test_cli_refuses_bad_values_with_exit_2_and_writes_nothing(tmp_path, capsys):
    for override, message in (("method.rounds=-1", "method.rounds=-1; give a whole number"),
                              ("method.alpha=2", "method.alpha=2; give the labels' weight"),
                              ("teachers.t.name=mlp", "teachers: t; pipeline self_distill's teacher in each round")):
        assert main(["run", "experiment=digits_self_distill", f"out_dir={tmp_path}", override]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"mmkd: error: {message}") and "\n" not in err, err
        assert not any(tmp_path.iterdir())


# ---------------------------------------------------------------- the rounds, chained by one mmkd run
TINY = ["trainer.max_epochs=1", "trainer.batch_size=128", "student.args.hidden=[16]", "trainer.tensorboard=false",
        "trainer.progress=off", "export=[]"]


def softmax_of(run_dir: Path, cfg, val) -> np.ndarray:
    """The softmax of the student in ``run_dir/student.pt`` on ``val``, in float64 numpy."""
    from mmkd.build import build_model

    model = build_model(cfg.student, {"num_classes": 10, "shapes": {"image": (1, 8, 8)}}, "student").eval()
    model.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True))
    with torch.no_grad():
        return model(val.tensors["image"]).double().softmax(1).numpy()


def test_rounds_chain_through_their_run_directories(tmp_path):
    from omegaconf import OmegaConf

    from mmkd.data import digits

    run_dir = tmp_path / "sd"
    args = ["run", "experiment=digits_self_distill", f"out_dir={tmp_path}", f"run_dir={run_dir}", *TINY,
            "method.alpha=[0.3,auto,1.0]", "method.init=same"]
    assert main(args) == 0
    results = json.loads((run_dir / "results.json").read_text())
    parts = ["round0", "round1", "probe2", "round2", "round3"]
    configs = {p: OmegaConf.load(run_dir / p / "config.yaml") for p in parts}
    rounds = {p: json.loads((run_dir / p / "results.json").read_text()) for p in parts}
    for p in parts:  # each a complete distill run
        assert configs[p].pipeline == "distill" and configs[p].seed == 0 and (run_dir / p / "student.pt").is_file()
    # round 0 on the labels; round r's teacher is round r-1's student, with the configured alpha
    assert dict(configs["round0"].teachers) == {} and list(configs["round0"].losses) == ["gt_labels"]
    estimate = results["rounds"][2]["alpha"]
    for p, prev, alpha in (("round1", "round0", 0.3), ("probe2", "round1", 0.0), ("round2", "round1", estimate),
                           ("round3", "round2", 1.0)):
        teacher = configs[p].teachers.previous
        assert teacher.checkpoint == str(run_dir / prev / "student.pt") and teacher.frozen and teacher.cache
        assert (teacher.name, list(teacher.args.hidden)) == ("mlp", [16])
        assert list(configs[p].losses) == ["gt_mix"] and configs[p].losses.gt_mix.args.alpha == alpha
        # the teacher it evaluated is the previous round's student: the same test scores
        assert rounds[p]["teachers"]["previous"]["test_acc"] == rounds[prev]["student"]["test_acc"]
        assert rounds[p]["teachers"]["previous"]["test_loss"] == rounds[prev]["student"]["test_loss"]
    assert [r["alpha"] for r in results["rounds"]] == [1.0, 0.3, estimate, 1.0]
    assert [r["alpha_from"] for r in results["rounds"]] == ["labels", "config", "auto", "config"]
    assert results["rounds"][2]["probe"]["run_dir"] == str(run_dir / "probe2")
    state = {p: torch.load(run_dir / p / "student.pt", weights_only=True) for p in parts}
    # alpha = 1 from round 0's initialisation (init: same) ignores the teacher: round 0 again, bit for bit
    assert all(torch.equal(v, state["round0"][k]) for k, v in state["round3"].items())
    assert not all(torch.equal(v, state["round0"][k]) for k, v in state["round1"].items())  # alpha = 0.3 is not
    last = torch.load(run_dir / "student.pt", weights_only=True)
    assert all(torch.equal(v, state["round3"][k]) for k, v in last.items())
    assert results["student"]["test_acc"] == rounds["round3"]["student"]["test_acc"]
    assert results["baseline"]["test_acc"] == rounds["round0"]["student"]["test_acc"]
    # the estimate, recomputed here from round 0's and the probe's students on the validation split
    cfg = configs["round0"]
    val = digits(split_seed=0).val
    f1, f0 = softmax_of(run_dir / "round0", cfg, val), softmax_of(run_dir / "probe2", cfg, val)
    t = np.eye(10)[val.tensors["label"].numpy()]
    raw = ((t - f0) * (f1 - f0)).sum() / ((f1 - f0) ** 2).sum()
    assert estimate == pytest.approx(min(1.0, max(0.0, raw)), abs=1e-6)
    # resume: the finished rounds are kept as they are
    stamps = {p: (run_dir / p / "student.pt").stat().st_mtime_ns for p in parts}
    assert main([*args, "resume=true"]) == 0
    assert {p: (run_dir / p / "student.pt").stat().st_mtime_ns for p in parts} == stamps
    again = json.loads((run_dir / "results.json").read_text())
    assert again["rounds"] == results["rounds"]


def test_new_initialisation_per_round_keeps_the_run_seeds_split(tmp_path):
    from omegaconf import OmegaConf

    from mmkd.methods.self_distill import round_config

    cfg = compose(["experiment=digits_self_distill", f"out_dir={tmp_path}", "seed=5"])
    opts = options(cfg)
    assert opts["init"] == "new"
    r2 = round_config(cfg, 2, 0.6, tmp_path / "r2", tmp_path / "r1", opts, "x")
    assert (r2.seed, r2.data.args.split_seed) == (7, 5)
    same = round_config(cfg, 2, 0.6, tmp_path / "r2", tmp_path / "r1", {**opts, "init": "same"}, "x")
    assert same.seed == 5 and "split_seed" not in same.data.args
    assert OmegaConf.to_container(r2.losses.gt_mix.args) == {"alpha": 0.6, "criterion": "mse"}


# ---------------------------------------------------------------- the shipped configs
def test_shipped_configs_follow_the_official_procedure(cfg):
    """digits_self_distill trains above (the rounds test); cifar10_self_distill trains in
    tests/e2e/test_cifar10_configs.py (every shipped CIFAR-10 experiment, on tiny images)."""
    cifar = compose(["experiment=cifar10_self_distill"])
    for c, data, student, rounds in ((cifar, "cifar10", "resnet20", 4), (cfg, "digits", "mlp", 3)):
        assert (c.pipeline, c.data.name, c.student.name, c.trainer.keep) == ("self_distill", data, student, "last")
        assert dict(c.method) == {"rounds": rounds, "alpha": 0.6, "criterion": "mse", "init": "new"}
        assert dict(c.teachers) == {} and c.baseline is False
    protocol = (cifar.trainer.optimizer, cifar.trainer.max_epochs, list(cifar.data.args.augment))
    assert protocol == ("sgd", 240, ["crop", "flip"])  # configs/setup/cifar10.yaml
