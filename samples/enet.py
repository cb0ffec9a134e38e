"""An ENet-style encoder-decoder: max-pool indices feed max-unpool (discrete decisions).

Which element of a pooling window is the largest is a discrete decision; where two elements
are nearly equal, float32 rounding alone decides it, so the float32 original is itself some way
from its float64 evaluation, and a correct fold (which rounds differently) flips other
decisions. The proof must judge such a drift against float64 (no worse than twice the
original's own error), not undo right folds. ``example_inputs`` gives windows of near-equal
values (a 2x nearest-upsampled image plus noise at the float32 rounding level).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout))


class ENetLike(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.initial = ConvBN(3, c, 1)
        self.down = nn.MaxPool2d(2, return_indices=True)
        self.bottleneck = ConvBN(c, c, 1)
        self.up = nn.MaxUnpool2d(2)
        self.head = ConvBN(c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.initial(x))
        y, idx = self.down(x)
        y = F.relu(self.bottleneck(y))
        return self.head(self.up(y, idx, output_size=x.shape[-2:]))


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(ENetLike())


def example_inputs(size: int = 32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    coarse = torch.randn(1, 3, size // 2, size // 2, generator=g)
    x = F.interpolate(coarse, scale_factor=2, mode="nearest")
    return (x + 1e-7 * torch.randn(x.shape, generator=g),)
