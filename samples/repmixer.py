"""FastViT's RepMixer (Vasu et al. 2023): ``x + layer_scale * (mixer(x) - norm(x))``, a linear
combination - a difference scaled by a stored per-channel layer scale - of a depthwise
MobileOne block (kxk conv+BN, 1x1 scale branch, skip BN) and a BatchNorm-only block, both
reading ``x``. The block after it, ``x + layer_scale * convffn(x)``, has a GELU between ``x``
and the sum: it stays as it is (FD110), though its conv+BN folds.

``reparameterize(model)`` is the repository's own ``reparameterize_model`` (every module with
a ``reparameterize`` method; ConvFFN's conv+BN is not touched by it).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ._stats import trained
from .mobileone import MobileOneBlock


class FastViTMobileOneBlock(MobileOneBlock):
    """MobileOneBlock with FastViT's ``use_act`` / ``use_scale_branch`` switches."""

    def __init__(
        self, dim: int, kernel_size: int, *, use_act: bool, use_scale_branch: bool, num_conv_branches: int
    ):
        super().__init__(
            dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, num_conv_branches=num_conv_branches
        )
        if not use_act:
            self.activation = nn.Identity()
        if not use_scale_branch:
            self.rbr_scale = None


class RepMixer(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init_value: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.kernel_size = dim, kernel_size
        self.norm = FastViTMobileOneBlock(
            dim, kernel_size, use_act=False, use_scale_branch=False, num_conv_branches=0
        )
        self.mixer = FastViTMobileOneBlock(
            dim, kernel_size, use_act=False, use_scale_branch=True, num_conv_branches=1
        )
        self.layer_scale = nn.Parameter(layer_scale_init_value * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "reparam_conv"):
            return self.reparam_conv(x)
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))

    def reparameterize(self) -> None:
        self.mixer.reparameterize()
        self.norm.reparameterize()
        w = self.mixer.id_tensor + self.layer_scale.unsqueeze(-1) * (
            self.mixer.reparam_conv.weight - self.norm.reparam_conv.weight
        )
        b = torch.squeeze(self.layer_scale) * (self.mixer.reparam_conv.bias - self.norm.reparam_conv.bias)
        self.reparam_conv = nn.Conv2d(
            self.dim,
            self.dim,
            self.kernel_size,
            stride=1,
            padding=self.kernel_size // 2,
            groups=self.dim,
            bias=True,
        )
        self.reparam_conv.weight.data = w
        self.reparam_conv.bias.data = b
        for para in self.parameters():
            para.detach_()
        self.__delattr__("mixer")
        self.__delattr__("norm")
        self.__delattr__("layer_scale")


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv", nn.Conv2d(dim, dim, 7, padding=3, groups=dim, bias=False))
        self.conv.add_module("bn", nn.BatchNorm2d(dim))
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.conv(x))))


class RepMixerBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 2.0, kernel_size: int = 3) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio))
        self.layer_scale = nn.Parameter(1e-5 * torch.ones((dim, 1, 1)), requires_grad=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.layer_scale * self.convffn(x)


class RepMixerNet(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.blocks = nn.Sequential(RepMixerBlock(32), RepMixerBlock(32))
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def reparameterize(model: nn.Module) -> nn.Module:
    deployed = copy.deepcopy(model)
    for module in deployed.modules():
        if isinstance(module, RepMixer):
            module.reparameterize()
    return deployed


def build() -> nn.Module:
    torch.manual_seed(0)
    model = trained(RepMixerNet(), seed=6)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # trained layer scales, not the 1e-5 they start from
        for name, p in model.named_parameters():
            if name.endswith("layer_scale"):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def example_inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)
