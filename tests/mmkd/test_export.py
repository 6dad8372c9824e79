"""Export and prediction for every model family that can be a student: the data description's input
dtypes and ranges, example inputs that follow them (integer token ids, 0/1 masks, floats), ONNX and
torch.export programs against PyTorch on other inputs than the example, ``predict`` against the
model's own logits, GNN students refused, a text run exported end to end, and ``mmkd predict``'s bad
inputs and outputs as one-line errors that write nothing. Every model is built tiny."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mmkd.cli import main
from mmkd.config import ConfigError
from mmkd.data import DataSplits, TensorDictDataset
from mmkd.predict import predict, write_predictions
from mmkd.io import check_writable
from mmkd.export import example_inputs, export_onnx, export_student
from mmkd.registry import MODELS
from mmkd.build import build_model

VOCAB, TOKENS = 100, 8
TINY_BERT = {"hidden": 16, "layers": 1, "heads": 2, "vocab_size": VOCAB, "max_positions": 16}
TINY_CLIP = {"arch": "ViT-S-32", "config": {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}}
CLASSES = ["ant", "bee", "cat"]


def tokens(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Padded sentences: ids in [1, VOCAB) then 0 (padding), the mask 1 on the real tokens."""
    lengths = torch.randint(2, TOKENS + 1, (n,), generator=g)
    lengths[0] = TOKENS
    mask = (torch.arange(TOKENS) < lengths[:, None]).long()
    return {"input_ids": torch.randint(1, VOCAB, (n, TOKENS), generator=g) * mask, "attention_mask": mask}


def image(shape):
    return lambda n, g: {"image": torch.rand(n, *shape, generator=g)}


def text(n, g):
    return tokens(n, g)


def fused(n, g):
    return {"image": torch.rand(n, 1, 8, 8, generator=g), **tokens(n, g)}


def wave(n, g):
    return {"audio": 0.1 * torch.randn(n, 400, generator=g)}


# family -> (args, items, formats): torch.export for all; ONNX (about 3 s an export, whatever the model)
# for the multi-input ones, text among them (the MLP, CNN and dual-head ONNX exports are covered in
# test_cli.py, test_predict.py and tests/methods/test_dual_head.py)
FAMILIES = {
    "mlp": ({"hidden": [8]}, image((1, 8, 8)), ["pt2"]),
    "cnn": ({"channels": [4, 8]}, image((1, 8, 8)), ["pt2"]),
    "resnet18": ({}, image((3, 16, 16)), ["pt2"]),
    "audio_cnn": ({"channels": [4]}, wave, ["pt2"]),
    "text_transformer": (TINY_BERT, text, ["onnx", "pt2"]),
    "text_minilm": ({"path": "TINY_BERT_DIR"}, text, ["pt2"]),
    "clip": (TINY_CLIP, image((1, 16, 16)), ["pt2"]),
    "fusion": ({"encoders": {"image": {"name": "cnn", "args": {"channels": [4]}},
                             "text": {"name": "text_transformer", "args": TINY_BERT,
                                      "inputs": ["input_ids", "attention_mask"]}},
                "hidden": [8]}, fused, ["onnx", "pt2"]),
    "dual_head": ({"backbone": {"name": "cnn", "args": {"channels": [4, 8]}}}, image((1, 8, 8)), ["pt2"]),
    "resnet8": ({}, image((3, 16, 16)), ["pt2"]),  # stands for resnet14 ... resnet110, resnet8x4, resnet32x4
    "cifar_resnet": ({"blocks": [1, 2, 1], "widths": [8, 8, 16, 16], "kernels": [3, 5, 3]}, image((3, 16, 16)), ["pt2"]),
    "wrn_16_1": ({}, image((3, 16, 16)), ["pt2"]),  # and the other wide ResNets
    "mobilenetv2": ({}, image((3, 32, 32)), ["pt2"]),
    "shufflenetv2": ({}, image((3, 16, 16)), ["onnx", "pt2"]),
    "vit_tiny": ({"dim": 16, "depth": 2, "heads": 2}, image((3, 16, 16)), ["onnx", "pt2"]),
}
GRAPH_FAMILIES = ["gcn", "sage", "gat", "appnp", "dgl_gcn"]
LM_FAMILIES = ["causal_lm"]  # exported in test_export_causal_lm; served by `mmkd generate`, not `mmkd predict`


