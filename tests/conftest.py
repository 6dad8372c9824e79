"""Shared test setup: one intra-op thread (the CI machine is small and shared) and a private
working directory per test, so nothing a test writes can leak into another test or the repo.

Tests on the real data sets skip, naming ``MMKD_DATA``, where no data root is set; with
``MMKD_REQUIRE_DATA=1`` (what ``.ci/run`` sets) such a skip is a failure, so CI runs every one."""
import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("MMKD_REQUIRE_DATA") == "1":
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if "MMKD_DATA" in reason:
            report.outcome = "failed"
            report.longrepr = f"MMKD_REQUIRE_DATA=1 but the test skipped: {reason}"


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path


@pytest.fixture
def run_experiment(tmp_path):
    """``run_experiment(name, *overrides)``: ``mmkd run experiment=name`` for one epoch, quietly, no
    baseline, no export, into ``tmp_path`` (the data root from ``MMKD_DATA`` when set); returns the
    run directory and its results.json."""
    import json
    import os

    from mmkd.cli import main

    def run(experiment: str, *overrides: str):
        root = [f"data_root={os.environ['MMKD_DATA']}"] if "MMKD_DATA" in os.environ else []
        code = main(["run", f"experiment={experiment}", f"out_dir={tmp_path}", *root, "trainer.max_epochs=1",
                     "trainer.tensorboard=false", "trainer.progress=off", "baseline=false", "export=[]", *overrides])
        assert code == 0
        run_dir = next((tmp_path / experiment).iterdir())
        return run_dir, json.loads((run_dir / "results.json").read_text())

    return run
