import torch

from bnrewrite import analyze

from ._models import codes_at, conv_bn


def test_fires_on_batch_of_one_in_training():
    assert codes_at(analyze(conv_bn(train=True), (torch.randn(1, 3, 8, 8),)), "BN008") == ["_1"]


def test_silent_on_larger_batch_or_eval():
    assert codes_at(analyze(conv_bn(train=True), (torch.randn(4, 3, 8, 8),)), "BN008") == []
    assert codes_at(analyze(conv_bn(train=False), (torch.randn(1, 3, 8, 8),)), "BN008") == []


def test_fires_even_when_the_model_cannot_run_in_training_mode():
    """BatchNorm1d on one sample raises in training mode; analysis still runs and says why."""
    from torch import nn

    model = nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6)).train()
    assert codes_at(analyze(model, (torch.randn(1, 8),)), "BN008") == ["_1"]
    assert model.training and model[1].training  # modes restored
