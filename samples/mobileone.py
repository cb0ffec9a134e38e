"""MobileOne (Vasu et al. 2023), as its repository writes the block: k over-parameterized kxk
conv+BN branches kept in an ``nn.ModuleList``, a 1x1 "scale" conv+BN branch, and a skip
BatchNorm, summed (``out = scale_out + identity_out`` then ``out += branch(x)`` in a loop, with
``0`` standing in for a missing branch). Each stage is a depthwise block (groups = channels)
followed by a pointwise block, as in MobileOne-S0 (4 conv branches).

``reparameterize(model)`` is the repository's own ``reparameterize()`` per block.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._stats import trained


class MobileOneBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 1,
        num_conv_branches: int = 1,
    ) -> None:  # fmt: skip
        super().__init__()
        self.inference_mode = False
        self.groups, self.stride, self.kernel_size, self.padding = groups, stride, kernel_size, padding
        self.in_channels, self.out_channels = cin, cout
        self.num_conv_branches = num_conv_branches
        self.se = nn.Identity()
        self.activation = nn.ReLU()
        self.rbr_skip = nn.BatchNorm2d(num_features=cin) if cout == cin and stride == 1 else None
        self.rbr_conv = nn.ModuleList(
            [self._conv_bn(kernel_size=kernel_size, padding=padding) for _ in range(num_conv_branches)]
        )
        self.rbr_scale = self._conv_bn(kernel_size=1, padding=0) if kernel_size > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode:
            return self.activation(self.se(self.reparam_conv(x)))
        identity_out = 0
        if self.rbr_skip is not None:
            identity_out = self.rbr_skip(x)
        scale_out = 0
        if self.rbr_scale is not None:
            scale_out = self.rbr_scale(x)
        out = scale_out + identity_out
        for ix in range(self.num_conv_branches):
            out += self.rbr_conv[ix](x)
        return self.activation(self.se(out))

    def _conv_bn(self, kernel_size: int, padding: int) -> nn.Sequential:
        mod_list = nn.Sequential()
        mod_list.add_module(
            "conv",
            nn.Conv2d(
                self.in_channels,
                self.out_channels,
                kernel_size,
                self.stride,
                padding,
                groups=self.groups,
                bias=False,
            ),
        )
        mod_list.add_module("bn", nn.BatchNorm2d(num_features=self.out_channels))
        return mod_list

    # --- the repository's own reparameterization ---------------------------------------------
    def reparameterize(self) -> None:
        if self.inference_mode:
            return
        kernel, bias = self._get_kernel_bias()
        self.reparam_conv = nn.Conv2d(
            self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding, groups=self.groups,
            bias=True,
        )  # fmt: skip
        self.reparam_conv.weight.data = kernel
        self.reparam_conv.bias.data = bias
        for para in self.parameters():
            para.detach_()
        self.__delattr__("rbr_conv")
        self.__delattr__("rbr_scale")
        if hasattr(self, "rbr_skip"):
            self.__delattr__("rbr_skip")
        self.inference_mode = True

    def _get_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        kernel_scale, bias_scale = 0, 0
        if self.rbr_scale is not None:
            kernel_scale, bias_scale = self._fuse_bn_tensor(self.rbr_scale)
            pad = self.kernel_size // 2
            kernel_scale = torch.nn.functional.pad(kernel_scale, [pad, pad, pad, pad])
        kernel_identity, bias_identity = 0, 0
        if self.rbr_skip is not None:
            kernel_identity, bias_identity = self._fuse_bn_tensor(self.rbr_skip)
        kernel_conv, bias_conv = 0, 0
        for ix in range(self.num_conv_branches):
            _kernel, _bias = self._fuse_bn_tensor(self.rbr_conv[ix])
            kernel_conv += _kernel
            bias_conv += _bias
        return kernel_conv + kernel_scale + kernel_identity, bias_conv + bias_scale + bias_identity

    def _fuse_bn_tensor(self, branch: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(branch, nn.Sequential):
            kernel = branch.conv.weight
            running_mean, running_var = branch.bn.running_mean, branch.bn.running_var
            gamma, beta, eps = branch.bn.weight, branch.bn.bias, branch.bn.eps
        else:
            assert isinstance(branch, nn.BatchNorm2d)
            if not hasattr(self, "id_tensor"):
                input_dim = self.in_channels // self.groups
                kernel_value = torch.zeros(
                    (self.in_channels, input_dim, self.kernel_size, self.kernel_size),
                    dtype=branch.weight.dtype, device=branch.weight.device,
                )  # fmt: skip
                for i in range(self.in_channels):
                    kernel_value[i, i % input_dim, self.kernel_size // 2, self.kernel_size // 2] = 1
                self.id_tensor = kernel_value
            kernel = self.id_tensor
            running_mean, running_var = branch.running_mean, branch.running_var
            gamma, beta, eps = branch.weight, branch.bias, branch.eps
        std = (running_var + eps).sqrt()
        t = (gamma / std).reshape(-1, 1, 1, 1)
        return kernel * t, beta - running_mean * gamma / std


class MobileOne(nn.Module):
    """A small MobileOne-S0: a stem, then depthwise + pointwise block pairs, 4 conv branches."""

    def __init__(self, num_classes: int = 10, k: int = 4) -> None:
        super().__init__()
        self.stage0 = MobileOneBlock(3, 16, 3, stride=2, padding=1)
        layers: list[nn.Module] = []
        for cin, cout, stride in ((16, 32, 2), (32, 32, 1), (32, 64, 2)):
            layers.append(MobileOneBlock(cin, cin, 3, stride, 1, groups=cin, num_conv_branches=k))
            layers.append(MobileOneBlock(cin, cout, 1, 1, 0, num_conv_branches=k))
        self.stages = nn.Sequential(*layers)
        self.gap = nn.AdaptiveAvgPool2d(output_size=1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gap(self.stages(self.stage0(x)))
        return self.linear(x.view(x.size(0), -1))


def reparameterize(model: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(model)
    for module in deployed.modules():
        if hasattr(module, "reparameterize"):
            module.reparameterize()
    return deployed


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(MobileOne(), seed=4)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
