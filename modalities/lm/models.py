"""Causal language models: any Hugging Face ``AutoModelForCausalLM``, built from a config or loaded.

``causal_lm`` builds a GPT-2 or LLaMA-family model from a ``transformers`` config at the size the
arguments give (GPT-2's names for both: ``n_layer``, ``n_embd``, ``n_head``, ``n_inner``), randomly
initialised, with the data set's vocabulary (``num_classes``) and a context of the data set's block
size (``in_shape``), or loads one from a local directory (``path``: ``from_pretrained``, nothing
downloads; its vocabulary must be the data set's tokenizer's). The model reads ``input_ids``
``[batch, time]`` and returns next-token logits ``[batch, time, vocab]``; a
:class:`~mmkd.net.Net` with ``tokens`` turns them into one row per kept token.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import Tensor, nn

from mmkd.checks import COUNT, FRACTION
from mmkd.models import Generative
from mmkd.registry import MODELS

FAMILIES = ("gpt2", "llama")


def hf_config(family: str, vocab: int, context: int, n_layer: int, n_embd: int, n_head: int,
              n_inner: int | None, dropout: float, n_kv_head: int | None):
    """The ``transformers`` config of a ``family`` model of the given size."""
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=context, n_embd=n_embd, n_layer=n_layer,
                                       n_head=n_head, n_inner=n_inner, resid_pdrop=dropout, embd_pdrop=dropout,
                                       attn_pdrop=dropout, bos_token_id=None, eos_token_id=None)
    if family == "llama":
        return transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=context, hidden_size=n_embd,
                                        intermediate_size=n_inner or 4 * n_embd, num_hidden_layers=n_layer,
                                        num_attention_heads=n_head, num_key_value_heads=n_kv_head or n_head,
                                        attention_dropout=dropout, bos_token_id=None, eos_token_id=None)
    raise ValueError(f"family={family!r} is not a causal-LM family; choose from: {', '.join(FAMILIES)}")


def context_of(config) -> int:
    """The longest sequence a ``transformers`` config's model takes."""
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"{type(config).__name__} names no context length")


