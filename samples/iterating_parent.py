"""A parent that iterates its ``nn.Sequential`` and inspects its blocks in ``forward``.

The parent is untraceable (it reads a tensor value), so only parts are captured; the folded
model must still be iterable where the parent iterates and keep the block types it checks.
"""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


class Iterating(nn.Module):
    def __init__(self, c: int = 8, depth: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(*[Residual(c) for _ in range(depth)])
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if not isinstance(block, Residual):
                raise TypeError(f"block {i} is a {type(block).__name__}")
            x = block(x)
            if float(x.abs().max()) > 1e4:  # early exit on a tensor value
                break
        return self.head(x.mean((2, 3)))


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(Iterating())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
