"""Your own configs from the command line: ``--config-dir DIR experiment=NAME``, ``experiment=PATH.yaml``,
``mmkd init NAME`` and the run label ``name=`` (mmkd/cli.py, mmkd/config.py, mmkd/run.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from mmkd.cli import compose, main
from mmkd.config import ConfigError

FAST = ["trainer.max_epochs=1", "teachers.cnn.epochs=1", "baseline=false", "export=[]", "trainer.progress=off",
        "trainer.tensorboard=false"]
README = Path(__file__).resolve().parents[2] / "README.md"


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


KD_T2 = """\
# @package _global_
defaults:
  - quickstart
losses:
  kd: {args: {temperature: 2.0}}
trainer:
  batch_size: 32
"""


def test_config_dir_group_folder_runs_a_users_experiment(tmp_path, capsys):
    """DIR/experiment/NAME.yaml starts from a shipped experiment and changes two keys; the run is named
    after it (run directory, results.json, config.yaml)."""
    cfgs, out = tmp_path / "cfgs", tmp_path / "runs"
    write(cfgs / "experiment" / "kd_t2.yaml", KD_T2)
    code, stdout, err = run_cli(capsys, "run", "--config-dir", cfgs, "experiment=kd_t2", *FAST, f"out_dir={out}")
    assert code == 0, err
    run_dir, = (out / "kd_t2").iterdir()
    stored = OmegaConf.load(run_dir / "config.yaml")
    assert stored.experiment == "kd_t2" and stored.losses.kd.args.temperature == 2.0
    assert stored.trainer.batch_size == 32
    assert list(stored.teachers) == ["cnn"] and list(stored.teachers.cnn.args.channels) == [32, 64, 128]  # quickstart's
    results = json.loads((run_dir / "results.json").read_text())
    assert results["experiment"] == "kd_t2" and results["name"] == "kd_t2"  # no name=: the experiment's
    assert "kd_t2 (seed 0)" in stdout
    # resuming it composes the stored config: the experiment's name matches
    cfg = compose(["experiment=kd_t2", f"run_dir={run_dir}", "resume=true", *FAST, f"out_dir={out}"], cfgs)
    assert cfg.experiment == "kd_t2" and cfg.trainer.batch_size == 32


def test_config_dir_flat_files_and_the_group_folder_first(tmp_path):
    cfgs = tmp_path / "cfgs"
    write(cfgs / "flat.yaml", "defaults:\n  - /experiment/quickstart\nseed: 5\n")
    write(cfgs / "both.yaml", "seed: 1\n")
    write(cfgs / "experiment" / "both.yaml", "seed: 2\n")
    cfg = compose(["experiment=flat"], cfgs)
    assert cfg.experiment == "flat" and cfg.seed == 5 and cfg.losses.kd.args.temperature == 4.0
    assert compose(["experiment=both"], cfgs).seed == 2  # DIR/experiment/NAME.yaml before DIR/NAME.yaml
    assert compose(["experiment=g2m_glnn"], cfgs).experiment == "g2m_glnn"  # shipped names still work
    assert compose([], cfgs).experiment == "quickstart"
    write(cfgs / "experiment" / "2024.yaml", "seed: 7\n")  # a name Hydra parses as a number
    assert compose(["experiment=2024"], cfgs).seed == 7


def test_a_users_file_may_replace_a_shipped_experiment_and_start_from_it(tmp_path):
    """DIR/experiment/quickstart.yaml is found before the shipped quickstart, and its `defaults: [quickstart]`
    is the shipped one (defaults find the shipped configs first)."""
    cfgs = tmp_path / "cfgs"
    write(cfgs / "experiment" / "quickstart.yaml", KD_T2)
    mine, shipped = compose(["experiment=quickstart"], cfgs), compose(["experiment=quickstart"])
    assert mine.losses.kd.args.temperature == 2.0 and shipped.losses.kd.args.temperature == 4.0
    assert mine.trainer.max_epochs == shipped.trainer.max_epochs == 300


def test_defaults_find_the_users_other_configs(tmp_path):
    """A defaults list names the user's own group configs (DIR/teacher/) and experiments (DIR/experiment/),
    and, with hydra.searchpath given too, configs in that folder."""
    cfgs, other = tmp_path / "cfgs", tmp_path / "other"
    write(cfgs / "teacher" / "small.yaml", "name: cnn\ninputs: [image]\nargs: {channels: [8]}\n")
    write(cfgs / "experiment" / "base.yaml", "# @package _global_\ndefaults:\n  - quickstart\nseed: 9\n")
    write(cfgs / "experiment" / "two.yaml", "defaults:\n  - base\n  - /teacher@teachers.small: small\n")
    cfg = compose(["experiment=two"], cfgs)
    assert cfg.seed == 9 and list(cfg.teachers) == ["cnn", "small"] and list(cfg.teachers.small.args.channels) == [8]
    write(other / "teacher" / "tiny.yaml", "name: cnn\ninputs: [image]\nargs: {channels: [4]}\n")
    write(cfgs / "experiment" / "three.yaml", "defaults:\n  - base\n  - /teacher@teachers.tiny: tiny\n")
    cfg = compose(["experiment=three", f"hydra.searchpath=[file://{other}]"], cfgs)
    assert list(cfg.teachers.tiny.args.channels) == [4] and cfg.seed == 9


def test_readme_example_composes(tmp_path):
    """The README's my_configs/experiment/kd_t2.yaml, as written there."""
    text = README.read_text()
    block = re.search(r"```yaml\n(# @package _global_\n# my_configs/experiment/kd_t2\.yaml.*?)```", text, re.S).group(1)
    cfgs = tmp_path / "my_configs"
    write(cfgs / "experiment" / "kd_t2.yaml", block)
    write(cfgs / "teacher" / "wide_cnn.yaml", "name: cnn\ninputs: [image]\nargs: {channels: [64, 128]}\n")
    cfg = compose(["experiment=kd_t2", "seed=1"], cfgs)
    assert cfg.experiment == "kd_t2" and cfg.seed == 1 and list(cfg.teachers) == ["cnn", "wide"]
    assert list(cfg.teachers.wide.args.channels) == [64, 128] and cfg.losses.kd.args.temperature == 2.0


