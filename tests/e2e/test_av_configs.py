"""The shipped AV-digits experiments run end to end on the real data (``MMKD_DATA``; skipped without
it): ``av_teachers`` once, then every student config loading its teachers from that run, the way
``benchmarks/avdigits.py`` chains them; one epoch on 2 recordings per digit and split."""
from __future__ import annotations

import json
import os

import pytest

from mmkd.cli import main

pytestmark = pytest.mark.skipif("MMKD_DATA" not in os.environ, reason="set MMKD_DATA to the shared data folder")

TEACHER_OF = {"av_image_kd_cross": "audio", "av_audio_kd_cross": "image"}  # the others: the fusion teacher


def run(tmp, experiment: str, *overrides: str) -> dict:
    """``mmkd run`` of ``experiment`` for one epoch on tiny data into ``tmp/<experiment>``; its results.json."""
    run_dir = tmp / experiment
    code = main(["run", f"experiment={experiment}", f"data_root={os.environ['MMKD_DATA']}", f"out_dir={tmp}",
                 f"run_dir={run_dir}", f"data.args.cache_dir={tmp / 'avcache'}", "data.args.limit_per_class=2",
                 "trainer.max_epochs=1", "trainer.tensorboard=false", "trainer.progress=off", "export=[]",
                 "baseline=false", *overrides])
    assert code == 0
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """The run directory of ``av_teachers`` (each teacher trained for one epoch) and its results."""
    tmp = tmp_path_factory.mktemp("av")
    results = run(tmp, "av_teachers", *(f"teachers.{t}.epochs=1" for t in ("image", "audio", "fusion")))
    return tmp, results


def test_av_teachers(teachers):
    _, results = teachers
    assert set(results["teachers"]) == {"image", "audio", "fusion"}
    assert all(0 <= row["test_acc"] <= 1 for row in results["teachers"].values())


@pytest.mark.parametrize("experiment", [f"av_{s}_{m}" for s in ("image", "audio")
                                        for m in ("kd_mm", "kd_cross", "dkd", "fitnet")])
def test_student_configs_load_the_teachers_run(teachers, experiment):
    tmp, teacher_results = teachers
    teacher = TEACHER_OF.get(experiment, "fusion")
    results = run(tmp, experiment, f"teachers.{teacher}.checkpoint={teacher_results['run_dir']}")
    assert 0 <= results["student"]["test_acc"] <= 1
    assert list(results["teachers"]) == [teacher]
    assert "val_acc" not in results["teachers"][teacher]  # loaded, not trained again
