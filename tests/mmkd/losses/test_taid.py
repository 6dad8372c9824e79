"""TAID (mmkd.losses.adaptive.taid): the loss against a loop-based float64 reference and its limits (t = 0: the
student's own distribution, t = 1: KD), the stop-gradient on the student's side of the target, the
update of t against a transcription of the official rule, and the callback in fits (the t each step
uses, the state a resumed fit continues from)."""
import math

import pytest
import torch
from torch import nn

from mmkd import Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.callbacks import Callback
from mmkd.losses.kd import kd
from mmkd.losses.adaptive.taid import TAIDInterpolation, taid
from mmkd.registry import CALLBACKS, LOSSES
from mmkd.routers import ConstantRouter
from tests.reference import Crash, CrashAtEpoch


def make(b, c, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g, dtype=dtype) * 2, torch.randn(b, c, generator=g, dtype=dtype) * 2


# ---------------------------------------------------------------- naive reference (python loops)
def softmax(row, T=1.0):
    m = max(row)
    e = [math.exp((x - m) / T) for x in row]
    z = sum(e)
    return [v / z for v in e]


def ref_taid(S, Z, t, T=1.0, kl=False):
    out = []
    for s, z in zip(S.tolist(), Z.tolist()):
        p = softmax([(1 - t) * a + t * b for a, b in zip(s, z)], T)
        q = softmax(s, T)
        value = -sum(pi * math.log(qi) for pi, qi in zip(p, q))
        if kl:
            value += sum(pi * math.log(pi) for pi in p if pi > 0)
        out.append(value * T**2)
    return torch.tensor(out, dtype=torch.float64)