def test_experiment_file_by_path(tmp_path, monkeypatch):
    """experiment=PATH: absolute, relative to the working folder (the test's tmp_path), under ~, or .yml;
    a file without the @package line is an experiment too."""
    write(tmp_path / "sub" / "mine.yaml", "defaults:\n  - quickstart\nseed: 3\nstudent:\n  args: {hidden: [16]}\n")
    for value in (tmp_path / "sub" / "mine.yaml", "sub/mine.yaml", "./sub/mine.yaml"):
        cfg = compose([f"experiment={value}"])
        assert cfg.experiment == "mine" and cfg.seed == 3 and list(cfg.student.args.hidden) == [16]
        assert cfg.teachers.cnn.epochs == 40  # quickstart's, through its defaults
    write(tmp_path / "home" / "h.yml", "seed: 4\n")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = compose(["experiment=~/h.yml"])
    assert cfg.experiment == "h" and cfg.seed == 4
    # the folder above an experiment/ folder is searched for the configs its defaults name
    write(tmp_path / "cfgs" / "teacher" / "small.yaml", "name: cnn\ninputs: [image]\nargs: {channels: [8]}\n")
    path = write(tmp_path / "cfgs" / "experiment" / "e.yaml", "defaults:\n  - quickstart\n"
                 "  - /teacher@teachers.small: small\n")
    assert list(compose([f"experiment={path}"]).teachers) == ["cnn", "small"]


