"""``mmkd run`` dispatches through the PIPELINES registry (``pipeline``, default ``distill``); the
latency timing its pipelines report."""
from __future__ import annotations

import torch

from mmkd.cli import compose, main
from mmkd.registry import PIPELINES
from mmkd.run import distill, run


@PIPELINES.register("echo_method")
def echo_method(cfg):
    """A pipeline that returns its own options."""
    return {"method": dict(cfg.method), "experiment": cfg.experiment}


def test_run_dispatches_to_the_configured_pipeline():
    cfg = compose(["pipeline=echo_method", "method.alpha=0.5", "+method.beta=x"])
    assert run(cfg) == {"method": {"alpha": 0.5, "beta": "x"}, "experiment": "quickstart"}
    assert compose([]).pipeline == "distill" and PIPELINES["distill"] is distill


def test_unknown_pipeline_is_a_one_line_error(capsys):
    assert main(["run", "pipeline=nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mmkd: error: pipeline: unknown pipeline 'nope'; choose from:") and "distill" in err


def test_latency_times_repeats_passes_or_at_least_three_once_over_budget():
    from mmkd.report import latency_ms

    class Count(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Count.calls += 1
            return x

    for budget, repeats, want in ((0.0, 30, 1 + 3), (1e9, 5, 1 + 5)):  # 1: the warm-up pass
        Count.calls = 0
        assert latency_ms(Count(), [torch.zeros(2)], repeats=repeats, budget_s=budget) >= 0
        assert Count.calls == want
