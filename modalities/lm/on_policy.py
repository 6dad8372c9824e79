"""On-policy data for language-model distillation: the student's own samples (GKD), optionally
corrected by the teacher (MGSR's sequence correction and re-generation).

GKD (Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist and Bachem, "On-Policy Distillation of Language
Models: Learning from Self-Generated Mistakes", ICLR 2024) mixes fixed data and the student's samples,

    L(theta) = (1 - lambda) E_{(x, y) ~ data} [D(p_T || p_S)(y | x)]
               + lambda E_{x ~ data} E_{y ~ p_S(. | x)} [D(p_T || p_S)(y | x)],
    D(p_T || p_S)(y | x) = 1 / |y| sum_n D(p_T(. | y_<n, x), p_S(. | y_<n, x)),

with no gradient through the sampling of ``y`` (a sample is data; the loss is differentiated at
fixed ``y``). :class:`OnPolicy` is the second expectation's data: with probability ``lambda_`` a
training batch is replaced by the student's continuations of each row's prompt, and the loss terms
(``gjsd``, ``fkl``, ...) then compare the student with the teachers, run live, on them. A corpus of
token blocks has no prompt/response split: the first ``prompt`` tokens of a block are its prompt.

MGSR (Liu, Zhang, Li, Li, Huang, Chen, Tang, Hu, Xiong and Wang, "Multi-Granularity Semantic Revision
for Large Language Model Distillation", arXiv 2407.10068, 2024), its sequence level (SCRG), with
``correct=True``: for the sample ``y^s``, the teacher's token at each sampled position, given the
student's prefix, and the error position ``j``,

    y^t_i = argmax_v p_T(v | x, y^s_<i),
    j = argmax_{i : y^s_i != y^t_i} KL(p_T(. | x, y^s_<i) || p_S(. | x, y^s_<i)),
    y~ = (y^s_<j, y^t_j, y~_>j ~ p_S(. | x, y^s_<j, y^t_j, ...))

(``pick="divergent"``): the departing token of largest divergence is replaced by the teacher's and
the student re-generates the rest of the row; a row where no token departs keeps its sample.
``pick="first"`` corrects the earliest departure instead (an expert's local correction of the
learner's trajectory, as in LaSO). Neither the paper's full text nor official code could be found:
this follows the OpenReview reviews' account of its Eq. 3 (error candidates are the positions where
the student's token differs from the teacher-generated one, the error is the one of largest
token-wise KL, corrected once per sequence: the paper's SCRG "frequency" 1; it reports small gains
for 3 and 5 rounds, not reproduced here). The teacher's token is its argmax (not a top-k test); with
several teachers, their probabilities are averaged with equal weights. MGSR trains on the corrected
samples with DAC-KL (``dac_kl``) beside an SFT term on the data.

Seeding and what TRL's ``GKDTrainer`` (the official implementation) does differently: TRL draws the
on-policy coin from Python's global RNG (``random.random() <= lmbda``) and samples with
``model.generate`` (no gradient; defaults ``lmbda=0.5``, ``beta=0.5``, ``temperature=0.9``,
``max_new_tokens=128``, ``top_k=0``, and dropout disabled in the student for the whole training). Here
the coin and every sample come from one ``torch.Generator`` seeded by ``(seed, step)`` (``step``: the
training batches seen, a buffer of the module's state, so a resumed run draws as the first did), the
global RNG is left untouched, and the student samples in eval mode (dropout off) and trains in the
mode it was in. Samples are drawn by a plain loop over the positions, from the student's key-value
cache (``CausalLM.decode``), not ``CausalLM.generate``, which reseeds the global RNG.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmkd.checks import COUNT, FRACTION, SEED, TEMPERATURE, Range
from mmkd.net import Batch, Net
from mmkd.transforms import BatchTransform, register_transform

PICKS = ("divergent", "first")


@contextmanager
def evaluating(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Every sub-module of ``modules`` in eval mode inside the block, each back in its own mode after."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by a hash of ``(seed, step)``."""
    digest = hashlib.sha256(f"on_policy:{seed}:{step}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def nucleus(probs: Tensor, top_p: float) -> Tensor:
    """``probs`` ``[..., V]`` with the classes outside the top-``p`` nucleus set to 0 (not renormalised):
    the most probable classes whose mass before them is below ``top_p`` (the first is always kept)."""
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(-1, descending=True)
    kept = sorted_p * ((sorted_p.cumsum(-1) - sorted_p) < top_p)
    return torch.zeros_like(probs).scatter(-1, order, kept)


def prompt_lengths(mask: Tensor, prompt: int) -> Tensor:
    """Per row, ``min(prompt, real)``: ``real`` counts the leading inputs that are real tokens, one more
    than the positions before the mask's first False (all ``T`` for a full row)."""
    T = mask.shape[1]
    off = ~mask.bool()
    first_off = torch.where(off.any(1), off.int().argmax(1), T)
    return (first_off + 1).clamp(max=min(prompt, T))


@register_transform("on_policy", ranges={"lambda_": FRACTION, "prompt": COUNT, "temperature": TEMPERATURE,
                                         "top_p": Range(0, 1, low_open=True), "max_new_tokens": COUNT,
                                         "seed": SEED})
class OnPolicy(BatchTransform):
    """Replace a training batch, with probability ``lambda_``, by the student's samples (GKD), corrected
    by the teachers with ``correct`` (MGSR); see the module docstring for the formulas.

    For a batch of blocks (``input_ids [B, T]``, ``mask [B, T]``, ``label [N]``, as
    :class:`~mmkd.modalities.lm.TokenBlocks` gives), row ``b`` keeps its first ``P_b = min(prompt, R_b)``
    tokens (``R_b``: its leading real tokens, ``T`` for a full row; fewer for a padded document) and
    the student samples the next ``min(max_new_tokens, T + 1 - P_b)`` tokens (at ``temperature``, from
    the top-``top_p`` nucleus), without gradient and in eval mode. The new batch: the prompt and the
    sample cut to ``T`` (the last sampled token is a target only; positions past the sample keep
    their old tokens, masked out), ``mask`` True exactly where the next token is a sampled one,
    ``label`` those tokens (row-major), and the entries named in ``keep`` (per-row, e.g. ``index``)
    unchanged. Every other entry (per-token extras such as ``agnews_lm``'s ``domain``) is dropped: a
    sampled token belongs to no document. ``label`` holds the student's own samples, so a label term
    (``ce``) on an on-policy batch trains the student on them; the shipped configs give ``ce`` weight 0.

    Off-policy batches (and every batch in eval mode) pass through unchanged. ``step`` (a buffer,
    saved with the module) counts the training batches seen; batch ``step`` draws its coin and its
    samples from :func:`generator` ``(seed, step)``. The student and the teachers read one entry, the
    same (the token ids); their models map ``[B, t]`` ids to ``[B, t, V]`` logits.

    Args:
        lambda_: the probability of an on-policy batch (GKD's lambda; TRL's default 0.5).
        prompt: the prompt's tokens (default: half the block, at least 1); at most ``T``.
        temperature: the sampling temperature (the paper's 1; TRL's default 0.9).
        top_p: the nucleus mass sampled from (1: the whole distribution).
        max_new_tokens: the most tokens sampled per row (default: to the end of the block).
        correct: MGSR's sequence correction and re-generation of each sample (needs a teacher).
        pick: the corrected position: ``divergent`` (MGSR: the departing token of largest
            ``KL(p_T || p_S)``, both at temperature 1) or ``first`` (the earliest departure).
        seed: with the step, seeds the coin and the samples (a config may give ``${seed}``).
        label_key: the entry of the targets.
        keep: the per-row entries carried over to an on-policy batch.
        kv_cache: sample a model that has ``decode`` (a causal LM) step by step from its key-value
            cache (each position runs once); ``False``: run the whole prefix at every position (the
            same tokens up to float rounding, slower; ``benchmarks/sampling.py`` times both).
    """

    keeps_inputs = False

    def __init__(self, lambda_: float = 0.5, prompt: int | None = None, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int | None = None, correct: bool = False,
                 pick: str = "divergent", seed: int = 0, label_key: str = "label",
                 keep: Sequence[str] = ("index",), kv_cache: bool = True):
        super().__init__()
        if pick not in PICKS:
            raise ValueError(f"on_policy.pick={pick!r}; choose from: {', '.join(PICKS)}")
        self.lambda_, self.prompt, self.temperature, self.top_p = float(lambda_), prompt, float(temperature), float(top_p)
        self.max_new_tokens, self.correct, self.pick, self.seed = max_new_tokens, bool(correct), pick, int(seed)
        self.label_key, self.keep, self.kv_cache = label_key, list(keep), bool(kv_cache)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def forward(self, batch: Batch, student: nn.Module, teachers: Sequence[nn.Module]) -> Batch:
        if not self.training:
            return batch
        key, mask_key = self._keys(student, teachers)
        ids = batch[key]
        g = generator(self.seed, int(self.step), ids.device)
        self.step += 1
        if not bool(torch.rand((), generator=g, device=ids.device) < self.lambda_):
            return batch
        T = ids.shape[1]
        prompt = max(1, T // 2) if self.prompt is None else self.prompt
        if prompt > T:
            raise ValueError(f"on_policy.prompt={prompt} is longer than the blocks of {T} tokens; give at most {T}")
        if missing := [k for k in self.keep if k not in batch]:
            raise KeyError(f"on_policy.keep: the batch has no {', '.join(missing)}; it has: {', '.join(batch)} "
                           "(set keep to the per-row entries to carry over)")
        start = prompt_lengths(batch[mask_key], prompt)
        budget = T + 1 - start if self.max_new_tokens is None else (T + 1 - start).clamp(max=self.max_new_tokens)
        end = start + budget
        seq = torch.cat([ids, ids[:, -1:]], 1)  # [B, T + 1]: position T is a target only
        with torch.no_grad(), evaluating([student, *teachers]):
            self._sample(student.model, seq, start, end, g)
            if self.correct:
                self._correct(student.model, [t.model for t in teachers], seq, start, end, g)
        pos = torch.arange(1, T + 1, device=ids.device)  # the target position of each input position
        mask = (pos >= start[:, None]) & (pos < end[:, None])
        return {key: seq[:, :T], mask_key: mask, self.label_key: seq[:, 1:][mask],
                **{k: batch[k] for k in self.keep}}

    def _keys(self, student: nn.Module, teachers: Sequence[nn.Module]) -> tuple[str, str]:
        """The token-id entry and the mask entry; a one-line error for nets this transform cannot serve."""
        if not isinstance(student, Net) or len(student.keys) != 1 or student.tokens is None:
            raise ValueError("on_policy: the student must be a sequence Net reading one entry (the token ids) "
                             "with a token mask (Net(model, keys=['input_ids'], tokens='mask'))")
        for i, t in enumerate(teachers):
            if not isinstance(t, Net) or t.keys != student.keys:
                raise ValueError(f"on_policy: teacher {i} does not read {list(student.keys)} alone; the samples "
                                 "replace the student's entry, so the teachers must read that one, live")
        if self.correct and not teachers:
            raise ValueError("on_policy.correct: MGSR's correction needs a teacher; the Distiller has none "
                             "(add one, or set correct: false)")
        return student.keys[0], student.tokens

    def _draw(self, logits: Tensor, g: torch.Generator) -> Tensor:
        """One token per row from ``logits`` ``[B, V]`` at the temperature, in the nucleus."""
        probs = nucleus(F.softmax(logits.float() / self.temperature, -1), self.top_p)
        return torch.multinomial(probs, 1, generator=g)[:, 0]

    def _sample(self, model: nn.Module, seq: Tensor, start: Tensor, end: Tensor, g: torch.Generator) -> None:
        """Fill ``seq[b, t]`` for ``start[b] <= t < end[b]`` with ``model``'s samples, left to right, in
        place. A model with ``decode`` (:class:`~mmkd.modalities.lm.CausalLM`: a key-value cache) reads
        each position once; any other runs on the whole prefix at every position."""
        first, last = int(start.min()), int(end.max())
        past, fresh = None, seq[:, :first]  # the positions the cache has not seen yet
        for t in range(first, last):
            if self.kv_cache and hasattr(model, "decode"):
                logits, past = model.decode(fresh, past)
            else:
                logits = model(seq[:, :t])[:, -1]
            token = self._draw(logits, g)
            active = (t >= start) & (t < end)
            seq[:, t] = torch.where(active, token, seq[:, t])
            fresh = seq[:, t:t + 1]

    def _correct(self, student: nn.Module, teachers: list[nn.Module], seq: Tensor, start: Tensor, end: Tensor,
                 g: torch.Generator) -> None:
        """MGSR's correction of the samples in ``seq``: the chosen departing token of each row becomes
        the teachers' token and the student re-generates the rest of the row (in place)."""
        T = seq.shape[1] - 1
        ids = seq[:, :T]
        p_t = torch.stack([F.softmax(m(ids).float(), -1) for m in teachers]).mean(0)  # [B, T, V]: of seq[:, 1:]
        teacher_token = p_t.argmax(-1)
        pos = torch.arange(1, T + 1, device=seq.device)
        depart = (pos >= start[:, None]) & (pos < end[:, None]) & (seq[:, 1:] != teacher_token)
        if self.pick == "first":
            score = -pos.expand_as(depart).float()
        else:
            log_s = F.log_softmax(student(ids).float(), -1)
            score = torch.where(p_t > 0, p_t * (p_t.log() - log_s), 0.0).sum(-1)
        j = score.masked_fill(~depart, -torch.inf).argmax(1)  # an input position: its target is seq[:, j + 1]
        found = depart.any(1)
        rows = found.nonzero()[:, 0]
        seq[rows, j[rows] + 1] = teacher_token[rows, j[rows]]
        self._sample(student, seq, torch.where(found, j + 2, end), end, g)
