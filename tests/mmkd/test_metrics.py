"""Evaluation metrics (mmkd.metrics): each against a hand computation or scikit-learn, the
trainer's metric set and what trainer.monitor may name."""
import math

import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Term, Trainer
from mmkd.metrics import IMBALANCED, MetricSet, task_metrics


def batches(seed=0, n=200, c=6, parts=3):
    g = torch.Generator().manual_seed(seed)
    logits, y = torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)
    return logits, y, list(zip(logits.chunk(parts), y.chunk(parts)))


def compute(names, parts):
    m = MetricSet(names)
    for z, y in parts:
        m.update(z, y)
    return m.compute()


def test_accuracy_and_loss_by_hand():
    logits, y, parts = batches()
    got = compute(["acc", "loss"], parts)
    correct = sum(int(logits[i].argmax() == y[i]) for i in range(len(y)))
    ce = sum(float(torch.logsumexp(logits[i].double(), 0) - logits[i, y[i]].double()) for i in range(len(y)))
    assert got["acc"] == correct / len(y)
    assert got["loss"] == pytest.approx(ce / len(y), rel=1e-6)


def test_f1_auroc_top5_against_references():
    logits, y, parts = batches(seed=1)
    got = compute(["f1", "auroc", "top5"], parts)
    assert got["f1"] == pytest.approx(f1_score(y, logits.argmax(1), average="macro"), abs=1e-6)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, logits.softmax(1), multi_class="ovr", average="macro"), abs=1e-5)
    top5 = sum(int(y[i] in logits[i].topk(5).indices) for i in range(len(y))) / len(y)
    assert got["top5"] == pytest.approx(top5)


def test_binary_auroc_is_the_roc_auc_of_the_positive_class():
    g = torch.Generator().manual_seed(3)
    logits, y = torch.randn(300, 2, generator=g), (torch.rand(300, generator=g) < 0.2).long()  # 20% positives
    got = compute(["auroc", "acc"], list(zip(logits.chunk(4), y.chunk(4))))
    assert got["auroc"] == pytest.approx(roc_auc_score(y, logits.softmax(1)[:, 1]), abs=1e-6)


def test_task_metrics_follow_the_labels():
    assert task_metrics(torch.tensor([0, 1, 1, 1, -1]), 2) == ["auroc", "acc", "loss"]
    balanced = torch.arange(3).repeat(10)
    assert task_metrics(balanced, 3) == ["acc", "loss"]
    small = int(IMBALANCED)  # class 2 has 1 item, class 0 has IMBALANCED - 1 and IMBALANCED
    assert task_metrics(torch.tensor([0] * (small - 1) + [1] * 3 + [2]), 3) == ["acc", "loss"]
    assert task_metrics(torch.tensor([0] * small + [1] * 3 + [2] + [-1] * 50), 3) == ["f1", "acc", "loss"]
    assert task_metrics(torch.tensor([0, 0, 1, 1]), 3) == ["f1", "acc", "loss"]  # a class without items


def test_perfect_predictions():
    y = torch.arange(5).repeat(4)
    got = compute(["acc", "f1", "auroc"], [(10 * nn.functional.one_hot(y, 5).float(), y)])
    assert got == {"acc": 1.0, "f1": pytest.approx(1.0), "auroc": pytest.approx(1.0)}


def data(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (60,), generator=g)
    y[:5] = -1  # unlabelled items are left out
    return TensorDictDataset(f"d{seed}", x=torch.randn(60, 4, generator=g), label=y)


def test_trainer_evaluates_the_named_set_and_monitors_any(tmp_path):
    torch.manual_seed(0)
    mod = Distiller(Net(nn.Linear(4, 3), ("x",)), [], [Term("ce")])
    t = Trainer(run_dir=tmp_path, max_epochs=3, batch_size=16, metrics=["acc", "f1"], monitor="val/f1",
                tensorboard=False, progress="off", device="cpu")
    res = t.fit(mod, data(0), data(1))
    assert {"val/acc", "val/f1"} <= set(res.history[0]) and "val/loss" not in res.history[0]
    assert res.best_score == max(row["val/f1"] for row in res.history)
    val = data(1)
    keep = val.tensors["label"] >= 0
    with torch.no_grad():
        pred = mod.student.model(val.tensors["x"][keep]).argmax(1)
    got = t.evaluate(mod, val)
    assert got["f1"] == pytest.approx(f1_score(val.tensors["label"][keep], pred, average="macro"), abs=1e-6)
    assert math.isclose(got["acc"], float((pred == val.tensors["label"][keep]).double().mean()))


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match=r"trainer.metrics: unknown metric 'f2'; choose from: acc, agree, auroc, f1, loss, ppl, tkl, top5"):
        Trainer(metrics=["acc", "f2"], device="cpu")
