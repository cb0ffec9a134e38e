from torch import nn

from bnrewrite import analyze
from tests.conftest import randomize_bn

from ._models import codes_at, conv_bn, x4


def test_fires_on_dropout_before_bn():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4)))
    assert codes_at(analyze(m, x4()), "BN006") == ["_2"]


def test_silent_on_dropout_after_bn():
    m = randomize_bn(nn.Sequential(conv_bn(), nn.Dropout(0.5)))
    assert codes_at(analyze(m, x4()), "BN006") == []
