"""The on-policy transform (GKD's lambda, MGSR's correction): lambda 0 and 1, the mask and labels of
the sampled positions, the sampling distribution against hand-computed ones, seeding by (seed, step),
the step counter in the state dict, eval mode and no gradient while sampling, the corrected position
against hand-built teachers and students, one Distiller step, and the shipped configs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, Teacher, Term
from mmkd.build import build_plugins
from mmkd.cli import compose
from mmkd.modalities.lm.corpus import pad, stream
from mmkd.modalities.lm.models import causal_lm
from mmkd.modalities.lm.on_policy import OnPolicy, prompt_lengths
from mmkd.routers import ConstantRouter

V, T = 11, 8


def blocks(n: int = 4, seed: int = 0):
    """A batch of ``n`` full stream blocks of ``T`` positions over ``V`` tokens."""
    tokens = torch.randint(V, (n * T + 1,), generator=torch.Generator().manual_seed(seed))
    return stream("toy", tokens, T).__getitems__(list(range(n)))


class Fixed(nn.Module):
    """Logits that depend on the position only: ``z[t]`` (``z``: ``[T, V]``) at position ``t`` of every
    row; records its mode and whether gradients were on at each call."""

    def __init__(self, z: torch.Tensor):
        super().__init__()
        self.register_buffer("z", z.expand(T, -1).clone() if z.dim() == 1 else z)
        self.drop = nn.Dropout(0.5)
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, ids):
        self.calls.append((self.training, torch.is_grad_enabled()))
        return self.z[:ids.shape[1]].expand(len(ids), -1, -1)


def net(model, teacher=False):
    return (Teacher if teacher else Net)(model, ("input_ids",), tokens="mask")


def tiny(seed=0):
    torch.manual_seed(seed)
    return causal_lm(V, (T,), n_layer=1, n_embd=8, n_head=2)


def per_row(batch):
    """The labels of each row (row-major order of the mask)."""
    return list(batch["label"].split(batch["mask"].sum(1).tolist()))


def test_lambda_0_passes_every_batch_and_lambda_1_replaces_every_one():
    student = net(tiny())
    keep, swap = OnPolicy(lambda_=0.0), OnPolicy(lambda_=1.0, prompt=3)
    for i in range(6):
        batch = blocks(seed=i)
        assert keep(batch, student, []) is batch
        out = swap(batch, student, [])
        assert out is not batch and not out["mask"][:, :2].any() and out["mask"][:, 2:].all()
    assert int(keep.step) == int(swap.step) == 6


def test_mask_covers_exactly_the_sampled_positions_and_labels_are_their_tokens():
    student, batch = net(tiny()), blocks()
    out = OnPolicy(lambda_=1.0, prompt=3)(batch, student, [])
    assert set(out) == {"input_ids", "mask", "label", "index"} and torch.equal(out["index"], batch["index"])
    assert torch.equal(out["input_ids"][:, :3], batch["input_ids"][:, :3])
    assert torch.equal(out["mask"], (torch.arange(T) >= 2).expand(4, -1))
    for b, labels in enumerate(per_row(out)):  # targets of positions 2..T-1: tokens 3..T, the last a target only
        assert torch.equal(labels[:-1], out["input_ids"][b, 3:]) and 0 <= labels[-1] < V
    short = OnPolicy(lambda_=1.0, prompt=3, max_new_tokens=2)(batch, student, [])
    assert torch.equal(short["mask"], ((torch.arange(T) >= 2) & (torch.arange(T) < 4)).expand(4, -1))
    assert torch.equal(short["input_ids"][:, 5:], batch["input_ids"][:, 5:])  # past the budget: old, masked out
    assert torch.equal(short["label"].view(4, 2), short["input_ids"][:, 3:5])


def test_a_padded_document_keeps_its_real_tokens_as_its_prompt():
    docs = [[2, 3], [4, 5, 6, 7, 8, 9, 10, 2, 3]]  # with eos: 3 and T + 1 real tokens
    data = pad("docs", docs, T, pad_id=0, eos_id=1, domain=torch.tensor([0, 1]))
    batch = data.__getitems__([0, 1])
    assert prompt_lengths(batch["mask"], 5).tolist() == [3, 5]
    assert prompt_lengths(torch.zeros(1, T, dtype=torch.bool), 5).tolist() == [1]
    out = OnPolicy(lambda_=1.0, prompt=5)(batch, net(tiny()), [])
    assert "domain" not in out  # a per-token extra is dropped
    assert out["mask"].int().argmax(1).tolist() == [2, 4] and out["mask"].sum(1).tolist() == [T - 2, T - 4]
    assert torch.equal(out["input_ids"][0, :3], torch.tensor([2, 3, 1]))


@pytest.mark.parametrize("temperature, top_p, expected", [
    (1.0, 1.0, [0.5, 0.3, 0.2]),
    (0.5, 1.0, [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]),  # p^(1 / T), renormalised
    (1.0, 0.6, [0.5 / 0.8, 0.3 / 0.8, 0.0]),  # mass before class 2 is 0.8 >= 0.6: outside the nucleus
])
def test_samples_follow_the_students_distribution(temperature, top_p, expected):
    z = torch.full((V,), -torch.inf)
    z[:3] = torch.tensor([0.5, 0.3, 0.2]).log()
    out = OnPolicy(lambda_=1.0, prompt=1, temperature=temperature, top_p=top_p)(blocks(256), net(Fixed(z)), [])
    assert len(out["label"]) == 256 * T
    freq = torch.bincount(out["label"], minlength=V).double() / len(out["label"])  # 2048 draws: sd <= 0.011
    assert torch.allclose(freq[:3], torch.tensor(expected, dtype=torch.double), atol=0.035)
    assert freq[3:].sum() == 0


def test_the_same_seed_and_step_give_the_same_sample_another_step_another():
    student, batch = net(tiny()), blocks()
    first, again = OnPolicy(lambda_=1.0, seed=3), OnPolicy(lambda_=1.0, seed=3)
    rng = torch.get_rng_state()
    a, b = first(batch, student, []), again(batch, student, [])
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is left alone
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["label"], b["label"])
    assert not torch.equal(first(batch, student, [])["label"], a["label"])  # step 1
    assert not torch.equal(OnPolicy(lambda_=1.0, seed=4)(batch, student, [])["label"], a["label"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_decode_from_the_cache_gives_the_logits_of_the_whole_prefix(family):
    torch.manual_seed(0)
    model = causal_lm(V, (T,), family=family, n_layer=2, n_embd=8, n_head=2).double().eval()
    ids = blocks(3)["input_ids"]
    with torch.no_grad():
        full = model(ids)  # [B, T, V]: position t from the prefix ids[:, :t + 1]
        logits, past = model.decode(ids[:, :3])
        steps = [logits]
        for t in range(3, T):
            logits, past = model.decode(ids[:, t:t + 1], past)
            steps.append(logits)
    assert torch.allclose(torch.stack(steps, 1), full[:, 2:], atol=1e-12)


@pytest.mark.parametrize("correct", [False, True])
def test_sampling_from_the_cache_draws_the_tokens_of_the_whole_prefix_loop(correct):
    student = net(tiny().double())
    teacher = [net(tiny(seed=1).double(), teacher=True)] if correct else []
    batch = blocks(16)
    batch["mask"][3, 5:] = False  # a padded row: its prompt is shorter, its sample starts earlier
    cached, full = (OnPolicy(lambda_=1.0, prompt=4, correct=correct, seed=2, kv_cache=c)(batch, student, teacher)
                    for c in (True, False))
    assert torch.equal(cached["input_ids"], full["input_ids"]) and torch.equal(cached["mask"], full["mask"])
    assert not torch.equal(cached["input_ids"], batch["input_ids"])  # something was sampled


def test_the_step_counter_survives_a_state_dict_round_trip():
    student, batch = net(tiny()), blocks()
    run = OnPolicy(lambda_=0.5, seed=1)
    for _ in range(3):
        run(batch, student, [])
    resumed = OnPolicy(lambda_=0.5, seed=1)
    resumed.load_state_dict(run.state_dict())
    assert int(resumed.step) == 3
    outs = [run(batch, student, []) for _ in range(4)], [resumed(batch, student, []) for _ in range(4)]
    for x, y in zip(*outs):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert any(o is not batch for o in outs[0]) and any(o is batch for o in outs[0])  # both kinds drawn
    module = Distiller(student, [], [Term("ce")], transforms=[resumed])
    assert int(module.state_dict()["transforms.0.step"]) == 7


def test_sampling_runs_in_eval_mode_without_gradient_and_restores_the_modes():
    s_model, t_model = Fixed(torch.zeros(V)), Fixed(torch.zeros(V))
    student, teacher = net(s_model), net(t_model)
    student.train(), teacher.train()
    s_model.drop.eval()  # a sub-module in its own mode stays in it
    OnPolicy(lambda_=1.0, correct=True)(blocks(), student, [teacher])
    assert s_model.calls and t_model.calls and all(call == (False, False) for call in s_model.calls + t_model.calls)
    assert student.training and s_model.training and not s_model.drop.training and teacher.training
    transform = OnPolicy(lambda_=1.0).eval()
    batch = blocks()
    assert transform(batch, student, []) is batch and int(transform.step) == 0


def departing(strength: torch.Tensor):
    """A teacher whose argmax is always token 0 (logit ``strength[t]`` at position ``t``) and a student
    that (practically) never samples it."""
    zt = torch.zeros(T, V)
    zt[:, 0] = strength
    zs = torch.zeros(V)
    zs[0] = -30.0
    return net(Fixed(zs)), net(Fixed(zt), teacher=True)


@pytest.mark.parametrize("pick, corrected", [("first", 3), ("divergent", 6)])
def test_the_correction_replaces_exactly_the_chosen_departing_token(pick, corrected):
    strength = torch.full((T,), 3.0)
    strength[5] = 8.0  # input position 5 predicts token 6: the largest KL(p_T || p_S)
    student, teacher = departing(strength)
    batch = blocks()
    plain = OnPolicy(lambda_=1.0, prompt=3)(batch, student, [teacher])
    assert (plain["label"] != 0).all()  # every sampled token departs
    out = OnPolicy(lambda_=1.0, prompt=3, correct=True, pick=pick)(batch, student, [teacher])
    assert torch.equal(out["mask"], plain["mask"])
    assert torch.equal(out["input_ids"][:, :corrected], plain["input_ids"][:, :corrected])  # before: the sample
    assert (out["input_ids"][:, corrected] == 0).all()
    for labels in per_row(out):  # targets 3..T: the teacher's token once, at the corrected one
        assert (labels == 0).nonzero()[:, 0].tolist() == [corrected - 3]


class Echo(nn.Module):
    """Repeats its input: position ``t`` predicts the token ``ids[t]`` (almost surely)."""

    def forward(self, ids):
        return 50.0 * nn.functional.one_hot(ids, V).float()


def test_the_student_continues_from_the_corrected_token():
    _, teacher = departing(torch.full((T,), 3.0))
    batch = blocks()
    batch["input_ids"] = 1 + batch["input_ids"] % (V - 1)  # no token 0 in the prompts
    out = OnPolicy(lambda_=1.0, prompt=3, correct=True, pick="first")(batch, net(Echo()), [teacher])
    assert torch.equal(out["input_ids"][:, :3], batch["input_ids"][:, :3])
    assert (out["input_ids"][:, 3:] == 0).all() and (out["label"] == 0).all()  # the echo of the teacher's 0


def test_a_sample_the_teacher_agrees_with_is_kept():
    z = torch.zeros(V)
    z[5] = 50.0
    student, teacher = net(Fixed(z)), net(Fixed(z), teacher=True)  # both always token 5
    batch = blocks()
    plain = OnPolicy(lambda_=1.0)(batch, student, [teacher])
    fixed = OnPolicy(lambda_=1.0, correct=True)(batch, student, [teacher])
    assert (plain["label"] == 5).all() and torch.equal(plain["input_ids"], fixed["input_ids"])


@pytest.mark.parametrize("correct", [False, True])
def test_a_distiller_with_the_transform_trains_one_step(correct):
    student, teacher = net(tiny(0)), net(tiny(1), teacher=True)
    module = Distiller(student, [teacher], [Term("fkl")], router=ConstantRouter(),
                       transforms=[OnPolicy(lambda_=1.0, correct=correct)])
    module.train()
    before = [p.detach().clone() for p in student.parameters()]
    losses = module(blocks())
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    losses["loss"].backward()
    opt.step()
    assert student.training and any(not torch.equal(p, q) for p, q in zip(student.parameters(), before))
    assert int(module.transforms[0].step) == 1


def test_refused_settings_are_one_line_errors():
    student, batch = net(tiny()), blocks()
    with pytest.raises(ValueError, match="on_policy.prompt=9 is longer than the blocks of 8"):
        OnPolicy(lambda_=1.0, prompt=9)(batch, student, [])
    with pytest.raises(ValueError, match="on_policy.correct: MGSR's correction needs a teacher"):
        OnPolicy(lambda_=1.0, correct=True)(batch, student, [])
    with pytest.raises(KeyError, match="on_policy.keep: the batch has no row"):
        OnPolicy(lambda_=1.0, keep=["row"])(batch, student, [])
    with pytest.raises(ValueError, match="on_policy.pick='best'; choose from: divergent, first"):
        OnPolicy(pick="best")
    other = Teacher(tiny(), ("other_ids",), tokens="mask")
    with pytest.raises(ValueError, match=r"teacher 0 does not read \['input_ids'\] alone"):
        OnPolicy(lambda_=1.0)(batch, student, [other])


def test_the_shipped_configs_build_the_transform():
    gkd = compose(["experiment=lm_shakespeare_gkd", "seed=7"])
    (transform,) = build_plugins(gkd, "transforms")
    assert isinstance(transform, OnPolicy) and not transform.correct
    assert (transform.lambda_, transform.seed, gkd.losses.gjsd.args.beta, gkd.teachers.lm.cache) == (0.5, 7, 0.5, False)
    mgsr = compose(["experiment=lm_shakespeare_mgsr"])
    (transform,) = build_plugins(mgsr, "transforms")
    assert transform.correct and transform.pick == "divergent" and transform.lambda_ == 0.5
    assert "dac_kl" in mgsr.losses and mgsr.losses.ce.weight == 0 and not mgsr.teachers.lm.cache
