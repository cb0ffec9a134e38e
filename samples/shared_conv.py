"""One conv module called at two places, each call followed by its own BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


class SharedConv(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.shared = nn.Conv2d(c, c, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(c)
        self.bn_b = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        a = self.act(self.bn_a(self.shared(x)))
        b = self.bn_b(self.shared(a))
        return a + b


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(SharedConv())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
