"""Bad input, table-driven: every case exits with code 2, prints exactly one line on stderr, and
leaves nothing in the run directory (or anywhere under ``out_dir``). Numeric config values are
checked against their declared ranges with hypothesis."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmkd.cli import compose, main
from mmkd.config import ConfigError

FAST = ["trainer.max_epochs=1", "teachers.cnn.epochs=1", "trainer.tensorboard=false", "trainer.progress=off",
        "baseline=false", "export=[]"]

CASES = [
    # names, keys and types
    ("foo=1", "foo: unknown config key; valid keys: experiment, seed"),
    ("trainer.foo=1", "trainer.foo: unknown config key; valid keys under trainer: max_epochs"),
    ("+foo=1", "+foo: unknown config key; valid keys: experiment, seed"),
    ("+trainer.foo=1", "+trainer.foo: unknown config key; valid keys under trainer: max_epochs"),
    ("teachers.cnn.foo=1", "teachers.cnn.foo: unknown config key; valid keys under teachers.cnn: name"),
    ("trainer.max_epochs=abc", "trainer.max_epochs: expected integer, got 'abc'"),
    ("trainer.lr=fast", "trainer.lr: expected float, got 'fast'"),
    ("trainer.batch_size=1e20", "trainer.batch_size: expected integer, got '1e+20'"),
    ("trainer.seed=3", "trainer.seed: unknown config key; valid keys under trainer: max_epochs"),
    ("experiment=nope", "experiment: unknown experiment 'nope'; choose from: "),
    ("experiment=g2m_glnn experiment=quickstart", "experiment: given twice ('experiment=g2m_glnn' and "),
    # your own configs (tests/mmkd/test_user_configs.py has the cases that need files)
    ("experiment=missing.yaml", "experiment: no such file 'missing.yaml'"),
    ("experiment=/no/such/folder/my.yaml", "experiment: no such file '/no/such/folder/my.yaml'"),
    ("--config-dir nodir experiment=quickstart", "--config-dir: no such folder 'nodir'"),
    ("-cd a --config-dir=b", "--config-dir: given 2 times ('a', 'b'); give one folder"),
    ("name=a/b", "name='a/b': give a folder name of at most 128 letters, digits, '.', '_' and '-'"),
    ("name=..", "name='..': give a folder name"),
    ("teachers.extra.epochs=1", "teachers.extra.name: missing; give it a value (teachers.extra.name=...)"),
    ("student=3", "student=3: student is a config group; give the name of one of its configs ("),
    ("losses.kd.loss=kdd", "losses.kd.loss: unknown loss 'kdd'; choose from: "),
    ("student.name=zzz", "student.name: unknown model 'zzz'; choose from: "),
    ("teachers.cnn.name=zzz", "teachers.cnn.name: unknown model 'zzz'; choose from:"),
    ("teachers.cnn.trainer.foo=1", "teachers.cnn.trainer.foo: not a trainer setting; choose from: max_epochs, batch_size"),
    ("teachers.cnn.trainer.patience=0", "teachers.cnn.trainer.patience=0; it must be at least 1"),
    ("data.name=zzz", "data.name: unknown dataset 'zzz'; choose from: "),
    ("router.name=zzz", "router.name: unknown router 'zzz'; choose from:"),
    ("export=[pdf]", "export: unknown format 'pdf'; choose from: onnx, pt2, torchscript"),
    ("student.args.bogus=1", "student.args: MLP.__init__() got an unexpected keyword argument 'bogus'"),
    ("student.inputs=[audio]", "student.inputs: ['audio'] are not all inputs of the data set; choose from: image"),
    ("teachers.cnn.checkpoint=missing.pt", "teachers.cnn.checkpoint: no such file 'missing.pt'"),
    ("data.args.bogus=1", "data.args: got an unexpected keyword argument 'bogus' (data set 'digits' takes: "),
    # structure of the overrides
    ("teachers.cnn=null", "teachers.cnn: null; to drop it, delete it with ~teachers.cnn"),
    ("~trainer", "~trainer: only entries of teachers, losses, method, data.args, student.args, router.args can be"),
    ("~teachers", "~teachers: only entries of teachers, losses"),
    ("teachers={}", "teachers={}: an override merges into the experiment's teachers (cnn) and removes nothing; "
                    "delete entries with ~teachers.cnn"),
    ("losses={}", "losses={}: an override merges into the experiment's losses (ce, kd) and removes nothing"),
    ("data_root=/tmp/donn\u00e9es", "'data_root=/tmp/donn\u00e9es': values with non-ASCII characters must be quoted: "
                                    "data_root=\"/tmp/donn\u00e9es\""),
    ("trainer.max_epochs=", "trainer.max_epochs: expected integer"),
    # the trainer's settings
    ("trainer.optimizer=foo", "trainer.optimizer='foo'; choose from: adamw, adam, sgd"),
    ("trainer.scheduler=x", "trainer.scheduler='x'; choose from: cosine, linear, step, none"),
    ("trainer.mode=x", "trainer.mode='x'; choose from: max, min"),
    ("trainer.precision=fp16", "trainer.precision='fp16'; choose from: auto, bf16, fp32"),
    ("trainer.progress=foo", "trainer.progress='foo'; choose from: auto, on, off"),
    ("trainer.device=gpu", "trainer.device='gpu'; choose from: auto, cpu, cuda, cuda:N"),
    ("trainer.batch_size=0", "trainer.batch_size=0; it must be at least 1"),
    ("trainer.lr=0", "trainer.lr=0.0; it must be a positive finite number"),
    ("trainer.lr=inf", "trainer.lr=inf; it must be a positive finite number"),
    ("trainer.gamma=-1", "trainer.gamma=-1.0; it must be a positive finite number"),
    ("trainer.weight_decay=nan", "trainer.weight_decay=nan; give a finite number"),
    ("trainer.monitor=val/zz", "trainer.monitor='val/zz'; choose from: auto, train/loss, val/acc, val/agree, val/auroc, "
                               "val/f1, val/loss, val/ppl, val/tkl, val/top5 (a val/ metric joins trainer.metrics)"),
    ("trainer.metrics=[acc,f2]", "trainer.metrics: unknown metric 'f2'; choose from: acc, agree, auroc, f1, loss, ppl, tkl, top5"),
    # batch transforms, data policies, callbacks
    ("transforms=[{name:mixupp}]", "transforms[0].name: unknown batch transform 'mixupp'; choose from: cutmix, hard, mixdist, mixup"),
    ("transforms=[{name:cutmix,args:{mode:swap}}]", "transforms[0].args: cutmix.mode='swap'; choose from: append, replace"),
    ("transforms=[{name:mixup,args:{alpha:-1}}]", "transforms[0].args.alpha=-1; it must be a number > 0"),
    ("transforms=[{name:mixup,args:{beta:1}}]", "transforms[0].args: Mixup.__init__() got an unexpected keyword argument 'beta'"),
    ("policies=[{name:hardest,args:{fraction:2}}]", "policies[0].args.fraction=2; it must be a number in (0, 1]"),
    ("pipeline=mst_stage1 callbacks=[{name:grad_norm}]",
     "callbacks[0]: transforms, policies and callbacks apply to the distill pipeline's student stage"),
    ("callbacks=[{name:nope}]", "callbacks[0].name: unknown callback 'nope'; choose from: forgetting, golden, grad_norm"),
    ("callbacks=[{name:forgetting,args:{batch_size:0}}]", "callbacks[0].args.batch_size=0; it must be an integer >= 1"),
    # data pruning
    ("policies=[{name:prune,args:{scores:/nonexistent.npy}}]",
     "policies[0].args: scores: no such file '/nonexistent.npy'; give a forgetting_scores.npy or el2n_scores.npy"),
    ("policies=[{name:prune,args:{scores:/x.npy,fraction:0}}]", "policies[0].args.fraction=0; it must be a number in (0, 1]"),
    ("policies=[{name:prune,args:{scores:/x.npy,keep:middle}}]", "policies[0].args: keep='middle'; choose from: hard, easy"),
    ("policies=[{name:el2n,args:{runs:[/nonexistent]}}]",
     "policies[0].args: runs: '/nonexistent' has no config.yaml; give the directory of a finished run"),
    ("seed=99999999999999999999999", "seed=99999999999999999999999; it must be an integer in [0, 9223372036854775807]"),
    ("seed=-1", "seed=-1; it must be an integer in [0, "),
    # what the owners of values declare
    ("student.args.hidden=[-5]", "student.args.hidden=[-5]; each element must be an integer >= 1"),
    ("student.args.dropout=1.5", "student.args.dropout=1.5; it must be a number in [0, 1)"),
    ("teachers.cnn.args.channels=[]", "teachers.cnn.args.channels=[]; give a non-empty list, each an integer >= 1"),
    ("teachers.cnn.args.dropout=-0.1", "teachers.cnn.args.dropout=-0.1; it must be a number in [0, 1)"),
    ("teachers.cnn.epochs=-1", "teachers.cnn.epochs=-1; give a whole number of epochs >= 0"),
    ("teachers.cnn.lr=-1", "teachers.cnn.lr=-1.0; it must be a positive finite number"),
    ("data.args.fractions=[1,0,0]", "data.args.fractions=[1, 0, 0]; each element must be a number in (0, 1]"),
    ("data.args.fractions=[0.5,0.2,0.2]", "data.args.fractions=[0.5, 0.2, 0.2]; the fractions must sum to 1"),
    ("data.args.split_seed=1.5", "data.args.split_seed=1.5; it must be an integer in [0, "),
    ("losses.ce.args.label_smoothing=2", "losses.ce.args.label_smoothing=2; it must be a number in [0, 1]"),
    ("losses.kd.args.temperature=-1", "losses.kd.args.temperature=-1; it must be a number >= 0.01"),
    ("losses.kd.args.temperature=1e-9", "losses.kd.args.temperature=1e-09; it must be a number >= 0.01"),
    ("losses.kd.args.temperature={schedule:linear,start:4,end:0}",
     "losses.kd.args.temperature={schedule: linear, start: 4, end: 0}; it must be a number >= 0.01"),
    ("losses.kd.weight=-1", "losses.kd.weight=-1; it must be a finite number >= 0"),
    ("losses.kd.weight={schedule:step,every:10,gamma:0.5,start:-1}",
     "losses.kd.weight={schedule: step, every: 10, gamma: 0.5, start: -1}; it must be a finite number >= 0"),
    ("losses.kd.weight={schedule:warmup,epochs:0}", "losses.kd.weight: warmup epochs=0; give a whole number >= 1"),
    ("losses.kd.weight={schedule:step,every:10,gamma:2}",
     "losses.kd.weight={schedule: step, every: 10, gamma: 2, start: 1}; it must be a finite number >= 0"),
    ("losses.kd.weight=inf", "losses.kd.weight=inf; it must be a finite number >= 0"),
    ("experiment=dhkd_digits backward.args.primary=[cee]",
     "backward.args.primary: 'cee' is not a loss term; choose from: ce, bkl"),
    ("experiment=dho_digits data.args.batches=pairs", "data.args: batches='pairs'; choose from: mixed, paired"),
    ("experiment=dhkd_digits student.args.aux_head=deep",
     "student.args: dual_head.aux_head='deep'; choose from: linear, nonlinear"),
    ("experiment=dho_digits student.args.search=never", "student.args: dual_head.search='never'; choose from: epoch, end"),
    ("losses.kd.args.temperatur=2", "losses.kd.args.temperatur: loss 'kd' has no argument 'temperatur'; it takes: temperature"),
    ("losses.kd.args.temperature=abc", "losses.kd.args.temperature: expected a number, got 'abc'"),
    ("losses.kd.weight=abc", "losses.kd.weight='abc'; give a number or a schedule such as {schedule: warmup, epochs: 20}"),
    ("losses.kd.colour=red", "losses.kd.colour: unknown config key; valid keys under losses.kd: loss, weight"),
    ("losses.kd.adapter=warp", "losses.kd.adapter: unknown adapter 'warp'; choose from: linear, conv, token"),
    ("losses.extra.loss=nope", "losses.extra.loss: unknown loss 'nope'"),
    ("teachers.cnn.losses.extra.loss=nope", "teachers.cnn.losses.extra.loss: unknown loss 'nope'"),
    ("teachers.cnn.losses.kd.weight=1", "teachers.cnn.losses.kd: loss 'kd' reads a teacher; a teacher trains on"),
    ("teachers.cnn.losses.mcmi.weight=inf", "teachers.cnn.losses.mcmi.weight=inf; it must be a finite number"),
    ("teachers.cnn.callbacks=[{name:mcmi_centroids,args:{term:kd}}]",
     "teachers.cnn.callbacks[0].args.term: 'kd' is not a loss term; choose from: ce"),
    ("pipeline=mst_stage1 teachers.cnn.losses.ce.weight=1",
     "teachers.cnn.losses: a teacher's losses and callbacks apply to the distill pipeline's teacher stages"),
    ("losses.kd.args.temperature={schedule:exp,start:4,end:1}",
     "losses.kd.args.temperature: unknown schedule 'exp'; choose from: cosine, linear, warmup, step"),
    ("losses.kd.args.temperature={schedule:step,start:4,end:1}",
     "losses.kd.args.temperature: a step schedule takes the keys every, gamma, [start]; unknown: end"),
    ("losses.kd.student=feat", "losses.kd.student: 'feat'; give logits, features (all of them) or features.<module path>"),
    ("losses.kd.student=features", "losses.kd.student: features (all of them), but student.features is empty; list them there"),
    ("losses.kd.student=features.body", "losses.kd.student: 'body' is not among student.features []; list it there"),
    ("teachers.cnn.features=[body]", "teachers.cnn.features: cnn has no sub-module 'body'; its modules: features, "),
    ("router.args.weights=[1,2]", "router.args: 2 router weights for 1 teachers; give one per teacher"),
    ("router.args.weights=[nan]", "router.args.weights=[nan]; give finite numbers"),
    # resume
    ("resume=true", "resume=true: "),
]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


@pytest.mark.parametrize("override, expected", CASES)
def test_refused_in_one_line_with_exit_code_2_and_nothing_written(capsys, tmp_path, override, expected):
    out = tmp_path / "runs"
    code, stdout, err = run_cli(capsys, "run", *FAST, *override.split(), f"out_dir={out}")
    assert code == 2, err
    assert err.startswith("mmkd: error: " + expected), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert stdout == ""
    assert files(out) == set(), f"{override} left {files(out)}"
    if expected.endswith(("choose from: ", "choose from:")):  # a registry's names are listed, the core's among them
        choices = err.strip().split("choose from: ")[1].split(", ")
        assert {"mlp", "digits", "kd", "constant", "quickstart", "onnx", "image"} & set(choices)


@pytest.mark.parametrize("make, key, expected", [
    (lambda d: (d / "f").write_text("x"), "run_dir=f", "run_dir: 'f' is a file; give a directory"),
    (lambda d: (d / "f").write_text("x"), "run_dir=f/run",
     "run_dir: cannot write 'f/run': 'f' is a file, not a folder; give a path in a writable folder"),
    (lambda d: (d / "f").write_text("x"), "cache_dir=f", "cache_dir: 'f' is a file; give a directory"),
    (lambda d: (d / "w.pt").write_text("not a checkpoint\n"), "teachers.cnn.checkpoint=w.pt",
     "w.pt: cannot read"),
])
def test_paths_and_files(capsys, tmp_path, make, key, expected):
    make(tmp_path)
    before = files(tmp_path)
    code, _, err = run_cli(capsys, "run", *FAST, f"out_dir={tmp_path / 'runs'}", "run_dir=r", key)
    assert code == 2 and err.startswith("mmkd: error: " + expected), err
    assert err.count("\n") == 1
    assert files(tmp_path) == before


def test_unwritable_run_dir(capsys):
    """A folder where no file can be created (sysfs, which stops root too) is refused before anything
    is written."""
    run_dir = Path("/sys/mmkd-run")
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    code, _, err = run_cli(capsys, "run", *FAST, f"run_dir={run_dir}")
    assert code == 2 and err.startswith(f"mmkd: error: run_dir: cannot write '{run_dir}' into '/sys' ("), err
    assert err.endswith("); give a path in a writable folder\n") and err.count("\n") == 1
    assert not run_dir.exists()


def test_an_error_inside_the_pipeline_leaves_no_run_directory(capsys, tmp_path):
    """Model arguments a factory itself rejects are found after the run directory is claimed: the
    directories the claim created are removed again."""
    code, _, err = run_cli(capsys, "run", *FAST, "student.args.bogus=1", f"run_dir={tmp_path / 'a' / 'b'}")
    assert code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- numeric values against their ranges
BASE = ["trainer.max_epochs=1"]


def accepted(*overrides: str) -> bool:
    try:
        compose([*BASE, *overrides])
    except ConfigError as e:
        assert "\n" not in str(e)
        return False
    return True


numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6))
fast = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@fast
@given(numbers)
def test_lr(v):
    assert accepted(f"trainer.lr={v!r}") == (math.isfinite(v) and v > 0)


@fast
@given(numbers)
def test_gamma(v):
    assert accepted(f"trainer.gamma={v!r}") == (math.isfinite(v) and v > 0)


@fast
@given(numbers)
def test_kd_temperature(v):
    assert accepted(f"losses.kd.args.temperature={v!r}") == (math.isfinite(v) and v >= 0.01)


@fast
@given(numbers)
def test_term_weight(v):
    assert accepted(f"losses.kd.weight={v!r}") == (math.isfinite(v) and v >= 0)


@fast
@given(numbers)
def test_dropout(v):
    assert accepted(f"student.args.dropout={v!r}") == (math.isfinite(v) and 0 <= v < 1)


@fast
@given(st.lists(st.integers(-4, 300), max_size=3))
def test_hidden_widths(widths):
    assert accepted(f"student.args.hidden={widths}") == (len(widths) > 0 and min(widths) >= 1)


@fast
@given(st.integers(-2**70, 2**70))
def test_seed(v):
    assert accepted(f"seed={v}") == (0 <= v < 2**63)


@fast
@given(st.integers(-3, 3), st.integers(-3, 3))
def test_batch_size_and_epochs(b, e):
    assert accepted(f"trainer.batch_size={b}", f"trainer.max_epochs={e}") == (b >= 1 and e >= 1)


# ---------------------------------------------------------------- models inside models
@pytest.mark.parametrize("name, where, args, expected", [
    ("fusion", "student", {"encoders": {"image": {"name": "cnn", "args": {"channels": []}}}},
     "student.args: fusion.encoders.image.args.channels=[]; give a non-empty list, each an integer >= 1"),
    ("dual_head", "student", {"backbone": {"name": "mlp", "args": {"dropout": 2}}},
     "student.args: dual_head.backbone.args.dropout=2; it must be a number in [0, 1)"),
    ("gat", "teachers.gnn", {"hidden": 65, "heads": 8}, "teachers.gnn.args: gat: hidden (65) must be a multiple of heads (8)"),
    ("mlp", "student", {"hidden": [4], "colour": 1}, "student.args: MLP.__init__() got an unexpected keyword argument"),
])
def test_create_model_checks_nested_and_factory_arguments(name, where, args, expected):
    """Every model a run builds goes through create_model, so the encoders of a fusion model and the
    backbone of a dual-head model are range-checked too, and a factory's own refusal is one line."""
    from mmkd.build import create_model

    shape = {"image": (1, 8, 8)} if name == "fusion" else (1, 8, 8)
    with pytest.raises(ConfigError) as e:
        create_model(name, 10, shape, where, **args)
    assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)


