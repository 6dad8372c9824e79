"""Every shipped CIFAR-10 experiment (configs/experiment/cifar10_*.yaml) trains: one epoch on a tiny
folder of seeded 32x32 images in CIFAR-10's layout, with untrained small teachers, through the whole
run (checks, cached or live teachers, the method's callbacks and modules, evaluation). The
methods' own tests check their numbers; this one checks that each shipped config is runnable."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mmkd.cli import compose, main
from mmkd.config import experiments

CIFAR = [e for e in experiments() if e.startswith("cifar10_")]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """10 classes x 6 seeded random 32x32 PNG images."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    for c in range(10):
        (root / "imgs" / f"c{c}").mkdir(parents=True)
        for n in range(6):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / "imgs" / f"c{c}" / f"{n}.png")
    return root


def test_there_are_cifar10_experiments():
    assert {"cifar10_kd", "cifar10_dkd", "cifar10_at"} <= set(CIFAR)


@pytest.mark.parametrize("experiment", CIFAR)
def test_shipped_cifar10_experiment_trains_one_epoch(experiment, images, tmp_path):
    cfg = compose([f"experiment={experiment}"])
    small = [o for name, t in cfg.teachers.items()
             for o in (f"teachers.{name}.epochs=0", *([f"teachers.{name}.name=resnet8"]
                                                      if str(t.name).startswith("resnet") else []))]
    if str(cfg.student.name).startswith("resnet"):
        small.append("student.name=resnet8")
    if cfg.pipeline == "active":  # 3 training images a class: a budget that leaves an unlabelled pool
        small += ["method.initial=1", "method.queries=5", "method.rounds=1"]
    if cfg.pipeline == "diswot":  # a short search
        small += ["method.population=3", "method.iterations=3"]
    if cfg.pipeline == "comd":  # two rounds: the second trains on the first's added items
        small += ["method.rounds=2"]
    if "offset_per_class" in cfg.data.args:  # a shifted pool of CIFAR-10's images: here, of the folder's
        small += ["data.args.offset_per_class=0", "~data.args.limit_per_class", "~data.args.val_size"]
    code = main(["run", f"experiment={experiment}", f"data_root={images}", "data.name=image_folder",
                 "+data.args.path=imgs", "+data.args.fractions=[0.5,0.25,0.25]", f"data.args.cache_dir={tmp_path / 'img'}",
                 f"out_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "trainer.max_epochs=1", "trainer.batch_size=10",
                 "trainer.tensorboard=false", "trainer.progress=off", "baseline=false", "export=[]", *small])
    assert code == 0
    (run_dir,) = (tmp_path / experiment).iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    if cfg.pipeline == "diswot":  # a search: its pick, no trained student
        assert (run_dir / "student.yaml").is_file() and results["candidates"]
    else:
        assert 0.0 <= results["student"]["test_acc"] <= 1.0
