"""Blocks kept in ``nn.ModuleList``/``nn.ModuleDict``, driven by data-dependent control flow.

Neither ``symbolic_trace`` nor ``torch.export`` captures the whole model (the root branches on a
tensor value), so capture must descend through the containers to reach the blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class ListNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stages = nn.ModuleList([Block(3, c), Block(c, c), Block(c, 2 * c)])
        self.heads = nn.ModuleDict(
            {
                "seg": nn.Sequential(nn.Conv2d(2 * c, 4, 1), nn.BatchNorm2d(4)),
                "edge": nn.Sequential(nn.Conv2d(2 * c, 1, 3, padding=1), nn.BatchNorm2d(1)),
            }
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for stage in self.stages:
            x = stage(x)
        if x.mean() > 10:  # data-dependent: no whole-model graph
            x = x / x.mean()
        return {name: head(x) for name, head in self.heads.items()}


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(ListNet())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
