"""TensorFlow-style "SAME" padding computed from the input's shape in ``forward``.

``symbolic_trace`` cannot read it (``math.ceil`` of a traced size); ``torch.export`` can, so
the whole model is captured as an ATen graph and the folds are mapped back to the modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


class SameConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SameNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = SameConv(3, c, 3, stride=2, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = SameConv(c, c, 3, stride=2, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(SameNet())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 17, 15, generator=torch.Generator().manual_seed(1)),)
