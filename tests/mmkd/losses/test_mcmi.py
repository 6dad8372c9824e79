"""MCMI (mmkd.losses.mcmi): the CMI loss against a loop-based float64 reference and the official
``F.kl_div`` form, its zero, its gradients (gradcheck through the batch centroids), the callback's
centroids against an independent pass; and the teacher-side config path (``teachers.<t>.losses`` and
``.callbacks``): a tiny run logs the term, the store key follows the teacher's losses, bad terms are
one-line errors."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Term, Trainer
from mmkd.callbacks import Callback
from mmkd.losses.mcmi import MCMICentroids, mcmi
from mmkd.registry import CALLBACKS, LOSSES
from mmkd.trainer import TrainerConfig


def make(b=12, c=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, c, generator=g, dtype=dtype) * 2
    y = torch.randint(0, c, (b,), generator=g)
    y[:c] = torch.arange(c)  # every class present
    return z, y


# ---------------------------------------------------------------- naive reference (python loops)
def softmax(row):
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [v / sum(e) for v in e]


def ref_cmi(Z, Y, Q=None):
    """Per-instance KL(p_i || q_{y_i}) (0 for unlabelled rows), q the class means of the labelled rows."""
    P = [softmax(z) for z in Z.tolist()]
    labels = Y.tolist()
    c = len(P[0])
    if Q is None:
        Q = []
        for k in range(c):
            rows = [p for p, y in zip(P, labels) if y == k]
            Q.append([sum(p[j] for p in rows) / len(rows) for j in range(c)] if rows else [1 / c] * c)
    else:
        Q = Q.tolist()
    return [sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, Q[y])) if y >= 0 else 0.0
            for p, y in zip(P, labels)]


# ---------------------------------------------------------------- the loss
def test_registered_as_a_label_only_batch_loss_that_takes_a_negative_weight():
    assert LOSSES["mcmi"] is mcmi and CALLBACKS["mcmi_centroids"] is MCMICentroids
    meta = LOSSES.meta("mcmi")
    assert not meta["teacher"] and not meta["per_sample"] and meta["negative_weight"]
    assert CALLBACKS.meta("mcmi_centroids")["reads_losses"] == ("term",)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_naive_reference_with_batch_centroids(seed):
    z, y = make(seed=seed)
    y[-2] = -1  # an unlabelled row: left out of the centroids and of the mean
    want = torch.tensor(ref_cmi(z, y), dtype=torch.float64)
    torch.testing.assert_close(mcmi(z, None, y, reduction="none"), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mcmi(z, None, y), want.sum() / (y >= 0).sum(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mcmi(z, None, y, reduction="sum"), want.sum(), rtol=1e-10, atol=1e-12)
    assert mcmi(z, None, y) > 0


def test_given_centroids_match_the_reference_and_the_official_kl_div():
    z, y = make(seed=3)
    q = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 1)
    want = torch.tensor(ref_cmi(z, y, q), dtype=torch.float64)
    torch.testing.assert_close(mcmi(z, None, y, centroids=q, reduction="none"), want, rtol=1e-10, atol=1e-12)
    # the official term: F.kl_div(Q[y].log(), log_softmax(z), log_target=True, reduction="batchmean")
    official = F.kl_div(q[y].log(), F.log_softmax(z, 1), reduction="batchmean", log_target=True)
    torch.testing.assert_close(mcmi(z, None, y, centroids=q), official, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=r"centroids of shape \(3, 4\)"):
        mcmi(z, None, y, centroids=q[:3])


def test_zero_when_every_instance_of_a_class_predicts_the_same_distribution():
    g = torch.Generator().manual_seed(4)
    per_class = torch.randn(5, 5, generator=g, dtype=torch.float64) * 3
    y = torch.tensor([0, 3, 1, 3, 4, 2, 0, 0, 4, 1, 2, 3])
    z = per_class[y] + torch.randn(12, 1, generator=g, dtype=torch.float64)  # a shift per row changes no softmax
    torch.testing.assert_close(mcmi(z, None, y), torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)
    q = torch.softmax(per_class, 1)
    torch.testing.assert_close(mcmi(z, None, y, centroids=q), torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)
    z2 = z.clone()
    z2[1, 0] += 1.0  # one instance moves away from its class: CMI > 0
    assert mcmi(z2, None, y) > 1e-4


def test_gradcheck_float64():
    """The batch centroids are detached, yet the gradient is that of the CMI with the centroids
    attached (gradcheck's finite differences move them): the class mean minimises sum_i KL(p_i || q)."""
    z, y = make(b=9, c=3, seed=5)
    y[4] = -1
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mcmi(t, None, y), (z,))
    q = torch.softmax(torch.randn(3, 3, dtype=torch.float64), 1)
    assert torch.autograd.gradcheck(lambda t: mcmi(t, None, y, centroids=q), (z,))


