"""Tests for the modality encoders (mmkd.modalities): shapes, feature paths, the log-mel front end
against a direct STFT computation, SpecAugment in training only, the real all-MiniLM-L6-v2 sentence
embeddings, the CLIP zero-shot head against a hand computation, late fusion, and one tiny epoch of
distillation for every encoder. Tiny random inputs; MiniLM is loaded once."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from mmkd import DataError, Distiller, Net, TensorDictDataset, Teacher, Term, Trainer
from mmkd.config import ModelConfig
from mmkd.models import CNN
from mmkd.registry import MODELS
from mmkd.routers import ConstantRouter
from mmkd.build import build_model
from mmkd.modalities.audio import AudioCNN
from mmkd.modalities.image import ResNet18
from mmkd.modalities.text import tokenize
from mmkd.modalities.vl import CLIPClassifier

# a tiny open_clip ViT (33k parameters besides the 49408-token embedding): the real code path, random weights
TINY_CLIP = {"arch": "ViT-S-32", "config": {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}}
TINY_BERT = {"hidden": 32, "layers": 1, "heads": 2}
SR, SAMPLES = 8000, 1600


@pytest.fixture(scope="module")
def minilm():
    torch.manual_seed(0)
    return MODELS["text_minilm"](num_classes=4, in_shape={"input_ids": (16,), "attention_mask": (16,)}, freeze=True).eval()


def test_encoders_are_registered():
    assert {"resnet18", "audio_cnn", "text_transformer", "text_minilm", "clip", "fusion", "cnn"} <= set(MODELS.names())


# ------------------------------------------------------------------ image
def test_resnet18_stems_channels_and_features():
    torch.manual_seed(0)
    small = ResNet18(10, (1, 28, 28)).eval()
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, torch.nn.Identity)
    big = ResNet18(10, (3, 64, 64)).eval()
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 3 and isinstance(big.maxpool, torch.nn.MaxPool2d)
    assert ResNet18(10, (3, 64, 64), small_input=True).conv1.kernel_size == (3, 3)
    x = torch.rand(2, 1, 28, 28)
    out = Net(small, ["image"], features=["layer4", "avgpool"])({"image": x})
    assert out.logits.shape == (2, 10) and out.features["layer4"].shape == (2, 512, 4, 4)
    torch.testing.assert_close(out.features["avgpool"], out.features["layer4"].mean((2, 3)))
    torch.testing.assert_close(out.logits, small.fc(out.features["avgpool"]))
    assert big(torch.rand(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("small_input,side", [(True, 16), (False, 32)])
def test_resnet18_three_channel_weights_into_one_channel_model(tmp_path, small_input, side):
    """Summing the first convolution over its input channels: model_1(g) == model_3((g, g, g))."""
    torch.manual_seed(0)
    rgb = ResNet18(1000, (3, side, side), small_input=small_input).eval()
    for m in rgb.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    grey = ResNet18(1000, (1, side, side), small_input=small_input, weights=str(tmp_path / "rgb.pt")).eval()
    g = torch.rand(2, 1, side, side)
    with torch.no_grad():
        torch.testing.assert_close(grey(g), rgb(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
        # another class count: everything but the classifier loads
        ten = ResNet18(10, (1, side, side), small_input=small_input, weights=str(tmp_path / "rgb.pt")).eval()
        feats = Net(ten, ["x"], ["avgpool"])({"x": g}).features["avgpool"]
        torch.testing.assert_close(feats, Net(rgb, ["x"], ["avgpool"])({"x": g.expand(-1, 3, -1, -1)}).features["avgpool"],
                                   rtol=1e-4, atol=1e-4)
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a ResNet-18 state dict"):
        ResNet18(10, (1, side, side), weights=str(tmp_path / "other.pt"))
    with pytest.raises(DataError, match="resnet18.weights: no such file .*missing.pt"):
        ResNet18(10, (1, side, side), weights=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(DataError, match=r"resnet18.weights: '\S*junk.pt' is not a readable state dict"):
        ResNet18(10, (1, side, side), weights=str(tmp_path / "junk.pt"))


# ------------------------------------------------------------------ audio
def reference_log_mel(x, n_fft=200, hop=80, n_mels=40, top_db=80.0):
    """|STFT|^2 with a periodic Hann window, HTK mel filters, 10 log10, clipped top_db below each maximum."""
    from torchaudio.functional import melscale_fbanks

    spec = torch.stft(x.double(), n_fft, hop, window=torch.hann_window(n_fft, dtype=torch.float64),
                      center=True, pad_mode="reflect", return_complex=True).abs() ** 2
    fb = melscale_fbanks(n_fft // 2 + 1, 0.0, SR / 2, n_mels, SR).double()  # [freqs, mels]
    db = 10 * torch.log10((fb.T @ spec).clamp_min(1e-10))
    return torch.maximum(db, db.amax((1, 2), keepdim=True) - top_db)


def test_log_mel_front_end_matches_direct_computation():
    torch.manual_seed(0)
    t = torch.arange(SAMPLES) / SR
    wave = torch.stack([0.5 * torch.sin(2 * math.pi * 440 * t), 0.1 * torch.randn(SAMPLES)])
    wave[0, :400] = 0.0  # silence: exercises the top_db clipping
    model = AudioCNN(10, (1, SAMPLES)).eval()
    out = Net(model, ["audio"], ["frontend"])({"audio": wave.unsqueeze(1)})
    ref = reference_log_mel(wave)
    assert out.features["frontend"].shape == (2, 1, 40, SAMPLES // 80 + 1)
    torch.testing.assert_close(out.features["frontend"][:, 0].double(), ref, rtol=1e-4, atol=2e-3)
    assert (ref[0] == ref[0].max() - 80).any()  # the clip did something
    torch.testing.assert_close(model.frontend(wave), out.features["frontend"])  # [B, samples] too
    assert out.logits.shape == (2, 10)


def test_precomputed_spectrograms_skip_the_front_end():
    model = AudioCNN(10, (1, 40, 21))
    assert isinstance(model.frontend, torch.nn.Identity)
    assert model(torch.randn(3, 1, 40, 21)).shape == (3, 10)
    with pytest.raises(ValueError, match="frontend"):
        AudioCNN(10, (1, SAMPLES), frontend=False)


def test_spec_augment_masks_in_training_only():
    torch.manual_seed(0)
    masked = AudioCNN(10, (1, SAMPLES), freq_mask=8, time_mask=6, num_masks=1)
    plain = AudioCNN(10, (1, SAMPLES))
    plain.load_state_dict(masked.state_dict())
    x = torch.randn(8, 1, SAMPLES)
    masked.eval(), plain.eval()
    with torch.no_grad():
        first = masked(x)
        torch.testing.assert_close(first, masked(x), rtol=0, atol=0)
        torch.testing.assert_close(first, plain(x), rtol=0, atol=0)
    masked.train()
    out = Net(masked, ["a"], ["norm", "specaug"])({"a": x}).features
    before, after = out["norm"][:, 0], out["specaug"][:, 0]  # [batch, mels, frames]
    zero = after == 0
    rows, cols = zero.all(2), zero.all(1)  # whole mel bands, whole frames
    assert torch.equal(zero, rows[:, :, None] | cols[:, None, :])  # nothing but whole bands and frames
    assert torch.equal(after[~zero], before[~zero])
    assert rows.any() and cols.any()
    assert rows.sum(1).max() <= 8 and cols.sum(1).max() <= 6
    assert rows.any(1).sum() >= 2  # drawn per example: not all the same
    assert len({tuple(r.nonzero().flatten().tolist()) for r in rows}) > 1


# ------------------------------------------------------------------ text
def cosine(a, b):
    return F.cosine_similarity(a, b, dim=-1).item()


def test_minilm_sentence_embeddings(minilm):
    texts = ["a cat sits on the mat", "a kitten is sitting on a mat", "stock markets fell sharply"]
    tok = tokenize(texts, max_length=16)
    assert tok["input_ids"].shape == (3, 16) and tok["input_ids"].dtype == torch.long
    assert tok["input_ids"][0, 0].item() == 101 and tok["attention_mask"][0].sum() == 8  # [CLS] a cat sits on the mat [SEP]
    with torch.no_grad():
        out = Net(minilm, ["input_ids", "attention_mask"], ["pool"])(tok)
        e = out.features["pool"]
        assert e.shape == (3, 384) and out.logits.shape == (3, 4)
        assert cosine(e[0], e[1]) > 0.7 > 0.2 > cosine(e[0], e[2])
        # masked mean pooling: padding to another length changes nothing
        longer = tokenize(texts[:1], max_length=40)
        torch.testing.assert_close(Net(minilm, ["input_ids", "attention_mask"], ["pool"])(longer).features["pool"][0],
                                   e[0], rtol=1e-4, atol=1e-5)
        # without a mask, non-padding tokens count
        torch.testing.assert_close(minilm(tok["input_ids"]), out.logits)


def test_tiny_text_transformer_and_tokenize_truncation():
    torch.manual_seed(0)
    model = MODELS["text_transformer"](num_classes=3, in_shape=(8,), **TINY_BERT).eval()
    tok = tokenize(["hello world", "a much longer sentence that will not fit in eight word pieces at all"], max_length=8)
    assert tok["attention_mask"].tolist()[0] == [1, 1, 1, 1, 0, 0, 0, 0]
    assert tok["attention_mask"][1].all() and tok["input_ids"][1, -1].item() == 102  # cut, still ends in [SEP]
    assert model(tok["input_ids"], tok["attention_mask"]).shape == (2, 3)
    with pytest.raises(ValueError, match="max_positions"):
        MODELS["text_transformer"](num_classes=3, in_shape=(600,))
    with pytest.raises(DataError, match="no such folder '/nonexistent/tokenizer'"):
        tokenize(["x"], tokenizer="/nonexistent/tokenizer")


# ------------------------------------------------------------------ vision-language
def test_clip_zero_shot_logits_by_hand(tmp_path):
    import open_clip

    torch.manual_seed(0)
    clip = open_clip.create_model(TINY_CLIP["arch"], **TINY_CLIP["config"]).eval()
    tokenizer = open_clip.get_tokenizer(TINY_CLIP["arch"], context_length=12)
    names, templates = ["cat", "dog", "car"], ["a photo of a {}.", "a drawing of a {}."]
    model = CLIPClassifier(clip, tokenizer, names, templates).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        rows = []
        for c in names:
            t = torch.stack([F.normalize(clip.encode_text(tokenizer([p.format(c)]))[0], dim=0) for p in templates])
            rows.append(F.normalize(t.mean(0), dim=0))
        w = torch.stack(rows)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        img = (F.interpolate(x.repeat(1, 3, 1, 1), size=(16, 16), mode="bicubic") - mean) / std
        f = F.normalize(clip.encode_image(img), dim=1)
        expect = clip.logit_scale.exp() * f @ w.T
        got = model(x)
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)
    assert got.std() > 0

    # the registered factory with a local checkpoint: the same weights give the same logits
    torch.save(clip.state_dict(), tmp_path / "clip.pt")
    loaded = MODELS["clip"](num_classes=3, in_shape=(1, 28, 28), pretrained=str(tmp_path / "clip.pt"),
                            class_names=names, templates=templates, **TINY_CLIP).eval()
    # an open_clip model folder (config and weights): the same again
    folder = tmp_path / "tiny-clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP["config"]}))
    torch.save(clip.state_dict(), folder / "open_clip_pytorch_model.bin")
    from_dir = MODELS["clip"](num_classes=3, in_shape=(1, 28, 28), arch=f"local-dir:{folder}",
                              class_names=names, templates=templates).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), got)
        torch.testing.assert_close(from_dir(x), got)
    with pytest.raises(ValueError, match="3 classes"):
        MODELS["clip"](num_classes=3, in_shape=(1, 28, 28), class_names=["a"], **TINY_CLIP)
    with pytest.raises(ValueError, match="unknown architecture"):
        MODELS["clip"](num_classes=3, in_shape=(1, 28, 28), arch="ViT-Nope")


# ------------------------------------------------------------------ fusion
FUSION = {"encoders": {"image": {"name": "cnn", "args": {"channels": [8, 16]}},
                       "audio": {"name": "audio_cnn", "args": {"channels": [8]}},
                       "text": {"name": "text_transformer", "args": TINY_BERT,
                                "inputs": ["input_ids", "attention_mask"]}},
          "hidden": [16]}
SHAPES = {"image": (1, 28, 28), "audio": (1, 40, 21), "input_ids": (8,), "attention_mask": (8,)}


def fusion_batch(n=4):
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(8) < torch.randint(2, 9, (n, 1), generator=g)).long()
    return {"image": torch.rand(n, 1, 28, 28, generator=g), "audio": torch.randn(n, 1, 40, 21, generator=g),
            "input_ids": torch.randint(1000, 2000, (n, 8), generator=g) * mask, "attention_mask": mask,
            "label": torch.randint(0, 5, (n,), generator=g)}


def load_but_head(model, encoder):
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and not unexpected


def test_fusion_from_config_exposes_each_modality():
    torch.manual_seed(0)
    mc = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                         {"name": "fusion", "inputs": list(SHAPES), "args": FUSION})
    model = build_model(mc, {"num_classes": 5, "shapes": SHAPES}, "student").eval()  # Hydra containers as args
    batch = fusion_batch()
    paths = ["encoders.image", "encoders.audio", "encoders.text"]
    with torch.no_grad():
        out = Net(model, list(SHAPES), paths)(batch)
        # each modality's embedding equals its encoder run alone (a fresh one with the same weights)
        image = CNN(5, (1, 28, 28), channels=[8, 16]).eval()
        load_but_head(image, model.encoders.image)
        torch.testing.assert_close(out.features["encoders.image"], image.pool(image.features(batch["image"])))
        audio = AudioCNN(5, (1, 40, 21), channels=[8]).eval()
        load_but_head(audio, model.encoders.audio)
        torch.testing.assert_close(out.features["encoders.audio"], audio.pool(audio.features(audio.norm(batch["audio"]))))
        text = model.encoders.text
        hidden = text.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).float()
        torch.testing.assert_close(out.features["encoders.text"], (hidden * m).sum(1) / m.sum(1))
        assert [out.features[p].shape[1] for p in paths] == [16, 8, 32]
        torch.testing.assert_close(out.logits, model.head(torch.cat([out.features[p] for p in paths], 1)))
    assert out.logits.shape == (4, 5)


def test_fusion_errors():
    with pytest.raises(ValueError, match="inputs"):
        MODELS["fusion"](num_classes=2, in_shape=(1, 28, 28), encoders={"image": {"name": "cnn"}})
    with pytest.raises(ValueError, match=r"\['audio'\] are not among"):
        MODELS["fusion"](num_classes=2, in_shape={"image": (1, 28, 28)}, encoders={"audio": {"name": "audio_cnn"}})
    with pytest.raises(ValueError, match="expected"):
        MODELS["fusion"](num_classes=2, in_shape={"image": (1, 28, 28)}, encoders={"image": {"model": "cnn"}})


# ------------------------------------------------------------------ one tiny epoch of distillation each
def _case(name):
    g = torch.Generator().manual_seed(1)
    n, tok = 8, fusion_batch(8)
    image = {"image": torch.rand(n, 1, 28, 28, generator=g)}
    text = {k: tok[k] for k in ("input_ids", "attention_mask")}
    cases = {  # model name, args, inputs, data, feature path
        "resnet18": ("resnet18", {}, image, "avgpool"),
        "audio_cnn": ("audio_cnn", {"freq_mask": 6, "time_mask": 4, "channels": [8]},
                      {"audio": 0.1 * torch.randn(n, 1, SAMPLES, generator=g)}, "pool"),
        "text_transformer": ("text_transformer", TINY_BERT, text, "pool"),
        "text_minilm": ("text_minilm", {}, text, "pool"),
        "clip": ("clip", TINY_CLIP, image, "visual"),
        "fusion": ("fusion", FUSION, {k: tok[k] for k in SHAPES}, "encoders.audio"),
    }
    return cases[name]


@pytest.mark.parametrize("name", ["resnet18", "audio_cnn", "text_transformer", "text_minilm", "clip", "fusion"])
def test_every_encoder_distils_for_one_epoch(name, request, tmp_path):
    model_name, args, inputs, feature = _case(name)
    keys = list(inputs)
    shapes = {k: tuple(v.shape[1:]) for k, v in inputs.items()}
    torch.manual_seed(0)
    if name == "text_minilm":
        student = copy.deepcopy(request.getfixturevalue("minilm"))
    else:
        student = MODELS[model_name](num_classes=4, in_shape=shapes[keys[0]] if len(keys) == 1 else shapes, **args)
    teacher_model = copy.deepcopy(student)
    labels = torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(2))
    data = TensorDictDataset(f"enc/{name}", **inputs, label=labels)
    teacher = Teacher(teacher_model, keys, [feature])
    distiller = Distiller(Net(student, keys, [feature]), [teacher], [Term("ce"), Term("kd", 0.5)], ConstantRouter())
    before = {k: v.clone() for k, v in student.state_dict().items()}
    t_before = {k: v.clone() for k, v in teacher_model.state_dict().items()}
    trainer = Trainer(run_dir=tmp_path / name, max_epochs=1, batch_size=4, lr=1e-3, tensorboard=False,
                      progress="off", device="cpu")
    result = trainer.fit(distiller, data, data)
    assert len(result.history) == 1 and math.isfinite(result.history[0]["train/loss"])
    assert 0.0 <= trainer.evaluate(distiller, data)["acc"] <= 1.0
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(torch.equal(t_before[k], v) for k, v in teacher_model.state_dict().items())
    if name == "text_minilm":  # frozen encoder: only the classifier trained, the encoder stays in eval mode
        assert all(torch.equal(before[k], v) for k, v in student.state_dict().items() if k.startswith("encoder."))
        assert not student.train().encoder.training and student.dropout.training
    out = distiller.student.eval()({k: v[:2] for k, v in inputs.items()})
    assert out.logits.shape == (2, 4) and out.features[feature].shape[0] == 2


# ------------------------------------------------------------------ a pretrained / zero-shot teacher in a run
def test_teacher_with_zero_epochs_is_used_as_built(tmp_path):
    """``teachers.<name>.epochs: 0``: no training stage; the teacher is the model as its factory built it."""
    from omegaconf import open_dict

    from mmkd.cli import compose
    from mmkd.config import typed_sections
    from mmkd.data import digits
    from mmkd.run import run
    from mmkd.trainer import seed_everything

    cfg = compose([f"run_dir={tmp_path}/run", f"cache_dir={tmp_path}/cache", "trainer.max_epochs=1", "export=[]",
                   "baseline=false", "trainer.progress=off", "trainer.tensorboard=false"])
    with open_dict(cfg):
        cfg.teachers = {"clip": {"name": "clip", "inputs": ["image"], "epochs": 0, "args": TINY_CLIP}}
    results = run(typed_sections(cfg))
    assert "val_acc" not in results["teachers"]["clip"] and not (tmp_path / "run" / "teachers").exists()
    seed_everything(cfg.seed)
    fresh = MODELS["clip"](num_classes=10, in_shape=(1, 8, 8), **TINY_CLIP)
    acc = Trainer(device="cpu").evaluate(Distiller(Net(fresh, ["image"]), [], [Term("ce")]), digits().test)["acc"]
    assert results["teachers"]["clip"]["test_acc"] == pytest.approx(acc)


def test_run_gives_models_that_take_class_names_the_data_sets():
    from omegaconf import OmegaConf

    @MODELS.register("test_named_head")
    def named_head(num_classes, in_shape, class_names=None):
        head = torch.nn.Linear(4, num_classes)
        head.names = class_names
        return head

    meta = {"shapes": {"image": [4]}, "num_classes": 2, "class_names": ["cat", "dog"]}
    mc = OmegaConf.structured(ModelConfig(name="test_named_head", inputs=["image"]))
    assert build_model(mc, meta, "student").names == ["cat", "dog"]
    mc.args = {"class_names": ["a", "b"]}  # the config's own names win
    assert build_model(mc, meta, "student").names == ["a", "b"]
    assert build_model(OmegaConf.structured(ModelConfig(name="mlp", inputs=["image"])), meta, "student")  # takes none
