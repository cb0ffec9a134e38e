"""Small modules that rewrites put into models.

They are plain ``nn.Module`` s with buffers, so rewritten models save, load, trace and export like
any other model.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAffine(nn.Module):
    """``y = x * scale + shift`` per channel (dim 1): an eval-mode BatchNorm without statistics."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(self.shift.view(shape), x, self.scale.view(shape))  # one fused op

    def extra_repr(self) -> str:
        return f"{self.scale.numel()}"


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine (buffers): eval-mode BN in every mode."""

    _bnrewrite_frozen = True

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * scale.view(shape) + shift.view(shape)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class ChannelwiseLayerNorm(nn.Module):
    """LayerNorm over the channel dim (dim 1) at every position, with per-channel affine.

    For ``(N, C)`` inputs this is ``nn.LayerNorm(C)``; for ``(N, C, *spatial)`` it normalizes each
    position's C values, like a transformer's LayerNorm on ``(N, L, C)`` data.
    """

    _bnrewrite_norm_family = "layer"

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.normalized_shape = (num_features,)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(
            x.movedim(1, -1), (self.num_features,), self.weight, self.bias, self.eps
        )
        return y.movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
