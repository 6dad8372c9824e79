"""Shared test setup: one intra-op thread (the CI machine is small and shared) and a private
working directory per test, so nothing a test writes can leak into another test or the repo."""
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
