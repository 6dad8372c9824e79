"""Text generation with a finished run's language-model student (``mmkd generate``).

The student of a run whose data set is a token corpus is rebuilt from the run directory
(:func:`mmkd.export.trained_student`); its ``tokenizer.json`` encodes the prompt and decodes the
continuation. The model implements :class:`mmkd.models.Generative` (the causal LMs of
``mmkd.modalities.lm`` do, through ``transformers``' ``generate``): greedy decoding at
``temperature=0``, else sampling at that temperature from the top-p nucleus, seeded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmkd.config import ConfigError
from mmkd.data import DataError
from mmkd.io import first_line
from mmkd.models import Generative
from mmkd.registry import TOKENIZERS


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer saved in ``path`` (a ``tokenizer.json``, or a run directory holding one), read by
    the loader registered for its ``"type"`` (:data:`~mmkd.registry.TOKENIZERS`)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"no tokenizer file {str(path)!r}; a run on a token corpus writes one into its run directory")
    try:
        kind = json.loads(path.read_text(encoding="utf-8")).get("type")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise DataError(f"{path}: not a tokenizer JSON file ({first_line(e, typed=False)}); give a tokenizer.json "
                        "written by mmkd") from None
    return TOKENIZERS[str(kind)](path)


@dataclass
class Sample:
    """A prompt and its continuation."""

    prompt: str
    text: str


def generate(run_dir: str | os.PathLike, prompts: list[str], max_new_tokens: int = 200, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[Sample]:
    """Continue each of ``prompts`` with the student of ``run_dir`` (see the module docstring)."""
    from mmkd.export import trained_student

    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens={max_new_tokens}; give a positive number of tokens")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature}; give 0 (greedy) or a positive temperature")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p}; give a nucleus mass in (0, 1]")
    student, cfg, meta = trained_student(run_dir)
    if not isinstance(student, Generative):
        raise ConfigError(f"run_dir: the student of {str(run_dir)!r} ({cfg.student.name}) is not a generative "
                          "language model; give the run directory of a causal-LM student")
    tokenizer = load_tokenizer(run_dir)
    if tokenizer.vocab_size != meta["num_classes"]:
        raise DataError(f"{Path(run_dir) / 'tokenizer.json'}: {tokenizer.vocab_size} tokens, but the student predicts "
                        f"{meta['num_classes']}; the tokenizer does not match the checkpoint")
    return continue_prompts(student, tokenizer, prompts, max_new_tokens, temperature, top_p, seed)


def continue_prompts(model: Generative, tokenizer, prompts: list[str], max_new_tokens: int, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0) -> list[Sample]:
    """``model``'s continuation of each prompt (encoded and decoded by ``tokenizer``)."""
    device = next(model.parameters()).device
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
        new = model.generate(torch.tensor([ids], device=device), max_new_tokens, temperature, top_p, seed)
        out.append(Sample(prompt, tokenizer.decode(new[0].tolist())))
    return out


SAMPLE_PROMPTS = 4  # prompts of a run's samples file: the starts of the first test blocks
SAMPLE_PROMPT_TOKENS = 32
SAMPLE_TOKENS = 96


def write_samples(model: Generative, tokenizer, test, path: str | os.PathLike) -> Path:
    """Greedy continuations by ``model`` (of :data:`SAMPLE_TOKENS` tokens, at most half a block) of the
    first tokens of the first :data:`SAMPLE_PROMPTS` items of the token data set ``test``, written to
    ``path`` (the run's ``samples.txt``)."""
    from mmkd.io import write_text

    items = [test[i] for i in range(min(SAMPLE_PROMPTS, len(test)))]
    length = len(items[0]["input_ids"])  # the model's context holds a block at least
    new = min(SAMPLE_TOKENS, length // 2)
    prompts = [tokenizer.decode(item["input_ids"][:min(SAMPLE_PROMPT_TOKENS, length - new)].tolist()) for item in items]
    model.eval()
    samples = continue_prompts(model, tokenizer, prompts, new)
    text = "".join(f"=== prompt {i}\n{s.prompt}\n=== continuation (greedy)\n{s.text}\n\n" for i, s in enumerate(samples))
    write_text(text, path)
    return Path(path)
