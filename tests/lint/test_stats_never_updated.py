from torch import nn

from bnrewrite import analyze

from ._models import codes_at, conv_bn, x4


def test_fires_on_fresh_statistics():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    assert codes_at(analyze(m, x4()), "BN003") == ["_1"]


def test_silent_on_trained_statistics():
    assert codes_at(analyze(conv_bn(), x4()), "BN003") == []