# ---------------------------------------------------------------- the loss
def test_registered_with_its_ranges():
    assert LOSSES["taid"] is taid and CALLBACKS["taid"] is TAIDInterpolation
    meta = LOSSES.meta("taid")
    assert meta["teacher"] and meta["per_sample"] and not meta["batch"]
    assert set(meta["ranges"]) == {"t", "temperature"}


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.7, 1.0])
def test_matches_the_naive_reference(t, T, kl):
    s, z = make(6, 5, seed=1)
    want = ref_taid(s, z, t, T, kl)
    got = taid(s, z, t=t, temperature=T, kl=kl, reduction="none")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(taid(s, z, t=t, temperature=T, kl=kl), want.mean(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(taid(s, z, t=t, temperature=T, kl=kl, reduction="sum"), want.sum(),
                               rtol=1e-10, atol=1e-12)
    # t as a 0-d tensor (what the callback gives) is the same
    torch.testing.assert_close(taid(s, z, t=torch.tensor(t), temperature=T, kl=kl, reduction="none"), got)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_t1_is_kd_to_the_teacher(T):
    """At t = 1 the target is the teacher's softmax(z_t / T): the KL form is KD (both carry T^2), the
    official cross-entropy form is KD plus T^2 times the teacher's entropy."""
    s, z = make(7, 6, seed=2)
    torch.testing.assert_close(taid(s, z, t=1.0, temperature=T, kl=True, reduction="none"),
                               kd(s, z, temperature=T, reduction="none"), rtol=1e-10, atol=1e-12)
    p = torch.softmax(z / T, 1)
    entropy = -(p * p.log()).sum(1)
    torch.testing.assert_close(taid(s, z, t=1.0, temperature=T, reduction="none"),
                               kd(s, z, temperature=T, reduction="none") + T**2 * entropy, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_t0_targets_the_student_itself(T):
    """At t = 0 the target is the detached student distribution: KL 0, cross-entropy the student's own
    entropy, and no gradient either way."""
    s, z = make(5, 4, seed=3)
    q = torch.softmax(s / T, 1)
    for kl, want in [(True, torch.zeros(5, dtype=torch.float64)), (False, -T**2 * (q * q.log()).sum(1))]:
        x = s.clone().requires_grad_()
        value = taid(x, z, t=0.0, temperature=T, kl=kl, reduction="none")
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)
        value.sum().backward()
        torch.testing.assert_close(x.grad, torch.zeros_like(s), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kl", [False, True])
@pytest.mark.parametrize("t", [0.2, 0.6])
def test_gradient_flows_only_through_the_student_side(t, kl):
    """The student's part of the target is detached: the gradient equals that of the same loss towards
    a fixed target (taid at t = 1 with the interpolated logits as the 'teacher'), T (q_s - p_t) / N."""
    T, n = 2.0, 6
    s, z = make(n, 5, seed=4)
    x = s.clone().requires_grad_()
    taid(x, z, t=t, temperature=T, kl=kl).backward()
    fixed = (1 - t) * s + t * z
    y = s.clone().requires_grad_()
    taid(y, fixed, t=1.0, temperature=T, kl=kl).backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    closed = T * (torch.softmax(s / T, 1) - torch.softmax(fixed / T, 1)) / n
    torch.testing.assert_close(x.grad, closed, rtol=1e-10, atol=1e-12)


def test_gradcheck_float64():
    s, z = make(4, 5, seed=5)
    fixed = (0.6 * s + 0.4 * z).detach()
    for kl in (False, True):
        # the student's side against a fixed target, and the teacher's side of the interpolation
        assert torch.autograd.gradcheck(lambda x: taid(x, fixed, t=1.0, temperature=1.5, kl=kl),
                                        (s.clone().requires_grad_(),))
        assert torch.autograd.gradcheck(lambda w: taid(s, w, t=0.4, temperature=1.5, kl=kl, reduction="none"),
                                        (z.clone().requires_grad_(),))


def test_infinite_logits_are_left_out():
    """A class masked out with -inf logits (a padded vocabulary) adds nothing, as in the official code."""
    s, z = make(3, 5, seed=6)
    s_inf, z_inf = s.clone(), z.clone()
    s_inf[:, 4], z_inf[:, 4] = -math.inf, -math.inf
    for kl in (False, True):
        x = s_inf.clone().requires_grad_()
        got = taid(x, z_inf, t=0.5, kl=kl, reduction="none")
        torch.testing.assert_close(got, taid(s[:, :4], z[:, :4], t=0.5, kl=kl, reduction="none"))
        got.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_without_t_it_says_what_sets_it():
    s, z = make(2, 3)
    with pytest.raises(ValueError, match=r"t is not set; add the callback .*\{name: taid\}"):
        taid(s, z)


# ---------------------------------------------------------------- the update of t
class Official(nn.Module):
    """The official update (SakanaAI/TAID, src/distil_losses/taid.py, TAID.update_t), as written there."""

    def __init__(self, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, disable_adaptive=False):
        super().__init__()
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.disable_adaptive = disable_adaptive
        self.register_buffer("t", torch.tensor(t_start, dtype=torch.float32))
        self.register_buffer("prev_loss", torch.tensor(float("inf"), dtype=torch.float32))
        self.register_buffer("momentum", torch.zeros([], dtype=torch.float32))

    def update_t(self, loss, global_step, num_train_steps):
        if torch.isinf(self.prev_loss):
            self.prev_loss = loss
            return
        relative_change = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * relative_change
        adaptive_delta = torch.sigmoid(self.momentum)
        progress = global_step / num_train_steps
        t_target = self.t_start + (self.t_end - self.t_start) * progress
        delta_t = self.alpha * adaptive_delta * (1 - self.t)
        t = min(self.t_end, max(t_target, self.t + delta_t)) if not self.disable_adaptive else t_target
        if not isinstance(t, torch.Tensor):
            t = torch.tensor(t, device=self.t.device, dtype=self.t.dtype)
        self.t = t
        self.prev_loss = loss
        return delta_t


def losses_sequence(n, seed, kind="noisy"):
    g = torch.Generator().manual_seed(seed)
    if kind == "noisy":  # a decreasing loss with noise: steps up and down
        base = torch.linspace(3.0, 0.5, n, dtype=torch.float64)
        return (base * torch.exp(0.3 * torch.randn(n, generator=g, dtype=torch.float64))).float()
    return (torch.rand(n, generator=g) * 5).float()  # unrelated losses from step to step


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("hp", [{}, {"t_start": 0.1, "alpha": 0.3, "beta": 0.9},
                                {"t_start": 0.0, "t_end": 0.8, "alpha": 1.0}, {"disable_adaptive": True}])
@pytest.mark.parametrize("kind", ["noisy", "random"])
def test_update_matches_the_official_rule(hp, kind):
    steps = 60
    ours = TAIDInterpolation(**{"adaptive": not hp.get("disable_adaptive", False),
                                **{k: v for k, v in hp.items() if k != "disable_adaptive"}})
    ref = Official(**hp)
    for k, loss in enumerate(losses_sequence(steps, seed=7, kind=kind)):
        ref.update_t(loss.clone(), global_step=k, num_train_steps=steps)
        ours.update(loss.clone(), k / steps)
        same(ours.t, ref.t)
        same(ours.momentum, ref.momentum)
        same(ours.prev_loss, ref.prev_loss)


def test_first_step_only_records_and_non_finite_losses_follow_the_official_rule():
    """The first update records the loss; a NaN loss turns the momentum NaN, after which t follows the
    linear floor (Python's max keeps the target); an infinite loss makes the next step a first again."""
    ours = TAIDInterpolation(t_start=0.2, alpha=0.5)
    ours.update(torch.tensor(2.0), 0.0)
    assert float(ours.t) == pytest.approx(0.2) and float(ours.momentum) == 0 and float(ours.prev_loss) == 2.0
    for values in ([2.0, 1.5, math.inf, 1.0, 0.9, 0.8], [2.0, 1.5, math.nan, 1.0, 0.9, 0.8]):
        ours, ref = TAIDInterpolation(t_start=0.2, alpha=0.5), Official(t_start=0.2, alpha=0.5)
        for k, v in enumerate(values):
            loss = torch.tensor(v, dtype=torch.float32)
            ref.update_t(loss.clone(), k, 10)
            ours.update(loss.clone(), k / 10)
            same(ours.t, ref.t)
            same(ours.momentum, ref.momentum)
            same(ours.prev_loss, ref.prev_loss)
    assert math.isnan(float(ours.momentum)) and float(ours.t) == pytest.approx(0.2 + 0.8 * 5 / 10)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [5e-4, 0.05, 1.0])
def test_t_stays_between_the_linear_floor_and_t_end(seed, alpha):
    steps, t_start, t_end = 80, 0.3, 0.9
    cb = TAIDInterpolation(t_start=t_start, t_end=t_end, alpha=alpha)
    before = float(cb.t)
    for k, loss in enumerate(losses_sequence(steps, seed, kind="random" if seed % 2 else "noisy")):
        cb.update(loss, k / steps)
        t = float(cb.t)
        floor = float(torch.tensor(t_start + (t_end - t_start) * k / steps, dtype=torch.float32))
        assert floor <= t <= float(torch.tensor(t_end, dtype=torch.float32)) and t >= before
        before = t


def test_bad_arguments_are_refused():
    for kw, msg in [({"t_start": 1.0}, "t_start=1.0; it must be in \\[0, 1\\)"), ({"t_end": 0.0}, "t_end=0.0"),
                    ({"alpha": 2.0}, "alpha=2.0"), ({"beta": -0.1}, "beta=-0.1")]:
        with pytest.raises(ValueError, match=msg):
            TAIDInterpolation(**kw)


# ---------------------------------------------------------------- in a fit
D, C, N, BATCH = 4, 3, 24, 8  # 3 steps per epoch


def data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDictDataset(f"d{seed}", x=torch.randn(N, D, generator=g), label=torch.randint(0, C, (N,), generator=g))


def module(seed=0, weight=1.0, name="taid"):
    torch.manual_seed(seed)
    teacher = Teacher(nn.Linear(D, C), ("x",))
    return Distiller(Net(nn.Linear(D, C), ("x",)), [teacher], [Term("ce"), Term("taid", weight, name=name)],
                     router=ConstantRouter())


def trainer(run_dir, **kw):
    return Trainer(run_dir=run_dir, **{"max_epochs": 4, "batch_size": BATCH, "lr": 0.05, "tensorboard": False,
                                       "progress": "off", "device": "cpu", **kw})


class Seen(Callback):
    """What each step used: the term's t (set just before), its loss value and the step."""

    def __init__(self, term="taid"):
        self.term, self.t, self.losses, self.steps = term, [], [], []

    def on_step_start(self, trainer, module, batch):
        (term,) = [t for t in module.terms if t.name == self.term]
        self.t.append(float(term.args["t"]))
        self.steps.append(trainer.global_step)

    def on_step_end(self, trainer, module, losses):
        self.losses.append(losses[self.term].detach().clone())


HP = {"t_start": 0.1, "alpha": 0.3, "beta": 0.9}  # t moves by the adaptive step, above the linear floor


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_each_step_uses_the_t_of_the_previous_update(tmp_path, weight):
    """Replaying the official rule over the fit's own losses (divided by the term weight) gives the t
    every step used: step k sees the t updated after step k - 1, at progress (k - 1) / max_steps."""
    cb, seen = TAIDInterpolation(**HP), Seen()
    res = trainer(tmp_path).fit(module(weight=weight), data(), data(1), callbacks=[cb, seen])
    steps = 4 * (N // BATCH)
    assert seen.steps == list(range(steps))
    ref, want = Official(**HP), []
    for k, loss in enumerate(seen.losses):
        want.append(float(ref.t))
        ref.update_t(loss / weight if weight != 1 else loss, k, steps)
    assert seen.t == want
    assert [row["taid/t"] for row in res.history] == want[3::3] + [float(ref.t)]
    floor = [HP["t_start"] + (1 - HP["t_start"]) * k / steps for k in range(steps)]
    assert any(t > f + 1e-3 for t, f in zip(seen.t[2:], floor[1:]))  # the adaptive step, not the floor alone


def test_a_missing_term_is_one_line(tmp_path):
    with pytest.raises(ValueError, match=r"^callback taid: the Distiller has no loss term 'taid'; its terms are: "
                                         r"ce, kd_like \(set args.term\)$"):
        trainer(tmp_path).fit(module(name="kd_like"), data(), data(1), callbacks=[TAIDInterpolation()])
    cb = TAIDInterpolation(term="kd_like", **HP)  # a term of another name is driven when named
    trainer(tmp_path / "named", max_epochs=1).fit(module(name="kd_like"), data(), data(1), callbacks=[cb])
    assert float(cb.t) > HP["t_start"]


def test_resume_continues_exactly(tmp_path):
    """4 epochs straight and 2 epochs + a resume to 4: the same t at every step, the same weights."""
    full_mod, full_seen = module(), Seen()
    full = trainer(tmp_path / "full").fit(full_mod, data(), data(1), callbacks=[TAIDInterpolation(**HP), full_seen])
    cut_seen = Seen()
    with pytest.raises(Crash):
        trainer(tmp_path / "cut").fit(module(), data(), data(1),
                                      callbacks=[TAIDInterpolation(**HP), cut_seen, CrashAtEpoch(2)])
    fresh, resumed_seen = module(seed=123), Seen()
    res = trainer(tmp_path / "cut", resume=True).fit(fresh, data(), data(1),
                                                     callbacks=[TAIDInterpolation(**HP), resumed_seen])
    assert cut_seen.t + resumed_seen.t == full_seen.t and len(full_seen.t) == 12
    assert resumed_seen.steps == list(range(6, 12))
    assert [row["taid/t"] for row in res.history] == [row["taid/t"] for row in full.history]
    last_full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    last_cut = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    for k, v in last_full["model"].items():
        assert torch.equal(v, last_cut["model"][k]), k
    assert last_full["callbacks"]["TAIDInterpolation"].keys() == {"t", "momentum", "prev_loss"}
    for k, v in last_full["callbacks"]["TAIDInterpolation"].items():
        assert torch.equal(v, last_cut["callbacks"]["TAIDInterpolation"][k]), k
    for k, v in full_mod.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k


def _rank(rank, port, out):
    import torch.distributed as dist
    from types import SimpleNamespace

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cb, mod = TAIDInterpolation(**HP), module()
        trainer = SimpleNamespace(global_step=0, max_steps=10)
        cb.on_fit_start(trainer, mod)
        for k in range(4):
            trainer.global_step = k
            cb.on_step_start(trainer, mod, None)
            mine = torch.tensor(2.0 - 0.3 * k + rank)  # each process its own loss
            cb.on_step_end(trainer, mod, {"taid": mine})
            assert torch.equal(mine, torch.tensor(2.0 - 0.3 * k + rank))  # the step's own value is kept
        out.put((rank, [float(v) for v in (cb.t, cb.momentum, cb.prev_loss)]))
    finally:
        dist.destroy_process_group()


def test_under_ddp_every_process_follows_rank_0():
    import multiprocessing
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    states = dict(out.get(timeout=5) for _ in procs)
    ref = TAIDInterpolation(**HP)
    for k in range(4):
        ref.update(torch.tensor(2.0 - 0.3 * k), k / 10)
    assert states[0] == states[1] == [float(v) for v in (ref.t, ref.momentum, ref.prev_loss)]


# ---------------------------------------------------------------- configs
def test_config_builds_the_callback_for_the_students_fit():
    from mmkd.build import build_plugins
    from mmkd.cli import compose

    cfg = compose(["losses.taid={weight: 1.0}", "callbacks=[{name: taid, args: {alpha: 0.01, t_start: 0.2}}]"])
    (cb,) = build_plugins(cfg, "callbacks")
    assert isinstance(cb, TAIDInterpolation) and (cb.term, cb.alpha, cb.t_start, cb.t_end) == ("taid", 0.01, 0.2, 1.0)
    assert "taid" in cfg.losses


@pytest.mark.parametrize("override, expected", [
    ("callbacks=[{name: taid, args: {term: nope}}]",
     "callbacks[0].args.term: 'nope' is not a loss term; choose from: "),
    ("callbacks=[{name: taid, args: {alpha: 2.0}}]", "callbacks[0].args.alpha=2.0; it must be a number in [0, 1]"),
    ("losses.taid={args: {t: 1.5}}", "losses.taid.args.t=1.5; it must be a number in [0, 1]"),
])
def test_config_checks(override, expected):
    from mmkd.cli import compose
    from mmkd.config import ConfigError

    with pytest.raises(ConfigError) as e:
        compose(["losses={ce: {weight: 1.0}, taid: {weight: 1.0}}", override])
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)
