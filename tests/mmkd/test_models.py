"""Tests for mmkd.models: the classifier-head contract (:class:`Classifier`: ``num_features``,
``get_classifier``, ``reset_classifier``) on every registered model that implements it, and
:func:`strip_head` on contract models, foreign (torchvision-like) models and models with no head.
Tiny random models; MiniLM is loaded once."""
import copy

import pytest
import torch
import torchvision
from torch import nn

from mmkd.models import CNN, MLP, Classifier, strip_head
from mmkd.registry import MODELS

TINY_CLIP = {"arch": "ViT-S-32", "config": {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "head_width": 8},
    "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}}
TINY_BERT = {"hidden": 32, "layers": 1, "heads": 2}
FUSION = {"encoders": {"image": {"name": "cnn", "args": {"channels": [4, 6]}},
                       "audio": {"name": "audio_cnn", "args": {"channels": [5]}}}, "hidden": [7]}
B, C = 3, 4


def _inputs():
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(B, 8, dtype=torch.long)
    mask[0, 5:] = 0
    return {"image": torch.rand(B, 1, 28, 28, generator=g), "audio": 0.1 * torch.randn(B, 1, 800, generator=g),
            "image3": torch.rand(B, 3, 16, 16, generator=g), "image32": torch.rand(B, 3, 32, 32, generator=g),
            "input_ids": torch.randint(1000, 2000, (B, 8), generator=g) * mask, "attention_mask": mask}


# registered name -> (factory arguments, batch keys forward reads, expected num_features)
CASES = {
    "mlp": ({"in_shape": (1, 28, 28), "hidden": [16, 8], "batch_norm": True}, ["image"], 8),
    "mlp_linear": ({"in_shape": (1, 28, 28), "hidden": []}, ["image"], 784),  # no hidden layer
    "cnn": ({"in_shape": (1, 28, 28), "channels": [4, 6]}, ["image"], 6),
    "resnet18": ({"in_shape": (1, 28, 28)}, ["image"], 512),
    "audio_cnn": ({"in_shape": (1, 800), "channels": [5]}, ["audio"], 5),
    "text_transformer": ({"in_shape": (8,), **TINY_BERT}, ["input_ids", "attention_mask"], 32),
    "text_minilm": ({"in_shape": (8,)}, ["input_ids", "attention_mask"], 384),
    "clip": ({"in_shape": (1, 28, 28), **TINY_CLIP}, ["image"], 16),
    "fusion": ({"in_shape": {"image": (1, 28, 28), "audio": (1, 800)}, **FUSION}, ["image", "audio"], 7),
    "fusion_no_hidden": ({"in_shape": {"image": (1, 28, 28), "audio": (1, 800)}, **FUSION, "hidden": []},
                         ["image", "audio"], 6 + 5),  # the classifier reads the concatenation
    "resnet8": ({"in_shape": (3, 16, 16)}, ["image3"], 64),
    "wrn_16_1": ({"in_shape": (3, 16, 16)}, ["image3"], 64),
    "mobilenetv2": ({"in_shape": (3, 32, 32)}, ["image32"], 1280),
    "shufflenetv2": ({"in_shape": (3, 16, 16)}, ["image3"], 1024),
    "vit_tiny": ({"in_shape": (3, 16, 16), "dim": 16, "depth": 2, "heads": 2}, ["image3"], 16),
}
CONTRACT = {"mlp", "cnn", "resnet18", "audio_cnn", "text_transformer", "text_minilm", "clip", "fusion", "resnet8",
            "wrn_16_1", "mobilenetv2", "shufflenetv2", "vit_tiny"}

_built: dict[str, nn.Module] = {}


def build(case: str) -> nn.Module:
    """A fresh copy of the case's model (built once, deep-copied), in eval mode."""
    if case not in _built:
        args, _, _ = CASES[case]
        torch.manual_seed(0)
        _built[case] = MODELS[case.split("_no_")[0].removesuffix("_linear")](num_classes=C, **args).eval()
    return copy.deepcopy(_built[case])


def run(model: nn.Module, case: str) -> torch.Tensor:
    batch = _inputs()
    with torch.no_grad():
        return model(*[batch[k] for k in CASES[case][1]])


def test_every_contract_model_is_covered():
    classes = {n for n in MODELS.names() if isinstance(MODELS[n], type) and issubclass(MODELS[n], Classifier)}
    assert classes <= CONTRACT, f"add {sorted(classes - CONTRACT)} to CASES"
    assert {c.split("_no_")[0].removesuffix("_linear") for c in CASES} == CONTRACT
    for name in CONTRACT:  # factories that are functions: the model they build
        assert isinstance(build(name), Classifier), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_reset_classifier_to_identity_returns_the_embedding(case):
    model = build(case)
    assert model.num_features == CASES[case][2]
    seen = []
    hook = model.get_classifier().register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    logits = run(model, case)
    hook.remove()
    assert logits.shape == (B, C) and seen[0].shape == (B, model.num_features)
    model.reset_classifier(0)
    assert isinstance(model.get_classifier(), nn.Identity)
    embedding = run(model, case)
    assert embedding.shape == (B, model.num_features)
    assert torch.equal(embedding, seen[0])  # exactly what the classifier read


@pytest.mark.parametrize("case", sorted(CASES))
def test_reset_classifier_to_k_classes(case):
    model = build(case)
    default = model.state_dict()
    path = model.classifier_path
    head_keys = {k for k in default if k.startswith(path + ".")}
    assert head_keys  # the classifier has parameters under its path
    model.reset_classifier(7)
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (model.num_features, 7)
    assert run(model, case).shape == (B, 7)
    model.reset_classifier(C)
    if case == "clip":  # a fresh linear classifier replaces the zero-shot (cosine) head
        assert {k for k in model.state_dict() if k.startswith("head.")} == {"head.weight", "head.bias"}
    else:  # the default class count: the default state-dict layout again
        assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in default.items()}
        model.load_state_dict(default)  # a checkpoint of the default model loads strictly
        torch.testing.assert_close(run(model, case), run(build(case), case), rtol=0, atol=0)
    model.reset_classifier(0)
    assert set(model.state_dict()) == set(default) - head_keys  # only the classifier went
    with pytest.raises(ValueError, match="num_classes must be >= 0"):
        model.reset_classifier(-1)


