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