def test_every_student_family_is_covered():
    """Every model mmkd registers (not those other tests register) is exported and predicted below, or
    refused as a whole-graph model."""
    def family(name: str) -> str:  # the factories one function makes in a loop (resnet8 ... resnet110) are one
        qualname = MODELS[name].__qualname__
        return qualname if "<locals>" in qualname else name

    shipped = {family(n) for n in MODELS.names() if MODELS[n].__module__.startswith("mmkd.")}
    assert shipped == {family(n) for n in FAMILIES} | set(GRAPH_FAMILIES) | set(LM_FAMILIES)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_causal_lm(family, tmp_path):
    """A causal LM exports to torch.export and ONNX with a dynamic batch; both give torch's next-token
    logits ``[batch, time, vocab]`` (onnxruntime checked inside export_onnx, torch.export here)."""
    from mmkd.export import export_onnx, export_program
    from mmkd.modalities.lm.models import causal_lm

    torch.manual_seed(0)
    model = causal_lm(30, (12,), family=family, n_layer=1, n_embd=16, n_head=2).eval()
    ids = torch.randint(0, 30, (2, 12))
    program = torch.export.load(export_program(model, (ids,), tmp_path / "lm.pt2"))
    more = torch.randint(0, 30, (5, 12))
    with torch.no_grad():
        close(program.module()(more), model(more), f"{family}: torch.export, batch 5")
    assert export_onnx(model, (ids,), tmp_path / "lm.onnx", ["input_ids"]).is_file()


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    """A BERT checkpoint folder of width 16 (what ``text_minilm``'s ``path`` reads): the MiniLM code path, tiny."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16), add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


def splits(items: dict[str, torch.Tensor], labels: torch.Tensor) -> DataSplits:
    sets = [TensorDictDataset(f"tiny/{s}", **items, label=labels) for s in ("train", "val", "test")]
    return DataSplits(*sets, num_classes=len(CLASSES), shapes={k: tuple(v.shape[1:]) for k, v in items.items()},
                      class_names=list(CLASSES))


def write_run(run_dir: Path, name: str, inputs: list[str], args: dict, meta: dict, seed: int = 0) -> torch.nn.Module:
    """A finished run by hand: config.yaml, data.json and student.pt; returns the student (eval mode)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    mc = OmegaConf.create({"name": name, "inputs": inputs, "args": args, "features": []})
    torch.manual_seed(seed)
    model = build_model(mc, meta, "student").eval()
    OmegaConf.save(OmegaConf.create({"student": mc, "imports": []}), run_dir / "config.yaml")
    (run_dir / "data.json").write_text(json.dumps(meta))
    torch.save(model.state_dict(), run_dir / "student.pt")
    return model


def close(got, want, what: str):
    want = np.asarray(want)
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * scale, err_msg=what)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_and_predict_every_family(family, tmp_path, request):
    args, make, formats = FAMILIES[family]
    if family == "text_minilm":
        args = {"path": request.getfixturevalue("tiny_bert_dir")}
    g = torch.Generator().manual_seed(1)
    items = make(6, g)
    meta = splits(items, torch.arange(6) % 3).meta()
    for k, v in items.items():  # dtypes and ranges from the training split
        cast = int if not v.dtype.is_floating_point else float
        assert meta["inputs"][k] == {"dtype": str(v.dtype).removeprefix("torch."), "min": cast(v.min()),
                                     "max": cast(v.max())}
    keys = list(items)
    model = write_run(tmp_path, family, keys, args, meta)
    paths = export_student(tmp_path, formats)
    files = {"onnx": "student.onnx", "pt2": "student.pt2"}
    assert paths == [tmp_path / "export" / files[f] for f in formats] and all(p.is_file() for p in paths)
    exported = json.loads((tmp_path / "export/meta.json").read_text())
    assert exported["inputs"] == {k: list(v.shape[1:]) for k, v in items.items()}
    assert exported["dtypes"] == {k: str(v.dtype).removeprefix("torch.") for k, v in items.items()}

    x = make(5, torch.Generator().manual_seed(7))  # other rows and batch size than the example's
    with torch.no_grad():
        want = model(*x.values()).numpy()
    assert np.isfinite(want).all()
    if "pt2" in formats:
        program = torch.export.load(tmp_path / "export/student.pt2").module()
        with torch.no_grad():
            close(program(*x.values()).numpy(), want, "torch.export program")
    if "onnx" in formats:
        import onnxruntime as ort

        session = ort.InferenceSession(str(tmp_path / "export/student.onnx"), providers=["CPUExecutionProvider"])
        close(session.run(None, {k: v.numpy() for k, v in x.items()})[0], want, "onnxruntime")
    features = x[keys[0]].numpy() if len(keys) == 1 else {k: v.numpy() for k, v in x.items()}
    for fmt in formats:
        pred = predict(tmp_path, features, batch_size=2, format=fmt)  # several batches
        assert pred.class_ids.tolist() == want.argmax(1).tolist()
        np.testing.assert_allclose(pred.probs, torch.from_numpy(want).double().softmax(1).numpy(), atol=1e-5)
        assert pred.class_names == CLASSES


