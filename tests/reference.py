"""Naive references that several test files compare the library against, and the crash a resume
test interrupts a fit with."""
import math

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
