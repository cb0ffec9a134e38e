"""BatchNorm placed after the activation, next to pre-activation blocks.

- ``post_unpadded``: Conv -> ReLU -> BN -> Conv(padding=0): BN folds into the following conv.
- ``post_reflect``:  Conv -> ReLU -> BN -> Conv(padding=1, reflect): folds too (exact).
- ``post_zero_pad``: Conv -> ReLU -> BN -> Conv(padding=1, zeros): not exact, becomes scale-shift.
- ``preact``:        BN -> ReLU -> Conv (pre-activation): no conv can absorb it, scale-shift.
"""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


class PostAct(nn.Module):
    def __init__(self, c: int, padding: int, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.act = nn.ReLU()
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=padding, padding_mode=padding_mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.bn(self.act(self.conv1(x))))


class PreAct(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(self.act(self.bn(x)))


class BNAfterAct(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.post_unpadded = PostAct(c, padding=0)
        self.post_reflect = PostAct(c, padding=1, padding_mode="reflect")
        self.post_zero_pad = PostAct(c, padding=1)
        self.preact = PreAct(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.post_unpadded(x)
        x = self.post_reflect(x)
        x = self.post_zero_pad(x)
        return self.preact(x)


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(BNAfterAct())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
