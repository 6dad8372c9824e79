"""MiniPLM's difference sampling (modalities/lm/miniplm.py): per-block scores against a naive loop over
blocks and tokens, the kept fraction on a hand-built case, and the policy in a tiny run end to end
(the student trains on the kept blocks only, with no teacher), with its refused inputs."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mmkd.cli import main
from mmkd.modalities.lm.corpus import TokenBlocks, tinyshakespeare
from mmkd.modalities.lm.miniplm import difference_scores
from mmkd.policies import top_fraction
from mmkd.net import Net

from .conftest import TINY
from .test_distill import one_line_error

V, T = 7, 5


class Table(nn.Module):
    """Next-token logits ``table[x_t]``."""

    def __init__(self, seed: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(seed)))

    def forward(self, ids):
        return self.table[ids]


def test_scores_are_the_mean_per_token_log_ratio_of_teacher_and_reference():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (9, T + 1), generator=g)
    mask = torch.rand(9, T, generator=g) > 0.3
    mask[4] = False  # a block without a target
    data = TokenBlocks("blocks", ids, mask, "test")
    teacher, reference = Table(1).requires_grad_(False), Table(2).requires_grad_(False)
    got = difference_scores(Net(teacher, ("input_ids",), tokens="mask"), Net(reference, ("input_ids",), tokens="mask"),
                            data, torch.device("cpu"), batch_size=4)
    for b in range(9):
        terms = [float(teacher.table[ids[b, t]].log_softmax(0)[ids[b, t + 1]]
                       - reference.table[ids[b, t]].log_softmax(0)[ids[b, t + 1]])
                 for t in range(T) if mask[b, t]]
        want = sum(terms) / len(terms) if terms else -math.inf
        assert got[b].item() == pytest.approx(want, abs=1e-5)


def test_the_top_fraction_is_kept_in_corpus_order_ties_to_the_lower_index():
    scores = torch.tensor([1.0, 3.0, -math.inf, 3.0, 0.5, 2.0], dtype=torch.float64)
    assert top_fraction(scores, 0.5).tolist() == [1, 3, 5]  # int(3.0)
    assert top_fraction(scores, 0.3).tolist() == [1]  # int(1.8): the tie goes to the lower index
    assert top_fraction(scores, 0.1).tolist() == [1]  # at least one block
    assert top_fraction(scores, 1.0).tolist() == [0, 1, 2, 3, 4, 5]


STUDENT = [t for t in TINY if not t.startswith("teachers.")]


def test_a_run_trains_on_the_kept_blocks_alone(tiny_run, corpus, tmp_path):
    policy = (f"policies=[{{name: miniplm, args: {{teacher: '{tiny_run}', teacher_name: lm, reference: '{tiny_run}', "
              "ratio: 0.25}}]")
    assert main(["run", "experiment=lm_shakespeare_miniplm", f"data_root={corpus}", f"run_dir={tmp_path / 'run'}",
                 policy, *STUDENT]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not results.get("teachers") and "test_ppl" in results["student"]  # no teacher trained or run
    rows = (tmp_path / "run" / "student" / "metrics.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    train = tinyshakespeare(root=corpus, block_size=16).train
    assert float(first[header.index("miniplm/kept")]) == int(0.25 * len(train))
    scores = np.load(tmp_path / "run" / "student" / "miniplm_scores.npy")
    assert scores.shape == (len(train),)
    # the same refined corpus for another student, without either model
    again = f"policies=[{{name: miniplm, args: {{scores: '{tmp_path / 'run' / 'student' / 'miniplm_scores.npy'}', ratio: 0.25}}}}]"
    assert main(["run", "experiment=lm_shakespeare_miniplm", f"data_root={corpus}", f"run_dir={tmp_path / 'again'}",
                 again, *STUDENT]) == 0
    rows = (tmp_path / "again" / "student" / "metrics.csv").read_text().splitlines()
    header, first = rows[0].split(","), rows[1].split(",")
    assert float(first[header.index("miniplm/kept")]) == int(0.25 * len(train))
    assert float(first[header.index("miniplm/score_s")]) == 0.0
    np.save(tmp_path / "short.npy", scores[:-1])
    short = f"policies=[{{name: miniplm, args: {{scores: '{tmp_path / 'short.npy'}'}}}}]"
    assert main(["run", "experiment=lm_shakespeare_miniplm", f"data_root={corpus}", f"run_dir={tmp_path / 'short'}",
                 short, *STUDENT]) == 2


def test_a_reference_that_is_not_a_finished_run(tiny_run, corpus, tmp_path, capsys):
    policy = (f"policies=[{{name: miniplm, args: {{teacher: '{tiny_run}', teacher_name: lm, "
              f"reference: '{tmp_path / 'none'}'}}}}]")
    err = one_line_error(capsys, ["run", "experiment=lm_shakespeare_miniplm", f"data_root={corpus}",
                                  f"out_dir={tmp_path / 'out'}", policy, *STUDENT])
    assert "policies[0].args: reference: " in err and "none' has no config.yaml" in err and "finished run" in err
    assert not (tmp_path / "out").exists()  # nothing written before the config is checked


def test_neither_models_nor_scores(corpus, tmp_path, capsys):
    err = one_line_error(capsys, ["run", "experiment=lm_shakespeare_miniplm", f"data_root={corpus}",
                                  f"out_dir={tmp_path / 'out'}", *STUDENT])
    assert "give both teacher and reference" in err and "miniplm_scores.npy" in err
    assert not (tmp_path / "out").exists()


def test_a_teacher_name_the_run_does_not_have(tiny_run, corpus, tmp_path, capsys):
    policy = (f"policies=[{{name: miniplm, args: {{teacher: '{tiny_run}', teacher_name: big, "
              f"reference: '{tiny_run}'}}}}]")
    err = one_line_error(capsys, ["run", "experiment=lm_shakespeare_miniplm", f"data_root={corpus}",
                                  f"out_dir={tmp_path / 'out'}", policy, *STUDENT])
    assert "policies[0].args: teacher_name: " in err and "no teacher 'big'; its teachers: lm" in err
