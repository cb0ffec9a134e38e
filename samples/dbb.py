"""Diverse Branch Block (Ding et al. 2021), as its repository writes it: a kxk conv+BN, a 1x1
conv+BN, a 1x1 conv -> BN-and-pad -> average pool -> BN branch, and a 1x1 (identity-based)
conv -> BN-and-pad -> kxk conv -> BN branch, summed with ``out +=``.

``BNAndPadLayer`` pads the BatchNorm's output with the BatchNorm's own shift (written into the
border in place), which is what makes the 1x1 -> kxk chain exact at the border; the layer is
not ``symbolic_trace``-able (item assignment), so the model is captured by ``torch.export``.
``IdentityBasedConv1x1`` computes its kernel in its forward. The depthwise variant (groups =
channels) has only the kxk, avg-pool and 1x1 -> kxk branches.

``reparameterize(model)`` is the repository's own ``dbb_transforms`` (transI-transVI).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


def conv_bn(
    cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 1
) -> nn.Sequential:
    se = nn.Sequential()
    se.add_module("conv", nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups, bias=False))
    se.add_module("bn", nn.BatchNorm2d(cout))
    return se


class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, channels: int, groups: int = 1) -> None:
        super().__init__(channels, channels, kernel_size=1, stride=1, padding=0, groups=groups, bias=False)
        input_dim = channels // groups
        id_value = torch.zeros((channels, input_dim, 1, 1))
        for i in range(channels):
            id_value[i, i % input_dim, 0, 0] = 1
        self.id_tensor = id_value
        nn.init.normal_(self.weight, std=0.1)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        kernel = self.weight + self.id_tensor.to(self.weight.device)
        return F.conv2d(input, kernel, None, stride=1, padding=0, dilation=self.dilation, groups=self.groups)

    def get_actual_kernel(self) -> torch.Tensor:
        return self.weight + self.id_tensor.to(self.weight.device)


class BNAndPadLayer(nn.Module):
    def __init__(self, pad_pixels: int, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(num_features, eps, momentum)
        self.pad_pixels = pad_pixels

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = self.bn(input)
        if self.pad_pixels > 0:
            pad_values = self.bn.bias.detach() - self.bn.running_mean * self.bn.weight.detach() / torch.sqrt(
                self.bn.running_var + self.bn.eps
            )
            output = F.pad(output, [self.pad_pixels] * 4)
            pad_values = pad_values.view(1, -1, 1, 1)
            output[:, :, 0 : self.pad_pixels, :] = pad_values
            output[:, :, -self.pad_pixels :, :] = pad_values
            output[:, :, :, 0 : self.pad_pixels] = pad_values
            output[:, :, :, -self.pad_pixels :] = pad_values
        return output

    weight = property(lambda self: self.bn.weight)
    bias = property(lambda self: self.bn.bias)
    running_mean = property(lambda self: self.bn.running_mean)
    running_var = property(lambda self: self.bn.running_var)
    eps = property(lambda self: self.bn.eps)


# --- the repository's dbb_transforms ----------------------------------------------------------
def transI_fusebn(kernel: torch.Tensor, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    gamma = bn.weight
    std = (bn.running_var + bn.eps).sqrt()
    return kernel * ((gamma / std).reshape(-1, 1, 1, 1)), bn.bias - bn.running_mean * gamma / std


def transIII_1x1_kxk(k1, b1, k2, b2, groups):
    if groups == 1:
        k = F.conv2d(k2, k1.permute(1, 0, 2, 3))
        b_hat = (k2 * b1.reshape(1, -1, 1, 1)).sum((1, 2, 3))
    else:
        k_slices, b_slices = [], []
        k1_T = k1.permute(1, 0, 2, 3)
        k1_group_width, k2_group_width = k1.size(0) // groups, k2.size(0) // groups
        for g in range(groups):
            k1_T_slice = k1_T[:, g * k1_group_width : (g + 1) * k1_group_width, :, :]
            k2_slice = k2[g * k2_group_width : (g + 1) * k2_group_width, :, :, :]
            k_slices.append(F.conv2d(k2_slice, k1_T_slice))
            b1_slice = b1[g * k1_group_width : (g + 1) * k1_group_width].reshape(1, -1, 1, 1)
            b_slices.append((k2_slice * b1_slice).sum((1, 2, 3)))
        k, b_hat = torch.cat(k_slices, dim=0), torch.cat(b_slices)
    return k, b_hat + b2


def transV_avg(channels: int, kernel_size: int, groups: int) -> torch.Tensor:
    input_dim = channels // groups
    k = torch.zeros((channels, input_dim, kernel_size, kernel_size))
    k[torch.arange(channels), torch.arange(input_dim).repeat(groups), :, :] = 1.0 / kernel_size**2
    return k


def transVI_multiscale(kernel: torch.Tensor, target_kernel_size: int) -> torch.Tensor:
    h = (target_kernel_size - kernel.size(2)) // 2
    w = (target_kernel_size - kernel.size(3)) // 2
    return F.pad(kernel, [h, h, w, w])


class DiverseBranchBlock(nn.Module):
    def __init__(
        self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, groups: int = 1
    ):
        super().__init__()
        self.nonlinear = nn.ReLU()
        self.kernel_size, self.out_channels, self.groups = kernel_size, cout, groups
        self.dbb_origin = conv_bn(cin, cout, kernel_size, stride, padding, groups)
        self.dbb_avg = nn.Sequential()
        if groups < cout:
            self.dbb_avg.add_module("conv", nn.Conv2d(cin, cout, 1, 1, 0, groups=groups, bias=False))
            self.dbb_avg.add_module("bn", BNAndPadLayer(pad_pixels=padding, num_features=cout))
            self.dbb_avg.add_module("avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=0))
            self.dbb_1x1 = conv_bn(cin, cout, 1, stride, 0, groups=groups)
        else:
            self.dbb_avg.add_module(
                "avg", nn.AvgPool2d(kernel_size=kernel_size, stride=stride, padding=padding)
            )
        self.dbb_avg.add_module("avgbn", nn.BatchNorm2d(cout))
        internal = cin if groups < cout else 2 * cin
        self.dbb_1x1_kxk = nn.Sequential()
        if internal == cin:
            self.dbb_1x1_kxk.add_module("idconv1", IdentityBasedConv1x1(channels=cin, groups=groups))
        else:
            self.dbb_1x1_kxk.add_module("conv1", nn.Conv2d(cin, internal, 1, 1, 0, groups=groups, bias=False))
        self.dbb_1x1_kxk.add_module("bn1", BNAndPadLayer(pad_pixels=padding, num_features=internal))
        self.dbb_1x1_kxk.add_module(
            "conv2", nn.Conv2d(internal, cout, kernel_size, stride, 0, groups=groups, bias=False)
        )
        self.dbb_1x1_kxk.add_module("bn2", nn.BatchNorm2d(cout))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "dbb_reparam"):
            return self.nonlinear(self.dbb_reparam(inputs))
        out = self.dbb_origin(inputs)
        if hasattr(self, "dbb_1x1"):
            out += self.dbb_1x1(inputs)
        out += self.dbb_avg(inputs)
        out += self.dbb_1x1_kxk(inputs)
        return self.nonlinear(out)

    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        k_origin, b_origin = transI_fusebn(self.dbb_origin.conv.weight, self.dbb_origin.bn)
        if hasattr(self, "dbb_1x1"):
            k_1x1, b_1x1 = transI_fusebn(self.dbb_1x1.conv.weight, self.dbb_1x1.bn)
            k_1x1 = transVI_multiscale(k_1x1, self.kernel_size)
        else:
            k_1x1, b_1x1 = 0, 0
        branch = self.dbb_1x1_kxk
        first = branch.idconv1.get_actual_kernel() if hasattr(branch, "idconv1") else branch.conv1.weight
        k_first, b_first = transI_fusebn(first, branch.bn1)
        k_second, b_second = transI_fusebn(branch.conv2.weight, branch.bn2)
        k_1x1_kxk, b_1x1_kxk = transIII_1x1_kxk(k_first, b_first, k_second, b_second, groups=self.groups)
        k_avg = transV_avg(self.out_channels, self.kernel_size, self.groups)
        k_avg_second, b_avg_second = transI_fusebn(
            k_avg.to(self.dbb_avg.avgbn.weight.device), self.dbb_avg.avgbn
        )
        if hasattr(self.dbb_avg, "conv"):
            k_avg_first, b_avg_first = transI_fusebn(self.dbb_avg.conv.weight, self.dbb_avg.bn)
            k_avg_merged, b_avg_merged = transIII_1x1_kxk(
                k_avg_first, b_avg_first, k_avg_second, b_avg_second, self.groups
            )
        else:
            k_avg_merged, b_avg_merged = k_avg_second, b_avg_second
        return k_origin + k_1x1 + k_1x1_kxk + k_avg_merged, b_origin + b_1x1 + b_1x1_kxk + b_avg_merged

    def switch_to_deploy(self) -> None:
        with torch.no_grad():
            kernel, bias = self.get_equivalent_kernel_bias()
        conv = self.dbb_origin.conv
        self.dbb_reparam = nn.Conv2d(
            conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
            conv.groups, bias=True,
        )  # fmt: skip
        self.dbb_reparam.weight.data = kernel
        self.dbb_reparam.bias.data = bias
        for name in ("dbb_origin", "dbb_avg", "dbb_1x1", "dbb_1x1_kxk"):
            if hasattr(self, name):
                self.__delattr__(name)


class DBBNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = DiverseBranchBlock(3, 16, 3, stride=2, padding=1)
        self.block1 = DiverseBranchBlock(16, 16, 3, stride=1, padding=1)
        self.block2 = DiverseBranchBlock(16, 32, 3, stride=2, padding=1, groups=2)
        self.dw = DiverseBranchBlock(32, 32, 3, stride=1, padding=1, groups=32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(self.block2(self.block1(self.stem(x))))
        return self.head(x.mean((2, 3)))


def reparameterize(model: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(model)
    for m in deployed.modules():
        if isinstance(m, DiverseBranchBlock):
            m.switch_to_deploy()
    return deployed


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(DBBNet(), seed=3)


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
