"""Deployment of a graph MLP student: feature preprocessing, the export's meta.json, ONNX and
torch.export against PyTorch, and ``predict`` (function and ``mmkd predict``) on raw node features."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd import preprocess
from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.predict import load_features, predict
from mmkd.registry import MODELS

DATA = Path(os.environ.get("MMKD_DATA", "data"))
CORA = DATA / "planetoid" / "Cora" / "raw"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A short GLNN run on Cora (SAGE teacher, MLP student), exported to ONNX and torch.export."""
    if not CORA.is_dir():
        pytest.skip(f"Cora is not under {CORA}; set MMKD_DATA to the shared data folder")
    d = tmp_path_factory.mktemp("g2m") / "run"
    code = main(["run", "experiment=g2m_glnn", f"run_dir={d}", f"cache_dir={d.parent / 'cache'}",
                 f"data_root={DATA}", "trainer.max_epochs=20", "teachers.gnn.epochs=1",
                 "teachers.gnn.args.hidden=16", "student.args.hidden=[32]", "baseline=false",
                 "trainer.tensorboard=false", "trainer.progress=off", "trainer.device=cpu",
                 "export=[onnx,torchscript]"])
    assert code == 0
    return d


@pytest.fixture(scope="module")
def cora(run_dir):
    """Cora's raw (not row-normalised) features, its labels, and the run's test nodes (rebuilt from
    the run's own data config)."""
    from omegaconf import OmegaConf

    from mmkd.graphs.io import planetoid
    from mmkd.registry import DATASETS

    cfg = OmegaConf.load(run_dir / "config.yaml")
    test_label = DATASETS[cfg.data.name](root=str(DATA), **cfg.data.args).test[0]["label"]
    g = planetoid(DATA / "planetoid", "cora")
    return g.x, g.y, test_label >= 0


