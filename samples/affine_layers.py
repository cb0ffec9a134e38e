"""Per-channel affine layers that are no BatchNorm: a ResMLP block on tokens.

``Affine`` (``alpha * x + beta``, the ResMLP/CaiT pre-norm replacement) before a Linear folds
into it; ``LayerScale`` (``x * gamma``) after a Linear folds into that Linear - both act on the
last dim of a ``(batch, tokens, channels)`` tensor, the Linear's feature axis. The token-mixing
Linear acts on the token axis instead: the affine layers around it stay, each with the reason.
"""

from __future__ import annotations

import torch
from torch import nn


class Affine(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * x + self.beta


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-1) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResMLPBlock(nn.Module):
    def __init__(self, dim: int, tokens: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = Affine(dim)
        self.token_mix = nn.Linear(tokens, tokens)
        self.ls1 = LayerScale(dim)
        self.norm2 = Affine(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.token_mix(self.norm1(x).transpose(1, 2)).transpose(1, 2))
        return x + self.ls2(self.fc2(self.act(self.fc1(self.norm2(x)))))


class ResMLP(nn.Module):
    def __init__(self, dim: int = 8, tokens: int = 6, hidden: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.blocks = nn.Sequential(ResMLPBlock(dim, tokens, hidden), ResMLPBlock(dim, tokens, hidden))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)).mean(1))


def build() -> nn.Module:
    torch.manual_seed(0)
    model = ResMLP()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # trained-looking coefficients
        for m in model.modules():
            if isinstance(m, (Affine, LayerScale)):
                for p in m.parameters():
                    p.copy_(
                        torch.randn(p.shape, generator=g) * 0.5
                        + (1.0 if p is not getattr(m, "beta", None) else 0.0)
                    )
    return model.eval()


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1)),)
