import torch

from bnrewrite import analyze

from ._models import codes_at, conv_bn


def test_fires_on_batch_of_one_in_training():
    assert codes_at(analyze(conv_bn(train=True), (torch.randn(1, 3, 8, 8),)), "BN008") == ["_1"]


def test_silent_on_larger_batch_or_eval():
    assert codes_at(analyze(conv_bn(train=True), (torch.randn(4, 3, 8, 8),)), "BN008") == []
    assert codes_at(analyze(conv_bn(train=False), (torch.randn(1, 3, 8, 8),)), "BN008") == []
