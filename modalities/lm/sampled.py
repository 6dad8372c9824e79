"""Training on sequences sampled from a model, offline or online, and the golden metric: the pieces of
the teacher-hacking study (Tiapkin, Calandriello, Ferret, Perrin, Vieillard, Ramé, Blondel, "On
Teacher Hacking in Language Model Distillation", ICML 2025, arXiv:2502.02671).

The study's setting: an *oracle* LM stands for the ground truth, a *teacher* is distilled from it and a
*student* from the teacher. The *proxy* metric is the student's distance to the teacher, the *golden*
metric its distance to the oracle, both per token on held-out data:

    proxy  = E_x 1/|x| sum_t KL(p_T(. | x_<t) || p_S(. | x_<t))      (the ``tkl`` metric, ``val/tkl``)
    golden = E_x 1/|x| sum_t KL(p_O(. | x_<t) || p_S(. | x_<t))      (callback ``golden``, ``val/golden``)

Teacher hacking is the golden metric turning up while the proxy keeps falling: the student learns the
teacher's errors. The paper finds it with a fixed offline set of oracle samples trained on for many
epochs, and finds that online data (fresh samples every epoch) prevents it, as does more diverse
offline data.

:class:`Sampled` (data policy ``sampled``) makes that data: ``count`` prompts, each the first
``prompt`` tokens of a training block (blocks drawn in a seeded order), continued by a finished run's
model (``model``, ``model_name``: its student or a teacher) to the block's length at ``temperature``;
the targets are the sampled tokens (the prompt's are masked). ``every=0`` samples once (offline);
``every=k`` draws fresh prompts and samples every ``k`` epochs (online). Samples are seeded by
``(seed, epoch)`` with the global RNG forked, so a run's other random draws, and a resumed run's
samples, are unchanged. The teachers must be live (``teachers.<t>.cache=false``): a cache holds the
corpus's blocks, not these.

:class:`Golden` (callback ``golden``) adds ``val/golden`` to each epoch's metrics: the mean per-token
``KL(p_O || p_S)`` over the validation split, ``p_O`` a finished run's model (the oracle).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mmkd.cache import Cached
from mmkd.callbacks import Callback, register_callback
from mmkd.checks import COUNT, NON_NEGATIVE_INT, SEED, TEMPERATURE
from mmkd.config import ConfigError
from mmkd.data import loader
from mmkd.metrics import TeacherKL
from mmkd.net import Net
from mmkd.policies import DataPolicy, register_policy

from .corpus import TokenBlocks
from .models import check_vocab, forked_rng, run_net


@torch.no_grad()
def token_kl(reference: Net, student: Net, dataset: Dataset, device: torch.device, batch_size: int = 64) -> float:
    """The mean over ``dataset``'s target tokens of ``KL(p_ref || p_S)`` (the ``tkl`` metric's
    :class:`~mmkd.metrics.TeacherKL`; both in eval mode, the student's mode restored)."""
    was = student.training
    student.eval(), reference.eval()
    kl, total, count = TeacherKL(), 0.0, 0
    for batch in loader(dataset, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = student(batch).logits
        total += float(kl.value(logits, None, reference(batch).logits.float().log_softmax(-1)))
        count += len(logits)
    student.train(was)
    return total / max(count, 1)


@register_policy("sampled", ranges={"count": COUNT, "prompt": COUNT, "every": NON_NEGATIVE_INT,
                                    "temperature": TEMPERATURE, "seed": SEED, "batch_size": COUNT})
class Sampled(DataPolicy):
    """Train on ``count`` sequences sampled from a finished run's model (module docstring): once
    (``every=0``, offline data) or afresh every ``every`` epochs (online data).

    Args:
        model: the run directory; ``model_name``: its teacher to sample from (``None``: its student).
        count: sequences per draw (default: as many as the training blocks).
        prompt: the tokens of each block kept as the prompt (at least 1, fewer than the block's).
        every: re-sample every ``every`` epochs; 0: sample once.
        temperature: the sampling temperature (1: the model's distribution).
        seed: with the epoch, seeds the prompts' order and the samples.
    """

    def __init__(self, model: str, model_name: str | None = None, count: int | None = None, prompt: int = 16,
                 every: int = 0, temperature: float = 1.0, seed: int = 0, batch_size: int = 256):
        self.net, self.vocab = run_net(model, model_name, "model")
        self.count, self.prompt, self.every, self.temperature = count, prompt, every, temperature
        self.seed, self.batch_size = seed, batch_size
        self.ids: Tensor | None = None  # the current samples, [count, T + 1]
        self.drawn = -1  # the epoch they were drawn at

    def select(self, trainer, module, dataset):
        cached = [type(t).__name__ for t in module.teachers if isinstance(t, Cached)]
        if cached:
            raise ConfigError("policies: sampled trains on new sequences, which a cached teacher has not seen; give "
                              "live teachers (teachers.<name>.cache=false)")
        epoch = trainer.epoch
        if self.ids is None:
            check_vocab("policies: sampled model", self.vocab, module.student, dataset, trainer.device)
        if self.ids is None or (self.every and epoch % self.every == 0 and self.drawn != epoch):
            self.ids, self.drawn = self.sample(dataset, epoch, trainer.device), epoch
        mask = torch.ones(len(self.ids), self.ids.shape[1] - 1, dtype=torch.bool)
        mask[:, :self.prompt - 1] = False  # the targets are the sampled tokens
        return TokenBlocks("sampled", self.ids, mask, "sampled")

    @torch.no_grad()
    def sample(self, dataset: Dataset, epoch: int, device: torch.device) -> Tensor:
        """``count`` prompts from ``dataset``'s blocks (a seeded order, cycled) continued by the model."""
        first = dataset[0]["input_ids"]
        length = len(first) + 1
        if not 1 <= self.prompt < length - 1:
            raise ConfigError(f"policies: sampled prompt={self.prompt}; a block has {length} tokens: give a "
                              f"prompt of 1 to {length - 2} tokens")
        count = self.count or len(dataset)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.cat([torch.randperm(len(dataset), generator=g) for _ in range(-(-count // len(dataset)))])[:count]
        model = self.net.to(device).model
        out = []
        with forked_rng(device):
            for i, start in enumerate(range(0, count, self.batch_size)):
                rows = order[start:start + self.batch_size].tolist()
                prompts = torch.stack([dataset[r]["input_ids"][:self.prompt] for r in rows]).to(device)
                seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
                new = model.generate(prompts, length - self.prompt, self.temperature, seed=seed)
                out.append(torch.cat([prompts, new], 1).cpu())
        return torch.cat(out)

    def state_dict(self):
        return {"ids": self.ids, "drawn": self.drawn}

    def load_state_dict(self, state):
        self.ids, self.drawn = state["ids"], state["drawn"]


@register_callback("golden", ranges={"batch_size": COUNT})
class Golden(Callback):
    """Adds ``val/golden``, the mean per-token ``KL(p_O || p_S)`` on the validation split, to each epoch's
    metrics; ``p_O`` is the model of a finished run (``model``; ``model_name``: its teacher, ``None``: its
    student), the study's oracle."""

    def __init__(self, model: str, model_name: str | None = None, batch_size: int = 64):
        self.net, self.vocab = run_net(model, model_name, "model")
        self.batch_size = batch_size

    def on_fit_start(self, trainer, module):
        check_vocab("callbacks: golden model", self.vocab, module.student, trainer.val_data, trainer.device)

    def on_epoch_end(self, trainer, module, metrics):
        metrics["val/golden"] = token_kl(self.net.to(trainer.device), module.student, trainer.val_data,
                                         trainer.device, self.batch_size)