@pytest.mark.parametrize("family", GRAPH_FAMILIES)
def test_whole_graph_students_are_refused_in_one_line(family, tmp_path, capsys):
    if family == "dgl_gcn":
        from mmkd.graphs.dgl import import_dgl

        try:
            import_dgl()
        except ImportError as e:
            pytest.skip(f"dgl is not usable here: {e}")
    n = 5
    x, edge_index = torch.rand(n, 4), torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])
    train = TensorDictDataset("graph", x=x.unsqueeze(0), edge_index=edge_index.unsqueeze(0), label=torch.zeros(1))
    meta = DataSplits(train, train, train, num_classes=2, shapes={"x": (4,), "edge_index": (2,)}).meta()
    assert meta["inputs"]["edge_index"] == {"dtype": "int64", "min": 0, "max": 4}
    write_run(tmp_path, family, ["x", "edge_index"], {"hidden": 8}, meta)
    with pytest.raises(ConfigError) as e:
        export_student(tmp_path, ["onnx", "pt2"])
    msg = str(e.value)
    assert msg.startswith(f"student: {family} reads a whole graph (inputs x, edge_index)") and "\n" not in msg
    assert "MLP" in msg and not (tmp_path / "export").exists()
    assert main(["export", f"run_dir={tmp_path}", "format=pt2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmkd: error: student: ") and err.count("\n") == 1 and not (tmp_path / "export").exists()


def test_example_inputs_follow_dtypes_and_ranges():
    meta = {"shapes": {"ids": [6], "mask": [6], "grid": [2, 3], "flag": [6], "x": [3], "old": [2]},
            "inputs": {"ids": {"dtype": "int64", "min": 3, "max": 9}, "mask": {"dtype": "int64", "min": 0, "max": 1},
                       "grid": {"dtype": "int32", "min": 0, "max": 1}, "flag": {"dtype": "bool", "min": 0, "max": 1},
                       "x": {"dtype": "float32", "min": -5.0, "max": 5.0}}}
    ids, mask, grid, flag, x, old = example_inputs(meta, ["ids", "mask", "grid", "flag", "x", "old"], batch=3)
    assert ids.dtype == torch.int64 and ids.shape == (3, 6) and 3 <= ids.min() and ids.max() <= 9
    # masks: ones then zeros, every row keeping at least one position and some padding traced
    assert mask.tolist() == [[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4]
    assert grid.dtype == torch.int32 and set(grid.unique().tolist()) <= {0, 1} and (grid[:, 0, 0] == 1).all()
    assert flag.dtype == torch.bool and flag.tolist() == (mask == 1).tolist()
    for t in (x, old):  # floats, and a key without dtype info (a run directory from before): uniform in [0, 1)
        assert t.dtype == torch.float32 and 0 <= t.min() and t.max() < 1
    assert torch.equal(example_inputs(meta, ["ids"])[0], example_inputs(meta, ["ids"])[0])  # seeded


def test_meta_reads_ranges_from_a_sample_without_touching_the_random_state():
    ids = torch.arange(5000).reshape(1000, 5)
    data = splits({"input_ids": ids, "x": torch.tensor([[float("nan")], [2.0]]).repeat(500, 1)},
                  torch.zeros(1000, dtype=torch.long))
    torch.manual_seed(3)
    before = torch.get_rng_state()
    stats = data.meta()["inputs"]
    assert torch.equal(torch.get_rng_state(), before)
    lo, hi = stats["input_ids"]["min"], stats["input_ids"]["max"]
    assert stats["input_ids"]["dtype"] == "int64" and 0 <= lo <= hi <= 4999  # a sample: within the data's range
    assert (lo, hi) == (0, 4999)  # evenly spaced items include the first and the last
    assert stats["x"] == {"dtype": "float32", "min": 2.0, "max": 2.0}  # over finite values


def test_run_directory_without_dtypes_exports_floats_and_text_fails_in_one_line(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    images = image((1, 8, 8))(4, g)
    meta = splits(images, torch.arange(4) % 3).meta()
    del meta["inputs"]  # data.json of a run from before dtypes were recorded
    model = write_run(tmp_path / "mlp", "mlp", ["image"], {"hidden": [8]}, meta)
    export_student(tmp_path / "mlp", ["pt2"])
    assert json.loads((tmp_path / "mlp/export/meta.json").read_text())["dtypes"] == {"image": "float32"}
    with torch.no_grad():
        assert predict(tmp_path / "mlp", images["image"].numpy()).class_ids.tolist() == \
            model(images["image"]).argmax(1).tolist()
    meta = splits(text(4, g), torch.arange(4) % 3).meta()
    del meta["inputs"]
    write_run(tmp_path / "text", "text_transformer", ["input_ids", "attention_mask"], TINY_BERT, meta)
    assert main(["export", f"run_dir={tmp_path / 'text'}", "format=pt2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmkd: error: run_dir: ") and "records no input dtypes" in err and "data.json" in err
    assert err.count("\n") == 1 and not (tmp_path / "text/export/student.pt2").exists()


def test_onnx_check_is_absolute_for_small_logits_and_relative_for_large(tmp_path):
    from mmkd.export import export_onnx, onnx_max_diff

    x = torch.eye(3)
    for scale, shift, want in ((0.1, 0.5, 0.5), (100.0, 0.5, 0.5 / 100.5)):
        model = torch.nn.Linear(3, 2, bias=False)
        torch.nn.init.constant_(model.weight, scale)  # logits all equal to scale
        path = export_onnx(model, (x,), tmp_path / f"m{scale}.onnx", ["x"])
        with torch.no_grad():
            model.weight += shift  # the exported file now lags PyTorch by exactly `shift`
        assert onnx_max_diff(path, model, (x,), ["x"]) == pytest.approx(want, rel=1e-5)


class NaNModel(torch.nn.Module):
    def forward(self, x):
        return x.log()  # NaN on negative inputs


def test_onnx_check_fails_on_nan_outputs(tmp_path):
    """NaN logits (in onnxruntime and PyTorch alike) used to compare as a difference of NaN, which
    passed ``diff > atol``; now the difference is inf, the check fails, and no file is written."""
    path = tmp_path / "nan.onnx"
    with pytest.raises(AssertionError, match="differs from PyTorch by inf"):
        export_onnx(NaNModel(), (torch.tensor([[1.0, -1.0]]),), path, ["x"])
    assert not path.exists() and not list(tmp_path.iterdir())


# ------------------------------------------------------------------ a text run, end to end
WORDS = {"animal": "cat dog horse cow sheep bird", "money": "bank stock price market trade fund"}


def tiny_text(root: str | None = None, max_length: int = 12, n: int = 40) -> DataSplits:
    """Generated two-topic sentences as MiniLM token ids and masks (the keys AG News has)."""
    from mmkd.modalities.text import tokenize

    rng, names = np.random.default_rng(0), list(WORDS)
    sets = []
    for part in ("train", "val", "test"):
        labels = torch.arange(n) % 2
        texts = [" ".join(rng.choice(WORDS[names[c]].split(), size=int(rng.integers(2, 7)))) for c in labels.tolist()]
        enc = tokenize(texts, max_length=max_length)
        sets.append(TensorDictDataset(f"tiny_text/{part}", input_ids=enc["input_ids"],
                                      attention_mask=enc["attention_mask"], label=labels))
    return DataSplits(*sets, num_classes=2, class_names=names,
                      shapes={"input_ids": (max_length,), "attention_mask": (max_length,)})


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """``mmkd run`` of a tiny text_transformer student (labels only) on generated sentences, exporting
    ONNX at the end of the run (where every text run used to crash)."""
    from mmkd.registry import DATASETS

    if "test_tiny_text" not in DATASETS.names():
        DATASETS.register("test_tiny_text")(tiny_text)
    root = tmp_path_factory.mktemp("text")
    run_dir = root / "run"
    code = main(["run", "experiment=quickstart", f"run_dir={run_dir}", f"cache_dir={root / 'cache'}",
                 "data.name=test_tiny_text", "~teachers.cnn", "~losses.kd", "student.name=text_transformer",
                 "student.inputs=[input_ids,attention_mask]",
                 "student.args={hidden: 16, layers: 1, heads: 2, dropout: 0.0}",
                 "trainer.max_epochs=2", "trainer.batch_size=8", "baseline=false", "export=[onnx]",
                 "trainer.tensorboard=false", "trainer.progress=off", "trainer.device=cpu"])
    assert code == 0
    return run_dir


def text_student(run_dir: Path) -> torch.nn.Module:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    model = build_model(cfg.student, json.loads((run_dir / "data.json").read_text()), "student")
    model.load_state_dict(torch.load(run_dir / "student.pt"))
    return model.eval()


def test_a_text_run_exports_and_predicts(text_run, tmp_path, capsys):
    data = json.loads((text_run / "data.json").read_text())
    ids, mask = data["inputs"]["input_ids"], data["inputs"]["attention_mask"]
    assert ids["dtype"] == mask["dtype"] == "int64" and mask["min"] == 0 and mask["max"] == 1
    assert 0 <= ids["min"] < ids["max"] < 30522  # MiniLM's word pieces
    results = json.loads((text_run / "results.json").read_text())
    assert results["export"] == [str(text_run / "export/student.onnx")]
    assert main(["export", f"run_dir={text_run}", "format=pt2"]) == 0
    assert capsys.readouterr().out.strip() == str(text_run / "export/student.pt2")
    meta = json.loads((text_run / "export/meta.json").read_text())
    assert meta["dtypes"] == {"input_ids": "int64", "attention_mask": "int64"}

    from mmkd.modalities.text import tokenize

    enc = tokenize(["cat dog", "bank stock price market", "horse"], max_length=12)
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    with torch.no_grad():
        want = text_student(text_run)(*x.values())
    np.savez(tmp_path / "x.npz", **{k: v.numpy() for k, v in x.items()})
    torch.save(x, tmp_path / "x.pt")
    for name, fmt in (("x.npz", "onnx"), ("x.pt", "pt2")):
        out = tmp_path / f"{name}.csv"
        code = main(["predict", f"run_dir={text_run}", f"input={tmp_path / name}", f"output={out}", f"format={fmt}"])
        assert code == 0 and capsys.readouterr().out.strip() == f"3 predictions -> {out}"
        lines = out.read_text().splitlines()
        assert [int(r.split(",")[1]) for r in lines[1:]] == want.argmax(1).tolist()
        probs = np.array([[float(v) for v in r.split(",")[3:]] for r in lines[1:]])
        np.testing.assert_allclose(probs, want.double().softmax(1).numpy(), atol=1e-5)


# ------------------------------------------------------------------ predict's bad inputs and outputs
@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Two exported runs: an MLP on images (torch.export) and a text_transformer on token ids and masks (ONNX)."""
    root = tmp_path_factory.mktemp("exports")
    g = torch.Generator().manual_seed(0)
    for name, args, items, fmt in (("mlp", {"hidden": [8]}, image((1, 8, 8))(6, g), "pt2"),
                                   ("text_transformer", TINY_BERT, text(6, g), "onnx")):
        write_run(root / name, name, list(items), args, splits(items, torch.arange(6) % 3).meta())
        export_student(root / name, [fmt])
    return root


def one_line_error(capsys, *args: str) -> str:
    code = main(["predict", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mmkd: error: ") and err.count("\n") == 1, err
    return err.removeprefix("mmkd: error: ").strip()


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder where no file can be created: read-only permissions, or (as root, whom they do not
    stop) /sys; skips where neither stops a write."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            check_writable(candidate / "preds.csv", "output", file=True)
        except ConfigError:
            return candidate
    pytest.skip("no unwritable folder here")


def test_bad_outputs_are_one_line_and_nothing_is_written(exports, tmp_path, capsys, monkeypatch):
    run_dir = exports / "mlp"
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((4, 1, 8, 8), dtype=np.float32))
    (tmp_path / "taken").mkdir()
    (tmp_path / "file.txt").write_text("not a folder")
    locked = unwritable_folder(tmp_path)
    ran = []
    import mmkd.predict

    real = mmkd.predict.load_runtime
    monkeypatch.setattr(mmkd.predict, "load_runtime", lambda *a, **k: ran.append(1) or real(*a, **k))
    before = sorted(tmp_path.rglob("*"))
    for output, expected in ((tmp_path / "taken", f"output: {str(tmp_path / 'taken')!r} is a directory; give a file path"),
                             (tmp_path / "file.txt" / "preds.csv", "output: cannot write "),
                             (locked / "preds.csv", "output: cannot write "),
                             (locked / "new" / "deeper" / "preds.csv", "output: cannot write ")):
        err = one_line_error(capsys, f"run_dir={run_dir}", f"input={tmp_path / 'x.npy'}", f"output={output}")
        assert err.startswith(expected) and err.endswith(("give a path in a writable folder", "give a file path")), err
        assert sorted(tmp_path.rglob("*")) == before
    assert not ran  # refused before the student was loaded or run
    pred = predict(run_dir, np.load(tmp_path / "x.npy"))
    with pytest.raises(ConfigError, match=r"^output: cannot write .*taken.*; give a path in a writable folder$"):
        write_predictions(pred, tmp_path / "taken")  # the write itself failing: one line too
    assert sorted(tmp_path.rglob("*")) == before
    assert check_writable(tmp_path / "new" / "preds.csv", "output", file=True) == tmp_path / "new" / "preds.csv"
    assert not (tmp_path / "new").exists()  # the check creates no folder


def test_nan_and_infinite_rows_are_named(exports, tmp_path, capsys):
    x = np.random.default_rng(0).random((20, 1, 8, 8), dtype=np.float32)
    x[3, 0, 2, 2], x[11, 0, 0, 0] = np.nan, np.inf
    np.save(tmp_path / "two.npy", x)
    err = one_line_error(capsys, f"run_dir={exports / 'mlp'}", f"input={tmp_path / 'two.npy'}")
    assert err.startswith("input: 2 of 20 rows of 'image' hold NaN or infinite values (rows 3, 11, counting from 0); "
                          "replace or drop them")
    x[:9, 0, 0, 1] = -np.inf
    with pytest.raises(ConfigError, match=r"^input: 10 of 20 rows of 'image' hold NaN or infinite values "
                                          r"\(rows 0, 1, 2, 3, 4, \.\.\., counting from 0\)"):
        predict(exports / "mlp", x)
    assert not Path("preds.csv").exists()


def test_several_inputs_from_npz_and_pt(exports, tmp_path, capsys):
    run_dir = exports / "text_transformer"
    x = text(5, torch.Generator().manual_seed(3))
    model = text_student(run_dir)
    with torch.no_grad():
        want = model(*x.values()).argmax(1).tolist()
    np.savez(tmp_path / "x.npz", **{k: v.numpy() for k, v in x.items()})
    assert predict(run_dir, tmp_path / "x.npz").class_ids.tolist() == want
    torch.save({k: v.int() for k, v in x.items()}, tmp_path / "x32.pt")  # int32 ids: cast to the export's int64
    assert predict(run_dir, tmp_path / "x32.pt").class_ids.tolist() == want
    assert predict(run_dir, {k: v.double() for k, v in x.items()}).class_ids.tolist() == want  # whole floats

    np.savez(tmp_path / "ids.npz", input_ids=x["input_ids"].numpy(), other=x["input_ids"].numpy())
    np.save(tmp_path / "ids.npy", x["input_ids"].numpy())
    torch.save({"ids": x["input_ids"]}, tmp_path / "ids.pt")
    frac = {k: v.double() for k, v in x.items()}
    frac["input_ids"][2, 1] += 0.5
    np.savez(tmp_path / "frac.npz", **{k: v.numpy() for k, v in frac.items()})
    np.savez(tmp_path / "short.npz", input_ids=x["input_ids"].numpy(), attention_mask=x["attention_mask"][:4].numpy())
    for name, expected in (
            ("ids.npz", "input: missing the student's inputs attention_mask (it has: input_ids, other); "
                        "give one array per input: input_ids, attention_mask"),
            ("ids.pt", "input: missing the student's inputs input_ids, attention_mask (it has: ids)"),
            ("ids.npy", "input: "),
            ("frac.npz", "input: 'input_ids' must hold whole numbers (the student reads int64 input_ids), "
                         "but 1 rows do not (rows 2, counting from 0)"),
            ("short.npz", "input: the inputs differ in rows (input_ids: 5, attention_mask: 4)")):
        err = one_line_error(capsys, f"run_dir={run_dir}", f"input={tmp_path / name}")
        assert err.startswith(expected), err
        if name == "ids.npy":
            assert "holds one array, but the student reads 2 inputs (input_ids, attention_mask)" in err and ".npz" in err
    assert not Path("preds.csv").exists()
