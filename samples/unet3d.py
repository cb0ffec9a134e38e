"""A small 3D UNet: Conv3d-BN-ReLU encoder, grouped ConvTranspose3d-BN upsampling, skip concat."""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm3d(cout),
        nn.ReLU(),
        nn.Conv3d(cout, cout, 3, padding=1),
        nn.BatchNorm3d(cout),
        nn.ReLU(),
    )


class UNet3D(nn.Module):
    def __init__(self, cin: int = 1, classes: int = 2, base: int = 8) -> None:
        super().__init__()
        self.enc1 = double_conv(cin, base)
        self.enc2 = double_conv(base, base * 2)
        self.pool = nn.MaxPool3d(2)
        self.bottom = double_conv(base * 2, base * 4)
        self.up2 = nn.ConvTranspose3d(base * 4, base * 2, 2, stride=2, groups=2)
        self.up2_bn = nn.BatchNorm3d(base * 2)
        self.dec2 = double_conv(base * 4, base * 2)
        self.up1 = nn.ConvTranspose3d(base * 2, base, 2, stride=2)
        self.up1_bn = nn.BatchNorm3d(base)
        self.dec1 = double_conv(base * 2, base)
        self.out = nn.Conv3d(base, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2_bn(self.up2(b)), e2], 1))
        d1 = self.dec1(torch.cat([self.up1_bn(self.up1(d2)), e1], 1))
        return self.out(d1)


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(UNet3D())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(1)),)