def test_finite_for_saturated_predictions():
    z = torch.tensor([[200.0, 0.0, 0.0], [200.0, 0.0, 0.0], [0.0, 0.0, 300.0]])  # float32 softmax underflows to 0
    y = torch.tensor([0, 0, 2])
    value = mcmi(z, None, y)
    assert torch.isfinite(value) and value.abs() < 1e-6
    z.requires_grad_(True)
    mcmi(z, None, y).backward()
    assert torch.isfinite(z.grad).all()


def test_in_the_mixture_core_a_negative_weight_subtracts_it():
    z, y = make(b=16, c=4, seed=6, dtype=torch.float32)
    data = {"x": z, "label": y}
    model = nn.Identity()
    d = Distiller(Net(model, ["x"]), [], [Term("ce"), Term("mcmi", -0.25)])
    losses = d(data)
    torch.testing.assert_close(losses["mcmi"], -0.25 * mcmi(z, None, y))
    torch.testing.assert_close(losses["loss"], F.cross_entropy(z, y) - 0.25 * mcmi(z, None, y))


# ---------------------------------------------------------------- the official centroids (callback)
class Small(nn.Module):
    """Linear -> BatchNorm -> Dropout -> Linear: train-mode predictions depend on the batch."""

    def __init__(self, d=5, c=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, c))

    def forward(self, x):
        return self.body(x)


def toy(n=40, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(f"toy/{seed}", x=torch.randn(n, d, generator=g), label=torch.arange(n) % c)


def test_the_centroids_are_the_class_means_of_one_train_mode_pass_and_leave_the_buffers():
    torch.manual_seed(0)
    data = toy()
    module = Distiller(Net(Small(), ["x"]), [], [Term("ce"), Term("mcmi", -0.25)])
    trainer = SimpleNamespace(train_data=data, cfg=TrainerConfig(batch_size=16), device=torch.device("cpu"))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()
    q = MCMICentroids().estimate(trainer, module)
    assert not module.training  # its mode is put back
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())  # BN statistics kept

    want = torch.zeros(3, 3)  # independently: batches of 16 in order, BatchNorm on batch statistics
    counts = torch.zeros(3)
    model = Small()
    model.load_state_dict({k.removeprefix("student.model."): v for k, v in before.items() if k.startswith("student.")})
    model.train()
    with torch.no_grad():
        for i in range(0, len(data), 16):
            x, y = data.tensors["x"][i:i + 16], data.tensors["label"][i:i + 16]
            p = torch.softmax(model(x), 1)
            for row, label in zip(p, y.tolist()):
                want[label] += row
                counts[label] += 1
    torch.testing.assert_close(q, want / counts[:, None])
    torch.testing.assert_close(q.sum(1), torch.ones(3))


class Spy(Callback):
    """Records the centroids the mcmi term is given at each step."""

    def __init__(self):
        self.seen = []

    def on_step_start(self, trainer, module, batch):
        self.seen.append((trainer.epoch, module.terms[1].args["centroids"].clone()))


