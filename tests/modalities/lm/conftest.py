"""Fixtures of the language-model tests: ``corpus``, a data root holding a tiny Shakespeare-like text."""
import pytest

TEXT = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmdata")
    (root / "tinyshakespeare").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text(TEXT, encoding="utf-8")
    return root
