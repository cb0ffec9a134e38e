"""Norm modules that do more than normalize, as popular model libraries write them.

``BatchNormAct2d`` subclasses ``nn.BatchNorm2d`` and its ``forward`` runs ``F.batch_norm``, then
dropout, then an activation, all inside one module (the style of the most widely used vision
model library). Folding must absorb only the normalization into the conv before it and keep the
dropout and the activation: each such module becomes ``nn.Sequential(m.drop, m.act)`` of its
own child objects. Variants: ReLU, SiLU, an ``Identity`` activation (a plain BatchNorm after
all), and dropout before the activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


class BatchNormAct2d(nn.BatchNorm2d):
    """BatchNorm + dropout + activation in one module (timm style)."""

    def __init__(
        self, num_features: int, act_layer: type[nn.Module] | None = nn.ReLU, drop: float = 0.0
    ) -> None:
        super().__init__(num_features)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, "expected a 4-D input")
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
        )
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    def __init__(
        self, cin: int, cout: int, act: type[nn.Module] | None, drop: float = 0.0, stride: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn = BatchNormAct2d(cout, act, drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class BNActNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, c, nn.ReLU)
        self.b1 = ConvNormAct(c, c, nn.SiLU, stride=2)
        self.b2 = ConvNormAct(c, 2 * c, None)  # Identity activation: only a BatchNorm
        self.b3 = ConvNormAct(2 * c, 2 * c, nn.ReLU, drop=0.2)  # dropout before the activation
        self.head = nn.Linear(2 * c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b3(self.b2(self.b1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(BNActNet())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)
