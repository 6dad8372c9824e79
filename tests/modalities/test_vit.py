"""vit_tiny (mmkd.modalities.image.vit): shapes, the feature paths a Net reads, attention against a naive
computation, the classifier contract, initialisation and one-line errors."""
import math

import pytest
import torch

from mmkd import Net
from mmkd.models import strip_head
from mmkd.modalities.image.vit import Attention, VisionTransformer
from mmkd.registry import MODELS


def small(**kw):
    torch.manual_seed(0)
    return MODELS["vit_tiny"](num_classes=10, in_shape=(3, 32, 32), **{"dim": 24, "depth": 3, "heads": 2, **kw})


def test_registered_with_the_tiny_defaults():
    m = MODELS["vit_tiny"](num_classes=10, in_shape=(3, 32, 32))
    assert isinstance(m, VisionTransformer) and m.num_features == 192 and len(m.blocks) == 6
    assert m.patch_embed.kernel_size == (4, 4) and m.pos_embed.shape == (1, 65, 192)
    assert m.blocks[0].attn.heads == 3 and m.blocks[0].mlp[0].out_features == 768
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_feature_paths_give_the_tokens_the_class_token_and_the_logits_it_feeds():
    m = small().eval()
    x = torch.randn(4, 3, 32, 32)
    out = Net(m, ("image",), ["blocks.0", "blocks.2", "norm", "pool"])({"image": x})
    assert out.features["blocks.0"].shape == (4, 65, 24) and out.features["blocks.2"].shape == (4, 65, 24)
    torch.testing.assert_close(out.features["norm"], torch.nn.functional.layer_norm(
        out.features["blocks.2"], (24,), m.norm.weight, m.norm.bias, eps=1e-6))
    torch.testing.assert_close(out.features["pool"], out.features["norm"][:, 0])
    torch.testing.assert_close(out.logits, m.head(out.features["pool"]))
    with pytest.raises(AttributeError):
        Net(m, ("image",), ["blocks.3"])  # only 3 blocks


def test_tokens_are_the_patches_after_the_class_token():
    m = small(patch=8).eval()
    x = torch.randn(2, 3, 32, 32)
    tok = m.tokens(x)
    assert tok.shape == (2, 17, 24)
    patch = x[:, :, 8:16, 16:24]  # grid row 1, column 2: token 1 + 1 * 4 + 2
    emb = (m.patch_embed.weight * patch[:, None]).sum((2, 3, 4)) + m.patch_embed.bias
    torch.testing.assert_close(tok[:, 7], emb + m.pos_embed[0, 7])
    torch.testing.assert_close(tok[:, 0], (m.cls_token[0, 0] + m.pos_embed[0, 0]).expand(2, -1))


def test_attention_matches_a_naive_per_head_computation():
    torch.manual_seed(1)
    att = Attention(12, 3).double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    q, k, v = att.qkv(x).split(12, -1)
    heads = []
    for h in range(3):
        sl = slice(4 * h, 4 * h + 4)
        w = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(4), -1)
        heads.append(w @ v[..., sl])
    torch.testing.assert_close(att(x), att.proj(torch.cat(heads, -1)))


def test_classifier_contract_and_initialisation():
    m = small()
    assert m.get_classifier() is m.head
    with torch.no_grad():
        assert float(m.cls_token.abs().max()) < 1e-5 and 0.017 < float(m.pos_embed.std()) < 0.023
        assert 0.018 < float(m.blocks[1].mlp[0].weight.std()) < 0.022  # std 0.02 (timm's), not PyTorch's default
    assert torch.all(m.blocks[1].attn.qkv.bias == 0)
    x = torch.randn(3, 3, 32, 32)
    m.eval()
    pooled = m.pool(m.norm(m.blocks(m.tokens(x))))
    assert strip_head(m, "test") == 24
    torch.testing.assert_close(m(x), pooled)
    m.reset_classifier(5)
    assert m(x).shape == (3, 5)


def test_bad_sizes_are_one_line_errors():
    with pytest.raises(ValueError, match="patch=5"):
        MODELS["vit_tiny"](num_classes=10, in_shape=(3, 32, 32), patch=5)
    with pytest.raises(ValueError, match="heads=5"):
        MODELS["vit_tiny"](num_classes=10, in_shape=(3, 32, 32), heads=5)
