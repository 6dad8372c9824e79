"""CIFAR networks (mmkd.modalities.image.cifar, .mobile): sizes against the CRD paper's table, the
blocks against their formulas, the classifier contract."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmkd.modalities.image.cifar import BasicBlock, WideBlock
from mmkd.registry import MODELS

# parameters (millions) with a 100-class head, Tian et al. (CRD, ICLR 2020), Table 1
CRD = {"wrn_40_2": 2.25, "wrn_16_2": 0.70, "resnet56": 0.86, "resnet20": 0.28, "resnet32x4": 7.43, "resnet8x4": 1.23,
       "mobilenetv2": 0.81, "shufflenetv2": 1.35}


@pytest.mark.parametrize("name,millions", CRD.items())
def test_sizes_match_the_published_table(name, millions):
    m = MODELS[name](num_classes=100, in_shape=(3, 32, 32))
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - millions) < 0.006  # the table rounds to 0.01M
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_basic_block_is_its_formula():
    torch.manual_seed(0)
    b = BasicBlock(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 8, 8)
    out = F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x))))) + b.shortcut[1](b.shortcut[0](x)))
    torch.testing.assert_close(b(x), out)
    same = BasicBlock(4, 4).eval()
    torch.testing.assert_close(same(x), F.relu(same.bn2(same.conv2(F.relu(same.bn1(same.conv1(x))))) + x))


def test_wide_block_is_pre_activation():
    torch.manual_seed(0)
    b = WideBlock(4, 8, stride=1).eval()
    x = torch.randn(2, 4, 8, 8)
    pre = F.relu(b.bn1(x))
    torch.testing.assert_close(b(x), b.conv2(F.relu(b.bn2(b.conv1(pre)))) + b.shortcut(pre))


def test_classifier_contract_and_feature_paths():
    m = MODELS["resnet8x4"](num_classes=10, in_shape=(3, 32, 32)).eval()
    assert m.num_features == 256 and m.get_classifier() is m.fc
    for path in ("layer1", "layer2", "layer3", "pool"):
        m.get_submodule(path)
    x = torch.randn(2, 3, 32, 32)
    emb = m.pool(m.layer3(m.layer2(m.layer1(m.stem(x)))))
    m.reset_classifier(0)
    torch.testing.assert_close(m(x), emb)


def test_channel_shuffle_interleaves_the_groups():
    from mmkd.modalities.image.mobile import shuffle

    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert shuffle(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]


@pytest.mark.parametrize("name,depth,message", [("resnet", 21, "6n \\+ 2"), ("wrn", 17, "6n \\+ 4")])
def test_bad_depth(name, depth, message):
    from mmkd.modalities.image.cifar import CifarResNet, WideResNet

    cls = CifarResNet if name == "resnet" else WideResNet
    with pytest.raises(ValueError, match=message):
        cls(10, (3, 32, 32), depth)
