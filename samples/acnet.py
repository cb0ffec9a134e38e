"""ACNet (Ding et al. 2019), as its repository writes the asymmetric convolution block: a 3x3
conv+BN, a 1x3 conv+BN and a 3x1 conv+BN in parallel, summed. The 1x3 and 3x1 kernels nest in
the 3x3 one (padding (0, 1) and (1, 0)). Includes a grouped variant and a stride-2 block.

``reparameterize(model)`` is the repository's own ``switch_to_deploy`` per block.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._stats import trained


class ACBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, padding: int = 1, groups: int = 1
    ):
        super().__init__()
        self.deploy = False
        self.square_conv = nn.Conv2d(
            cin, cout, (kernel_size, kernel_size), stride, padding, groups=groups, bias=False
        )
        self.square_bn = nn.BatchNorm2d(cout)
        center_offset_from_origin_border = padding - kernel_size // 2
        ver_pad = (padding, center_offset_from_origin_border)
        hor_pad = (center_offset_from_origin_border, padding)
        self.ver_conv = nn.Conv2d(cin, cout, (kernel_size, 1), stride, ver_pad, groups=groups, bias=False)
        self.hor_conv = nn.Conv2d(cin, cout, (1, kernel_size), stride, hor_pad, groups=groups, bias=False)
        self.ver_bn = nn.BatchNorm2d(cout)
        self.hor_bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.fused_conv(x)
        square_outputs = self.square_bn(self.square_conv(x))
        vertical_outputs = self.ver_bn(self.ver_conv(x))
        horizontal_outputs = self.hor_bn(self.hor_conv(x))
        return square_outputs + vertical_outputs + horizontal_outputs

    # --- the repository's own reparameterization ---------------------------------------------
    @staticmethod
    def _fuse_bn_tensor(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        std = (bn.running_var + bn.eps).sqrt()
        t = (bn.weight / std).reshape(-1, 1, 1, 1)
        return conv.weight * t, bn.bias - bn.running_mean * bn.weight / std

    @staticmethod
    def _add_to_square_kernel(square_kernel: torch.Tensor, asym_kernel: torch.Tensor) -> None:
        asym_h, asym_w = asym_kernel.size(2), asym_kernel.size(3)
        square_h, square_w = square_kernel.size(2), square_kernel.size(3)
        square_kernel[
            :,
            :,
            square_h // 2 - asym_h // 2 : square_h // 2 - asym_h // 2 + asym_h,
            square_w // 2 - asym_w // 2 : square_w // 2 - asym_w // 2 + asym_w,
        ] += asym_kernel

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        hor_k, hor_b = self._fuse_bn_tensor(self.hor_conv, self.hor_bn)
        ver_k, ver_b = self._fuse_bn_tensor(self.ver_conv, self.ver_bn)
        square_k, square_b = self._fuse_bn_tensor(self.square_conv, self.square_bn)
        self._add_to_square_kernel(square_k, hor_k)
        self._add_to_square_kernel(square_k, ver_k)
        return square_k, hor_b + ver_b + square_b

    def switch_to_deploy(self) -> None:
        with torch.no_grad():
            deploy_k, deploy_b = self.get_equivalent_kernel_bias()
        sq = self.square_conv
        self.deploy = True
        self.fused_conv = nn.Conv2d(
            sq.in_channels,
            sq.out_channels,
            sq.kernel_size,
            sq.stride,
            sq.padding,
            sq.dilation,
            sq.groups,
            bias=True,
        )
        self.fused_conv.weight.data = deploy_k
        self.fused_conv.bias.data = deploy_b
        for attr in ("square_conv", "square_bn", "hor_conv", "hor_bn", "ver_conv", "ver_bn"):
            self.__delattr__(attr)


class ACNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = ACBlock(3, 16, stride=2)
        self.act = nn.ReLU()
        self.body = nn.Sequential(ACBlock(16, 32), nn.ReLU(), ACBlock(32, 32, stride=2, groups=4), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.act(self.stem(x)))
        return self.head(x.mean((2, 3)))


def reparameterize(model: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(model)
    for m in deployed.modules():
        if isinstance(m, ACBlock):
            m.switch_to_deploy()
    return deployed


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(ACNet(), seed=2)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
