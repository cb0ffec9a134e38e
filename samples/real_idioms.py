"""The idioms real vision-model libraries write, in one small network.

- BatchNorm-with-activation modules (a ``nn.BatchNorm2d`` subclass) that start with a shape
  assert (``assert x.ndim == 4``, traced as ``getattr`` -> ``eq`` -> ``torch._assert``) and end in
  an activation built with ``inplace=True`` (or ``Identity`` for ``apply_act=False``);
- RepVGG blocks: a 3x3 and a 1x1 conv+BN and an identity BN-with-Identity-activation, a
  ``drop_path`` (Identity in eval) between the branch sum and ``x = x + identity``, ``attn``
  Identity after it, in-place ReLU;
- MobileOne blocks: ``k`` over-parameterized kxk branches in a ``ModuleList`` summed with ``+=``
  onto ``scale_out + identity_out`` placeholders that start at ``0``;
- a RepMixer token mixer ``x + layer_scale * (mixer(x) - norm(x))`` with BN-with-activation norms;
- a BatchNorm over the sum of a depthwise conv, a 1x1 conv and the identity (RepViT);
- a mixed conv (``torch.split`` -> convs -> ``torch.cat``) before a BN-with-activation;
- an attention-style block that reads ``B, C, H, W = x.shape`` between a BN and its 1x1 qkv conv;
- ``x += shortcut`` residuals.

``reparameterize(model)`` is the hand-written per-class reparameterization those libraries ship,
for comparing op counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._stats import trained


class BatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, c: int, apply_act: bool = True, act: type[nn.Module] = nn.SiLU) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act(inplace=True) if apply_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class ConvNormAct(nn.Module):
    def __init__(
        self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, apply_act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class RepVggBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(c, apply_act=False)
        self.conv_kxk = ConvNormAct(c, c, 3, act=False)
        self.conv_1x1 = ConvNormAct(c, c, 1, act=False)
        self.drop_path = nn.Identity()
        self.attn = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.identity(x)
        x = self.conv_1x1(x) + self.conv_kxk(x)
        x = self.drop_path(x)
        x = x + identity
        return self.act(self.attn(x))


class MobileOneBlock(nn.Module):
    def __init__(self, c: int, k: int = 2) -> None:
        super().__init__()
        self.identity = BatchNormAct2d(c, apply_act=False)
        self.conv_kxk = nn.ModuleList([ConvNormAct(c, c, 3, groups=c, act=False) for _ in range(k)])
        self.conv_scale = ConvNormAct(c, c, 1, groups=c, act=False)
        self.se = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity_out = 0
        if self.identity is not None:
            identity_out = self.identity(x)
        scale_out = 0
        if self.conv_scale is not None:
            scale_out = self.conv_scale(x)
        out = scale_out + identity_out
        for rc in self.conv_kxk:
            out += rc(x)
        return self.act(self.se(out))


class RepMixer(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = ConvNormAct(c, c, 3, groups=c, act=False)
        self.mixer = ConvNormAct(c, c, 3, groups=c, act=False)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale * (self.mixer(x) - self.norm(x))


class RepVggDw(nn.Module):
    """RepViT's token mixer: one BatchNorm over a depthwise 3x3, a depthwise 1x1 and the identity."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = ConvNormAct(c, c, 3, groups=c, act=False)
        self.conv1 = nn.Conv2d(c, c, 1, groups=c)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)


class MixedConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.splits = [c // 2, c - c // 2]
        self.convs = nn.ModuleList(
            [nn.Conv2d(s, s, k, padding=k // 2, bias=False) for s, k in zip(self.splits, (3, 5))]
        )
        self.bn = BatchNormAct2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.splits, 1)
        return self.bn(torch.cat([conv(p) for conv, p in zip(self.convs, parts)], 1))


class AttentionBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1, bias=False)
        self.proj = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm(x)
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).reshape(B, 3, C, H * W).unbind(1)
        attn = (q.transpose(1, 2) @ k * C**-0.5).softmax(-1)
        x = (v @ attn.transpose(1, 2)).reshape(B, C, H, W)
        x = self.proj(x)
        x += shortcut
        return x