class CausalLM(Generative, nn.Module):
    """A Hugging Face causal LM returning next-token logits ``[batch, time, vocab]`` for ``input_ids``.

    ``lm`` is the ``transformers`` model itself (``lm.generate``, ``lm.save_pretrained``)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.vocab = int(lm.config.vocab_size)
        self.context = context_of(lm.config)
        # the key-value cache's name, in and out: ``cache`` in transformers 5, ``past_key_values`` before
        self.cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits

    def decode(self, input_ids: Tensor, past: Any = None) -> tuple[Tensor, Any]:
        """Next-token logits ``[batch, vocab]`` after ``input_ids`` ``[batch, t]``, which continue the
        sequences whose key-value cache is ``past`` (``None``: from the start), and the cache extended
        by them: step-by-step decoding that runs each position once (``forward`` at every prefix
        gives the same logits, at t times the cost)."""
        out = self.lm(input_ids=input_ids, use_cache=True, **{self.cache_arg: past})
        return out.logits[:, -1], out[self.cache_arg]

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0) -> Tensor:
        """Continue ``ids`` ``[batch, time]`` by ``max_new_tokens`` tokens with ``lm.generate``: greedy at
        ``temperature=0``, else sampled at that temperature from the top-p nucleus (seeded). The model
        reads at most its context: a prompt keeps its last ``context + 1 - max_new_tokens`` tokens (the
        last new token is predicted from ``context`` tokens)."""
        if max_new_tokens > self.context:
            raise ValueError(f"max_new_tokens={max_new_tokens} does not fit the model's context of {self.context} "
                             f"tokens; ask for at most {self.context}")
        ids = ids[:, -(self.context + 1 - max_new_tokens):]
        torch.manual_seed(seed)
        sample = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 \
            else {"do_sample": False}
        out = self.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                               pad_token_id=0, eos_token_id=None, **sample)
        return out[:, ids.shape[1]:]


@MODELS.register("causal_lm", ranges={"n_layer": COUNT, "n_embd": COUNT, "n_head": COUNT, "n_inner": COUNT,
                                      "n_kv_head": COUNT, "dropout": FRACTION, "context": COUNT})
def causal_lm(num_classes: int, in_shape: Any, family: str = "gpt2", n_layer: int = 2, n_embd: int = 128,
              n_head: int = 4, n_inner: int | None = None, dropout: float = 0.0, context: int | None = None,
              n_kv_head: int | None = None, path: str | None = None) -> CausalLM:
    """A causal LM for a vocabulary of ``num_classes`` tokens and blocks of ``in_shape = (time,)``.

    Args:
        family: ``gpt2`` or ``llama`` (RMSNorm, rotary positions, SwiGLU; ``n_kv_head`` < ``n_head``
            for grouped-query attention).
        n_layer, n_embd, n_head, n_inner: layers, width, attention heads, MLP width (default 4 x width).
        dropout: on embeddings, attention and residuals.
        context: the model's longest sequence (default: the data set's block size).
        path: a local directory holding a saved model (``save_pretrained``): loaded with
            ``from_pretrained`` instead of built; the size arguments are then ignored.
    """
    block = int(in_shape[0])
    if path is not None:
        if not os.path.isdir(path):
            raise ValueError(f"path={path!r} is not a directory; give the folder a model was saved to with "
                             "save_pretrained (config.json and weights)")
        import transformers

        bars = transformers.utils.logging.is_progress_bar_enabled()
        transformers.utils.logging.disable_progress_bar()  # a small local load: no bar among mmkd's lines
        try:
            lm = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
        finally:
            if bars:
                transformers.utils.logging.enable_progress_bar()
        if lm.config.vocab_size != num_classes:
            raise ValueError(f"path={path!r}: the model has a vocabulary of {lm.config.vocab_size} tokens, the data "
                             f"set's tokenizer {num_classes}; give the tokenizer the model was trained with "
                             "(data.args.tokenizer_path)")
    else:
        import transformers

        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} is not a multiple of n_head={n_head}")
        config = hf_config(family, num_classes, context or block, n_layer, n_embd, n_head, n_inner, dropout,
                           n_kv_head)
        config._attn_implementation = "sdpa"
        lm = transformers.AutoModelForCausalLM.from_config(config)
    model = CausalLM(lm)
    if block > model.context:
        raise ValueError(f"the data set's blocks have {block} tokens, more than the model's context of "
                         f"{model.context}; lower data.args.block_size or raise the model's context")
    return model


def run_net(run_dir: str, name: str | None = None, key: str = "run_dir"):
    """The student (``name=None``) or the teacher ``name`` of the finished run in ``run_dir`` as a token
    :class:`~mmkd.net.Net` (the run's inputs, ``tokens="mask"``) in eval mode, and its vocabulary size
    (:func:`mmkd.export.trained_model`). A run that is not finished, or lacks teacher ``name``, is a
    :class:`~mmkd.config.ConfigError` naming the config keys ``key`` and ``<key>_name``."""
    from mmkd.export import finished_run, trained_model
    from mmkd.net import Net

    finished_run(run_dir, name, key=key, teacher_key=f"{key}_name")
    model, cfg, meta = trained_model(run_dir, name)
    inputs = cfg.student.inputs if name is None else cfg.teachers[name].inputs
    return Net(model, inputs, tokens="mask").eval(), int(meta["num_classes"])


def forked_rng(device: torch.device):
    """``torch.random.fork_rng`` over the CPU's generator and ``device``'s when it is a GPU: random draws
    inside leave the run's global random state as it was."""
    cuda = [] if device.type != "cuda" else [torch.cuda.current_device() if device.index is None else device.index]
    return torch.random.fork_rng(devices=cuda)


def check_vocab(where: str, vocab: int, student: nn.Module, dataset, device) -> None:
    """A :class:`~mmkd.config.ConfigError` unless a model of ``vocab`` tokens (named by ``where``) predicts
    the same tokens as ``student`` on ``dataset``'s first block (the global random state untouched)."""
    from mmkd.config import ConfigError
    from mmkd.data import loader

    with torch.no_grad(), forked_rng(device):  # a data loader draws its seed from the global generator
        first = {k: v.to(device) for k, v in next(iter(loader(dataset, 1))).items()}
        theirs = student(first).logits.shape[-1]
    if theirs != vocab:
        raise ConfigError(f"{where} predicts {vocab} tokens, the student {theirs}; give a model trained with the "
                          "data set's tokenizer")
