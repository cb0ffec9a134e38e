from torch import nn

from bnrewrite import analyze

from ._models import codes_at, conv_bn, x4


def test_fires_without_running_stats():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    report = analyze(m, x4())
    assert codes_at(report, "BN005") == ["_1"]
    assert report.norms[0].verdict == "not-foldable"
    assert report.norms[0].reason_code == "BN005"


def test_silent_with_running_stats():
    assert codes_at(analyze(conv_bn(), x4()), "BN005") == []