@pytest.mark.parametrize("every", [0, 1])
def test_the_term_trains_with_the_callbacks_centroids(tmp_path, every):
    torch.manual_seed(0)
    data, val = toy(), toy(n=12, seed=1)
    module = Distiller(Net(Small(), ["x"]), [], [Term("ce"), Term("mcmi", -0.25)])
    cb, spy = MCMICentroids(every=every), Spy()
    cfg = TrainerConfig(max_epochs=3, batch_size=16, lr=0.05, progress="off", tensorboard=False, device="cpu")
    Trainer(cfg, tmp_path / "fit").fit(module, data, val, [cb, spy])
    by_epoch = {e: q for e, q in spy.seen}
    assert set(by_epoch) == {0, 1, 2} and all(torch.equal(q, by_epoch[e]) for e, q in spy.seen)  # fixed in an epoch
    changed = [not torch.allclose(by_epoch[e], by_epoch[e + 1], atol=1e-7) for e in (0, 1)]
    assert changed == ([True, True] if every == 1 else [False, False])  # every=0: once, from the initial model
    assert torch.equal(cb.centroids, by_epoch[2]) and torch.equal(cb.state_dict()["centroids"], by_epoch[2])


class Crash(Callback):
    def on_epoch_start(self, trainer, module):
        if trainer.epoch == 1:
            raise KeyboardInterrupt


def test_a_resumed_fit_keeps_the_centroids_it_started_with(tmp_path):
    """every=0: the centroids of the initial model, also after a resume (not those of the resumed one)."""
    torch.manual_seed(0)
    data, val = toy(), toy(n=12, seed=1)
    cfg = TrainerConfig(max_epochs=3, batch_size=16, lr=0.05, progress="off", tensorboard=False, device="cpu")
    module = Distiller(Net(Small(), ["x"]), [], [Term("ce"), Term("mcmi", -0.25)])
    first = MCMICentroids()
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "fit").fit(module, data, val, [first, Crash()])
    module = Distiller(Net(Small(), ["x"]), [], [Term("ce"), Term("mcmi", -0.25)])
    again, spy = MCMICentroids(), Spy()
    Trainer(cfg, tmp_path / "fit", resume=True).fit(module, data, val, [again, spy])
    assert {e for e, _ in spy.seen} == {1, 2} and all(torch.equal(q, first.centroids) for _, q in spy.seen)


def test_the_callback_names_a_term_it_can_drive():
    module = Distiller(Net(nn.Identity(), ["x"]), [], [Term("ce")])
    with pytest.raises(ValueError, match="has no loss term 'mcmi'; its terms are: ce"):
        MCMICentroids().on_fit_start(None, module)
    with pytest.raises(ValueError, match="loss term 'ce' \\(loss 'ce'\\) takes no centroids"):
        MCMICentroids(term="ce").on_fit_start(None, module)
    with pytest.raises(ValueError, match="every=-1"):
        MCMICentroids(every=-1)


# ---------------------------------------------------------------- the teacher-side config path
TINY = ["trainer.max_epochs=1", "teachers.cnn.epochs=1", "trainer.tensorboard=false", "trainer.progress=off",
        "baseline=false", "export=[]", "data.args.split_seed=0", "teachers.cnn.args.channels=[4]",
        "student.args.hidden=[8]"]
MCMI = ["teachers.cnn.losses.ce.weight=1.0", "teachers.cnn.losses.mcmi.weight=-0.25",
        "teachers.cnn.callbacks=[{name: mcmi_centroids, args: {term: mcmi}}]"]


def header(path):
    return path.read_text().splitlines()[0].split(",")


