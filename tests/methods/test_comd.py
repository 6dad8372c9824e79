"""CoMD: the competitive router, the augmented items, the pipeline's rounds and their resumption."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from mmkd.cli import compose, main
from mmkd.config import ConfigError
from mmkd.data import TensorDictDataset
from mmkd.methods.comd import Augmented, AugmentedPolicy, options, shifted
from mmkd.net import Output
from mmkd.routers import CompetitiveRouter


def out(logits) -> Output:
    return Output(torch.tensor(logits, dtype=torch.float32))


def test_the_competitive_router_picks_the_teachers_that_beat_the_student_on_the_label():
    student = out([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    better = out([[3.0, 0.0], [0.0, 1.0], [0.0, 1.0], [5.0, 0.0]])
    also = out([[0.0, 0.0], [0.0, 3.0], [0.0, 9.0], [9.0, 0.0]])
    batch = {"label": torch.tensor([0, 1, 1, -1])}
    router = CompetitiveRouter()
    # row 0: only `better` has the lower CE; row 1: only `also`; row 2: both; row 3: unlabelled
    assert router(student, [better, also], batch).tolist() == [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.0, 0.0]]
    # a tie is not a win; with the student's own logits, nobody beats it
    assert router(student, [student], batch).sum() == 0
    with pytest.raises(KeyError, match="no 'label'"):
        router(student, [better], {})


def test_shifted_moves_the_last_two_dimensions_with_zeros_in():
    x = torch.arange(2 * 4 * 5, dtype=torch.float32).view(2, 4, 5) + 1
    for dy, dx in ((1, 2), (-2, 1), (0, -3), (3, 0)):
        got = shifted(x, dy, dx)
        for c in range(2):
            for i in range(4):
                for j in range(5):
                    src = (i - dy, j - dx)
                    want = x[c, src[0], src[1]] if 0 <= src[0] < 4 and 0 <= src[1] < 5 else 0
                    assert got[c, i, j] == want


def toy(n=6):
    return TensorDictDataset("toy", image=torch.randn(n, 1, 4, 4), label=torch.arange(n) % 3, index=torch.arange(n))


def test_augmented_appends_fixed_perturbed_copies_of_the_listed_items():
    base = toy()
    aug = Augmented(base, [4, 1, 4], copies=2, noise=0.5, shift=1, seed=3)
    assert len(aug) == 6 + 6
    batch = aug.__getitems__(list(range(12)))
    assert torch.equal(batch["image"][:6], base.tensors["image"]) and batch["index"].tolist() == list(range(12))
    sources = [4, 4, 1, 1, 4, 4]
    assert batch["label"][6:].tolist() == [int(base.tensors["label"][s]) for s in sources]  # labels kept
    for e, s in zip(range(6, 12), sources):
        g = torch.Generator().manual_seed(3 * 1_000_003 + e)  # the copy's own draw: noise, then the shift
        want = base.tensors["image"][s] + 0.5 * torch.randn((1, 4, 4), generator=g)
        dy, dx = (int(d) for d in torch.randint(-1, 2, (2,), generator=g))
        assert torch.allclose(batch["image"][e], shifted(want, dy, dx))
    # the same copy whatever the batch it falls in, and every epoch
    again = aug.__getitems__([9, 2, 7])
    assert torch.equal(again["image"][0], batch["image"][9]) and torch.equal(again["image"][2], batch["image"][7])
    aug.set_epoch(5)
    assert torch.equal(aug[10]["image"], batch["image"][10])
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        Augmented(base, [6])


def test_the_policy_reads_indices_from_npy_and_keeps_one_wrapper(tmp_path):
    np.save(tmp_path / "items.npy", np.array([0, 2]))
    policy = AugmentedPolicy(str(tmp_path / "items.npy"), copies=1)
    base = toy()
    first = policy.select(None, None, base)
    assert len(first) == 8 and policy.select(None, None, base) is first
    np.save(tmp_path / "bad.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(ConfigError, match="bad.npy"):
        AugmentedPolicy(str(tmp_path / "bad.npy"))  # no pickle


def test_options_are_checked():
    cfg = compose(["experiment=digits_comd"])
    assert options(cfg)["rounds"] == 3
    for bad, match in ((["method.rounds=0"], "method.rounds"), (["method.noise=-1"], "method.noise"),
                       (["+method.alpha=1"], "method.alpha"), (["method.teacher_epochs=0"], "teacher_epochs"),
                       (["~teachers.cnn"], "one teacher")):
        with pytest.raises(ConfigError, match=match):
            options(compose(["experiment=digits_comd", *bad]))


def test_bad_comd_options_exit_2(tmp_path, capsys):
    assert main(["run", "experiment=digits_comd", f"out_dir={tmp_path}", "method.rounds=0"]) == 2
    assert "method.rounds" in capsys.readouterr().err
    assert not (tmp_path / "digits_comd").exists()


SMALL = ["method.rounds=2", "trainer.max_epochs=2", "teachers.cnn.epochs=2", "teachers.cnn.args.channels=[8,8,8]",
         "trainer.tensorboard=false", "trainer.progress=off", "export=[]"]


def load(path):
    return torch.load(path, weights_only=True)


def test_rounds_chain_the_two_models_and_resume_exactly(tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", "experiment=digits_comd", f"run_dir={run_dir}", *SMALL]
    assert main(args) == 0
    results = json.loads((run_dir / "results.json").read_text())
    rows = results["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2]
    from omegaconf import OmegaConf

    conf = {p: OmegaConf.load(run_dir / p / "config.yaml")
            for p in ("teacher0", "round1/student", "round1/teacher", "round2/student", "round2/teacher")}
    # round 0: the teacher's model as the learner, on the labels
    assert conf["teacher0"].student.name == "cnn" and dict(conf["teacher0"].teachers) == {}
    # round 1: a fresh student from teacher 0; then teacher 0 learns from that student, competitively
    assert conf["round1/student"].student.init is None
    assert conf["round1/student"].teachers.cnn.checkpoint == str(run_dir / "teacher0" / "student.pt")
    assert conf["round1/teacher"].student.init == str(run_dir / "teacher0" / "student.pt")
    assert conf["round1/teacher"].teachers.student.checkpoint == str(run_dir / "round1" / "student" / "student.pt")
    assert conf["round1/teacher"].router.name == "competitive" and conf["round1/student"].router.name == "constant"
    # round 2: each model from its round-1 weights, on the data plus copies of round 1's wrong items
    assert conf["round2/student"].student.init == str(run_dir / "round1" / "student" / "student.pt")
    assert conf["round2/student"].teachers.cnn.checkpoint == str(run_dir / "round1" / "teacher" / "student.pt")
    assert not conf["round2/student"].teachers.cnn.cache  # no cached outputs for the added items
    wrong = np.load(run_dir / "round1" / "wrong.npy")
    assert rows[1]["wrong"] == len(wrong) > 0 and rows[2]["trained_on_added"] == len(wrong)
    (policy,) = conf["round2/student"].policies
    assert policy.name == "augmented" and policy.args["items"] == str(run_dir / "round1" / "augment.npy")
    assert np.array_equal(np.load(run_dir / "round2" / "augment.npy"),
                          np.concatenate([wrong, np.load(run_dir / "round2" / "wrong.npy")]))
    # the assessment: the share of training digits where the student's label CE is the lower
    assert 0 <= rows[1]["beats"] <= 1
    assert results["student"]["test_acc"] == rows[2]["student"]["test_acc"]
    final = load(run_dir / "student.pt")
    assert all(torch.equal(v, load(run_dir / "round2" / "student" / "student.pt")[k]) for k, v in final.items())

    # interrupted in round 2's competition: resume continues it, and ends where the whole run ended
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    for f in ("results.json", "student.pt"):
        (copy / "round2" / "teacher" / f).unlink()
    (copy / "results.json").unlink()
    (copy / "student.pt").unlink()
    kept = (copy / "round2" / "student" / "student.pt").stat().st_mtime_ns
    assert main(["run", "experiment=digits_comd", f"run_dir={copy}", "resume=true", *SMALL]) == 0
    assert (copy / "round2" / "student" / "student.pt").stat().st_mtime_ns == kept  # a finished phase is kept
    a, b = load(run_dir / "round2" / "teacher" / "student.pt"), load(copy / "round2" / "teacher" / "student.pt")
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    again = json.loads((copy / "results.json").read_text())
    assert again["rounds"][2]["teacher"] == rows[2]["teacher"]
