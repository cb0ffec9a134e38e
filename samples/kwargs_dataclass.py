"""``forward`` with keyword arguments returning a dataclass; blocks are called with kwargs.

The dataclass output stops ``symbolic_trace`` and ``torch.export`` (it is not a registered
pytree type), so the blocks are captured as parts from the inputs recorded with their kwargs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._stats import trained


@dataclass
class Output:
    logits: torch.Tensor
    features: torch.Tensor | None = None


class ScaledBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor, scale: float = 1.0, shift: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x))) * scale
        return y if shift is None else y + shift


class KwargsNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.block1 = ScaledBlock(3, c)
        self.block2 = ScaledBlock(c, c)
        self.classifier = nn.Sequential(nn.Linear(c, 6), nn.BatchNorm1d(6))
        self.register_buffer("offset", torch.full((1, c, 1, 1), 0.1))

    def forward(self, x: torch.Tensor, *, return_features: bool = True) -> Output:
        h = self.block1(x, scale=0.5)
        h = self.block2(h, shift=self.offset, scale=2.0)
        logits = self.classifier(h.mean((2, 3)))
        return Output(logits=logits, features=h if return_features else None)


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(KwargsNet())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
