"""In-place-ABN style norms, and a BatchNorm subclass that adds a cast.

``ABN`` is no ``nn.BatchNorm2d``: a plain module with its own affine parameters and running
statistics whose forward applies ``F.batch_norm`` and then ``F.leaky_relu`` in the same function
(the activation is no child module). Folding absorbs the normalization into the conv before it;
the rest of its forward (the leaky ReLU) has no module of its own, so the module is replaced by
the folded graph of its forward (FD104 says so). ``Float32BatchNorm2d`` runs torch's BatchNorm on
a float32 copy of its input and casts back, as mixed-precision code does: a subclass whose
forward is not torch's, traced through (here by ``torch.export``: torch's forward checks the
input rank in Python).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


class ABN(nn.Module):
    """Activated BatchNorm: batch_norm + leaky_relu in one forward, parameters of its own."""

    def __init__(self, num_features: int, slope: float = 0.01, eps: float = 1e-5) -> None:
        super().__init__()
        self.slope, self.eps = slope, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, self.eps
        )
        return F.leaky_relu(x, self.slope)


class Float32BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm computed in float32 whatever the input dtype, cast back (mixed precision)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class ABNNet(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1)
        self.abn1 = ABN(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.abn2 = ABN(c, slope=0.2)
        self.conv3 = nn.Conv2d(c, c, 1)
        self.bn3 = Float32BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.abn2(self.conv2(self.abn1(self.conv1(x))))
        return torch.relu(self.bn3(self.conv3(x)))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = ABNNet()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in (model.abn1, model.abn2):
            c = m.running_mean.numel()
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.25)
            m.weight.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return trained(model)


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1)),)