class RealIdioms(nn.Module):
    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, c, 3, 2)
        self.repvgg = RepVggBlock(c)
        self.mobileone = MobileOneBlock(c)
        self.mixer = RepMixer(c)
        self.repvit = RepVggDw(c)
        self.mixed = MixedConv(c)
        self.attn = AttentionBlock(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.repvgg(x)
        x = self.mobileone(x)
        x = self.mixer(x)
        x = self.repvit(x)
        x = self.mixed(x)
        x = self.attn(x)
        return self.head(x.mean((2, 3)))


def build() -> nn.Module:
    torch.manual_seed(0)
    return trained(RealIdioms())


def example_inputs() -> tuple[torch.Tensor, ...]:
    return (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)),)


# -- the hand-written per-class reparameterization those libraries ship ------------------------
def _fused(
    conv: nn.Conv2d | None, bn: nn.BatchNorm2d, c: int, k: int, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel (c, c/groups, k, k) and bias of ``bn(conv(x))`` (``conv=None``: ``bn(x)``)."""
    if conv is None:
        w = torch.zeros(c, c // groups, k, k)
        for i in range(c):
            w[i, i % (c // groups), k // 2, k // 2] = 1.0
    else:
        w = conv.weight.detach()
        pad = (k - w.shape[-1]) // 2
        w = F.pad(w, [pad] * 4)
    std = (bn.running_var + bn.eps).sqrt()
    t = bn.weight / std
    return w * t.reshape(-1, 1, 1, 1), bn.bias - bn.running_mean * t


class _Reparam(nn.Module):
    def __init__(self, conv: nn.Conv2d, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.act = conv, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


def _conv(weight: torch.Tensor, bias: torch.Tensor, groups: int) -> nn.Conv2d:
    c, _, k, _ = weight.shape
    conv = nn.Conv2d(weight.shape[1] * groups, c, k, padding=k // 2, groups=groups)
    conv.weight.data, conv.bias.data = weight.clone(), bias.detach().clone()
    return conv


def _fuse_branches(branches: list[tuple[nn.Conv2d | None, nn.BatchNorm2d]], c: int, groups: int) -> nn.Conv2d:
    w, b = 0, 0
    for conv, bn in branches:
        wi, bi = _fused(conv, bn, c, 3, groups)
        w, b = w + wi, b + bi
    return _conv(w, b, groups)


@torch.no_grad()
def reparameterize(model: RealIdioms) -> nn.Module:
    """What the libraries' own per-class ``reparameterize()`` gives (the blocks merged; the
    plain conv+BN pairs left to the exporter)."""
    import copy

    m = copy.deepcopy(model)
    c = m.stem.conv.out_channels
    blk = m.repvgg
    m.repvgg = _Reparam(
        _fuse_branches(
            [
                (blk.conv_kxk.conv, blk.conv_kxk.bn),
                (blk.conv_1x1.conv, blk.conv_1x1.bn),
                (None, blk.identity),
            ],
            c,
            1,
        ),
        blk.act,
    )
    blk = m.mobileone
    branches = [(b.conv, b.bn) for b in blk.conv_kxk] + [
        (blk.conv_scale.conv, blk.conv_scale.bn),
        (None, blk.identity),
    ]
    m.mobileone = _Reparam(_fuse_branches(branches, c, c), blk.act)
    mix = m.mixer
    wm, bm = _fused(mix.mixer.conv, mix.mixer.bn, c, 3, c)
    wn, bn_ = _fused(mix.norm.conv, mix.norm.bn, c, 3, c)
    ident, _ = _fused(None, _unit_bn(c), c, 3, c)
    s = mix.layer_scale.reshape(-1)
    m.mixer = _Reparam(_conv(ident + s.reshape(-1, 1, 1, 1) * (wm - wn), s * (bm - bn_), c), nn.Identity())
    rv = m.repvit
    w3, b3 = _fused(rv.conv.conv, rv.conv.bn, c, 3, c)
    w1 = F.pad(rv.conv1.weight, [1, 1, 1, 1])
    w = w3 + w1 + ident
    b = b3 + rv.conv1.bias
    t = rv.bn.weight / (rv.bn.running_var + rv.bn.eps).sqrt()
    m.repvit = _Reparam(
        _conv(w * t.reshape(-1, 1, 1, 1), (b - rv.bn.running_mean) * t + rv.bn.bias, c), nn.Identity()
    )
    return m


def _unit_bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c, eps=0.0).eval()
    return bn
