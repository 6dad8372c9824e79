"""The shipped FF-G2M configs with the official best settings compose and carry the official numbers.

The table is LirongWu/FF-G2M, param/best_parameters.json (the ``cora`` and ``citeseer`` entries), read
with that repository's code: ``src/models.py`` builds the student MLP with ``dropout_t`` and the GNN
teachers with ``dropout_s``, both with ``num_layers`` layers of width ``hidden_dim`` (GAT: 4 heads of
``hidden_dim // 4``, attention dropout 0.3); ``src/train_and_eval.py`` weighs
``loss_l * lamb + (loss_t + loss_s) * (1 - lamb)`` with ``tau`` in the high-frequency term only;
``src/train.py`` trains the teacher at lr 0.01 (hard-coded) and the student at ``learning_rate``, both
with Adam, ``weight_decay`` and ``max_epoch`` epochs, stopping after 50 epochs without a validation
accuracy >= the best (the last such epoch is the one reported).
"""
import pytest

from mmkd.build import trainer_config
from mmkd.cli import compose
from mmkd.trainer import resolved

# (data set, teacher): hidden_dim, num_layers, dropout_t, dropout_s, tau, lamb, learning_rate,
# weight_decay, max_epoch, num_heads
OFFICIAL = {
    ("cora", "gcn"): (512, 3, 0.6, 0.5, 1.5, 0.4, 0.01, 0.0005, 500, 4),
    ("cora", "gat"): (1024, 3, 0.3, 0.6, 1.2, 0.5, 0.01, 0.0005, 500, 4),
    ("cora", "sage"): (512, 3, 0.4, 0.3, 1.3, 0.5, 0.01, 0.0005, 500, 4),
    ("citeseer", "gcn"): (256, 2, 0.5, 0.5, 1.5, 0.1, 0.01, 0.0005, 500, 4),
    ("citeseer", "gat"): (2048, 2, 0.4, 0.5, 1.0, 0.1, 0.01, 0.0005, 500, 4),
    ("citeseer", "sage"): (1024, 2, 0.5, 0.5, 1.2, 0.1, 0.01, 0.0005, 500, 4),
}


@pytest.mark.parametrize("dataset,teacher", sorted(OFFICIAL))
def test_config_carries_the_official_settings(dataset, teacher):
    hidden, layers, dropout_t, dropout_s, tau, lamb, lr, wd, epochs, heads = OFFICIAL[dataset, teacher]
    cfg = compose([f"experiment=g2m_ffg2m_{dataset}_{teacher}"])
    assert cfg.experiment == f"g2m_ffg2m_{dataset}_{teacher}"
    assert cfg.data.name == dataset
    assert dict(cfg.data.args) == {"setting": "transductive", "batching": "full"}  # exp_setting tran

    gnn = cfg.teachers.gnn
    assert gnn.name == teacher and list(gnn.inputs) == ["x", "edge_index"]
    assert (gnn.args.hidden, gnn.args.layers, gnn.args.dropout) == (hidden, layers, dropout_s)
    if teacher == "gat":
        assert (gnn.args.heads, gnn.args.attn_dropout) == (heads, 0.3)
    # src/models.py: ReLU between GAT layers; DGL GraphConv / SAGEConv('gcn') stacks drop out between layers
    official_layers = {"gat": {"activation": "relu"}, "gcn": {"input_dropout": False},
                       "sage": {"aggr": "gcn", "input_dropout": False}}[teacher]
    assert official_layers.items() <= dict(gnn.args).items()
    assert (gnn.epochs, gnn.lr) == (epochs, 0.01)  # the teacher's lr is hard-coded in src/train.py

    student = cfg.student
    assert student.name == "mlp" and list(student.inputs) == ["x"]
    assert list(student.args.hidden) == [hidden] * (layers - 1)  # num_layers Linear layers
    assert student.args.dropout == dropout_t
    assert student.args.batch_norm is False

    assert set(cfg.losses) == {"ce", "ffg2m_lfd", "ffg2m_hfd"}
    assert cfg.losses.ce.weight == pytest.approx(lamb)
    assert cfg.losses.ffg2m_lfd.weight == pytest.approx(1 - lamb)
    assert cfg.losses.ffg2m_hfd.weight == pytest.approx(1 - lamb)
    assert cfg.losses.ffg2m_hfd.args.tau == tau
    assert cfg.losses.ffg2m_lfd.args.get("temperature", 1.0) == 1.0  # no temperature in the official LFD

    tr = resolved(trainer_config(cfg), metrics=["acc", "loss"])  # Cora's and CiteSeer's task metrics
    assert (tr.optimizer, tr.lr, tr.weight_decay, tr.max_epochs, tr.scheduler) == ("adam", lr, wd, epochs, "none")
    assert (tr.batch_size, tr.monitor, tr.mode, tr.patience, tr.ties) == (1, "val/acc", "max", 50, "last")
    assert cfg.router.name == "constant"



def test_hfd_tau_is_range_checked():
    from mmkd.config import ConfigError

    with pytest.raises(ConfigError, match=r"losses\.ffg2m_hfd\.args\.tau=-1"):
        compose(["experiment=g2m_ffg2m_cora_gcn", "losses.ffg2m_hfd.args.tau=-1"])
