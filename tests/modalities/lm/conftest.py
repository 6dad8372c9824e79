"""Fixtures of the language-model tests: ``corpus``, a data root holding a tiny Shakespeare-like text,
and ``tiny_run``, a finished tiny forward-KL run on it (its teacher ``lm`` and its student trained);
``TINY``, the overrides that make an ``lm_shakespeare_*`` experiment tiny."""
import pytest

from mmkd.cli import main

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40
TINY = ["teachers.lm.args.n_layer=1", "teachers.lm.args.n_embd=16", "teachers.lm.args.n_head=2",
        "student.args.n_embd=16", "student.args.n_head=2", "student.args.n_layer=1", "teachers.lm.epochs=1",
        "trainer.max_epochs=1", "data.args.block_size=16", "trainer.progress=off", "trainer.tensorboard=false"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdata")
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TEXT, encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def tiny_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("lmrun")
    assert main(["run", "experiment=lm_shakespeare_fkl", f"data_root={corpus}", f"run_dir={out / 'run'}",
                 f"cache_dir={out / 'cache'}", *TINY]) == 0
    return out / "run"
