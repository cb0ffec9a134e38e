import torch
from torch import nn

from bnrewrite import analyze
from tests.conftest import randomize_bn

from ._models import codes_at, conv_bn, x4


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_fires_when_conv_output_is_also_used_elsewhere():
    report = analyze(randomize_bn(Branch()), x4(), merge_branches=False)
    assert codes_at(report, "BN009") == ["bn"]
    assert report.norms[0].verdict == "not-foldable"  # stays a BatchNorm: a fold never adds work
    # bn(y) + y is one per-channel affine map of y: merged, then folded into the conv
    assert analyze(randomize_bn(Branch()), x4()).norms[0].verdict == "merge-branches"


def test_silent_on_plain_chain():
    assert codes_at(analyze(conv_bn(), x4()), "BN009") == []
