"""MST-Distill: co-training losses, mask training, routed distillation, the routing report and the
three stages chained through run directories by ``mmkd run``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from mmkd import Distiller, Net, Teacher, Term, Trainer
from mmkd.cli import compose, main
from mmkd.data import TensorDictDataset
from mmkd.models import MLP
from mmkd.methods.mst_distill import CoTraining, specialized_teachers
from mmkd.methods.mst_distill.pipeline import MaskFit, routing_report
from mmkd.routers import LinearRouter, top_k_mask

DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None
T = 4.0


def naive_kl(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """``mean_b sum_c p_t (log p_t - log p_s)``, written out."""
    return (p_t * (p_t.log() - p_s.log())).sum(1).mean()


def test_cotraining_losses_match_a_hand_computation_and_targets_are_detached():
    torch.manual_seed(0)
    nets = {n: Net(nn.Linear(6, 4), ["x"]) for n in ("fusion", "cross", "student")}
    batch = {"x": torch.randn(8, 6), "label": torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])}
    co = CoTraining(nets, temperature=T, kd_weight=0.5)
    losses = co(batch)
    z = {n: net.model(batch["x"]) for n, net in nets.items()}
    expected = {}
    for m in nets:
        logp = z[m].log_softmax(1)
        expected[f"{m}/ce"] = -logp[torch.arange(8), batch["label"]].mean()
        for o in nets:
            if o != m:
                expected[f"{m}/kd_{o}"] = 0.5 * T**2 * naive_kl((z[o] / T).softmax(1), (z[m] / T).softmax(1))
    assert set(losses) == set(expected) | {"loss"}
    for k, v in expected.items():
        torch.testing.assert_close(losses[k], v)
    torch.testing.assert_close(losses["loss"], sum(expected.values()))
    # a member's KL term trains that member only: the other's distribution is a detached target
    losses["student/kd_fusion"].backward()
    assert nets["fusion"].model.weight.grad is None and nets["cross"].model.weight.grad is None
    assert nets["student"].model.weight.grad.abs().sum() > 0
    torch.testing.assert_close(co.predict(batch), z["student"].detach())


def toy_data(n: int = 48, classes: int = 3, seed: int = 0) -> TensorDictDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 6, generator=g) + 2 * F.one_hot(y, 6).float()
    return TensorDictDataset(f"toy{seed}", x=x, label=y)


def test_stage2_trains_only_the_masknet(tmp_path):
    torch.manual_seed(0)
    data = toy_data()
    teacher = Teacher(MLP(3, (6,), hidden=[16, 8]), ["x"])
    student = Teacher(MLP(3, (6,), hidden=[4]), ["x"])
    backbone = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    (spec,) = specialized_teachers([teacher], [["body.2"]], data[[0, 1]], dim=8, heads=2)
    mask_before = {k: v.clone() for k, v in spec.model.masknet.state_dict().items()}
    module = MaskFit(spec, student, temperature=T)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in spec.model.masknet.parameters()}
    # the loss is T^2 KL(p_student || p_masked teacher)
    batch = data[list(range(8))]
    want = T**2 * naive_kl((student(batch).logits / T).softmax(1), (spec(batch).logits / T).softmax(1))
    torch.testing.assert_close(module(batch)["loss"], want)
    Trainer(run_dir=tmp_path, max_epochs=3, batch_size=16, lr=1e-2, device="cpu", tensorboard=False,
            progress="off").fit(module, data, toy_data(seed=1))
    for k, v in teacher.model.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    assert any(not torch.equal(v, mask_before[k]) for k, v in spec.model.masknet.state_dict().items())


def routed(mode: str):
    torch.manual_seed(0)
    student = Net(nn.Linear(6, 3), ["x"])
    teachers = [Teacher(nn.Linear(6, 3), ["x"]) for _ in range(4)]
    router = LinearRouter(num_teachers=4, num_classes=3, mode=mode, k=2, balance_weight=1.0)
    d = Distiller(student, teachers, [Term("ce"), Term("kd", args={"temperature": T})], router)
    return d, router, {"x": torch.randn(16, 6), "label": torch.arange(16) % 3}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_stage3_router_learns_from_kl_in_soft_mode_and_from_balance_only_in_hard_mode(mode):
    d, router, batch = routed(mode)
    losses = d(batch)
    # the distillation term: (1/k) sum over the top-k (hard) or sum_t P_t (soft) of T^2 KL_t
    s = d.student(batch).logits
    kls = torch.stack([T**2 * (F.softmax(t.model(batch["x"]) / T, 1) * (F.log_softmax(t.model(batch["x"]) / T, 1)
                                                                      - F.log_softmax(s / T, 1))).sum(1)
                       for t in d.teachers], 1)
    p = router.gate(s).softmax(1)
    w = top_k_mask(p, 2).float() / 2 if mode == "hard" else p
    torch.testing.assert_close(losses["kd"], (w * kls).sum(1).mean())
    losses["kd"].backward(retain_graph=True)
    grad = router.gate.weight.grad
    if mode == "soft":
        assert grad is not None and grad.abs().sum() > 0
    else:
        assert grad is None or grad.abs().sum() == 0
    router.zero_grad()
    losses["router/balance"].backward()
    assert router.gate.weight.grad.abs().sum() > 0


def toy_report(mode: str, tmp_path) -> tuple[dict, dict, torch.Tensor]:
    """The routing report of a ``mode`` router over 4 teachers on 30 toy items; the items and the gate
    probabilities."""
    d, router, _ = routed(mode)
    data = toy_data(30)
    report = routing_report(router, d.student, list(d.teachers), ["a", "b", "c", "d"], data, ["c0", "c1", "c2"],
                            tmp_path)
    batch = data[list(range(30))]
    return report, batch, router.gate(d.student(batch).logits).softmax(1)


def test_routing_report_counts_top_k_picks_per_class_and_writes_a_png(tmp_path):
    report, batch, p = toy_report("hard", tmp_path)
    picks = top_k_mask(p, 2).float()
    want = torch.stack([picks[batch["label"] == c].sum(0) for c in range(3)])
    torch.testing.assert_close(torch.tensor(report["counts"]), want)
    torch.testing.assert_close(torch.tensor(report["fraction"]), want / 10)
    assert (tmp_path / "routing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "routing.json").read_text())["teachers"] == ["a", "b", "c", "d"]
    torch.testing.assert_close(torch.tensor(report["overall"]["fraction"]), want.sum(0) / 30)


def test_routing_report_of_a_soft_router_gives_mean_weights_per_class(tmp_path):
    report, batch, p = toy_report("soft", tmp_path)
    want = torch.stack([p[batch["label"] == c].mean(0) for c in range(3)])
    assert report["mode"] == "soft"
    torch.testing.assert_close(torch.tensor(report["mean_weight"]), want)
    torch.testing.assert_close(torch.tensor(report["overall"]["mean_weight"]), p.mean(0))


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["run", *args])
    return code, capsys.readouterr().err.strip()


def test_stage_chaining_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    code, err = cli(capsys, "experiment=mst_image_stage2")
    assert code == 2 and err.startswith("mmkd: error: method.stage1: missing") and "\n" not in err
    code, err = cli(capsys, "experiment=mst_image_stage2", f"method.stage1={tmp_path / 'nowhere'}")
    assert code == 2 and "no such run directory" in err and "\n" not in err
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={tmp_path / 'nowhere'}")
    assert code == 2 and err.startswith("mmkd: error: method.stage2=") and "no such run directory" in err
    code, err = cli(capsys, "experiment=mst_image_stage2", "method.stage1=x", "method.epoch=3")
    assert code == 2 and "method.epoch: unknown option of pipeline mst_stage2" in err
    # an earlier stage's run with another student, other data, or another pipeline
    for name, change in (("student", {"student": {"args": {"hidden": [32]}}}),
                         ("data", {"data": {"args": {"hop": 80}}}), ("pipeline", {"pipeline": "distill"})):
        run = tmp_path / name
        run.mkdir()
        cfg = OmegaConf.merge(compose(["experiment=mst_image_stage1"]), change)
        (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
        code, err = cli(capsys, "experiment=mst_image_stage2", f"method.stage1={run}")
        assert code == 2 and "\n" not in err, err
        assert (f"that run's {name}" in err) if name != "pipeline" else "pipeline is 'distill'" in err, err
    code, err = cli(capsys, "experiment=mst_image_stage2", "pipeline=mst_stage9")
    assert code == 2 and "pipeline: unknown pipeline 'mst_stage9'" in err


@pytest.mark.skipif(DATA is None, reason="set MMKD_DATA to the shared data folder")
def test_three_stages_chain_through_mmkd_run_on_tiny_avdigits(tmp_path, capsys):
    common = [f"data_root={DATA}", "data.args.limit_per_class=2", f"data.args.cache_dir={tmp_path / 'av'}",
              "trainer.max_epochs=1", "trainer.tensorboard=false", "trainer.progress=off", "export=[]",
              f"out_dir={tmp_path}"]
    s1, s2, s3 = tmp_path / "s1", tmp_path / "s2", tmp_path / "s3"
    assert main(["run", "experiment=mst_image_stage1", f"run_dir={s1}", *common]) == 0
    assert main(["run", "experiment=mst_image_stage2", f"run_dir={s2}", f"method.stage1={s1}",
                 "method.epochs=2", "method.dim=8", "method.heads=2", *common]) == 0
    assert main(["run", "experiment=mst_image_stage3", f"run_dir={s3}", f"method.stage2={s2}", *common]) == 0
    # stage 2 keeps each mask's best-validation state: the one in its trainer's best.pt
    masks = torch.load(s2 / "masks.pt", weights_only=True)
    for name, state in zip(masks["names"], masks["masks"]):
        best = torch.load(s2 / "masks" / name / "best.pt", weights_only=True)["model"]
        prefix = "teacher.model.masknet."
        assert set(state) == {k.removeprefix(prefix) for k in best if k.startswith(prefix)}, name
        for k, v in state.items():
            torch.testing.assert_close(v, best[prefix + k])
    for run, parts in ((s1, ["cotrain"]), (s2, [f"masks/{m}" for m in ("fusion@encoders.image.pool",
                        "fusion@encoders.audio.body", "audio@body.2", "audio@body.5")]), (s3, ["student"])):
        assert (run / "config.yaml").is_file() and (run / "results.json").is_file()
        for part in parts:
            assert all((run / part / f).is_file() for f in ("metrics.csv", "best.pt", "last.pt")), part
    assert {(s1 / "teachers" / n / "best.pt").is_file() for n in ("fusion", "audio")} == {True}
    results = json.loads((s3 / "results.json").read_text())
    assert len(results["specialized"]) == 4 and 0 <= results["student"]["test_acc"] <= 1
    routing = json.loads((s3 / "routing.json").read_text())
    assert torch.tensor(routing["counts"]).sum() == 2 * 20  # k=2 picks for each of 20 test items
    assert (routing["mode"], routing["k"]) == ("hard", 2) and results["routing"]["overall"] == routing["overall"]
    assert (s3 / "routing.png").is_file()
    # a soft router on a student feature: stage 3 gives it the feature's width
    s3f = tmp_path / "s3f"
    assert main(["run", "experiment=mst_image_stage3", f"run_dir={s3f}", f"method.stage2={s2}", "router.name=mlp",
                 "router.args.mode=soft", "router.args.source=features.body", *common]) == 0
    routing = json.loads((s3f / "routing.json").read_text())
    assert routing["mode"] == "soft"
    torch.testing.assert_close(torch.tensor(routing["mean_weight"]).sum(1), torch.ones(10))  # weights sum to 1
    capsys.readouterr()
    # masks that do not fit the stage-1 teachers' layers
    torch.save({**masks, "names": masks["names"][::-1]}, s2 / "masks.pt")
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={s2}", *common)
    err = err.splitlines()[-1]  # after the data set's log line
    assert code == 2 and err.startswith("mmkd: error: method.stage2=") and "do not match the teachers' layers" in err
    torch.save({**masks, "masks": masks["masks"][::-1]}, s2 / "masks.pt")
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={s2}", *common)
    err = err.splitlines()[-1]
    assert code == 2 and err.startswith("mmkd: error: method.stage2=") and "does not fit its teacher" in err
    # the audio student's stage 3 cannot read the image student's stage 2
    code, err = cli(capsys, "experiment=mst_audio_stage3", f"method.stage2={s2}", *common)
    assert code == 2 and "that run's student" in err and "\n" not in err
    # a stage-2 run whose stage-1 run is gone
    (s1 / "student.pt").unlink()
    code, err = cli(capsys, "experiment=mst_image_stage3", f"method.stage2={s2}", *common)
    assert code == 2 and "its method.stage1" in err and "incomplete (no student.pt)" in err
