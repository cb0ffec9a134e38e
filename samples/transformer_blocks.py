"""Transformer blocks whose norms carry an elementwise affine (``fold --norm-affine``).

- a ViT-style pre-norm block: LayerNorm -> q/k/v projections (separate Linears), LayerNorm ->
  MLP; the residual reads the block input, not the norm's output;
- a LLaMA-style block: an RMSNorm written the way model libraries write it (``weight *
  x.to(dtype)`` after ``x * rsqrt(mean(x^2) + eps)``, no class of torch's) -> q/k/v, and torch's
  ``nn.RMSNorm`` -> gate/up projections of a SwiGLU MLP;
- a post-norm block whose LayerNorm output is also the residual (the affine output is needed:
  refused), a conv stage with GroupNorm -> 1x1 conv (folds) and GroupNorm -> padded 3x3 conv
  (refused), and a final LayerNorm the model returns (refused).

Every affine is random (not the identity a fresh layer starts with), so a fold that drops one
shows in the output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM, TOKENS = 32, 10


class RMSNorm(nn.Module):
    """The RMSNorm model libraries ship (Hugging Face's LlamaRMSNorm, in substance)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (
            t(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2) for t in (self.q, self.k, self.v)
        )
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SwiGLU(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, 2 * dim, bias=False)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.input_norm, self.attn = RMSNorm(dim), Attention(dim)
        self.post_norm, self.mlp = nn.RMSNorm(dim), SwiGLU(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.input_norm(x))
        return x + self.mlp(self.post_norm(x))


class PostNormBlock(nn.Module):
    """BERT-style: the LayerNorm's output is the next residual (refused: the affine output is needed)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.fc(h)


class ConvStage(nn.Module):
    """GroupNorm -> 1x1 conv folds; GroupNorm -> zero-padded 3x3 conv is refused."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.gn1, self.pw = nn.GroupNorm(2, channels), nn.Conv2d(channels, channels, 1)
        self.gn2, self.conv = nn.GroupNorm(2, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.pw(self.gn1(x)))
        return self.conv(self.gn2(x))


class TransformerBlocks(nn.Module):
    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.vit, self.llama, self.post = ViTBlock(dim), LlamaBlock(dim), PostNormBlock(dim)
        self.stage = ConvStage()
        self.head_norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.post(self.llama(self.vit(tokens)))
        return self.head_norm(x), self.stage(image)


def randomize_affines(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every norm affine random: weight in [0.5, 1.5], bias in [-0.5, 0.5]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            if isinstance(owner, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, RMSNorm)):
                lo, hi = (0.5, 1.5) if name.endswith("weight") else (-0.5, 0.5)
                p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
    return model


def build() -> nn.Module:
    torch.manual_seed(0)
    return randomize_affines(TransformerBlocks()).eval()


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, TOKENS, DIM, generator=g), torch.randn(2, 8, 6, 6, generator=g)
