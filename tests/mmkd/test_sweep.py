"""Sweeps (mmkd.sweep): --multirun expands Hydra sweep values into jobs checked before any runs, and
mmkd summary aggregates their results by setting, checked against the runs' own results.json."""
from __future__ import annotations

import json
import statistics

import pytest

from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.sweep import expand
from tests.graphs.test_data import ten_split_npz

TINY = ["experiment=g2m_glnn", "data.name=npz", "data.args.path=h.npz", "teachers.gnn.epochs=2",
        "trainer.max_epochs=2", "trainer.progress=off", "trainer.tensorboard=false", "export=[]"]


def test_expand_makes_every_combination_and_names_the_swept_keys():
    jobs, swept = expand(["a=1,2", "b=x", "c=range(0,3)", "~losses.kd"])
    assert swept == ["a", "c"] and len(jobs) == 6
    assert jobs[0] == ["a=1", "b=x", "c=0", "~losses.kd"] and jobs[-1] == ["a=2", "b=x", "c=2", "~losses.kd"]
    assert expand(["seed=3"]) == ([["seed=3"]], [])
    with pytest.raises(ConfigError, match="^--multirun: "):
        expand(["a=[1,"])


@pytest.mark.slow
def test_a_sweep_over_splits_and_teachers_and_its_summary(tmp_path, capsys):
    ten_split_npz(tmp_path / "h.npz", splits=2)
    sweep = tmp_path / "sweep"
    code = main(["run", *TINY, f"data_root={tmp_path}", f"out_dir={tmp_path}", "--multirun",
                 "data.args.split_index=0,1", "teacher@teachers.gnn=glnn_gcn,glnn_sage", f"sweep_dir={sweep}"])
    assert code == 0
    manifest = (sweep / "multirun.yaml").read_text()
    assert "data.args.split_index=1" in manifest and sorted(p.name for p in sweep.iterdir() if p.is_dir()) == list("0123")
    results = [json.loads((sweep / str(n) / "results.json").read_text()) for n in range(4)]
    assert [r["run_dir"] for r in results] == [str(sweep / str(n)) for n in range(4)]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["swept"] == ["data.args.split_index", "teacher@teachers.gnn"]
    groups = {tuple(g["setting"]): g for g in summary["groups"]}
    assert set(groups) == {("teacher@teachers.gnn=glnn_gcn",), ("teacher@teachers.gnn=glnn_sage",)}
    for setting, runs in ((("teacher@teachers.gnn=glnn_gcn",), (0, 2)), (("teacher@teachers.gnn=glnn_sage",), (1, 3))):
        got = groups[setting]["models"]
        for model, key in (("teacher gnn", ("teachers", "gnn")), ("student, distilled", ("student",))):
            values = [r[key[0]][key[1]]["test_acc"] if len(key) == 2 else r[key[0]]["test_acc"] for r in
                      (results[i] for i in runs)]
            assert got[model]["acc"]["values"] == values
            assert got[model]["acc"]["mean"] == pytest.approx(statistics.mean(values))
            assert got[model]["acc"]["std"] == pytest.approx(statistics.stdev(values))
    md = (sweep / "summary.md").read_text()
    assert "| teacher@teachers.gnn=glnn_sage | student, labels only | 2 |" in md
    capsys.readouterr()
    assert main(["summary", f"sweep_dir={sweep}"]) == 0  # again, from the files
    assert "sweep " in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--multirun", "seed=0,1", "run_dir=R"], "run_dir: a sweep gives each job its own folder"),
    (["seed=0", "sweep_dir=S"], "sweep_dir: names the folder of a sweep; add --multirun"),
    (["--multirun", "seed=0,1", "trainer.lr=-1"], "trainer.lr=-1.0; it must be a positive finite number"),
])
def test_a_bad_sweep_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmkd: error: {message}") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_summary_of_a_folder_without_a_sweep(tmp_path, capsys):
    assert main(["summary", f"sweep_dir={tmp_path}"]) == 2
    assert "holds no multirun.yaml; give a folder that mmkd run --multirun wrote" in capsys.readouterr().err
