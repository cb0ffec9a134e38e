"""BatchNorm statistics that make folded weights dangerous in low precision, one per layer.

- ``overflow``: a channel with running_var 1e-12 (and eps 1e-12): its folded weights exceed
  float16's range (PR001), the BatchNorm is ill-conditioned (PR004) and its own scale overflows
  float16 (it cannot run there folded or not);
- ``subnormal``: a bias-free conv whose BatchNorm shift is 1e-39: the folded bias is subnormal in
  float32 (PR003);
- ``dead``: a channel with gamma 0: its folded output is constant (PR005);
- ``spread``: gammas log-spaced over 1e-3..10: per-tensor int8 loses the small channels (PR002).
``build_healthy()`` is the same network with ordinary statistics: no PR finding.
"""

from __future__ import annotations

import torch
from torch import nn

from ._stats import trained


class PrecisionCases(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.overflow = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, eps=1e-12))
        self.subnormal = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.dead = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
        self.spread = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.overflow(x)) * 1e-5
        x = torch.relu(self.subnormal(x))
        x = torch.relu(self.dead(x))
        x = torch.relu(self.spread(x))
        return self.head(x.mean((2, 3)))


def build_healthy() -> nn.Module:
    torch.manual_seed(0)
    return trained(PrecisionCases())


def build() -> nn.Module:
    model = build_healthy()
    with torch.no_grad():
        bn = model.overflow[1]
        bn.running_var[0], bn.weight[0] = 1e-12, 1.0
        bn = model.subnormal[1]
        bn.running_mean[2], bn.bias[2] = 0.0, 1e-39
        model.dead[1].weight[1] = 0.0
        model.spread[1].weight.copy_(torch.logspace(-3, 1, 8))
    return model


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)),)
