"""RepVGG (Ding et al. 2021), written the way its repository writes it: each block trains a
3x3 conv+BN, a 1x1 conv+BN and an identity BatchNorm in parallel, summed, and ships its own
``get_equivalent_kernel_bias`` / ``switch_to_deploy`` to run as one 3x3 conv. Stages include
grouped blocks (RepVGG-g2 style) and stride-2 blocks without the identity branch.

``reparameterize(model)`` is that hand-written per-class code, for comparison with ``fold``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


def conv_bn(
    cin: int, cout: int, kernel_size: int, stride: int, padding: int, groups: int = 1
) -> nn.Sequential:
    result = nn.Sequential()
    result.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False))
    result.add_module("bn", nn.BatchNorm2d(cout))
    return result


class RepVGGBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, padding: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        self.groups, self.cin = groups, cin
        self.nonlinearity = nn.ReLU()
        self.se = nn.Identity()
        self.rbr_identity = nn.BatchNorm2d(cin) if cout == cin and stride == 1 else None
        self.rbr_dense = conv_bn(cin, cout, kernel_size, stride, padding, groups)
        self.rbr_1x1 = conv_bn(cin, cout, 1, stride, padding - kernel_size // 2, groups)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "rbr_reparam"):
            return self.nonlinearity(self.se(self.rbr_reparam(inputs)))
        id_out = 0 if self.rbr_identity is None else self.rbr_identity(inputs)
        return self.nonlinearity(self.se(self.rbr_dense(inputs) + self.rbr_1x1(inputs) + id_out))

    # --- the repository's own reparameterization ---------------------------------------------
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        k3, b3 = self._fuse_bn_tensor(self.rbr_dense)
        k1, b1 = self._fuse_bn_tensor(self.rbr_1x1)
        kid, bid = self._fuse_bn_tensor(self.rbr_identity)
        return k3 + self._pad_1x1_to_3x3_tensor(k1) + kid, b3 + b1 + bid

    def _pad_1x1_to_3x3_tensor(self, k1: torch.Tensor) -> torch.Tensor:
        return F.pad(k1, [1, 1, 1, 1])

    def _fuse_bn_tensor(
        self, branch: nn.Module | None
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[int, int]:
        if branch is None:
            return 0, 0
        if isinstance(branch, nn.Sequential):
            kernel = branch.conv.weight
            bn = branch.bn
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                input_dim = self.cin // self.groups
                kernel_value = torch.zeros((self.cin, input_dim, 3, 3), dtype=torch.float32)
                for i in range(self.cin):
                    kernel_value[i, i % input_dim, 1, 1] = 1
                self.id_tensor = kernel_value.to(branch.weight.device)
            kernel = self.id_tensor
            bn = branch
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return kernel * t, bn.bias - bn.running_mean * bn.weight / std

    def switch_to_deploy(self) -> None:
        if hasattr(self, "rbr_reparam"):
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        conv = self.rbr_dense.conv
        self.rbr_reparam = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
            conv.dilation, conv.groups, bias=True,
        )  # fmt: skip
        self.rbr_reparam.weight.data = kernel.detach()
        self.rbr_reparam.bias.data = bias.detach()
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            if hasattr(self, name):
                self.__delattr__(name)


class RepVGG(nn.Module):
    """A small RepVGG: widths 16-32-64, blocks 1-2-2-1, the middle stage grouped (g2)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stage0 = RepVGGBlock(3, 16, stride=2)
        self.stage1 = nn.Sequential(RepVGGBlock(16, 32, stride=2), RepVGGBlock(32, 32))
        self.stage2 = nn.Sequential(RepVGGBlock(32, 64, stride=2), RepVGGBlock(64, 64, groups=2))
        self.stage3 = nn.Sequential(RepVGGBlock(64, 64, groups=2))
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage3(self.stage2(self.stage1(self.stage0(x))))
        return self.linear(self.gap(out).flatten(1))


def reparameterize(model: nn.Module) -> nn.Module:
    """The repository's way: a deep copy, then ``switch_to_deploy`` on every block."""
    deployed = copy.deepcopy(model)
    for m in deployed.modules():
        if hasattr(m, "switch_to_deploy"):
            m.switch_to_deploy()
    return deployed


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(RepVGG(), seed=1)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
