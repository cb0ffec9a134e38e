"""A segmentation decoder with bias-free transposed convs (FD108's case).

Each stage mixes channels with a grouped 1x1 ``ConvTranspose2d`` and upsamples with a depthwise
then a plain stride-2 one, each followed by BatchNorm. On CPU, oneDNN adds a transposed-conv bias
on a slow path for 1x1 and grouped kernels, so giving those layers a bias can cost more than the
BatchNorm: `fold` times each such fold and keeps the BatchNorm where it would be slower.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from ._stats import trained


class Stage(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.mix = nn.ConvTranspose2d(cin, cin, 1, groups=4, bias=False)
        self.bn_mix = nn.BatchNorm2d(cin)
        self.smooth = nn.ConvTranspose2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.bn_smooth = nn.BatchNorm2d(cin)
        self.up = nn.ConvTranspose2d(cin, cout, 2, stride=2, bias=False)
        self.bn_up = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_mix(self.mix(x)))
        x = torch.relu(self.bn_smooth(self.smooth(x)))
        return torch.relu(self.bn_up(self.up(x)))


class Decoder(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (64, 32, 16)) -> None:
        super().__init__()
        self.stages = nn.Sequential(*(Stage(a, b) for a, b in itertools.pairwise(widths)))
        self.head = nn.Conv2d(widths[-1], 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(x))


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(Decoder())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(1, 64, 32, 32),)
