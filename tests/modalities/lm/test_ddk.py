"""DDK's data policy (modalities/lm/ddk.py) on hand-built token blocks with a per-token ``domain``:
per-domain losses against a naive per-token loop, Eq. 1 and Eq. 2 against the formulas computed here,
the re-drawn blocks' domain counts against hand-computed largest-remainder counts, seeding, the state
across a resumed fit, the refused inputs, and the two AG News configs."""
from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term, Trainer
from mmkd.build import build_plugins
from mmkd.cli import compose
from mmkd.config import ConfigError
from mmkd.data import DataError
from mmkd.modalities.lm.corpus import DOMAINS, TokenBlocks
from mmkd.modalities.lm.ddk import DDK, allocate, block_domains, domain_losses
from mmkd.routers import ConstantRouter

NAMES = ["a", "b", "c"]
V, T = 12, 4  # domain d's tokens are 4d .. 4d + 3
DATA = Path(os.environ["MMKD_DATA"]).resolve() if "MMKD_DATA" in os.environ else None


def blocks(name: str, sizes, seed: int, extra: bool = False, domain: bool = True) -> TokenBlocks:
    """``sizes[d]`` blocks of domain ``d`` (its tokens only; every other block's last target masked);
    ``extra``: then a block of a's tokens then b's (targets a, b, b, b: b by majority) and one without a target."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(4 * d, 4 * d + 4, (k, T + 1), generator=g) for d, k in enumerate(sizes)]
    dom = [torch.full((k, T), d) for d, k in enumerate(sizes)]
    if extra:
        ids += [torch.tensor([[0, 1, 5, 6, 7]]), torch.tensor([[8, 9, 10, 11, 8]])]
        dom += [torch.tensor([[0, 1, 1, 1]]), torch.tensor([[2, 2, 2, 2]])]
    ids, dom = torch.cat(ids), torch.cat(dom)
    mask = torch.ones(len(ids), T, dtype=torch.bool)
    mask[::2, -1] = False
    if extra:
        mask[-1] = False
    return TokenBlocks(name, ids, mask, "test", **({"domain": dom} if domain else {}))


TRAIN = blocks("train", [6, 10, 14], 0, extra=True)  # 32 blocks: domains 0 x6, 1 x10, 2 x14, 1, -1
VAL = blocks("val", [5, 5, 5], 1)


class Lookup(nn.Module):
    """Next-token logits ``table[x_t]``: each input token's row of a ``[V, V]`` table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.clone())

    def forward(self, ids):
        return self.table[ids]


def tables(seed: int = 0, lag: float = 1.0):
    """A teacher table that favours the input's domain (+3 on its 4 tokens, the best guess for these
    blocks) and a student's: the teacher's plus noise, and in domain a (rows 0-3) ``1 - lag`` times it
    (lag 1: uniform)."""
    g = torch.Generator().manual_seed(seed)
    teacher = 0.5 * torch.randn(V, V, generator=g)
    for d in range(len(NAMES)):
        teacher[4 * d:4 * d + 4, 4 * d:4 * d + 4] += 3
    student = teacher + 0.3 * torch.randn(V, V, generator=g)
    student[:4] = (1 - lag) * teacher[:4]
    return teacher, student


def kd(student: torch.Tensor, *teachers: torch.Tensor) -> Distiller:
    net = Net(Lookup(student), ("input_ids",), tokens="mask")
    ts = [Teacher(Lookup(t), ("input_ids",), tokens="mask") for t in teachers]
    return Distiller(net, ts, [Term("ce"), Term("fkl")], ConstantRouter())


def fake_trainer(epoch: int = 0, seed: int = 0, val=VAL):
    return SimpleNamespace(epoch=epoch, val_data=val, device=torch.device("cpu"), cfg=SimpleNamespace(seed=seed))


def naive_ce(data: TokenBlocks, *tabs: torch.Tensor) -> list[float]:
    """Per domain, the mean over its kept targets of -log p(y), p the mean of softmax(table[x_t])."""
    total, count = [0.0] * len(NAMES), [0] * len(NAMES)
    for b in range(len(data)):
        for t in range(T):
            if data.mask[b, t]:
                x, y, d = int(data.ids[b, t]), int(data.ids[b, t + 1]), int(data.extras["domain"][b, t])
                p = 0.0
                for tab in tabs:
                    z = tab[x].tolist()
                    p += math.exp(z[y]) / sum(math.exp(v) for v in z) / len(tabs)
                total[d] -= math.log(p)
                count[d] += 1
    return [s / c for s, c in zip(total, count)]


