"""Swing distillation: KD at a temperature per instance set by how likely it is to be private, with
noisy soft targets.

Each instance (a row of the logits: a sentence, or a token of a sequence) carries a privacy score
``s_i`` in [0, 1], read from the batch (``batch[score_key]``: a privacy detector's probability, or 1
for flagged instances and 0 for the rest). Its temperature swings between the public and the private
one, the teacher's soft targets at that temperature receive noise, and the student matches them:

    T_i = T + (T_priv - T) * s_i
    q_i = n(max(softmax(t_i / T_i) + e_i, 0)),     e_ic ~ Laplace(0, b) or N(0, b^2),  n(v) = v / sum_c v_c
    Swing(s, t)_i = T_i^2 * sum_c q_ic (log q_ic - log softmax(s_i / T_i)_c)

With every ``T_i = T`` and ``b = 0`` this is Hinton's KD (:func:`mmkd.losses.kd.kd`). A high ``T_priv``
flattens the teacher's distribution where an instance is private: what the teacher memorised there
(the label of a planted secret) shrinks towards uniform while the noise keeps its size, so for the
student the private instances' signal drowns in the noise and the public ones' does not. The
temperatures alone hide little: with the T_i^2 factor (which keeps every row's gradient scale
comparable, as in KD) a high temperature makes the student match the teacher's logits (Hinton et al.'s
limit), so it is through the noise that a high T_priv protects.

Li, Wu, Dong, Wu, Bian and Xiong, "Swing Distillation: A Privacy-Preserving Knowledge Distillation
Framework", arXiv:2212.08349, 2022. No official code was found (no repository in the search index, none
named in the stored copies of the paper), and of the paper only the abstract and introduction could be
read; this follows their description: temperatures assigned per token by the likelihood that the token
holds private information, and noise injected into the soft targets given to the student. The linear
swing between two temperatures, the T_i^2 factor, the noise added to the probabilities (clipped at 0
and renormalised, so the targets stay distributions; a row whose noisy target is all <= 0 contributes
0), the noise kinds and the defaults are this implementation's choices. Laplace noise of scale
``b = Delta / epsilon`` is the Laplace mechanism with L1 sensitivity Delta and privacy budget epsilon.

Noise draws: by default fresh each call, from torch's global generator (reproducible under the run's
seed; a resumed run draws the same, as the trainer restores the generator). ``noise_seed`` instead
fixes each item's noise, drawn from a generator seeded by ``(noise_seed, batch[index_key])`` alone:
every epoch shows an item the same noisy soft target (one noisy release per item, which repeated
epochs cannot average away).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mmkd.checks import NON_NEGATIVE, SEED, TEMPERATURE
from mmkd.losses import reduce, register_loss

NOISES = ("laplace", "gaussian")


def draw_noise(shape: Sequence[int], kind: str, scale: float, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """``shape`` independent zero-mean draws: ``laplace`` (density ``exp(-|x| / b) / 2b`` with
    ``b = scale``; ``E|x| = b``, std ``sqrt(2) b``, drawn as ``b (E1 - E2)`` of two unit exponentials)
    or ``gaussian`` (std ``scale``), from ``generator`` (default: torch's global one on ``device``)."""
    if kind == "gaussian":
        return scale * torch.randn(tuple(shape), generator=generator, device=device)
    if kind == "laplace":
        e = torch.empty((2, *shape), device=device).exponential_(generator=generator)
        return scale * (e[0] - e[1])
    raise ValueError(f"noise={kind!r}; choose from: {', '.join(NOISES)}")


def item_noise(index: Tensor, rows: int, classes: int, kind: str, scale: float, seed: int) -> Tensor:
    """``[len(index) * rows, classes]`` noise, item ``i``'s ``rows`` rows drawn from a generator seeded by
    ``(seed, i)`` alone: the same for the item in every batch it is part of. The seed is
    ``(seed * 0x9E3779B1 + i) mod 2**32`` (torch's CPU generator keeps 32 bits of a seed), distinct for
    the items of one ``seed``."""
    g = torch.Generator()
    parts = []
    for i in index.reshape(-1).tolist():
        g.manual_seed((seed * 0x9E3779B1 + int(i)) % 2**32)
        parts.append(draw_noise((rows, classes), kind, scale, g))
    return torch.cat(parts)


def per_row(values: Tensor, n: int, key: str) -> Tensor:
    """``values`` flattened to one per row of ``n``: ``n`` values as they are, or one per instance of
    ``B`` instances of ``n / B`` rows each (a sentence's score for each of its tokens)."""
    flat = values.reshape(-1)
    if flat.numel() == 0 or n % flat.numel():
        raise ValueError(f"batch[{key!r}] has {flat.numel()} values for {n} logit rows; give one per row or "
                         "one per instance (rows a multiple of it)")
    return flat.repeat_interleave(n // flat.numel())


def temperatures(scores: Tensor, temperature: float, private_temperature: float) -> Tensor:
    """``T + (T_priv - T) * s``: the temperature of each row from its privacy score ``s`` in [0, 1]."""
    if ((scores < 0) | (scores > 1)).any():
        bad = scores[(scores < 0) | (scores > 1)][0].item()
        raise ValueError(f"privacy score {bad:g} outside [0, 1]; give scores in [0, 1] (1: private)")
    return temperature + (private_temperature - temperature) * scores


@register_loss("swing", teacher=True, per_sample=True, batch=True,
               ranges={"temperature": TEMPERATURE, "private_temperature": TEMPERATURE, "noise_scale": NON_NEGATIVE,
                       "noise_seed": SEED})
def swing(student_logits, teacher_logits, target=None, *, batch: Mapping[str, Tensor], score_key="private",
          temperature=4.0, private_temperature=32.0, noise="laplace", noise_scale=0.05, noise_seed=None,
          index_key="index", reduction="mean"):
    """``T_i^2 * KL(q_i || softmax(s_i / T_i))`` with ``T_i = T + (T_priv - T) * batch[score_key]_i`` and
    ``q_i`` the teacher's ``softmax(t_i / T_i)`` plus ``noise`` noise of scale ``noise_scale``, clipped
    at 0 and renormalised (see the module docstring).

    Li et al., "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework",
    arXiv:2212.08349, 2022.

    Args:
        batch: the batch; ``batch[score_key]`` holds the privacy scores in [0, 1], one per logit row or
            one per instance (each of its rows, e.g. tokens, gets it).
        score_key: the batch entry of the privacy scores (a data set's, e.g. ``agnews_canaries``'s ``private``).
        temperature: ``T``, the temperature of public rows (score 0).
        private_temperature: ``T_priv``, the temperature of private rows (score 1).
        noise: ``"laplace"`` (scale: ``b``) or ``"gaussian"`` (scale: the std).
        noise_scale: the noise's scale on the soft targets' probabilities; 0: no noise. The defaults
            (T = 4, T_priv = 32, b = 0.05) are those of ``configs/experiment/agnews_swing.yaml``, chosen on
            its canaries (the paper's values are not known to us).
        noise_seed: fix each item's noise by this seed and ``batch[index_key]`` (an item's rows, e.g.
            its tokens, consecutive); ``None``: fresh draws from torch's global generator at every call.
        index_key: the batch entry of the item ids (``index``, which every mmkd data set adds).
    """
    if noise not in NOISES:
        raise ValueError(f"noise={noise!r}; choose from: {', '.join(NOISES)}")
    if score_key not in batch:
        raise ValueError(f"swing: the batch has no privacy score {score_key!r} (it has: {', '.join(sorted(batch))}); "
                         "give the data set's score entry as score_key")
    n, c = student_logits.shape
    temps = temperatures(per_row(batch[score_key], n, score_key).to(student_logits), temperature,
                         private_temperature)[:, None]
    log_s = F.log_softmax(student_logits / temps, dim=1)
    log_q = F.log_softmax(teacher_logits / temps, dim=1)
    q = log_q.exp()
    if noise_scale > 0:
        if noise_seed is None:
            e = draw_noise((n, c), noise, noise_scale, device=q.device)
        else:
            if index_key not in batch:
                raise ValueError(f"swing: noise_seed needs the item ids batch[{index_key!r}], which the batch lacks; "
                                 "give index_key or noise_seed: null")
            index = batch[index_key].reshape(-1)
            if n % len(index):
                raise ValueError(f"swing: {n} logit rows are not a whole number of rows for each of the "
                                 f"{len(index)} items of batch[{index_key!r}]")
            e = item_noise(index, n // len(index), c, noise, noise_scale, noise_seed).to(q.device)
        tiny = torch.finfo(q.dtype).tiny
        q = (q + e.to(q.dtype)).clamp_min(0)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny)
        log_q = q.clamp_min(tiny).log()
    per_sample = (q * (log_q - log_s)).sum(dim=1) * temps[:, 0] ** 2
    return reduce(per_sample, reduction)
