"""Blocks that ``forward`` reaches through a plain Python list, and a module also held by a
plain attribute, beside the registered children (a pattern of real pyramid-pooling heads).

The editor must replace a folded module wherever the copied tree holds it: a fold that edits
only the registered child would be reported while ``forward`` still calls the original block
through the list (the proof also checks that no replaced module object still runs).
"""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class PoolBranch(nn.Module):
    """``self.layers`` is a plain list; the same objects are registered as children too."""

    def __init__(self, size: int, cin: int, cout: int) -> None:
        super().__init__()
        self.layers = [nn.AdaptiveAvgPool2d(size), ConvBNAct(cin, cout)]
        for i, layer in enumerate(self.layers):
            self.add_module(str(i), layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return nn.functional.interpolate(x, size=(8, 8), mode="nearest")


class ListBlocksNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = ConvBNAct(3, c)
        self.branches = nn.ModuleList([PoolBranch(s, c, c) for s in (1, 2, 4)])
        self.fuse = nn.Conv2d(4 * c, c, 1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(c)
        object.__setattr__(self, "norm_ref", self.fuse_bn)  # a plain attribute, not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([x, *(b(x) for b in self.branches)], dim=1)
        return self.norm_ref(self.fuse(x))  # the BatchNorm runs through the plain attribute


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(ListBlocksNet())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)