def test_composing_a_users_file_leaves_no_option_in_the_config_store(tmp_path):
    from hydra.core.config_store import ConfigStore

    from mmkd.config import USER_EXPERIMENT

    path = write(tmp_path / "mine.yaml", "seed: 3\n")
    compose([f"experiment={path}"])
    assert f"{USER_EXPERIMENT}.yaml" not in ConfigStore.instance().repo.get("experiment", {})
    with pytest.raises(ConfigError, match="unknown experiment"):  # and the name selects nothing afterwards
        compose([f"experiment={USER_EXPERIMENT}"])


# ---------------------------------------------------------------- errors: exit 2, one line, nothing written
@pytest.mark.parametrize("files_, args, expected", [
    ({}, ["experiment=/x/y.yaml"], "experiment: no such file '/x/y.yaml'"),
    ({}, ["experiment=nothere.yaml"], "experiment: no such file 'nothere.yaml'"),
    ({"cfgs/experiment/a.yaml": "seed: 1\n"}, ["experiment=cfgs/experiment/"],
     "experiment: 'cfgs/experiment/' is a folder; give a YAML file, or name one of its experiments: --config-dir"),
    ({"bad.yaml": "trainer:\n  foo: 1\n"}, ["experiment=bad.yaml"],
     "trainer.foo: unknown config key (in {tmp}/bad.yaml); valid keys under trainer: max_epochs, "),
    ({"bad.yaml": "colour: red\n"}, ["experiment=bad.yaml"],
     "colour: unknown config key (in {tmp}/bad.yaml); valid keys: experiment, seed"),
    ({"bad.yaml": "trainer:\n  max_epochs: many\n"}, ["experiment=bad.yaml"],
     "trainer.max_epochs: expected integer, got 'many' (in {tmp}/bad.yaml)"),
    ({"bad.yaml": "student: 3\n"}, ["experiment=bad.yaml"],
     "student: expected a mapping of its keys, got 3 (in {tmp}/bad.yaml)"),
    ({"bad.yaml": "defaults:\n  - quickstart\nteachers:\n  cnn:\n    colour: red\n"}, ["experiment=bad.yaml"],
     "teachers.cnn.colour: unknown config key; valid keys under teachers.cnn: name, "),
    ({"bad.yaml": "defaults:\n  - quickstart\nlosses:\n  kd: {args: {temperature: 0}}\n"}, ["experiment=bad.yaml"],
     "losses.kd.args.temperature=0; it must be a number >= 0.01"),
    ({"bad.yaml": "seed: 1\n"}, ["experiment=bad.yaml"],  # FAST's teachers.cnn.epochs=1 makes a teacher
     "teachers.cnn.name: missing; give it a value (teachers.cnn.name=...)"),
    ({"bad.yaml": "defaults:\n  - quickstrat\n"}, ["experiment=bad.yaml"],
     "defaults: no config 'quickstrat' in experiment/ (in {tmp}/bad.yaml); choose from: "),
    ({"bad.yaml": "defaults:\n  - /teacher@teachers.x: nope\n"}, ["experiment=bad.yaml"],
     "defaults: no config 'nope' in teacher/ (in {tmp}/bad.yaml); choose from: agnews_lm, av_audio, av_fusion, av_image"),
    ({"bad.yaml": "a: [1\n"}, ["experiment=bad.yaml"], "experiment: cannot read '{tmp}/bad.yaml': ParserError: "),
    ({"bad.yaml": "- 1\n"}, ["experiment=bad.yaml"],
     "experiment: '{tmp}/bad.yaml' holds a list; an experiment is a mapping of config keys"),
    ({"cfgs/experiment/kd_t2.yaml": KD_T2, "cfgs/flat.yaml": "seed: 1\n"}, ["--config-dir", "cfgs", "experiment=nope"],
     "experiment: unknown experiment 'nope'; choose from: flat, kd_t2 (in {tmp}/cfgs), agnews_"),
    ({}, ["--config-dir", "nodir"], "--config-dir: no such folder 'nodir'"),
    ({"f.yaml": "seed: 1\n"}, ["--config-dir", "f.yaml"], "--config-dir: 'f.yaml' is a file; give the folder"),
    ({}, ["--config-dir"], "--config-dir: give a folder: --config-dir DIR"),
    ({"a/x": "", "b/x": ""}, ["--config-dir=a", "-cd", "b"], "--config-dir: given 2 times ('a', 'b'); give one folder"),
    ({}, ["name=a/b"], "name='a/b': give a folder name of at most 128 letters, digits, '.', '_' and '-'"),
    ({}, ["name=.hidden"], "name='.hidden': give a folder name"),
])
def test_refused_in_one_line(capsys, tmp_path, files_, args, expected):
    for name, text in files_.items():
        write(tmp_path / name, text)
    out = tmp_path / "runs"
    before = files(tmp_path)
    code, stdout, err = run_cli(capsys, "run", *FAST, *args, f"out_dir={out}")
    assert code == 2, err
    assert err.startswith("mmkd: error: " + expected.format(tmp=tmp_path)), err
    assert err.count("\n") == 1 and stdout == ""
    assert files(tmp_path) == before  # nothing written, out_dir not even created
    if expected.endswith("choose from: "):
        assert "quickstart" in err.split("choose from: ")[1].split(", ")


