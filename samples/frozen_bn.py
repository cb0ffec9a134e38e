"""Frozen BatchNorm, as detection backbones write it, in three spellings.

``FrozenBatchNorm2d`` (a widely used detection library's spelling: buffers reshaped, ``rsqrt``,
``x * scale + bias``), ``CachedFrozenBN`` (scale and shift computed once and kept as buffers,
indexed ``[None, :, None, None]``), and ``FunctionalFrozenBN`` (``F.batch_norm`` on buffers with
``training=False``). Each follows a conv and folds into it, found by what it computes, in every
capture dialect (symbolic_trace, torch.export, a ``.pt2`` program).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.reshape(1, -1, 1, 1)
        bias = self.bias.reshape(1, -1, 1, 1)
        running_var = self.running_var.reshape(1, -1, 1, 1)
        running_mean = self.running_mean.reshape(1, -1, 1, 1)
        scale = weight * (running_var + 1e-5).rsqrt()
        bias = bias - running_mean * scale
        return x * scale + bias


class CachedFrozenBN(nn.Module):
    """Scale and shift cached as buffers (statistics folded once at load time)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(n))
        self.register_buffer("shift", torch.zeros(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[None, :, None, None] + self.shift[None, :, None, None]


class FunctionalFrozenBN(nn.Module):
    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((n,), value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


class FrozenBackbone(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = FrozenBatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, stride=2, padding=1, bias=False)
        self.bn2 = CachedFrozenBN(c)
        self.conv3 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn3 = FunctionalFrozenBN(2 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return torch.relu(self.bn3(self.conv3(x)))


def frozen_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking statistics in every frozen module's buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            for name, b in m.named_buffers(recurse=False):
                if name in ("running_var",):
                    b.copy_(torch.rand(b.shape, generator=g) * 1.5 + 0.25)
                elif name in ("weight", "scale"):
                    b.copy_(torch.rand(b.shape, generator=g) + 0.5)
                else:
                    b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return model.eval()


def build() -> nn.Module:
    torch.manual_seed(0)
    return frozen_stats(FrozenBackbone())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
