"""Paired labelled/unlabelled batches (mmkd.data.PairedBatches, the semi data set's batches=paired):
counts per step, epoch length, reshuffling, and the trainer reading them."""
import pytest
import torch
from torch import nn

from mmkd.config import ConfigError
from mmkd.data import PairedBatches, PairedSampler, TensorDictDataset, semi
from mmkd.distiller import Distiller, Term
from mmkd.net import Net
from mmkd.trainer import Trainer


def data(n_labelled=10, n_unlabelled=25):
    n = n_labelled + n_unlabelled
    label = torch.full((n,), -1)
    label[torch.arange(0, 2 * n_labelled, 2)] = torch.arange(n_labelled) % 3  # labelled items interleaved
    return TensorDictDataset("p", x=torch.arange(n, dtype=torch.float32)[:, None], label=label)


def steps(ds, batch_size, seed=0, epoch=0):
    sampler = ds.batch_sampler(batch_size, seed)
    sampler.set_epoch(epoch)
    return sampler, [ds.__getitems__(b) for b in sampler]


@pytest.mark.parametrize("mode, b_l, b_u, want", [
    # 10 labelled, 25 unlabelled: ceil(10/4) = 3 labelled batches, ceil(25/4) = 7 unlabelled ones
    ("shorter", 4, None, [(4, 4), (4, 4), (2, 4)]),
    ("labelled", 4, 8, [(4, 8), (4, 8), (2, 8)]),
    ("unlabelled", 4, 8, [(4, 8), (4, 8), (2, 8), (4, 1)]),  # labelled pool restarts, unlabelled ends short
    ("shorter", 6, 20, [(6, 20), (4, 5)]),  # the unlabelled pool is the shorter one here
])
def test_counts_per_step_and_epoch_length(mode, b_l, b_u, want):
    ds = PairedBatches(data(), data().tensors["label"] >= 0, b_u, mode)
    sampler, batches = steps(ds, b_l)
    assert len(sampler) == len(want) == len(batches)
    got = [(int(b["labelled"].sum()), int((~b["labelled"]).sum())) for b in batches]
    assert got == want
    for b in batches:  # labelled rows first; the flag agrees with the labels; items are the data set's
        n = int(b["labelled"].sum())
        assert b["labelled"][:n].all() and not b["labelled"][n:].any()
        assert torch.equal(b["label"] >= 0, b["labelled"]) and torch.equal(b["x"][:, 0].long(), b["index"])


def test_each_pool_is_covered_once_per_pass_and_reshuffled_per_epoch():
    ds = PairedBatches(data(), data().tensors["label"] >= 0, 5, "labelled")
    _, batches = steps(ds, 4)
    labelled = torch.cat([b["index"][b["labelled"]] for b in batches])
    unlabelled = torch.cat([b["index"][~b["labelled"]] for b in batches])
    assert sorted(labelled.tolist()) == list(range(0, 20, 2))  # one pass over the 10 labelled items
    assert len(set(unlabelled.tolist())) == 15 and not set(unlabelled.tolist()) & set(range(0, 20, 2))
    again = steps(ds, 4)[1]
    other = steps(ds, 4, epoch=1)[1]
    assert all(torch.equal(a["index"], b["index"]) for a, b in zip(batches, again))  # seed + epoch only
    assert not all(torch.equal(a["index"], b["index"]) for a, b in zip(batches, other))


def test_trainer_trains_on_the_paired_steps(tmp_path):
    ds = PairedBatches(data(), data().tensors["label"] >= 0, None, "shorter")
    seen = []

    class Probe(Distiller):
        def forward(self, batch):
            seen.append((int(batch["labelled"].sum()), len(batch["labelled"])))
            return super().forward(batch)

    module = Probe(Net(nn.Linear(1, 3), ["x"]), [], [Term("ce")])
    trainer = Trainer(max_epochs=2, batch_size=4, tensorboard=False, progress="off", run_dir=tmp_path)
    trainer.fit(module, ds, data())
    assert trainer.steps_per_epoch == 3 and seen == [(4, 8), (4, 8), (2, 6)] * 2


def test_trainer_refuses_to_shard_self_made_batches(tmp_path):
    trainer = Trainer(max_epochs=1, batch_size=4, tensorboard=False, progress="off", run_dir=tmp_path)
    trainer.world = 2  # as under torchrun with two processes
    ds = PairedBatches(data(), data().tensors["label"] >= 0)
    with pytest.raises(ValueError, match="PairedBatches makes its own batches, which cannot be sharded across "
                                         "processes; train on one process or use batches=mixed"):
        trainer.fit(Distiller(Net(nn.Linear(1, 3), ["x"]), [], [Term("ce")]), ds, data())


def test_semi_paired_and_its_refusals():
    d = semi(root="unused", name="digits", fraction=0.1, seed=0, batches="paired", unlabelled_batch=32)
    assert isinstance(d.train, PairedBatches)
    labels = d.train.data.tensors["label"]
    assert torch.equal(d.train.labelled, labels >= 0) and d.train.fingerprint == d.train.data.fingerprint
    sampler = d.train.batch_sampler(64, 0)
    n_l, n_u = int((labels >= 0).sum()), int((labels < 0).sum())
    assert len(sampler) == min(-(-n_l // 64), -(-n_u // 32))
    with pytest.raises(ValueError, match="batches='zip'; choose from: mixed, paired"):
        semi(root="unused", name="digits", batches="zip")
    with pytest.raises(ValueError, match="unlabelled_batch applies to batches=paired"):
        semi(root="unused", name="digits", unlabelled_batch=8)
    with pytest.raises(ValueError, match="epoch applies to batches=paired"):
        semi(root="unused", name="digits", epoch="unlabelled")
    with pytest.raises(ValueError, match="epoch='longest'; choose from: shorter, labelled, unlabelled"):
        semi(root="unused", name="digits", batches="paired", epoch="longest")
    longer = semi(root="unused", name="digits", fraction=0.1, seed=0, batches="paired", epoch="unlabelled")
    assert len(longer.train.batch_sampler(64, 0)) == -(-n_u // 64)
    with pytest.raises(ValueError, match="the unlabelled pool is empty"):
        semi(root="unused", name="digits", fraction=1.0, batches="paired")
    with pytest.raises(ValueError, match="epoch='longest'; choose from: shorter, labelled, unlabelled"):
        PairedSampler(torch.arange(2), torch.arange(2), 1, 1, 0, "longest")


def test_bad_values_in_a_config_are_one_line_errors():
    from mmkd.build import load_data
    from mmkd.cli import compose

    with pytest.raises(ConfigError, match=r"^data.args: batches='zip'; choose from: mixed, paired$"):
        load_data(compose(["experiment=dho_digits", "data.args.batches=zip"]))
    with pytest.raises(ConfigError, match=r"^data.args.unlabelled_batch=0; it must be an integer >= 1$"):
        compose(["experiment=dho_digits", "data.args.unlabelled_batch=0"])
