"""Data pruning (mmkd.methods.pruning): EL2N and forgetting scores against naive computations, the kept
subsets on hand-built scores, and the scores written by one run and read by the next."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from mmkd import Net, TensorDictDataset
from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.methods.pruning import PruneByScore, el2n, forgetting_scores


def test_el2n_is_the_mean_error_norm_of_the_models():
    g = torch.Generator().manual_seed(0)
    ds = TensorDictDataset("d", x=torch.randn(9, 4, generator=g), label=torch.randint(0, 3, (9,), generator=g))
    torch.manual_seed(0)
    nets = [Net(nn.Linear(4, 3), ("x",)) for _ in range(2)]
    got = el2n(nets, ds, torch.device("cpu"), batch_size=4)
    for i in range(9):
        norms = []
        for net in nets:
            p = torch.softmax(net.model(ds.tensors["x"][i]).double(), 0).tolist()
            y = int(ds.tensors["label"][i])
            norms.append(sum((p[c] - (c == y)) ** 2 for c in range(3)) ** 0.5)
        assert got[i].item() == pytest.approx(sum(norms) / 2, abs=1e-6)


def test_forgetting_counts_correct_to_wrong_transitions():
    correct = torch.tensor([[1, 0, 1, 0],   # epoch 1
                            [0, 0, 1, 1],   # epoch 2
                            [1, 0, 0, 1],   # epoch 3
                            [0, 0, 1, 1]], dtype=torch.bool)
    # item 0: 1-0, 1-0: two events; item 1: never correct: 4 (the epochs); item 2: one; item 3: none
    assert forgetting_scores(correct).tolist() == [2.0, 4.0, 1.0, 0.0]


def scores_file(tmp_path, values) -> str:
    np.save(tmp_path / "s.npy", np.asarray(values))
    return str(tmp_path / "s.npy")


def test_prune_keeps_the_hardest_or_the_easiest_in_index_order(tmp_path):
    ds = TensorDictDataset("d", x=torch.zeros(6, 1), label=torch.zeros(6, dtype=torch.long))
    path, t = scores_file(tmp_path, [0.1, 0.9, 0.5, 0.9, 0.0, 0.3]), SimpleNamespace(epoch=0)
    assert PruneByScore(path, 0.5).select(t, None, ds).indices == [1, 2, 3]
    assert PruneByScore(path, 0.3).select(t, None, ds).indices == [1]  # int(1.8); the tie to the lower index
    assert PruneByScore(path, 0.5, keep="easy").select(t, None, ds).indices == [0, 4, 5]
    with pytest.raises(ConfigError, match="5 scores for 6 training items"):
        PruneByScore(scores_file(tmp_path, [1.0] * 5)).select(t, None, ds)


@pytest.mark.parametrize("values, match", [
    (None, "no such file"),
    (np.zeros((2, 3)), "shape \\(2, 3\\)"),
    (np.array([{"a": 1}], dtype=object), "not a NumPy array of scores"),  # pickled objects are refused
])
def test_bad_scores_files_are_one_line_errors(tmp_path, values, match):
    path = str(tmp_path / "missing.npy") if values is None else scores_file(tmp_path, values)
    with pytest.raises(ConfigError, match=match) as e:
        PruneByScore(path)
    assert "\n" not in str(e.value)


def run(tmp_path: Path, name: str, *overrides: str) -> Path:
    assert main(["run", "experiment=quickstart", f"name={name}", f"out_dir={tmp_path}", "teachers.cnn.epochs=1",
                 "trainer.max_epochs=2", "trainer.tensorboard=false", "trainer.progress=off", "baseline=false",
                 "export=[]", *overrides]) == 0
    return next((tmp_path / name).iterdir())


def test_one_runs_scores_prune_the_next_runs_data(tmp_path):
    """A run with the forgetting callback writes its scores; prune keeps half by them; el2n scores with
    the first run's student, as a naive EL2N of that student computes."""
    from mmkd.build import load_data
    from mmkd.export import trained_model
    from mmkd.cli import compose

    first = run(tmp_path, "scored", "callbacks=[{name: forgetting}]")
    scores = np.load(first / "student" / "forgetting_scores.npy")
    data, _ = load_data(compose(["experiment=quickstart"]))
    n = len(data.train)
    assert scores.shape == (n,) and scores.min() >= 0 and scores.max() <= 2  # 2 epochs: at most "never correct"

    pruned = run(tmp_path, "pruned", f"policies=[{{name: prune, args: {{scores: '{first}/student/forgetting_scores.npy', "
                                     "fraction: 0.5}}]")
    kept = (pruned / "student" / "metrics.csv").read_text().splitlines()
    col = kept[0].split(",").index("prune/kept")
    assert float(kept[1].split(",")[col]) == n // 2

    third = run(tmp_path, "el2n", f"policies=[{{name: el2n, args: {{runs: ['{first}'], fraction: 0.3}}}}]")
    got = np.load(third / "student" / "el2n_scores.npy")
    model, cfg, _ = trained_model(first)
    with torch.no_grad():
        x, y = torch.stack([data.train[i]["image"] for i in range(n)]), torch.stack([data.train[i]["label"] for i in range(n)])
        p = model(x).double().softmax(1)
    want = (p - torch.nn.functional.one_hot(y, p.shape[1]).double()).norm(dim=1).numpy()
    assert np.allclose(got, want, atol=1e-5)


def test_el2n_refuses_an_unfinished_run_before_loading_anything(tmp_path):
    from mmkd.methods.pruning import EL2N

    with pytest.raises(ConfigError, match="runs"):
        EL2N(runs=[str(tmp_path / "nowhere")])
    with pytest.raises(ConfigError, match="give the run directories"):
        EL2N(runs=[])