def test_state_dict_keys_are_those_of_before_the_contract():
    """The mixin adds no parameter or buffer: keys as the checkpoints on disk have them."""
    mlp = MLP(C, (1, 28, 28), hidden=[16, 8], batch_norm=True)
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert list(mlp.state_dict()) == ["body.1.weight", "body.1.bias", *[f"body.2.{k}" for k in bn],
                                      "body.5.weight", "body.5.bias", *[f"body.6.{k}" for k in bn],
                                      "head.weight", "head.bias"]
    cnn = CNN(C, (1, 28, 28), channels=[4, 6])
    assert list(cnn.state_dict()) == ["features.0.weight", *[f"features.1.{k}" for k in bn], "features.3.weight",
                                      *[f"features.4.{k}" for k in bn], "head.weight", "head.bias"]
    audio = build("audio_cnn")
    assert list(audio.state_dict()) == ["frontend.0.spectrogram.window", "frontend.0.mel_scale.fb",
                                        *[f"norm.{k}" for k in bn], "features.0.weight",
                                        *[f"features.1.{k}" for k in bn], "head.weight", "head.bias"]
    fusion = build("fusion")
    assert [k for k in fusion.state_dict() if k.startswith("head.")] == ["head.0.weight", "head.0.bias",
                                                                        "head.3.weight", "head.3.bias"]
    assert fusion.classifier_path == "head.3"
    # resnet18 keeps torchvision's names: torchvision's state dict loads strictly
    resnet = build("resnet18")
    assert resnet.classifier_path == "fc"
    want = torchvision.models.resnet18(num_classes=C).state_dict()
    assert {k: v.shape for k, v in resnet.state_dict().items() if k != "conv1.weight"} == \
        {k: v.shape for k, v in want.items() if k != "conv1.weight"}
    text = build("text_transformer")
    assert [k for k in text.state_dict() if not k.startswith("encoder.")] == ["head.weight", "head.bias"]
    clip = build("clip")
    assert [k for k in clip.state_dict() if k.startswith("head.")] == ["head.weight", "head.logit_scale"]


# ------------------------------------------------------------------ strip_head
def test_strip_head_uses_the_contract():
    fusion = build("fusion")  # its head is a Sequential: attribute guessing alone would refuse it
    assert strip_head(fusion, "x") == 7
    assert isinstance(fusion.head[3], nn.Identity) and isinstance(fusion.head[0], nn.Linear)
    assert run(fusion, "fusion").shape == (B, 7)
    resnet = build("resnet18")
    assert strip_head(resnet, "x") == 512
    assert isinstance(resnet.fc, nn.Identity) and not hasattr(resnet, "head")
    assert run(resnet, "resnet18").shape == (B, 512)
    clip = build("clip")  # a cosine zero-shot head, not a linear one
    assert strip_head(clip, "x") == 16 and run(clip, "clip").shape == (B, 16)


class _Foreign(nn.Module):
    """A model outside the contract whose classifier is a linear ``head``."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


def test_strip_head_on_foreign_models():
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=3).eval()
    assert not isinstance(tv, Classifier)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        logits = tv(x)
        assert strip_head(tv, "teacher") == 512 and isinstance(tv.fc, nn.Identity)
        embedding = tv(x)
    assert embedding.shape == (2, 512)
    torch.testing.assert_close(logits, torch.nn.functional.linear(embedding, *_fc_params(3)))
    m = _Foreign()
    assert strip_head(m, "x") == 5 and isinstance(m.head, nn.Identity) and m(torch.rand(2, 6)).shape == (2, 5)


def _fc_params(num_classes):
    torch.manual_seed(0)
    fc = torchvision.models.resnet18(num_classes=num_classes).fc
    return fc.weight, fc.bias


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 2)), nn.Linear(4, 2), _Foreign().body])
def test_strip_head_without_a_head_is_one_line(model):
    with pytest.raises(ValueError, match=r"^fusion\.encoders\.x: \w+ has no linear `head` or `fc` classifier") as e:
        strip_head(model, "fusion.encoders.x")
    assert "\n" not in str(e.value) and "mmkd.models.Classifier" in str(e.value)


def test_strip_head_refuses_a_non_linear_head_outside_the_contract():
    m = _Foreign()
    m.head = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ValueError, match="has no linear `head`"):
        strip_head(m, "x")
    assert isinstance(m.head, nn.Sequential)  # left as it was