def test_unknown_name_in_the_config_dir_lists_both(capsys, tmp_path):
    write(tmp_path / "cfgs" / "experiment" / "kd_t2.yaml", KD_T2)
    code, _, err = run_cli(capsys, "run", "--config-dir", "cfgs", "experiment=kd_t3")
    assert code == 2
    mine, shipped = err.strip().split("choose from: ")[1].split(f" (in {tmp_path / 'cfgs'}), ")
    assert mine == "kd_t2"
    assert shipped.endswith(" (shipped)") and "quickstart" in shipped.removesuffix(" (shipped)").split(", ")


def test_config_dir_only_where_it_means_something(capsys):
    code, _, err = run_cli(capsys, "export", "--config-dir", "x", "run_dir=r")
    assert code == 2 and err == "mmkd: error: --config-dir: only for mmkd run, list, init\n"


# ---------------------------------------------------------------- mmkd list
def test_list_with_config_dir(capsys, tmp_path):
    write(tmp_path / "cfgs" / "experiment" / "kd_t2.yaml", KD_T2)
    write(tmp_path / "cfgs" / "flat.yaml", "seed: 1\n")
    code, out, _ = run_cli(capsys, "list", "--config-dir", "cfgs")
    assert code == 0
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert lines["experiments in cfgs"] == "flat, kd_t2"
    assert "quickstart" in lines["experiments"].split(", ") and "kd_t2" not in lines["experiments"]
    code, out, _ = run_cli(capsys, "list")
    assert code == 0 and "experiments in" not in out
    code, out, err = run_cli(capsys, "list", "-cd", "nodir")
    assert code == 2 and out == "" and err == "mmkd: error: --config-dir: no such folder 'nodir'\n"


