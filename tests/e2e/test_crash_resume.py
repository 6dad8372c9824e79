"""Crash and resume with real processes: ``kill -9`` a running ``mmkd run`` at a random step of each
stage (teacher, student, baseline), resume it with the README's command, and compare the results
and every checkpoint tensor with an uninterrupted run. Also: one writer per run directory, resume
refuses overrides that would change the run, and a full disk is one line."""
from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from mmkd.cli import main

RUN = ["trainer.max_epochs=12", "teachers.cnn.epochs=12", "teachers.cnn.args.channels=[8,16]",
       "student.args.hidden=[32]", "trainer.tensorboard=false", "trainer.progress=off", "export=[]", "seed=7",
       "teachers.cnn.reuse=false"]  # the teacher stage runs (and is killed) in both runs, not loaded from the store
STAGES = ("teachers/cnn", "student", "baseline")
TIMING = ("time/", "latency_ms", "time_s", "run_dir")  # what may differ between two runs of the same config


def mmkd(*args: str, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MMKD_LOG": "WARNING"}
    return subprocess.Popen([sys.executable, "-m", "mmkd.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finished(p: subprocess.Popen) -> None:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err


def kill_during(p: subprocess.Popen, stage_dir: Path, rng: random.Random) -> bool:
    """SIGKILL ``p`` a random moment after ``stage_dir`` got its first checkpoint; False if ``p``
    finished first."""
    while not (stage_dir / "last.pt").exists():
        if p.poll() is not None:
            return False
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.3))
    if p.poll() is not None:
        return False
    p.send_signal(signal.SIGKILL)
    p.wait()
    return True


def without_timing(obj):
    if isinstance(obj, dict):
        return {k: without_timing(v) for k, v in obj.items() if not any(k.startswith(t) for t in TIMING)}
    if isinstance(obj, list):
        return [without_timing(v) for v in obj]
    return obj


def tensors(obj, prefix=""):
    """Every tensor in a checkpoint, by path (RNG states included)."""
    if torch.is_tensor(obj):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from tensors(v, f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from tensors(v, f"{prefix}/{i}")


def assert_same_run(a: Path, b: Path) -> None:
    assert without_timing(json.loads((a / "results.json").read_text())) == \
        without_timing(json.loads((b / "results.json").read_text()))
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*.pt"))
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*.pt"))
    assert len(files) == 7  # best.pt and last.pt of 3 stages, student.pt
    for f in files:
        sa, sb = (torch.load(d / f, weights_only=True) for d in (a, b))
        ta, tb = dict(tensors(sa)), dict(tensors(sb))
        assert ta.keys() == tb.keys(), f
        for k in ta:
            assert torch.equal(ta[k], tb[k]), f"{f}{k}"
        if "history" in sa:
            assert without_timing(sa["history"]) == without_timing(sb["history"]), f
    for stage in STAGES:
        rows = [without_timing(list(csv.DictReader((d / stage / "metrics.csv").open()))) for d in (a, b)]
        assert rows[0] == rows[1], stage


@pytest.mark.slow
def test_kill_9_in_every_stage_then_resume_equals_an_uninterrupted_run(tmp_path):
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    finished(mmkd("run", "run_dir=full", *RUN, cwd=tmp_path))

    killed = []
    p = mmkd("run", "run_dir=cut", *RUN, cwd=tmp_path)
    for stage in STAGES:
        if kill_during(p, tmp_path / "cut" / stage, rng):
            killed.append(stage)
            (tmp_path / "cut" / f".student.x{stage[0]}.tmp.onnx").write_bytes(b"half")  # as an interrupted export
            p = mmkd("run", "run_dir=cut", "resume=true", cwd=tmp_path)  # the README's command
    finished(p)
    assert len(killed) >= 2, f"kill seed {seed}: only {killed} were interrupted"
    assert not list((tmp_path / "cut").rglob(".*.tmp*")), "resume leaves no temporary file"
    assert (tmp_path / "cut" / "config.yaml").read_text() == (tmp_path / "full" / "config.yaml").read_text() \
        .replace("run_dir: full", "run_dir: cut")
    assert_same_run(tmp_path / "full", tmp_path / "cut")


# ---------------------------------------------------------------- resume refuses a changed run
@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("short")
    code = main(["run", f"run_dir={d / 'run'}", f"out_dir={d}", "trainer.max_epochs=2", "teachers.cnn.epochs=1",
                 "trainer.tensorboard=false", "trainer.progress=off", "export=[]", "seed=3", "baseline=false"])
    assert code == 0
    return d / "run"


def test_resume_refuses_overrides_that_change_the_run(short_run, capsys):
    before = (short_run / "config.yaml").read_text()
    code = main(["run", f"run_dir={short_run}", "resume=true", "seed=0", "trainer.max_epochs=5",
                 "losses.kd.args.temperature=2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("mmkd: error: resume=true continues the run as it was started; these overrides would "
                          "change it: seed=0 (the run has 3); trainer.max_epochs=5 (the run has 2); "
                          "losses.kd.args.temperature=2 (the run has 4.0). Drop them"), err
    assert (short_run / "config.yaml").read_text() == before


def test_resume_takes_the_stored_config_and_the_safe_overrides(short_run, capsys):
    before = json.loads((short_run / "results.json").read_text())
    code = main(["run", f"run_dir={short_run}", "resume=true", "trainer.progress=off", "trainer.device=cpu",
                 "trainer.num_workers=0", "seed=3"])  # seed=3: the run's own value is no change
    assert code == 0
    after = json.loads((short_run / "results.json").read_text())
    assert after["seed"] == 3 and without_timing(after) == without_timing(before)


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    code = main(["run", "resume=true", f"run_dir={tmp_path / 'none'}"])
    err = capsys.readouterr().err
    assert code == 2 and "holds no run (no config.yaml)" in err and not (tmp_path / "none").exists()


# ---------------------------------------------------------------- one writer per run directory
HOLD = textwrap.dedent("""
    import sys, time
    from mmkd.rundir import claim
    with claim(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_second_writer_is_refused_naming_the_holder_and_kill_9_releases(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "r")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["run", f"run_dir={tmp_path / 'r'}", "trainer.max_epochs=1", "export=[]"])
        err = capsys.readouterr().err
        assert code == 2 and err == (f"mmkd: error: run_dir='{tmp_path / 'r'}' is in use by another mmkd run "
                                     f"(pid {holder.pid}); wait for it to finish or give another run_dir\n")
        assert sorted(p.name for p in (tmp_path / "r").iterdir()) == [".lock"]  # nothing of the second run
    finally:
        holder.kill()
        holder.wait()
    from mmkd.rundir import claim

    with claim(tmp_path / "r"):  # the kernel dropped the dead holder's lock
        assert (tmp_path / "r" / ".lock").read_text() == f"{os.getpid()}\n"


def test_two_runs_at_once_one_wins(tmp_path):
    """Two real runs started at once on one run directory with different seeds: one trains, the
    other is refused, and results.json is the winner's alone. The first to take the lock is paused
    (SIGSTOP) until the other has exited, so a short run cannot finish before its rival even starts."""
    procs = {s: mmkd("run", "run_dir=r", *RUN, f"seed={s}", "trainer.max_epochs=3", "teachers.cnn.epochs=2",
                     "baseline=false", cwd=tmp_path) for s in (1, 2)}
    lock, deadline = tmp_path / "r" / ".lock", time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs.values()), "no run took the lock"
        time.sleep(0.005)
    winner = next(s for s, p in procs.items() if p.pid == int(lock.read_text()))
    os.kill(procs[winner].pid, signal.SIGSTOP)
    try:
        loser = 3 - winner
        code, err = procs[loser].wait(timeout=300), procs[loser].stderr.read()
    finally:
        os.kill(procs[winner].pid, signal.SIGCONT)
    assert code == 2 and f"is in use by another mmkd run (pid {procs[winner].pid})" in err, err
    assert procs[winner].wait(timeout=300) == 0, procs[winner].stderr.read()
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["seed"] == winner


# ---------------------------------------------------------------- a full disk
FILL = textwrap.dedent("""
    import resource, signal, sys, torch
    from mmkd import io
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then a write past the limit fails with EFBIG
    io.save({"w": torch.zeros(1000)}, sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
    try:
        io.save({"w": torch.ones(100000)}, sys.argv[1])
    except io.NoSpace as e:
        print(e)
""")


def test_full_disk_is_one_line_and_the_previous_file_is_intact(tmp_path):
    path = tmp_path / "last.pt"
    out = subprocess.run([sys.executable, "-c", FILL, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"no space left on {tmp_path} (writing last.pt: File too large); free some space or set " \
                         "out_dir / cache_dir to another disk\n"
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.zeros(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_failed_export_keeps_the_results(tmp_path, capsys, monkeypatch):
    import mmkd.run

    def broken(run_dir, formats):
        raise RuntimeError("Expected tensor for argument #1 'indices' to have one of the following scalar types\nmore")

    monkeypatch.setattr(mmkd.run, "export_student", broken)
    code = main(["run", f"run_dir={tmp_path / 'r'}", "trainer.max_epochs=1", "teachers.cnn.epochs=1",
                 "trainer.tensorboard=false", "trainer.progress=off", "baseline=false", "export=[onnx]"])
    captured = capsys.readouterr()
    assert code == 4
    assert captured.err.endswith(f"mmkd: error: export failed (RuntimeError: Expected tensor for argument #1 'indices' "
                                 f"to have one of the following scalar types); the run's results are in "
                                 f"{tmp_path / 'r' / 'results.json'}; retry with: mmkd export run_dir={tmp_path / 'r'}\n")
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    assert results["export"] == [] and results["export_error"].startswith("RuntimeError: Expected tensor")
    assert 0 <= results["student"]["test_acc"] <= 1 and "student, distilled" in captured.out


def test_non_finite_loss_exit_code_3_names_the_stage(tmp_path, capsys):
    code = main(["run", f"run_dir={tmp_path / 'r'}", "trainer.lr=1e30", "teachers.cnn.epochs=2", "export=[]",
                 "trainer.tensorboard=false", "trainer.progress=off"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("mmkd: error: teachers/cnn: non-finite loss at epoch 1, step "), err
    assert "lower trainer.lr or set trainer.grad_clip" in err[-1]