def naive_ratio(teacher, student) -> list[float]:
    """``l_S / l_T``, the ratio of the perplexities ``exp(CE)``, per domain of VAL."""
    return [math.exp(s) / math.exp(t) for s, t in zip(naive_ce(VAL, student), naive_ce(VAL, teacher))]


def softmax(v: list[float]) -> list[float]:
    return [math.exp(x) / sum(math.exp(y) for y in v) for x in v]


def test_domain_losses_are_the_per_token_mean_of_the_mixture_of_the_nets():
    teacher, student = tables()
    nets = [Net(Lookup(t), ("input_ids",), tokens="mask") for t in (teacher, student)]
    got = domain_losses(nets, VAL, 3, torch.device("cpu"), batch_size=4)  # batches cut across domains
    assert got.tolist() == pytest.approx(naive_ce(VAL, teacher, student), rel=1e-5)
    assert domain_losses(nets[:1], VAL, 4, torch.device("cpu"))[3].isnan()  # a domain without a token


def test_a_block_takes_the_majority_domain_of_its_targets():
    assert block_domains(TRAIN, 3, batch_size=5).tolist() == [0] * 6 + [1] * 10 + [2] * 14 + [1, -1]


def test_the_lagging_domain_gains_the_weight_eq_2_gives_and_the_smoothing_limits_it():
    teacher, student = tables()
    mod = kd(student, teacher).train()
    policy, trainer = DDK(init="uniform", names=NAMES), fake_trainer()
    assert policy.select(trainer, mod, TRAIN) is TRAIN  # the first interval: the data as it is
    assert policy.weights.tolist() == pytest.approx([1 / 3] * 3)
    trainer.epoch = 1
    policy.select(trainer, mod, TRAIN)
    ratio = naive_ratio(teacher, student)
    assert ratio[0] > 2 * max(ratio[1:])  # the constructed case: the student lags most in a
    psi = [math.exp(q) / 3 for q in ratio]
    want = [0.5 * p / sum(psi) + 0.5 / 3 for p in psi]  # Eq. 2 from r_0 = 1/3
    assert policy.weights.tolist() == pytest.approx(want, rel=1e-6)
    assert policy.ratio.tolist() == pytest.approx(ratio, rel=1e-5)
    assert float(policy.weights[0] - 1 / 3) == pytest.approx(want[0] - 1 / 3, rel=1e-6) and want[0] > 0.5
    unsmoothed = softmax(ratio)  # Eq. 1 alone (the paper's "w/o FS")
    for w, u in zip(policy.weights.tolist(), unsmoothed):  # from uniform, the move is alpha times Eq. 1's
        assert w - 1 / 3 == pytest.approx(0.5 * (u - 1 / 3), rel=1e-6)
    assert float(policy.weights[0]) < unsmoothed[0] and min(policy.weights.tolist()) >= 0.5 / 3  # the floor
    assert mod.training and not mod.teachers[0].training  # modes restored; a frozen teacher stays in eval


def test_the_paper_start_is_eq_1_and_the_update_carries_its_history():
    teacher, student = tables(lag=0.5)
    mod = kd(student, teacher)
    policy, trainer = DDK(alpha=0.3, names=NAMES), fake_trainer()
    policy.select(trainer, mod, TRAIN)
    r0 = softmax(naive_ratio(teacher, student))
    assert policy.weights.tolist() == pytest.approx(r0, rel=1e-6)
    worse = student.clone()
    worse[4:8] = 0  # now it lags in b too
    mod.student.model.table.data.copy_(worse)
    trainer.epoch = 1
    policy.select(trainer, mod, TRAIN)
    psi = [r * math.exp(q) for r, q in zip(r0, naive_ratio(teacher, worse))]
    assert policy.weights.tolist() == pytest.approx([0.3 * p / sum(psi) + 0.7 / 3 for p in psi], rel=1e-6)