# ---------------------------------------------------------------- mmkd init
def test_init_writes_a_starter_that_runs(capsys, tmp_path):
    """`mmkd init` then `mmkd run experiment=<that file>` on the digits data; the run is labelled with name=."""
    code, out, err = run_cli(capsys, "init", "starter")
    assert code == 0, err
    path = tmp_path / "starter.yaml"
    assert out == "wrote starter.yaml; run it with: mmkd run experiment=starter.yaml\n"
    text = path.read_text()
    assert text.startswith("# @package _global_\n") and "# data_root:" in text
    starter = yaml.safe_load(text)
    assert {"name", "seed", "data", "teachers", "student", "router", "losses", "trainer", "transforms", "policies",
            "callbacks"} <= set(starter)
    assert {"name", "args"} <= set(starter["data"]) and {"name", "args", "epochs"} <= set(starter["teachers"]["cnn"])
    assert all({"weight"} <= set(term) for term in starter["losses"].values()) and "args" in starter["losses"]["kd"]
    assert {"max_epochs", "batch_size", "lr"} <= set(starter["trainer"])
    cfg = compose(["experiment=starter.yaml"])  # it validates as written
    assert cfg.experiment == "starter" and cfg.trainer.max_epochs == starter["trainer"]["max_epochs"]
    assert cfg.losses.kd.args.temperature == starter["losses"]["kd"]["args"]["temperature"]

    out_dir = tmp_path / "runs"
    code, stdout, err = run_cli(capsys, "run", "experiment=starter.yaml", *FAST, "name=try-1.a", f"out_dir={out_dir}")
    assert code == 0, err
    run_dir, = (out_dir / "try-1.a").iterdir()  # <out_dir>/<name>/<date-time>
    assert re.fullmatch(r"\d{8}-\d{6}", run_dir.name)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["name"] == "try-1.a" and results["experiment"] == "starter"
    assert list(results)[0] == "name" and 0 <= results["student"]["test_acc"] <= 1
    assert "try-1.a (seed 0)" in stdout and "starter (seed" not in stdout  # the table's title
    assert OmegaConf.load(run_dir / "config.yaml").name == "try-1.a"


def test_init_into_a_config_dir(capsys, tmp_path):
    for args, folder in ((["--config-dir", "cfgs"], "cfgs"), (["dir=other"], "other")):
        code, out, err = run_cli(capsys, "init", "mine", *args)
        assert code == 0, err
        assert (tmp_path / folder / "experiment" / "mine.yaml").is_file()
        assert out.endswith(f"run it with: mmkd run --config-dir {folder} experiment=mine\n")
        assert compose(["experiment=mine"], tmp_path / folder).experiment == "mine"
    code, out, _ = run_cli(capsys, "init", "mine.yaml")  # the suffix may be given
    assert code == 0 and (tmp_path / "mine.yaml").is_file() and not (tmp_path / "mine.yaml.yaml").exists()


@pytest.mark.parametrize("args, expected", [
    (["taken"], "init: 'taken.yaml' exists; give another name or remove the file"),
    (["taken", "dir=cfgs"], "init: 'cfgs/experiment/taken.yaml' exists; give another name or remove the file"),
    ([], "init: give one experiment name (none given); mmkd init NAME"),
    (["a", "b"], "init: give one experiment name (got a, b)"),
    (["a/b"], "init: NAME='a/b': give a folder name"),
    (["a", "colour=red"], "'colour=red': unknown option; valid keys: dir"),
    (["a", "dir=x", "--config-dir", "y"], "dir: given with --config-dir; give the folder once"),
])
def test_init_refuses(capsys, tmp_path, args, expected):
    write(tmp_path / "taken.yaml", "seed: 1\n")
    write(tmp_path / "cfgs" / "experiment" / "taken.yaml", "seed: 2\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out, err = run_cli(capsys, "init", *args)
    assert code == 2 and out == ""
    assert err.startswith("mmkd: error: " + expected) and err.count("\n") == 1, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing overwritten or added


# ---------------------------------------------------------------- name=
def test_default_run_dir_uses_the_name(tmp_path):
    from mmkd.run import default_run_dir

    named = compose(["name=abl", f"out_dir={tmp_path}"])
    assert Path(default_run_dir(named)).parent == tmp_path / "abl"
    assert Path(default_run_dir(compose([f"out_dir={tmp_path}"]))).parent == tmp_path / "quickstart"


def test_the_shipped_example_experiment_file_composes():
    """examples/agnews_csv.yaml (benchmarks/text_csv.py runs it) is a valid experiment given by path."""
    path = Path(__file__).resolve().parents[2] / "examples" / "agnews_csv.yaml"
    cfg = compose([f"experiment={path}"])
    assert (cfg.experiment, cfg.data.name, cfg.teachers.minilm.args.freeze) == ("agnews_csv", "text_csv", True)
    assert list(cfg.student.inputs) == ["col0_input_ids", "col0_attention_mask"] == list(cfg.teachers.minilm.inputs)
