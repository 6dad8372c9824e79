"""A two-process DDP run on CPU (gloo), launched with torch.distributed.run: the ranks end with
identical weights, each sees its own half of the data, metrics are reduced over both, and only
rank 0 writes files."""
import textwrap

import pytest
import torch
import torch.distributed as dist

from tests.reference import torchrun

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available in this torch build")

N_TRAIN, N_VAL, BATCH, EPOCHS = 128, 40, 16, 2

SCRIPT = textwrap.dedent(f"""
    import os, sys
    import torch
    from torch import nn
    import mmkd.io
    from mmkd import Distiller, Net, Teacher, TensorDictDataset, Term, Trainer
    from mmkd.routers import ConstantRouter

    torch.set_num_threads(1)
    rank, out = int(os.environ["RANK"]), sys.argv[1]

    writes = []  # every atomic file write this process makes
    real_atomic = mmkd.io.atomic_path
    def spy(path):
        writes.append(os.path.basename(str(path)))
        return real_atomic(path)
    mmkd.io.atomic_path = spy
    writers = []  # whether this process opened a TensorBoard writer, per fit
    from mmkd.callbacks import MetricsLogger
    real_start = MetricsLogger.on_fit_start
    def tb_spy(self, trainer, module):
        real_start(self, trainer, module)
        writers.append(self.writer is not None)
    MetricsLogger.on_fit_start = tb_spy

    g = torch.Generator().manual_seed(0)
    x = torch.randn({N_TRAIN + N_VAL}, 6, generator=g)
    y = (x[:, :4] + 0.3 * torch.randn({N_TRAIN + N_VAL}, 4, generator=g)).argmax(1)
    train = TensorDictDataset("train", x=x[:{N_TRAIN}], label=y[:{N_TRAIN}])
    val = TensorDictDataset("val", x=x[{N_TRAIN}:], label=y[{N_TRAIN}:])

    torch.manual_seed(100)
    teacher = Teacher(nn.Linear(6, 4), keys=("x",))
    torch.manual_seed(rank)  # a different init per rank: DDP must start all ranks from rank 0's
    student = Net(nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 4)), keys=("x",))
    module = Distiller(student, [teacher], [Term("ce"), Term("kd", 0.5)], router=ConstantRouter())
    init = {{k: v.clone() for k, v in module.state_dict().items()}}

    seen, losses = [], []
    module.register_forward_pre_hook(lambda m, a: seen.append(a[0]["index"].tolist()))
    module.register_forward_hook(lambda m, a, o: losses.append(o["loss"].item()))
    snaps, own_acc = [], []
    real_eval = Trainer.evaluate
    def eval_spy(self, mod, ds):
        snaps.append({{k: v.clone() for k, v in mod.state_dict().items()}})
        mod.eval()
        with torch.no_grad():  # accuracy on the whole val set, not sharded
            own_acc.append((mod.predict(ds.tensors).argmax(1) == ds.tensors["label"]).double().mean().item())
        return real_eval(self, mod, ds)
    Trainer.evaluate = eval_spy

    trainer = Trainer(run_dir=os.path.join(out, "run"), max_epochs={EPOCHS}, batch_size={BATCH}, lr=0.05,
                      optimizer="sgd", progress="off", tensorboard=True, device="cpu")
    res = trainer.fit(module, train, val)
    torch.save({{"rank": trainer.rank, "world": trainer.world, "init": init, "trained": snaps[-1],
                "after_fit": module.state_dict(), "seen": seen, "losses": losses, "own_acc": own_acc,
                "writes": writes, "writers": writers, "history": res.history, "best_epoch": res.best_epoch}},
               os.path.join(out, f"rank{{rank}}.pt"))
""")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    rc, log = torchrun(SCRIPT, out, "train_ddp", timeout=120)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) if (out / f"rank{r}.pt").exists() else None
             for r in range(2)]
    return rc, log, out, ranks


def test_ddp_run_succeeds(ddp_run):
    rc, log, out, ranks = ddp_run
    assert rc == 0, log[-4000:]
    assert [r["rank"] for r in ranks] == [0, 1] and [r["world"] for r in ranks] == [2, 2]


def test_ddp_ranks_end_with_identical_weights(ddp_run):
    rc, log, out, (r0, r1) = ddp_run
    assert rc == 0, log[-4000:]
    w = "student.model.0.weight"
    assert not torch.equal(r0["init"][w], r1["init"][w])  # the ranks started from different inits
    assert not torch.equal(r0["trained"][w], r0["init"][w])  # and training changed the weights
    for k in r0["trained"]:
        assert torch.equal(r0["trained"][k], r1["trained"][k]), k
        assert torch.equal(r0["after_fit"][k], r1["after_fit"][k]), k
    last = torch.load(out / "run" / "last.pt", weights_only=False)
    for k in r0["trained"]:
        assert torch.equal(last["model"][k], r0["trained"][k]), k


def test_ddp_sampler_gives_each_rank_half_the_data(ddp_run):
    rc, log, out, (r0, r1) = ddp_run
    assert rc == 0, log[-4000:]
    steps = N_TRAIN // 2 // BATCH
    assert len(r0["seen"]) == len(r1["seen"]) == EPOCHS * steps
    for e in range(EPOCHS):
        a = [i for b in r0["seen"][e * steps:(e + 1) * steps] for i in b]
        b = [i for b in r1["seen"][e * steps:(e + 1) * steps] for i in b]
        assert len(a) == len(b) == N_TRAIN // 2
        assert not set(a) & set(b) and sorted(a + b) == list(range(N_TRAIN))
    first_epoch = [i for b in r0["seen"][:steps] for i in b]
    second_epoch = [i for b in r0["seen"][steps:] for i in b]
    assert first_epoch != second_epoch  # reshuffled per epoch


def test_ddp_metrics_are_reduced_over_ranks(ddp_run):
    rc, log, out, (r0, r1) = ddp_run
    assert rc == 0, log[-4000:]
    steps = N_TRAIN // 2 // BATCH
    for e, (h0, h1) in enumerate(zip(r0["history"], r1["history"])):
        both = r0["losses"][e * steps:(e + 1) * steps] + r1["losses"][e * steps:(e + 1) * steps]
        assert h0["train/loss"] == pytest.approx(sum(both) / len(both), rel=1e-5)
        assert h0["val/acc"] == pytest.approx(r0["own_acc"][e], abs=1e-12)  # full val set, not one shard
        for k in ("train/loss", "train/ce", "train/kd", "val/acc", "val/loss", "lr"):
            assert h0[k] == h1[k], k
    assert r0["best_epoch"] == r1["best_epoch"]


def test_ddp_only_rank0_writes_files(ddp_run):
    rc, log, out, (r0, r1) = ddp_run
    assert rc == 0, log[-4000:]
    assert r1["writes"] == [] and r1["writers"] == [False]
    assert r0["writers"] == [True]
    assert r0["writes"].count("last.pt") == EPOCHS and r0["writes"].count("metrics.csv") == EPOCHS
    assert "best.pt" in r0["writes"]
    run = out / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "last.pt", "metrics.csv", "tb"]
    assert len(list((run / "tb").iterdir())) == 1  # one event file, from rank 0
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + EPOCHS