def student(run_dir: Path) -> torch.nn.Module:
    """The run's MLP student in PyTorch, rebuilt from its config and weights."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = MODELS[cfg.student.name](num_classes=7, in_shape=(1433,), **cfg.student.args)
    model.load_state_dict(torch.load(run_dir / "student.pt"))
    return model.eval()


def test_export_meta_has_preprocessing_and_class_names(run_dir):
    meta = json.loads((run_dir / "export/meta.json").read_text())
    assert meta["inputs"] == {"x": [1433]}  # only the student's input, not the teacher's edge_index
    assert meta["preprocessing"] == {"x": [{"op": "row_normalize"}]}
    assert meta["class_names"] == json.loads((run_dir / "data.json").read_text())["class_names"]
    assert len(meta["class_names"]) == meta["num_classes"] == 7
    assert meta["dtypes"] == {"x": "float32"}
    inputs = json.loads((run_dir / "data.json").read_text())["inputs"]  # dtypes and ranges of the whole graph
    assert inputs == {"x": {"dtype": "float32", "min": 0.0, "max": 1.0},
                      "edge_index": {"dtype": "int64", "min": 0, "max": 2707}}


def test_onnx_and_program_equal_pytorch(run_dir, cora):
    import onnxruntime as ort

    x = preprocess.row_normalize(cora[0])
    with torch.no_grad():
        want = student(run_dir)(x).numpy()
    session = ort.InferenceSession(str(run_dir / "export/student.onnx"), providers=["CPUExecutionProvider"])
    scale = max(1.0, float(np.abs(want).max()))  # large logits: within 1e-5 of their scale
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, atol=1e-5 * scale, rtol=0)
    program = torch.export.load(run_dir / "export/student.pt2").module()
    np.testing.assert_allclose(program(x).detach().numpy(), want, atol=1e-5 * scale, rtol=0)


def test_predict_applies_the_preprocessing_and_matches_the_run(run_dir, cora):
    x_raw, y, test = cora
    with torch.no_grad():
        logits = student(run_dir)(preprocess.row_normalize(x_raw))
    want = logits.softmax(1).numpy()
    for fmt, batch_size in (("onnx", 1000), ("pt2", 512), ("torchscript", 333), (None, 4096)):
        pred = predict(run_dir / "export" if fmt else run_dir, x_raw.numpy(), batch_size, fmt)
        np.testing.assert_allclose(pred.probs, want, atol=1e-5)
        clear = np.sort(want, 1)[:, -1] - np.sort(want, 1)[:, -2] > 1e-4  # no near-tie between the top two
        assert (pred.class_ids[clear] == want.argmax(1)[clear]).all()
        assert pred.class_names == json.loads((run_dir / "export/meta.json").read_text())["class_names"]
    # the accuracy of these predictions on the run's test nodes is the one the run reported
    acc = (pred.class_ids[test.numpy()] == y[test].numpy()).mean()
    reported = json.loads((run_dir / "results.json").read_text())["student"]["test_acc"]
    assert acc == pytest.approx(reported, abs=1.5 / int(test.sum()))


def read_predictions(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_predict_command_on_npy_csv_and_pt(run_dir, cora, capsys, tmp_path):
    x_raw = cora[0][:300].numpy()
    want = predict(run_dir, x_raw)
    np.save(tmp_path / "f.npy", x_raw)
    np.savetxt(tmp_path / "f.csv", x_raw, delimiter=",", header=",".join(f"w{i}" for i in range(1433)),
               comments="", fmt="%g")
    torch.save({"x": torch.from_numpy(x_raw)}, tmp_path / "f.pt")
    for name in ("f.npy", "f.csv", "f.pt"):
        out = tmp_path / f"{name}.preds.csv"
        code = main(["predict", f"run_dir={run_dir}", f"input={tmp_path / name}", f"output={out}", "batch_size=64"])
        assert code == 0 and capsys.readouterr().out.strip() == f"300 predictions -> {out}"
        rows = read_predictions(out)
        assert [int(r["class_id"]) for r in rows] == want.class_ids.tolist()
        assert [r["class_name"] for r in rows] == [want.class_names[c] for c in want.class_ids]
        probs = np.array([[float(r[f"prob_{n}"]) for n in want.class_names] for r in rows])
        np.testing.assert_allclose(probs, want.probs, atol=1e-5)
    assert (Path.cwd() / "preds.csv").exists() is False
    assert main(["predict", f"run_dir={run_dir}", f"input={tmp_path / 'f.npy'}"]) == 0  # default output
    assert len(read_predictions(Path.cwd() / "preds.csv")) == 300
    assert not list(tmp_path.glob(".*tmp*")) and not list(Path.cwd().glob(".*tmp*"))


@pytest.mark.parametrize("args, expected", [
    ([], "run_dir: missing; mmkd predict run_dir=DIR input="),
    (["run_dir=RUN"], "input: missing"),
    (["run_dir=RUN", "input=nope.npy"], "input: no such file 'nope.npy'"),
    (["run_dir=RUN", "input=narrow.npy"], "input: expected features of shape [N, 1433] (the student's 'x'), got [4, 10]"),
    (["run_dir=RUN", "input=f.txt"], "input: 'f.txt': unknown file type '.txt'; choose from: .npy, .csv, .pt"),
    (["run_dir=RUN", "input=bad.csv"], "input: cannot read 'bad.csv'"),
    (["run_dir=RUN", "input=other.pt"], "input: 'other.pt' holds a dict without the key 'x' (it has: y)"),
    (["run_dir=RUN", "input=narrow.npy", "batch_size=0"], "batch_size: expected a positive integer, got '0'"),
    (["run_dir=RUN", "input=narrow.npy", "format=pdf"], "format: unknown format 'pdf'; choose from: onnx, pt2, torchscript"),
    (["run_dir=RUN", "input=narrow.npy", "colour=red"], "'colour=red': unknown option; valid keys: run_dir, input"),
    (["run_dir=nowhere", "input=narrow.npy"], "run_dir: 'nowhere' is neither a run directory nor an export directory"),
])
def test_predict_errors_are_one_line_with_exit_code_2(run_dir, capsys, args, expected):
    np.save("narrow.npy", np.ones((4, 10), dtype=np.float32))
    Path("f.txt").write_text("1,2\n")
    Path("bad.csv").write_text("1,2\n3\n")
    torch.save({"y": torch.ones(2, 1433)}, "other.pt")
    code = main(["predict", *(a.replace("RUN", str(run_dir)) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmkd: error: " + expected), err
    assert err.count("\n") == 1 and not Path("preds.csv").exists()


def test_nan_features_and_a_bad_output_are_refused_before_predicting(run_dir, cora, capsys, tmp_path):
    x = cora[0][:50].numpy().copy()
    x[[7, 30], 5] = np.nan
    np.save(tmp_path / "nan.npy", x)
    code = main(["predict", f"run_dir={run_dir}", f"input={tmp_path / 'nan.npy'}", f"output={tmp_path / 'p.csv'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmkd: error: input: 2 of 50 rows of 'x' hold NaN or infinite values "
                                        "(rows 7, 30, counting from 0)") and err.count("\n") == 1
    np.save(tmp_path / "ok.npy", cora[0][:50].numpy())
    code = main(["predict", f"run_dir={run_dir}", f"input={tmp_path / 'ok.npy'}", f"output={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"mmkd: error: output: {str(tmp_path)!r} is a directory") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy", "ok.npy"]


def test_predict_needs_an_export(run_dir, tmp_path):
    (tmp_path / "run").mkdir()
    torch.save({}, tmp_path / "run" / "student.pt")
    with pytest.raises(ConfigError, match="has no export; run `mmkd export run_dir=.* format=onnx` first"):
        predict(tmp_path / "run", np.ones((1, 1433)))
    export = tmp_path / "export"
    export.mkdir()
    (export / "meta.json").write_text((run_dir / "export/meta.json").read_text())
    (export / "student.onnx").write_bytes((run_dir / "export/student.onnx").read_bytes())
    with pytest.raises(ConfigError, match="has no student.pt2; export it with `mmkd export run_dir=... format=pt2`"):
        predict(export, np.ones((1, 1433)), format="pt2")
    assert predict(export, np.ones((2, 1433))).probs.shape == (2, 7)


def test_csv_without_header(tmp_path):
    (tmp_path / "a.csv").write_text("1,2.5\n-3,4e-2\n")
    np.testing.assert_array_equal(load_features(tmp_path / "a.csv"), np.array([[1, 2.5], [-3, 0.04]], np.float32))