@pytest.mark.slow
def test_a_tiny_run_trains_the_teacher_with_its_losses_under_its_own_store_key(tmp_path):
    from omegaconf import OmegaConf

    from mmkd import store
    from mmkd.build import build_model, load_data, trainer_config
    from mmkd.cli import compose
    from mmkd.run import run

    common = [f"out_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", *TINY]
    plain_cfg = compose([*common, f"run_dir={tmp_path / 'ce'}"])
    assert dict(plain_cfg.teachers.cnn.losses) == {} and list(plain_cfg.teachers.cnn.callbacks) == []
    run(plain_cfg)
    (plain,) = (tmp_path / "cache" / "teachers").glob("*.pt")
    assert "train/mcmi" not in header(tmp_path / "ce" / "teachers" / "cnn" / "metrics.csv")

    # the CE-only teacher keeps the key of a spec without losses (teachers stored before them are reused)
    tc = plain_cfg.teachers.cnn
    data, meta = load_data(plain_cfg)
    spec = {"name": tc.name, "args": OmegaConf.to_container(tc.args), "inputs": list(tc.inputs)}
    key = store.teacher_key(spec, build_model(tc, meta, "teachers.cnn"),
                            trainer_config(plain_cfg, tc.epochs, tc.lr, data, teacher=tc), [data.train, data.val])
    assert plain.stem == key

    results = run(compose([*common, f"run_dir={tmp_path / 'mcmi'}", *MCMI]))
    columns = header(tmp_path / "mcmi" / "teachers" / "cnn" / "metrics.csv")
    assert {"train/ce", "train/mcmi", "train/loss"} <= set(columns)
    row = dict(zip(columns, (tmp_path / "mcmi" / "teachers" / "cnn" / "metrics.csv").read_text().splitlines()[1].split(",")))
    assert float(row["train/mcmi"]) < 0  # -0.25 * CMI
    assert math.isclose(float(row["train/loss"]), float(row["train/ce"]) + float(row["train/mcmi"]), rel_tol=1e-5)
    assert "train/mcmi" not in header(tmp_path / "mcmi" / "student" / "metrics.csv")  # the student: CE + KD
    stored = {p.stem for p in (tmp_path / "cache" / "teachers").glob("*.pt")}
    assert len(stored) == 2 and plain.stem in stored  # a teacher trained with other losses is not reused
    assert results["teachers"]["cnn"]["test_acc"] >= 0


@pytest.mark.parametrize("override, message", [
    ("teachers.cnn.losses.nope.weight=1", "teachers.cnn.losses.nope.loss: unknown loss 'nope'; choose from: "),
    ("teachers.cnn.losses.kd.weight=1", "teachers.cnn.losses.kd: loss 'kd' reads a teacher; a teacher trains on"),
    ("teachers.cnn.losses.ce.weight=-1", "teachers.cnn.losses.ce.weight=-1; it must be a finite number >= 0"),
    ("teachers.cnn.losses.mcmi.wieght=1", "teachers.cnn.losses.mcmi.wieght: unknown config key; valid keys under "
                                          "teachers.cnn.losses.mcmi: loss, weight"),
    ("teachers.cnn.losses.mcmi.args.temperature=2", "teachers.cnn.losses.mcmi.args.temperature: loss 'mcmi' has no "
                                                    "argument 'temperature'; it takes: centroids"),
    ("teachers.cnn.callbacks=[{name: nope}]", "teachers.cnn.callbacks[0].name: unknown callback 'nope'; choose from:"),
    ("teachers.cnn.callbacks=[{name: mcmi_centroids, args: {term: kd}}]",
     "teachers.cnn.callbacks[0].args.term: 'kd' is not a loss term; choose from: ce"),
    ("teachers.cnn.callbacks=[{name: mcmi_centroids, args: {every: -1}}]",
     "teachers.cnn.callbacks[0].args.every=-1; it must be an integer >= 0"),
])
def test_bad_teacher_terms_are_one_line_errors(tmp_path, capsys, override, message):
    from mmkd.cli import main

    assert main(["run", f"out_dir={tmp_path}", *TINY, override]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mmkd: error: {message}") and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_the_shipped_experiment_composes_with_the_official_lambda():
    from mmkd.cli import compose

    cfg = compose(["experiment=cifar10_mcmi"])
    t = cfg.teachers.resnet
    assert {k: v.weight for k, v in t.losses.items()} == {"ce": 1.0, "mcmi": -0.25}
    assert [c.name for c in t.callbacks] == ["mcmi_centroids"]
    assert {k: v.weight for k, v in cfg.losses.items()} == {"ce": 0.1, "kd": 0.9}  # KD as in cifar10_kd
