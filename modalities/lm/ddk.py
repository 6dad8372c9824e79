"""DDK: the distillation data re-mixed by domain, towards the domains where the student lags its teacher
most (Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language Models", NeurIPS 2024,
arXiv:2407.16154), as the data policy ``ddk``.

On the validation split of each domain ``i`` of ``N`` (``agnews_lm``: the topics, :data:`DOMAINS`), the
student's and the teacher's perplexities ``l_S[i] = exp(CE_S[i])`` and ``l_T[i] = exp(CE_T[i])`` (``CE``:
the mean per-token cross-entropy over the domain's validation tokens) give the domain discrepancy factor

    r_0[i] = exp(l_S[i] / l_T[i]) / sum_i' exp(l_S[i'] / l_T[i'])                        (Eq. 1)

and, at the start of each later interval ``t + 1``, its factor-smooth update

    psi[i] = r_t[i] exp(l_S[i] / l_T[i]),   r_{t+1}[i] = alpha psi[i] / sum_i' psi[i'] + (1 - alpha) / N   (Eq. 2)

(``alpha = 0.5`` in the paper; every weight keeps at least ``(1 - alpha) / N``). The interval's training
data is drawn from the domains with probabilities ``r_t``; the first interval trains on the data as it
is (the paper's ``D_0``, drawn at random from the corpus; Algorithm 1). The student trains on it with the
paper's Eq. 3, ``CE + gamma KL(p_T || p_S)`` at temperature ``T`` (``gamma = 0.2``, ``T = 1``): loss
terms of the config (``configs/experiment/lm_agnews_ddk.yaml``), not part of this policy.

The paper re-measures every ``K = 1,000`` of its about 30,000 steps (Table 6 tries 50 to 2,000); a data
policy runs between epochs, so here an interval is ``every`` epochs: ``K = every * ceil(len(train) /
batch_size)`` steps (282 for ``lm_agnews_ddk``, a tenth of its 10-epoch run).

Where this differs from the paper (which publishes no code; it names DeepSpeed-Chat as its codebase):

- Sampling. The paper draws a domain per sample with probabilities ``r`` and takes that domain's next
  sample, starting the domain over once it is exhausted. Here each epoch draws as many blocks as the
  training set has, with the domain counts fixed by ``r`` (largest remainder: ``floor(n r[i])``, then one
  more for the largest fractions, ties to the lower domain index; the paper's expected counts without
  their multinomial noise), and each domain's blocks in a random order, repeated in fresh orders when its
  count exceeds its blocks (no block twice before every block of its domain was drawn once). The draws are
  seeded by the run's seed and the epoch alone, and a domain's cycle restarts every epoch.
- Start. ``init="factor"`` is the paper's ``r_0`` (Eq. 1 on the student as it starts: a pretrained
  one); ``init="uniform"`` starts from ``r_0 = 1 / N``, for a student trained from scratch, whose
  starting losses are the same near-uniform guess in every domain (with ``l_S`` near the vocabulary size,
  Eq. 1 would put nearly all the weight on the domain where the teacher is best, and Eq. 2 keeps that
  history). The first update is then ``r_1 = alpha softmax(l_S / l_T) + (1 - alpha) / N``.
- Several teachers (the paper has one): ``l_T`` is the perplexity of their mean distribution
  ``p_T = mean_t softmax(z_t)``. A cached teacher is measured with its live model.
- A block's domain is the most frequent domain of its targets (ties to the lower index; with ``layout:
  pad`` every block has one); a block without a target has none and is never drawn. A domain the
  training set lacks (a small ``limit``) gets no blocks: the others share its weight.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mmkd.cache import Cached
from mmkd.checks import COUNT, FRACTION
from mmkd.config import ConfigError
from mmkd.data import DataError, loader
from mmkd.distiller import Distiller
from mmkd.policies import DataPolicy, register_policy

from .corpus import DOMAINS

INITS = ("factor", "uniform")  # r_0: Eq. 1 on the starting student (the paper), or 1 / N


def _domains(batch: dict[str, Tensor], dataset: Dataset, n: int) -> Tensor:
    """The batch's per-token ``domain`` (``[N]``, long, on the CPU); a data set without one, or with a
    domain outside ``0 .. n - 1``, is a one-line :class:`ConfigError`."""
    name = getattr(dataset, "name", type(dataset).__name__)
    if "domain" not in batch or "mask" not in batch:
        raise ConfigError(f"policies: ddk needs token blocks whose items carry a per-token 'domain' (agnews_lm's "
                          f"topics); data set {name!r} has {', '.join(sorted(batch))}: use such a data set "
                          "(data.name=agnews_lm) or drop the ddk policy")
    dom = batch["domain"].long().cpu()
    if len(dom) and not 0 <= int(dom.min()) <= int(dom.max()) < n:
        bad = int(dom.min()) if int(dom.min()) < 0 else int(dom.max())
        raise ConfigError(f"policies: ddk: data set {name!r} has domain {bad}, outside the {n} names of args.names; "
                          "give a name to every domain of the data set")
    return dom


def block_domains(dataset: Dataset, n: int, batch_size: int = 4096) -> Tensor:
    """Per block of ``dataset`` (long ``[len]``): the most frequent of the ``n`` domains among its targets
    (ties to the lower index), ``-1`` for a block without a target."""
    out = []
    for batch in loader(dataset, batch_size):
        dom, mask = _domains(batch, dataset, n), batch["mask"]
        rows = torch.repeat_interleave(torch.arange(len(mask)), mask.sum(1))
        votes = torch.zeros(len(mask), n).index_put_((rows, dom), torch.ones(len(dom)), accumulate=True)
        out.append(torch.where(votes.sum(1) > 0, votes.argmax(1), -1))
    return torch.cat(out)


@torch.no_grad()
def domain_losses(nets: Sequence, dataset: Dataset, n: int, device: torch.device, batch_size: int = 256) -> Tensor:
    """Per domain ``i`` of ``n`` (float64 ``[n]``): the mean over ``dataset``'s tokens of domain ``i`` of
    ``-log p(y)``, ``p = mean_k softmax(z_k)`` the mean distribution of the token models ``nets``
    (:class:`~mmkd.net.Net` s with ``tokens``, in the mode they are in); NaN for a domain without a token."""
    total, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for batch in loader(dataset, batch_size):
        dom = _domains(batch, dataset, n)
        batch = {k: v.to(device) for k, v in batch.items()}
        log_p = torch.stack([net(batch).logits.float().log_softmax(-1) for net in nets]).logsumexp(0) - math.log(len(nets))
        nll = -log_p.gather(1, batch["label"][:, None])[:, 0]
        total.index_add_(0, dom, nll.double().cpu())
        count.index_add_(0, dom, torch.ones(len(dom), dtype=torch.float64))
    return total / count


def discrepancy(student_ce: Tensor, teacher_ce: Tensor) -> Tensor:
    """``l_S / l_T = exp(CE_S) / exp(CE_T)``, the ratio of the perplexities, per domain."""
    return (student_ce - teacher_ce).exp()


def factor(ratio: Tensor) -> Tensor:
    """Eq. 1: ``r[i] = exp(ratio[i]) / sum_i' exp(ratio[i'])``, ``ratio = l_S / l_T``."""
    return ratio.softmax(0)


def smooth(r: Tensor, ratio: Tensor, alpha: float = 0.5) -> Tensor:
    """Eq. 2: ``alpha psi / sum(psi) + (1 - alpha) / N`` with ``psi = r exp(ratio)`` (computed in log space)."""
    return alpha * (r.log() + ratio).softmax(0) + (1 - alpha) / len(r)


def allocate(weights: Tensor, present: Tensor, total: int) -> Tensor:
    """``total`` draws split over the domains where ``present`` is True in proportion to ``weights``
    (renormalised over them): ``floor(total w)``, then one more for the largest remainders (ties to the
    lower index). Long ``[N]``, summing to ``total``."""
    w = weights.double() * present
    exact = total * w / w.sum()
    counts = exact.floor().long()
    order = sorted(range(len(w)), key=lambda i: (-float(exact[i] - counts[i]), i))
    for i in order[:total - int(counts.sum())]:
        counts[i] += 1
    return counts


def resample(domains: Tensor, counts: Tensor, seed: int, epoch: int) -> Tensor:
    """Indices of ``counts[i]`` blocks of each domain ``i`` (``domains``: each block's, as
    :func:`block_domains` gives them): the domain's blocks in a random order, repeated in fresh orders
    while more are needed; the random orders come from ``(seed, epoch)`` alone."""
    rng = np.random.default_rng([seed, epoch])
    out = []
    for i, c in enumerate(counts.tolist()):
        pool = (domains == i).nonzero()[:, 0].numpy()
        if c:
            orders = [pool[rng.permutation(len(pool))] for _ in range(math.ceil(c / len(pool)))]
            out.append(np.concatenate(orders)[:c])
    return torch.from_numpy(np.concatenate(out)).long()


@register_policy("ddk", ranges={"every": COUNT, "alpha": FRACTION, "batch_size": COUNT})
class DDK(DataPolicy):
    """DDK's domain knowledge guided sampling with factor-smooth updating (module docstring): every
    ``every`` epochs, the student's and teachers' per-domain validation perplexities update the domain
    weights ``r`` (Eq. 1 at the start, then Eq. 2); from epoch ``every`` on, each epoch trains on the
    training blocks re-drawn by domain in the shares ``r``, as many as the training set has.

    Reports ``ddk/w_<domain>`` (``r``) and ``ddk/ratio_<domain>`` (``l_S / l_T`` as last measured) in each
    epoch's metrics; both are its state, so a resumed run continues with them.

    Args:
        every: epochs per interval (the paper's ``K`` steps; see the module docstring).
        alpha: the smoothing coefficient of Eq. 2 (the paper: 0.5); 1 leaves no floor, 0 is uniform.
        init: ``"factor"`` (the paper's ``r_0``, Eq. 1) or ``"uniform"`` (``1 / N``, a student trained
            from scratch).
        names: the domains' names, by index (default: agnews_lm's topics).
        batch_size: blocks per forward pass when measuring.
    """

    def __init__(self, every: int = 1, alpha: float = 0.5, init: str = "factor", names: Sequence[str] = tuple(DOMAINS),
                 batch_size: int = 256):
        if init not in INITS:
            raise ValueError(f"init={init!r}; choose from: {', '.join(INITS)}")
        names = list(names)
        if not names or len(set(names)) != len(names) or not all(isinstance(s, str) and s for s in names):
            raise ValueError(f"names={names!r}; give the domains' names, one distinct non-empty string each")
        self.every, self.alpha, self.init, self.names, self.batch_size = every, alpha, init, names, batch_size
        self.weights: Tensor | None = None  # r_t
        self.ratio: Tensor | None = None  # l_S / l_T, as last measured
        self._teacher_ce: Tensor | None = None  # frozen teachers: measured once

    def measure(self, trainer, module: Distiller) -> Tensor:
        """``l_S / l_T`` per domain on ``trainer.val_data`` (the module in eval mode, its mode restored)."""
        if not isinstance(module, Distiller) or not len(module.teachers):
            raise ConfigError("policies: ddk compares the student with its teachers; the fitted module has none: "
                              "add a teacher or drop the ddk policy")
        n, val, device = len(self.names), trainer.val_data, trainer.device
        was_training = module.training
        module.eval()
        try:
            student = domain_losses([module.student], val, n, device, self.batch_size)
            if self._teacher_ce is None or not all(t.frozen for t in module.teachers):
                live = [t.live.to(device) if isinstance(t, Cached) else t for t in module.teachers]
                self._teacher_ce = domain_losses(live, val, n, device, self.batch_size)
        finally:
            module.train(was_training)
        missing = [name for name, v in zip(self.names, student) if math.isnan(v)]
        if missing:
            raise DataError(f"policies: ddk: the validation split {getattr(val, 'name', '')!r} has no token of domain "
                            f"{missing[0]!r}; give it some, or leave the domain out of args.names")
        return discrepancy(student, self._teacher_ce)

    def select(self, trainer, module, dataset):
        epoch = trainer.epoch
        domains = block_domains(dataset, len(self.names))
        if self.weights is None or epoch % self.every == 0:
            self.ratio = self.measure(trainer, module)
            if self.weights is None:
                n = len(self.names)
                self.weights = factor(self.ratio) if self.init == "factor" else torch.full((n,), 1 / n, dtype=torch.float64)
            else:
                self.weights = smooth(self.weights, self.ratio, self.alpha)
        if epoch < self.every:  # the first interval: the data as it is (the paper's D_0)
            return dataset
        present = torch.stack([(domains == i).any() for i in range(len(self.names))])
        counts = allocate(self.weights, present, len(dataset))
        return Subset(dataset, resample(domains, counts, trainer.cfg.seed, epoch).tolist())

    def on_epoch_end(self, trainer, module, metrics):
        for name, w, q in zip(self.names, self.weights.tolist(), self.ratio.tolist()):
            metrics[f"ddk/w_{name}"], metrics[f"ddk/ratio_{name}"] = w, q

    def state_dict(self):
        return {"weights": self.weights, "ratio": self.ratio}

    def load_state_dict(self, state):
        self.weights, self.ratio = state["weights"], state["ratio"]
