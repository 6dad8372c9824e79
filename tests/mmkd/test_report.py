"""Reporting (mmkd.report): the latency timing the pipelines report."""
from __future__ import annotations

import torch


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
