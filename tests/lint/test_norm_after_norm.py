from torch import nn

from bnrewrite import analyze
from tests.conftest import randomize_bn

from ._models import codes_at, conv_bn, x4


def test_fires_on_bn_after_bn():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4)))
    assert codes_at(analyze(m, x4()), "BN007") == ["_2"]


def test_silent_on_single_norm():
    assert codes_at(analyze(conv_bn(), x4()), "BN007") == []
