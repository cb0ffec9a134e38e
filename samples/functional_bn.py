"""A model that holds its own parameters and calls F.conv2d / F.batch_norm in forward()."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FunctionalNet(nn.Module):
    def __init__(self, cin: int = 3, c: int = 8) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(c, cin, 3, 3, generator=g) * 0.3)
        self.w2 = nn.Parameter(torch.randn(c, c, 3, 3, generator=g) * 0.2)
        self.gamma = nn.Parameter(torch.rand(c, generator=g) + 0.5)
        self.beta = nn.Parameter(torch.randn(c, generator=g) * 0.1)
        self.register_buffer("mean1", torch.randn(c, generator=g) * 0.5)
        self.register_buffer("var1", torch.rand(c, generator=g) + 0.5)
        self.register_buffer("mean2", torch.randn(c, generator=g) * 0.5)
        self.register_buffer("var2", torch.rand(c, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.w1, padding=1)
        x = F.relu(F.batch_norm(x, self.mean1, self.var1, self.gamma, self.beta, training=False, eps=1e-3))
        x = F.conv2d(x, self.w2, stride=2)
        return F.batch_norm(x, self.mean2, self.var2, training=False)


def build() -> nn.Module:
    return FunctionalNet().eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