def test_create_model_builds_what_the_factory_builds():
    from mmkd.build import create_model
    from mmkd.models import MLP

    torch.manual_seed(0)
    a = create_model("mlp", 3, (4,), hidden=[5])
    torch.manual_seed(0)
    b = MLP(num_classes=3, in_shape=(4,), hidden=[5])
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


LM = ["experiment=lm_shakespeare_fkl", "trainer.max_epochs=1", "trainer.progress=off", "export=[]"]


@pytest.mark.parametrize("override, expected", [
    ("data.args.block_size=0", "data.args.block_size=0; it must be an integer >= 1"),
    ("data.args.vocab_size=100", "data.args.vocab_size=100; it must be an integer >= 258"),
    ("data.args.tokenizer=word", "data.args.tokenizer='word'; choose from: char, bpe"),
    ("data.name=agnews_lm data.args.layout=zip", "data.args.layout='zip'; choose from: pad, pack"),
    ("data_root=/nonexistent", "tinyshakespeare: missing /nonexistent/tinyshakespeare/input.txt; put tiny "),
    ("student.args.family=bert", "student.args: family='bert' is not a causal-LM family; choose from: gpt2, llama"),
    ("student.args.n_head=3", "student.args: n_embd=128 is not a multiple of n_head=3"),
    ("losses.fkl.args.temperature=0", "losses.fkl.args.temperature=0; it must be a number >= 0.01"),
    ("+losses.dac_kl.args.keep=-1", "losses.dac_kl.args.keep=-1; it must be a number >= 0"),
    ("+losses.span_corr.args.length=0", "losses.span_corr.args.length=0; it must be an integer >= 1"),
    ("trainer.strategy=zero", "trainer.strategy='zero'; choose from: auto, ddp, fsdp"),
    # the recipes' batch transform and data policies
    ("transforms=[{name:on_policy,args:{lambda_:1.5}}]", "transforms[0].args.lambda_=1.5; it must be a number in [0, 1]"),
    ("transforms=[{name:on_policy,args:{top_p:0}}]", "transforms[0].args.top_p=0; it must be a number in (0, 1]"),
    ("transforms=[{name:on_policy,args:{pick:last}}]", "transforms[0].args: on_policy.pick='last'; choose from: "),
    ("policies=[{name:ddk,args:{init:zero}}]", "policies[0].args: init='zero'; choose from: factor, uniform"),
    ("policies=[{name:ddk,args:{alpha:2}}]", "policies[0].args.alpha=2; it must be a number in [0, 1]"),
    ("policies=[{name:random,args:{fraction:0}}]", "policies[0].args.fraction=0; it must be a number in (0, 1]"),
    ("policies=[{name:miniplm,args:{teacher:/nonexistent,reference:/nonexistent}}]",
     "policies[0].args: teacher: '/nonexistent' has no config.yaml; give the directory of a finished run"),
    ("policies=[{name:miniplm,args:{teacher:/x,reference:/x,ratio:1.5}}]",
     "policies[0].args.ratio=1.5; it must be a number in (0, 1]"),
])
def test_language_model_input_refused_in_one_line(capsys, tmp_path, override, expected):
    out, corpus = tmp_path / "runs", tmp_path / "data" / "tinyshakespeare"
    corpus.mkdir(parents=True)
    (corpus / "input.txt").write_text("Now is the winter of our discontent\n" * 600, encoding="utf-8")
    root = [] if "data_root" in override else [f"data_root={tmp_path / 'data'}"]
    code, stdout, err = run_cli(capsys, "run", *LM, *root, *override.split(), f"out_dir={out}")
    assert code == 2, err
    assert err.startswith("mmkd: error: " + expected), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert files(out) == set(), f"{override} left {files(out)}"
