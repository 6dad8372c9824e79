"""Active distillation (mmkd.methods.active): the k-center, entropy and initial-set selections against
naive computations and hand cases, the labels policy's batches, and the pipeline's rounds, whose
selections are recomputed from each round's saved student."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmkd import TensorDictDataset
from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.methods.active import Labels, entropy, initial_set, k_center, select


def naive_k_center(pool, centers, k, cosine=False):
    def d(a, b):
        if cosine:
            return 1 - sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
        return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b)))

    chosen, cs = [], [list(c) for c in centers]
    for _ in range(k):
        best, best_gap = None, -1.0
        for i, x in enumerate(pool):
            if i in chosen:
                continue
            gap = min((d(x, c) for c in cs), default=math.inf)
            if gap > best_gap:
                best, best_gap = i, gap
        chosen.append(best)
        cs.append(list(pool[best]))
    return chosen


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("n_centers", [0, 3])
def test_k_center_matches_a_naive_farthest_first_loop(cosine, n_centers):
    g = torch.Generator().manual_seed(1)
    pool, centers = torch.rand(40, 5, generator=g), torch.rand(n_centers, 5, generator=g)
    got = k_center(pool, centers, 12, "cosine" if cosine else "euclidean").tolist()
    assert got == naive_k_center(pool.double().tolist(), centers.double().tolist(), 12, cosine)


def test_k_center_on_a_line_takes_the_far_point_then_the_middle():
    pool = torch.tensor([[1.0], [2.0], [10.0], [6.0]])
    # from center 0: 10 is farthest; then min distances 1, 2, -, 4 (to 10) -> 6; then 1 -> 2 (2 vs 1)
    assert k_center(pool, torch.tensor([[0.0]]), 3).tolist() == [2, 3, 1]


def test_cosine_k_center_ignores_row_scale():
    g = torch.Generator().manual_seed(2)
    pool, centers = torch.rand(30, 4, generator=g), torch.rand(2, 4, generator=g)
    scale = torch.rand(30, 1, generator=g) * 10 + 0.1
    assert torch.equal(k_center(pool, centers, 8, "cosine"), k_center(pool * scale, centers, 8, "cosine"))


def test_entropy_by_hand():
    p = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    assert entropy(p).tolist() == pytest.approx([math.log(4), 0.0, math.log(2)])


def test_initial_set_takes_per_class_items_and_follows_the_seed():
    labels = torch.tensor([0] * 10 + [1] * 6 + [2] * 1)
    got = initial_set(labels, 3, seed=0)
    assert torch.bincount(labels[got]).tolist() == [3, 3, 1] and got.tolist() == sorted(got.tolist())
    assert torch.equal(got, initial_set(labels, 3, seed=0)) and not torch.equal(got, initial_set(labels, 3, seed=1))


def test_select_picks_only_unlabelled_items():
    g = torch.Generator().manual_seed(3)
    probs = torch.rand(50, 4, generator=g).softmax(1)
    labelled = torch.tensor([0, 5, 9])
    for strategy in ("pcoreset", "entropy", "random", "coreset"):
        opts = {"strategy": strategy, "queries": 7}
        got = select(opts, 0, 0, labelled, probs, probs)
        assert len(got) == 7 and not set(got.tolist()) & {0, 5, 9} and got.tolist() == sorted(got.tolist())
    top = select({"strategy": "entropy", "queries": 7}, 0, 0, labelled, probs, None)
    h = entropy(probs)
    h[labelled] = -1
    assert sorted(top.tolist()) == sorted(h.argsort(descending=True)[:7].tolist())


def test_the_labels_policy_pairs_labelled_and_unlabelled_batches(tmp_path):
    from types import SimpleNamespace

    np.save(tmp_path / "l.npy", np.array([1, 4, 6]))
    ds = TensorDictDataset("d", x=torch.arange(10.0).view(10, 1), label=torch.arange(10) % 3)
    data = Labels(str(tmp_path / "l.npy")).select(SimpleNamespace(), None, ds)
    sampler = data.batch_sampler(2, seed=0)
    assert len(sampler) == 4  # one pass over the 7 unlabelled items, 2 a batch
    seen = []
    for ids in sampler:
        batch = data.__getitems__(ids)
        flags = batch["labelled"].tolist()
        assert flags == sorted(flags, reverse=True) and 1 <= sum(flags) <= 2  # labelled rows first, cycled
        seen += [i for i, f in zip(ids, flags) if not f]
        for i, y, lab in zip(ids, batch["label"].tolist(), batch["labelled"].tolist()):
            assert (y == i % 3) if i in (1, 4, 6) else y == -1
            assert lab == (i in (1, 4, 6))
    assert sorted(seen) == [0, 2, 3, 5, 7, 8, 9]  # every unlabelled item once an epoch
    assert data.fingerprint == ds.fingerprint  # cached teacher outputs still apply


@pytest.mark.parametrize("values, match", [([12], "indices outside 0..9"), (None, "no such file")])
def test_bad_labelled_files_are_one_line_errors(tmp_path, values, match):
    from types import SimpleNamespace

    path = tmp_path / "l.npy"
    if values is not None:
        np.save(path, np.array(values))
    ds = TensorDictDataset("d", x=torch.zeros(10, 1), label=torch.zeros(10, dtype=torch.long))
    with pytest.raises(ConfigError, match=match) as e:
        Labels(str(path)).select(SimpleNamespace(), None, ds)
    assert "\n" not in str(e.value)


def run(tmp_path: Path, *overrides: str) -> Path:
    assert main(["run", "experiment=digits_pcoreset", f"out_dir={tmp_path}", "teachers.cnn.epochs=2",
                 "trainer.max_epochs=2", "trainer.warmup_epochs=1", "trainer.tensorboard=false",
                 "trainer.progress=off", "export=[]", "method.rounds=2", "method.queries=15", *overrides]) == 0
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("run_dir=")]
    return Path(given[0]) if given else next((tmp_path / "digits_pcoreset").iterdir())


@pytest.mark.parametrize("strategy", ["pcoreset", "coreset"])
def test_each_round_labels_what_its_student_selects(tmp_path, strategy):
    """Round r's labelled set is round r-1's plus the k-center of round r-1's saved student (its
    probabilities, or its normalised features), recomputed here from student.pt."""
    from mmkd.build import load_data
    from mmkd.cli import compose
    from mmkd.export import trained_model
    from mmkd.net import Net

    feature = "body" if strategy == "coreset" else None  # the MLP's hidden features
    out = run(tmp_path, f"method.strategy={strategy}", *([f"method.feature={feature}"] if feature else []))
    results = json.loads((out / "results.json").read_text())
    assert [r["labelled"] for r in results["rounds"]] == [20, 35, 50]
    data, _ = load_data(compose(["experiment=digits_pcoreset"]))
    x = torch.stack([data.train[i]["image"] for i in range(len(data.train))])
    for tau in (1, 2):
        before = torch.from_numpy(np.load(out / f"labelled{tau - 1}.npy"))
        after = torch.from_numpy(np.load(out / f"labelled{tau}.npy"))
        model, _, _ = trained_model(out / f"round{tau - 1}")
        with torch.no_grad():
            o = Net(model, ["image"], [feature] if feature else [])({"image": x})
        space = o.features[feature].flatten(1) if feature else o.logits.softmax(1)
        pool = torch.tensor([i for i in range(len(x)) if i not in set(before.tolist())])
        want = pool[k_center(space[pool], space[before], 15, "cosine" if feature else "euclidean")]
        assert set(after.tolist()) == set(before.tolist()) | set(want.tolist())
        metrics = (out / f"round{tau}" / "student" / "metrics.csv").read_text().splitlines()
        assert float(metrics[1].split(",")[metrics[0].split(",").index("active/labelled")]) == len(after)
    assert (out / "student.pt").is_file() and results["student"]["test_acc"] == results["rounds"][-1]["test_acc"]


@pytest.mark.parametrize("override, match", [
    ("method.rounds=0", "method.rounds=0; give a whole number >= 1"),
    ("method.strategy=badge", "method.strategy='badge'; choose from: pcoreset, coreset, entropy, random"),
    ("+method.budget=3", "method.budget: unknown option of pipeline active"),
    ("method.space=oracle", "method.space='oracle'; choose from: student, teacher"),
    ("method.queries=5000", "3 rounds x 5000 queries = 15020 labels, but the training set has"),
])
def test_bad_options_exit_2_before_anything_is_written(tmp_path, capsys, override, match):
    code = main(["run", "experiment=digits_pcoreset", f"out_dir={tmp_path}", override])
    assert code == 2 and match in capsys.readouterr().err and not (tmp_path / "digits_pcoreset").exists()


def test_a_zero_shot_clip_teacher_selects_in_its_probability_space(tmp_path):
    """space: teacher with an untrained-in-the-run CLIP teacher (epochs 0; a tiny random open_clip
    ViT here, pretrained weights in use): round 1 adds the k-center of the teacher's probabilities."""
    from mmkd.build import build_model, load_data
    from mmkd.cli import compose
    from mmkd.net import Net

    tiny = ('{arch: ViT-S-32, config: {embed_dim: 16, vision_cfg: {image_size: 16, patch_size: 8, width: 16, '
            'layers: 1, head_width: 8}, text_cfg: {context_length: 12, vocab_size: 49408, width: 16, heads: 2, '
            'layers: 1}}}')
    clip = ["~teachers.cnn", f"+teachers.clip={{name: clip, inputs: [image], epochs: 0, args: {tiny}}}"]
    out = run(tmp_path, "method.space=teacher", "method.rounds=1", *clip)
    cfg = compose(["experiment=digits_pcoreset", *clip])
    data, meta = load_data(cfg)
    torch.manual_seed(cfg.seed)  # the run builds its teacher from the run's seed
    teacher = build_model(cfg.teachers.clip, meta, "teachers.clip")
    x = torch.stack([data.train[i]["image"] for i in range(len(data.train))])
    with torch.no_grad():
        probs = Net(teacher, ["image"]).eval()({"image": x}).logits.softmax(1)
    before = torch.from_numpy(np.load(out / "labelled0.npy"))
    after = torch.from_numpy(np.load(out / "labelled1.npy"))
    pool = torch.tensor([i for i in range(len(x)) if i not in set(before.tolist())])
    assert set(after.tolist()) == set(before.tolist()) | set(pool[k_center(probs[pool], probs[before], 15)].tolist())


def test_an_interrupted_run_resumes_exactly_where_it_stopped(tmp_path):
    """The last round and the run's results deleted (as an interrupted run leaves them): resume=true
    keeps rounds 0 and 1 as they are and trains round 2 again to the same student, bit for bit."""
    import shutil

    out = run(tmp_path, f"run_dir={tmp_path / 'r'}")
    first = json.loads((out / "results.json").read_text())
    weights = torch.load(out / "round2" / "student.pt", weights_only=True)
    stamps = {p: (out / p / "student.pt").stat().st_mtime_ns for p in ("round0", "round1")}
    shutil.rmtree(out / "round2")
    (out / "results.json").unlink()
    (out / "student.pt").unlink()
    run(tmp_path, f"run_dir={tmp_path / 'r'}", "resume=true")
    assert {p: (out / p / "student.pt").stat().st_mtime_ns for p in ("round0", "round1")} == stamps
    again = torch.load(out / "round2" / "student.pt", weights_only=True)
    assert all(torch.equal(v, weights[k]) for k, v in again.items())
    assert json.loads((out / "results.json").read_text())["rounds"] == first["rounds"]
