"""Feature preprocessing (mmkd.preprocess): the steps a run records and deployment replays, by hand."""
import pytest
import torch

from mmkd import preprocess


def test_row_normalize_and_standardize_by_hand():
    x = torch.tensor([[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]])
    steps = [{"op": "row_normalize"}, {"op": "standardize", "mean": [0.5, 0.25], "std": [0.5, 0.0]}]
    want = torch.tensor([[(0.25 - 0.5) / 0.5, 0.75 - 0.25],   # zero std divides by 1
                         [(0.0 - 0.5) / 0.5, 0.0 - 0.25],      # a zero row stays zero before standardising
                         [(0.5 - 0.5) / 0.5, 0.5 - 0.25]])
    torch.testing.assert_close(preprocess.apply(steps, x), want)
    # row-wise with stored statistics: batches give the rows of the whole
    torch.testing.assert_close(torch.cat([preprocess.apply(steps, x[:1]), preprocess.apply(steps, x[1:])]), want)
    with pytest.raises(ValueError, match="unknown op 'log'; choose from: row_normalize, standardize"):
        preprocess.apply([{"op": "log"}], x)
