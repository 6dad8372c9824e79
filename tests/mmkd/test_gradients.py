"""Backward rules (mmkd.gradients): the all-parameter projection against a naive reference, the
trainer calling a rule instead of loss.backward(), and the rule's config checks."""
import pytest
import torch
from torch import nn

from mmkd.data import TensorDictDataset
from mmkd.distiller import Distiller, Term
from mmkd.gradients import Align, BackwardRule, project_conflicting
from mmkd.net import Net
from mmkd.registry import GRADIENTS
from mmkd.trainer import Trainer


def backward_flat(loss, params):
    """Every parameter's gradient of ``loss`` by ``loss.backward()``, flattened by hand (zeros where unused)."""
    for p in params:
        p.grad = None
    loss.backward(retain_graph=True)
    flat = [float(v) for p in params for v in (p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()))]
    for p in params:
        p.grad = None
    return flat


def naive_align(primary, secondary, total, params):
    """Reference: the flattened gradients of the primary, secondary and total losses, the projection in
    scalar loops over every parameter entry, the rest of the total added unchanged."""
    g_p, g_s, g_t = (backward_flat(loss, params) for loss in (primary, secondary, total))
    g_r = [t - a - b for t, a, b in zip(g_t, g_p, g_s)]
    dot = sum(a * b for a, b in zip(g_p, g_s))
    norm = sum(a * a for a in g_p)
    if dot < 0:
        g_s = [b - dot / norm * a for a, b in zip(g_p, g_s)]
    return [a + b + r for a, b, r in zip(g_p, g_s, g_r)], dot


class TwoHeads(nn.Module):
    """A shared linear layer and two heads: the first loss reads head a, the second head b."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)


def losses_of(m, x, sign):
    h = m.shared(x)
    ce = m.a(h).pow(2).sum()
    kd = sign * 0.5 * ce + 0.01 * m.b(h).pow(2).sum()  # along (+) or against (-) ce, plus its own head b
    rest = 0.01 * sum(p.pow(2).sum() for p in m.parameters())
    return {"ce": ce, "kd": kd, "reg": rest, "loss": ce + kd + rest}


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_align_matches_the_naive_all_parameter_reference(sign):
    torch.manual_seed(0)
    m, x = TwoHeads().double(), torch.randn(5, 3, dtype=torch.float64)
    params = list(m.parameters())
    ref = losses_of(m, x, sign)
    want, dot = naive_align(ref["ce"], ref["kd"], ref["loss"], params)
    assert (dot < 0) == (sign < 0)  # the constructed cases: a conflict for sign -1, none for +1
    Align(["ce"], ["kd"]).backward(losses_of(m, x, sign), params)
    got = [float(v) for p in params for v in p.grad.reshape(-1)]
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)
    plain = backward_flat(losses_of(m, x, sign)["loss"], params)
    if dot >= 0:  # no conflict: exactly what loss.backward() gives
        assert got == pytest.approx(plain, rel=1e-10, abs=1e-12)
    else:  # conflict: different, and the projected secondary gradient is orthogonal to the primary one
        assert got != pytest.approx(plain, rel=1e-6)
        g_p, g_r = (backward_flat(losses_of(m, x, sign)[k], params) for k in ("ce", "reg"))
        g_s = [t - a - r for t, a, r in zip(got, g_p, g_r)]
        assert abs(sum(a * b for a, b in zip(g_p, g_s))) < 1e-9


def test_constructed_conflict_and_non_conflict():
    # one parameter vector w (2 entries): primary w.[1, 0], secondary w.[-1, 1]: <[-1,1],[1,0]> = -1 < 0
    w = nn.Parameter(torch.zeros(2))
    p, s = (w * torch.tensor([1.0, 0.0])).sum(), (w * torch.tensor([-1.0, 1.0])).sum()
    Align(["p"], ["s"]).backward({"p": p, "s": s, "loss": p + s}, [w])
    assert w.grad.tolist() == [1.0, 1.0]  # g_s -> [-1, 1] + 1 * [1, 0] = [0, 1]; plus g_p
    w.grad = None
    p, s = (w * torch.tensor([1.0, 0.0])).sum(), (w * torch.tensor([1.0, 1.0])).sum()
    Align(["p"], ["s"]).backward({"p": p, "s": s, "loss": p + s}, [w])
    assert w.grad.tolist() == [2.0, 1.0]  # no conflict: the plain sum
    assert project_conflicting(torch.tensor([2.0, 0.0]), torch.tensor([-1.0, 3.0])).tolist() == [0.0, 3.0]


def test_trainer_calls_the_rule_and_refuses_two(tmp_path):
    calls = []

    class Recording(BackwardRule):
        def backward(self, losses, params):
            calls.append(sorted(losses))
            losses["loss"].backward()

    torch.manual_seed(0)
    data = TensorDictDataset("t", x=torch.randn(20, 4), label=torch.randint(0, 3, (20,)))
    module = Distiller(Net(nn.Linear(4, 3), ["x"]), [], [Term("ce")])
    t = Trainer(max_epochs=1, batch_size=8, tensorboard=False, progress="off", run_dir=tmp_path)
    t.fit(module, data, data, callbacks=[Recording()])
    assert calls == [["ce", "loss"]] * 3  # 20 items in batches of 8: 3 steps
    with pytest.raises(ValueError, match="at most one"):
        t.fit(module, data, data, callbacks=[Recording(), Recording()])


def test_align_refuses_bad_arguments_and_unknown_losses():
    assert GRADIENTS["align"] is Align
    with pytest.raises(ValueError, match="primary and in secondary"):
        Align(["ce"], ["ce"])
    with pytest.raises(ValueError, match="at least one"):
        Align([], ["bkl"])
    w = nn.Parameter(torch.ones(1))
    with pytest.raises(ValueError, match="backward.args.secondary: the module returns no loss 'bkl'; it returns: ce"):
        Align().backward({"ce": w.sum(), "loss": w.sum()}, [w])


@pytest.mark.parametrize("override, expected", [
    ("backward={name: pcgrad}", "backward.name: unknown backward rule 'pcgrad'; choose from: align"),
    ("backward.args.secondary=[kd]", "backward.args.secondary: 'kd' is not a loss term; choose from: ce, bkl"),
    ("backward.args.primary=ce", None),  # one name as a string is accepted
    ("backward=null", None),
])
def test_config_checks_of_the_backward_rule(override, expected):
    from mmkd.build import build_plugins
    from mmkd.cli import compose
    from mmkd.config import ConfigError

    if expected is None:
        cfg = compose(["experiment=dhkd_digits", override])
        rules = [r for r in build_plugins(cfg, "callbacks") if isinstance(r, BackwardRule)]
        assert [r.primary for r in rules] == ([] if override == "backward=null" else [["ce"]])
        return
    with pytest.raises(ConfigError) as e:
        compose(["experiment=dhkd_digits", override])
    assert str(e.value).startswith(expected) and "\n" not in str(e.value)


def test_a_bad_rule_argument_is_one_line_at_build():
    from mmkd.build import build_plugins
    from mmkd.cli import compose
    from mmkd.config import ConfigError

    cfg = compose(["experiment=dhkd_digits", "backward.args.secondary=[ce]"])
    with pytest.raises(ConfigError, match=r"^backward.args: 'ce' is in primary and in secondary; give each loss "
                                          r"entry once$"):
        build_plugins(cfg, "callbacks")
