"""The statistics the benchmark scripts report (benchmarks/common.py) on hand-computed cases."""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
from common import kendall, mean_std, pearson  # noqa: E402


def test_pearson_and_kendall_by_hand():
    x, y = [1, 2, 3, 4], [1, 3, 2, 4]
    assert pearson(x, y) == pytest.approx(4 / 5)  # sum dx dy = 4, sum dx^2 = sum dy^2 = 5
    assert kendall(x, y) == pytest.approx((5 - 1) / 6)  # 5 concordant pairs, 1 discordant
    assert kendall([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / math.sqrt(2 * 3))  # tau-b: one pair tied in x
    assert pearson(x, [-v for v in y]) == pytest.approx(-0.8) and kendall(x, x[::-1]) == -1
    assert math.isnan(pearson(x, [2, 2, 2, 2])) and math.isnan(kendall(x, [2, 2, 2, 2]))


def test_mean_and_sample_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_std([5.0]) == (5.0, 0.0)