def test_several_teachers_are_measured_as_their_mean_distribution():
    teacher, student = tables()
    other = tables(seed=5)[0]
    policy = DDK(init="uniform", names=NAMES)
    policy.select(fake_trainer(), kd(student, teacher, other), TRAIN)
    mixed = [math.exp(s) / math.exp(t) for s, t in zip(naive_ce(VAL, student), naive_ce(VAL, teacher, other))]
    assert policy.ratio.tolist() == pytest.approx(mixed, rel=1e-5)


def test_largest_remainder_counts():
    assert allocate(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([True, True, True]), 32).tolist() == [16, 10, 6]
    # a domain without blocks: the others share its weight (7.14, 0, 2.86 -> 7, 0, 3)
    assert allocate(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([True, False, True]), 10).tolist() == [7, 0, 3]
    assert allocate(torch.tensor([0.5, 0.5]), torch.tensor([True, True]), 3).tolist() == [2, 1]  # ties: lower index


def with_weights(weights, every: int = 2) -> DDK:
    policy = DDK(every=every, names=NAMES)
    policy.load_state_dict({"weights": torch.tensor(weights, dtype=torch.float64), "ratio": torch.ones(3)})
    return policy


def test_the_drawn_blocks_follow_the_weights_exactly_and_cycle_within_a_domain():
    teacher, student = tables()
    policy = with_weights([0.5, 0.3, 0.2])
    drawn = policy.select(fake_trainer(epoch=3), kd(student, teacher), TRAIN)  # 3 % every != 0: no update
    assert policy.weights.tolist() == pytest.approx([0.5, 0.3, 0.2])
    assert len(drawn) == len(TRAIN)
    domains = block_domains(TRAIN, 3)
    idx = torch.tensor(drawn.indices)
    assert torch.bincount(domains[idx], minlength=3).tolist() == [16, 10, 6]  # 32 x (0.5, 0.3, 0.2), rounded
    uses = torch.bincount(idx, minlength=len(TRAIN))
    assert sorted(uses[:6].tolist()) == [2, 2, 3, 3, 3, 3]  # 16 of 6 blocks: each twice before any thrice
    assert uses[6:].max() == 1 and uses[-1] == 0  # b and c: fewer than their blocks, none twice; no target: never
    assert torch.equal(drawn[[0, 1]]["index"], idx[:2])  # items keep their index (cached teacher outputs)


def test_the_same_seed_and_epoch_draw_the_same_blocks():
    teacher, student = tables()
    mod = kd(student, teacher)

    def draw(epoch, seed):
        return with_weights([0.4, 0.4, 0.2]).select(fake_trainer(epoch, seed), mod, TRAIN).indices

    assert draw(3, 0) == draw(3, 0)
    assert draw(3, 0) != draw(5, 0) and draw(3, 0) != draw(3, 1)


def test_the_state_round_trips(tmp_path):
    teacher, student = tables()
    mod = kd(student, teacher)
    a, trainer = DDK(every=2, init="uniform", names=NAMES), fake_trainer()
    for trainer.epoch in (0, 2):
        a.select(trainer, mod, TRAIN)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = DDK(every=2, init="uniform", names=NAMES)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    trainer.epoch = 3
    assert a.select(trainer, mod, TRAIN).indices == b.select(trainer, mod, TRAIN).indices
    ma, mb = {}, {}
    a.on_epoch_end(trainer, mod, ma)
    b.on_epoch_end(trainer, mod, mb)
    assert ma == mb and set(ma) == {f"ddk/{k}_{n}" for k in ("w", "ratio") for n in NAMES}


def test_a_fit_reports_the_weights_and_a_resumed_fit_continues_with_them(tmp_path):
    teacher, student = tables()

    def fit(run_dir, resume=False, crash=False):
        policy = DDK(names=NAMES)
        if crash:
            policy.select = lambda t, m, d, real=policy.select: (_ for _ in ()).throw(KeyboardInterrupt) \
                if t.epoch == 2 else real(t, m, d)
        mod = kd(student, teacher)
        t = Trainer(run_dir=run_dir, max_epochs=3, batch_size=8, tensorboard=False, progress="off", device="cpu",
                    metrics=["loss"], resume=resume)
        return t.fit(mod, TRAIN, VAL, callbacks=[policy]), policy

    full, policy = fit(tmp_path / "full")
    weights = [[row[f"ddk/w_{n}"] for n in NAMES] for row in full.history]
    assert len(weights) == 3 and all(sum(w) == pytest.approx(1) for w in weights)
    assert weights[-1] == pytest.approx(policy.weights.tolist()) and weights[1] != weights[0]
    with pytest.raises(KeyboardInterrupt):
        fit(tmp_path / "cut", crash=True)
    again, _ = fit(tmp_path / "cut", resume=True)
    assert [[row[f"ddk/w_{n}"] for n in NAMES] for row in again.history] == weights


