"""The command line: errors and exit codes, `mmkd list`, a one-epoch quickstart run, export."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmkd.cli import main

FAST = ["trainer.max_epochs=1", "teachers.cnn.epochs=1", "trainer.tensorboard=false"]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_exit_code_2_from_the_installed_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmkd.cli", "run", "trainer.nope=1"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("mmkd: error: trainer.nope: unknown config key")
    assert proc.stdout == ""


def test_list(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert set(lines) == {"losses", "routers", "models", "datasets", "pipelines", "transforms", "policies",
                          "callbacks", "backward", "metrics", "experiments"}
    # membership, not equality: tests that run earlier (tests/e2e/test_readme.py) register more
    assert "mixup" in lines["transforms"].split(", ") and "hardest" in lines["policies"].split(", ")
    assert "align" in lines["backward"].split(", ")
    assert {"acc", "loss", "f1", "auroc", "top5"} <= set(lines["metrics"].split(", "))
    assert {"distill", "mst_stage1", "mst_stage2", "mst_stage3"} <= set(lines["pipelines"].split(", "))
    assert {"ce", "kd", "dkd", "nkd", "dist", "pld", "sinkd"} <= set(lines["losses"].split(", "))
    assert {"constant", "confidence"} <= set(lines["routers"].split(", "))
    assert "quickstart" in lines["experiments"].split(", ")


def test_registries_record_the_defining_module():
    from mmkd.registry import LOSSES, MODELS

    assert LOSSES.module("kd") == "mmkd.losses.kd"
    assert MODELS.module("gcn") == "mmkd.graphs.models"


def test_list_by_module(capsys):
    code, out, _ = run_cli(capsys, "list", "module=mmkd.graphs")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert "gcn" in lines["models"].split(", ") and "experiments" not in lines
    assert "kd" not in lines.get("losses", "").split(", ") and "glnn" in lines["losses"].split(", ")
    code, out, _ = run_cli(capsys, "list", "modules=true", "module=mmkd.losses.kd")
    assert code == 0 and out == "losses: kd (mmkd.losses.kd)\n"


@pytest.mark.parametrize("args, expected", [
    (["colour=red"], "'colour=red': unknown option; valid keys: module, modules"),
    (["modules=yes"], "modules: expected true or false, got 'yes'"),
    (["module=mmkd.graph"], "module=mmkd.graph: no registered name is defined in it or below it; choose from: "),
])
def test_list_errors(capsys, args, expected):
    code, out, err = run_cli(capsys, "list", *args)
    assert code == 2 and out == "" and err.startswith("mmkd: error: " + expected) and err.count("\n") == 1


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """One-epoch quickstart run through the CLI."""
    run_dir = tmp_path_factory.mktemp("runs") / "qs"
    code = main(["run", f"run_dir={run_dir}", f"cache_dir={run_dir.parent / 'cache'}",
                 "export=[onnx,pt2]", *FAST])
    assert code == 0
    return run_dir


def test_quickstart_writes_its_run_directory(quickstart_run):
    d = quickstart_run
    for name in ("config.yaml", "data.json", "results.json", "curves.png", "student.pt",
                 "export/student.onnx", "export/student.pt2", "export/meta.json"):
        assert (d / name).is_file(), name
    for stage in ("teachers/cnn", "student", "baseline"):
        for name in ("metrics.csv", "best.pt", "last.pt"):
            assert (d / stage / name).is_file(), f"{stage}/{name}"
    results = json.loads((d / "results.json").read_text())
    for key in ("student", "baseline"):
        assert 0.0 <= results[key]["test_acc"] <= 1.0
    assert results["teachers"]["cnn"]["params"] > results["student"]["params"]
    assert not list(d.rglob("*.tmp*")), "temporary files left behind"


def test_exports_match_pytorch(quickstart_run):
    import onnxruntime as ort

    from mmkd.models import MLP

    d = quickstart_run
    meta = json.loads((d / "export/meta.json").read_text())
    assert meta["inputs"] == {"image": [1, 8, 8]} and meta["num_classes"] == 10
    model = MLP(10, (1, 8, 8), hidden=[64], dropout=0.1)
    model.load_state_dict(torch.load(d / "student.pt"))
    model.eval()
    x = torch.rand(33, 1, 8, 8)  # a batch size other than the export example's
    want = model(x).detach().numpy()
    onnx_out = ort.InferenceSession(str(d / "export/student.onnx")).run(None, {"image": x.numpy()})[0]
    np.testing.assert_allclose(onnx_out, want, atol=1e-5)
    program = torch.export.load(d / "export/student.pt2")
    np.testing.assert_allclose(program.module()(x).detach().numpy(), want, atol=1e-6)


def test_export_command(quickstart_run, capsys):
    (quickstart_run / "export/student.pt2").unlink()
    code, out, _ = run_cli(capsys, "export", f"run_dir={quickstart_run}", "format=torchscript")  # the alias of pt2
    assert code == 0 and out.strip().endswith("student.pt2")
    assert (quickstart_run / "export/student.pt2").is_file()


@pytest.mark.parametrize("args, expected", [
    (["run_dir=nowhere"], "run_dir: 'nowhere' has no config.yaml"),
    ([], "run_dir: missing"),
    (["colour=red"], "'colour=red': unknown export option"),
])
def test_export_errors(capsys, args, expected):
    code, _, err = run_cli(capsys, "export", *args)
    assert code == 2 and err.startswith("mmkd: error: " + expected)


def test_export_unknown_format(quickstart_run, capsys):
    code, _, err = run_cli(capsys, "export", f"run_dir={quickstart_run}", "format=pdf")
    assert code == 2 and "unknown export format 'pdf'; choose from: onnx, pt2, torchscript" in err


def test_feature_kd_term_with_adapter_from_the_command_line(tmp_path):
    """A FitNet-style hint term added on the command line trains its adapter with the student."""
    from mmkd.cli import compose
    from mmkd.run import run

    args = [f"out_dir={tmp_path}", "baseline=false", "export=[]", "student.features=[body.2]",
            "teachers.cnn.features=[pool]", "losses.hint.loss=fitnet", "losses.hint.weight=1.0",
            "losses.hint.student=features.body.2", "losses.hint.teacher=features.pool",
            "losses.hint.adapter=linear", "teachers.cnn.lr=1e-3", *FAST]
    results = run(compose([*args, f"run_dir={tmp_path / 'trained'}"]))
    run(compose([*args, f"run_dir={tmp_path / 'frozen'}", "trainer.lr=1e-12"]))  # the same teacher and initialisation
    trained, frozen = (torch.load(tmp_path / d / "student" / "best.pt")["model"]["adapters.hint.1.weight"]
                       for d in ("trained", "frozen"))
    assert trained.shape == (128, 64)  # the 64 -> 128 projector
    assert (trained - frozen).abs().max() > 1e-4  # it moved: the hint loss's gradient reaches it
    assert 0 <= results["student"]["test_acc"] <= 1


def test_teacher_checkpoint_from_an_earlier_run_directory(quickstart_run, tmp_path, capsys):
    """Stages chain through run directories: a teacher trained by one run is loaded by the next."""
    from mmkd.cli import compose
    from mmkd.run import run

    cfg = compose([f"out_dir={tmp_path}", "baseline=false", "export=[]", f"teachers.cnn.checkpoint={quickstart_run}",
                   *FAST])
    results = run(cfg)
    first = json.loads((quickstart_run / "results.json").read_text())
    assert results["teachers"]["cnn"]["test_acc"] == first["teachers"]["cnn"]["test_acc"]
    assert "val_acc" not in results["teachers"]["cnn"]  # loaded, not trained again
    code, _, err = run_cli(capsys, "run", f"teachers.cnn.checkpoint={tmp_path}", *FAST)
    assert code == 2 and "has no teachers/cnn/best.pt" in err


def test_main_leaves_no_log_handler_behind(capsys):
    import logging

    before = list(logging.getLogger("mmkd").handlers)
    assert main(["list"]) == 0 and main(["run", "trainer.nope=1"]) == 2
    assert logging.getLogger("mmkd").handlers == before  # no duplicate log lines from a second call
