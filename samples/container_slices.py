"""A detector-style model that runs slices and steps of its containers in ``forward``.

Detection libraries run ``for m in self.model[:-1]: x = m(x)``; slicing an ``nn.Sequential``
(or ``nn.ModuleList``) builds a new container of the same module objects, so torch.export's
module paths read ``model.slice(None, -1, None).0.bn`` where the slice itself is called. Shape-dependent padding keeps
``symbolic_trace`` out, as in real detectors. Every BatchNorm here folds into the user's own
tree: the model keeps its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


class ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Head(nn.Module):
    def __init__(self, c: int, n: int = 4) -> None:
        super().__init__()
        self.out = nn.Conv2d(c, n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x)


class SlicingDetector(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.model = nn.Sequential(ConvBN(3, c), ConvBN(c, c), ConvBN(c, c, 2), Head(c))
        self.blocks = nn.ModuleList([ConvBN(c, c) for _ in range(4)])
        self.extra = nn.ModuleList([ConvBN(c, c), ConvBN(c, c)])
        self.steps = nn.ModuleList([ConvBN(c, c) for _ in range(4)])
        self.tail = nn.Sequential(ConvBN(c, c), ConvBN(c, c), ConvBN(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (-x.shape[-1]) % 8  # shape-dependent code: symbolic_trace cannot follow it
        if pad:
            x = F.pad(x, (0, pad, 0, pad))
        for m in self.model[:-1]:
            x = m(x)
        for b in self.blocks[1:]:
            x = b(x)
        for b in self.steps[::2]:
            x = x + b(x)
        for b in list(self.extra.children()):
            x = b(x)
        x = self.tail[1:](x)  # the slice itself is called: a Sequential the model does not hold
        return self.model[-1](x)


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(SlicingDetector())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 14, 14, generator=torch.Generator().manual_seed(1)),)
