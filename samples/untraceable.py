"""Data-dependent control flow around traceable blocks: symbolic_trace rejects the whole model."""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


def block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class Gated(nn.Module):
    """Chooses a branch from the data: untraceable, but each branch is traceable."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.bright = block(c, c)
        self.dark = block(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.bright(x)
        return self.dark(x)


class Untraceable(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = block(3, c)
        self.gate = Gated(c)
        self.post_bn = nn.BatchNorm2d(c)  # called from untraceable code: stays as it is
        self.head = nn.Sequential(block(c, 2 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gate(self.stem(x))
        if x.shape[-1] > 4:
            x = self.post_bn(x)
        return self.head(x)


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(Untraceable())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