@pytest.mark.parametrize("where", ["train", "val"])
def test_items_without_a_domain_are_one_line_naming_the_fix(where):
    teacher, student = tables()
    plain = blocks("plain", [2, 2, 2], 0, domain=False)
    train, val = (plain, VAL) if where == "train" else (TRAIN, plain)
    with pytest.raises(ConfigError, match=r"^policies: ddk needs .*per-token 'domain'.*'plain'.*drop the ddk policy$"):
        DDK(names=NAMES).select(fake_trainer(val=val), kd(student, teacher), train)


def test_refused_settings():
    teacher, student = tables()
    with pytest.raises(ConfigError, match="outside the 2 names of args.names"):
        DDK(names=["a", "b"]).select(fake_trainer(), kd(student, teacher), TRAIN)
    with pytest.raises(ConfigError, match="has none: add a teacher"):
        DDK(names=NAMES).select(fake_trainer(), Distiller(Net(Lookup(student), ("input_ids",), tokens="mask"), [],
                                                          [Term("ce")]), TRAIN)
    with pytest.raises(DataError, match="no token of domain 'd'"):
        DDK(names=[*NAMES, "d"]).select(fake_trainer(), kd(student, teacher), TRAIN)
    with pytest.raises(ValueError, match="init='paper'; choose from: factor, uniform"):
        DDK(init="paper")
    with pytest.raises(ValueError, match="one distinct non-empty string each"):
        DDK(names=["a", "a"])


def test_the_agnews_configs_compose_and_build():
    kd_cfg, ddk_cfg = compose(["experiment=lm_agnews_kd"]), compose(["experiment=lm_agnews_ddk"])
    for cfg in (kd_cfg, ddk_cfg):
        assert cfg.data.name == "agnews_lm" and cfg.data.args.block_size == 64 and cfg.data.args.vocab_size <= 2048
        assert (cfg.student.args.n_layer, cfg.student.args.n_embd) == (2, 128) and cfg.trainer.optimizer == "adamw"
        lm = cfg.teachers.lm
        assert (lm.name, lm.args.n_layer, lm.args.n_embd, lm.cache_topk) == ("causal_lm", 4, 256, 32)
        assert (cfg.losses.ce.weight, cfg.losses.fkl.weight) == (1.0, 0.2)
    assert build_plugins(kd_cfg, "policies") == []
    [policy] = build_plugins(ddk_cfg, "policies")
    assert isinstance(policy, DDK) and (policy.every, policy.alpha, policy.init, policy.names) == (1, 0.5, "uniform", DOMAINS)
    ddk_cfg.policies[0].args.init = "paper"
    with pytest.raises(ConfigError, match=r"^policies\[0\]\.args: init='paper'"):
        build_plugins(ddk_cfg, "policies")


def test_agnews_lm_blocks_are_redrawn_by_topic():
    if DATA is None:
        pytest.skip("set MMKD_DATA to the shared data folder")
    from mmkd.registry import DATASETS

    data = DATASETS["agnews_lm"](root=DATA, tokenizer="char", limit=64)
    g = torch.Generator().manual_seed(0)
    teacher, student = (torch.randn(data.num_classes, data.num_classes, generator=g) for _ in range(2))
    policy, trainer = DDK(), fake_trainer(val=data.val)
    mod = kd(student, teacher)
    assert policy.select(trainer, mod, data.train) is data.train
    trainer.epoch = 1
    drawn = policy.select(trainer, mod, data.train)
    domains = block_domains(data.train, len(DOMAINS))
    present = torch.bincount(domains, minlength=len(DOMAINS)) > 0
    assert policy.weights.sum() == pytest.approx(1) and policy.weights.min() >= 0.5 / len(DOMAINS)
    assert torch.equal(torch.bincount(domains[torch.tensor(drawn.indices)], minlength=len(DOMAINS)),
                       allocate(policy.weights, present, 64))
