"""Naive references that several test files compare the library against, the crash a resume
test interrupts a fit with, and a two-process torchrun launcher."""
import math
import os
import signal
import socket
import subprocess
import sys

import torch

from mmkd.callbacks import Callback


class Crash(RuntimeError):
    pass


class CrashAtEpoch(Callback):
    """Raises :class:`Crash` before epoch ``epoch`` (0-based) starts: the fit stops as if killed."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_start(self, trainer, module):
        if trainer.epoch == self.epoch:
            raise Crash(f"killed before epoch {self.epoch + 1}")


def ref_kd(s, t, T=4.0):
    """Per-instance T^2 KL(softmax(t/T) || softmax(s/T)), in float64 with python loops."""
    out = []
    for srow, trow in zip(s.double().tolist(), t.double().tolist()):
        ps = [math.exp(v / T) for v in srow]
        pt = [math.exp(v / T) for v in trow]
        zs, zt = sum(ps), sum(pt)
        out.append(T * T * sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt)))
    return torch.tensor(out, dtype=torch.float64)


# Overrides that make a CIFAR-10 experiment tiny for the ``run_experiment`` fixture (tests/conftest.py):
# 3 real images a class (10 of them held out for validation), one test image a class, untrained
# teachers, caches in the test's own folder.
TINY_CIFAR10 = ("data.args.limit_per_class=3", "data.args.val_size=10", "data.args.test_limit_per_class=1",
                "data.args.cache_dir=img", "cache_dir=cache", "teachers.resnet.epochs=0", "trainer.batch_size=20")


def torchrun(script: str, out, name: str, timeout: int):
    """Run ``script`` (Python source) with ``torch.distributed.run`` on 2 local CPU processes, its folder
    ``out`` as argument and working directory; returns ``(returncode, log)``. A run past ``timeout``
    seconds is killed (torchrun and its ranks) and reported with its log."""
    import pytest

    path = out / f"{name}.py"
    path.write_text(script)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(path), str(out)]
    proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and the ranks it started
        log, _ = proc.communicate()
        pytest.fail(f"{name} timed out after {timeout} s:\n{log[-4000:]}")
    return proc.returncode, log
