"""An MLP with BatchNorm1d after each hidden Linear."""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


class MLP(nn.Module):
    def __init__(self, features: int = 32, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(MLP())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(4, 32, generator=torch.Generator().manual_seed(1)),)
