"""The math of merging linear branches: every branch is one convolution of its input.

A :class:`ConvMap` is ``y = conv(x, weight, bias, stride, padding, dilation, groups)`` in
float64. A branch starts as the identity map of its input and composes op by op: per-channel
affine maps (BatchNorm, scales), convolutions, average pooling (a depthwise kernel) and constant
padding. Only one op of a branch may be spatial (a kernel larger than 1x1, a stride, padding):
two in a row would grow the kernel. A spatial op that pads the value of the ops before it is
exact at the border only when that value is what the merged conv computes there (its bias, as
the merged conv pads ``x`` with zeros): zero padding of a zero-bias value, or DBB-style padding
with the shift itself. :func:`merge` then aligns the branches' taps on one grid and sums them.
Everything refused raises :class:`Refused` with the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

_RTOL, _ATOL = 1e-5, 1e-6  # a padded value and a bias agree up to float32 rounding


class Refused(Exception):
    """A branch or a branch set that cannot be one conv, with the reason as its message."""


@dataclass
class ConvMap:
    weight: torch.Tensor  # float64 [out, in / groups, *kernel]
    bias: torch.Tensor  # float64 [out]
    groups: int
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    pad_value: torch.Tensor | None = None  # pointwise map behind an explicit constant pad: its border value
    pads: tuple[tuple[int, int], ...] | None = None  # that pad, (left, right) per spatial dim
    output_padding: tuple[int, ...] | None = (
        None  # set for a transposed conv (weight kept as [out, in/g, *k])
    )
    macs_in: float = 0.0  # work per input position (ops before the spatial op)
    macs_out: float = 0.0  # work per output position
    params: int = 0

    @property
    def out_channels(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.weight.shape[2:])

    @property
    def spatial(self) -> bool:
        return any(k > 1 for k in self.kernel) or any(s > 1 for s in self.stride) or any(self.padding)

    def macs(self) -> float:
        """Work per output position, the ops at input resolution counted per input position."""
        return self.macs_out + self.macs_in * math.prod(self.stride)


def identity(channels: int, nd: int) -> ConvMap:
    weight = torch.ones(channels, 1, *([1] * nd), dtype=torch.float64)
    one = (1,) * nd
    return ConvMap(weight, torch.zeros(channels, dtype=torch.float64), channels, one, (0,) * nd, one)


def then_affine(m: ConvMap, scale: torch.Tensor, shift: torch.Tensor | None, params: int = 0) -> ConvMap:
    """``scale * m(x) + shift`` per output channel (``scale`` may be a 0-d number)."""
    scale = scale.double().reshape(-1)
    if scale.numel() not in (1, m.out_channels):
        raise Refused(f"a scale of {scale.numel()} values for {m.out_channels} channels")
    shape = (-1, *([1] * (m.weight.dim() - 1)))
    bias = m.bias * scale
    if shift is not None:
        bias = bias + shift.double().reshape(-1)
    pad_value = None
    if m.pad_value is not None:
        pad_value = m.pad_value * scale + (shift.double().reshape(-1) if shift is not None else 0.0)
    cost = m.out_channels
    new = replace(
        m, weight=m.weight * scale.reshape(shape), bias=bias, pad_value=pad_value, params=m.params + params
    )
    return _charge(new, cost)


def _charge(m: ConvMap, macs: float) -> ConvMap:
    if m.spatial:
        return replace(m, macs_out=m.macs_out + macs)
    return replace(m, macs_in=m.macs_in + macs)


def regroup(weight: torch.Tensor, groups: int, to: int) -> torch.Tensor:
    """A grouped kernel as the same map with ``to`` groups (``to`` divides ``groups``)."""
    if to == groups:
        return weight
    r = groups // to
    out_g, in_g = weight.shape[0] // groups, weight.shape[1]
    k = tuple(weight.shape[2:])
    w = weight.reshape(to, r, out_g, in_g, *k)
    new = weight.new_zeros(to, r, out_g, r, in_g, *k)
    for a in range(r):
        new[:, a, :, a] = w[:, a]
    return new.reshape(weight.shape[0], r * in_g, *k)


def _compose(outer: torch.Tensor, go: int, inner: torch.Tensor, gi: int) -> tuple[torch.Tensor, int]:
    """The kernel of ``outer`` applied after ``inner`` (one of them 1x1), and its groups."""
    g = math.gcd(go, gi)
    a, b = regroup(outer, go, g), regroup(inner, gi, g)
    co, cm, ci = a.shape[0], b.shape[0], b.shape[1]
    ag = a.reshape(g, co // g, cm // g, *a.shape[2:])
    bg = b.reshape(g, cm // g, ci, *b.shape[2:])
    if all(int(k) == 1 for k in b.shape[2:]):
        w = torch.einsum("gom...,gmi->goi...", ag, bg.reshape(g, cm // g, ci))
    else:
        w = torch.einsum("gom,gmi...->goi...", ag.reshape(g, co // g, cm // g), bg)
    return w.reshape(co, ci, *w.shape[3:]), g


def then_conv(
    m: ConvMap,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    what: str,
) -> ConvMap:
    """The conv ``what`` applied to ``m``'s output."""
    w = weight.detach().double()
    if int(w.shape[1]) * groups != m.out_channels:
        raise Refused(f"{what} reads {int(w.shape[1]) * groups} channels, the branch has {m.out_channels}")
    params = w.numel() + (bias.numel() if bias is not None else 0)
    macs = float(w.numel() // max(1, 1))
    k = tuple(int(x) for x in w.shape[2:])
    pointwise = all(x == 1 for x in k) and all(s == 1 for s in stride) and not any(padding)
    kernel, g = _compose(w, groups, m.weight, m.groups)
    w_sum = w.sum(dim=tuple(range(2, w.dim())))  # the conv applied to a per-channel constant
    new_bias = _grouped_matvec(w_sum, groups, m.bias)
    if bias is not None:
        new_bias = new_bias + bias.detach().double()
    if pointwise:
        pad_value = None
        if m.pad_value is not None:
            pad_value = _grouped_matvec(w_sum, groups, m.pad_value) + (0 if bias is None else bias.double())
        new = replace(
            m, weight=kernel, bias=new_bias, groups=g, pad_value=pad_value, params=m.params + params
        )
        return _charge(new, macs)
    if m.spatial or m.output_padding is not None:
        raise Refused(f"{what} follows another spatial op: their composition is a larger kernel")
    pads = _border(m, padding, what)
    new = ConvMap(
        kernel,
        new_bias,
        g,
        stride,
        pads,
        dilation,
        macs_in=m.macs_in,
        macs_out=m.macs_out + macs,
        params=m.params + params,
    )
    return new


def _grouped_matvec(w_sum: torch.Tensor, groups: int, v: torch.Tensor) -> torch.Tensor:
    co, ci_g = w_sum.shape
    return torch.einsum(
        "goi,gi->go", w_sum.reshape(groups, co // groups, ci_g), v.reshape(groups, ci_g)
    ).reshape(co)


def _border(m: ConvMap, padding: tuple[int, ...], what: str) -> tuple[int, ...]:
    """The zero padding of ``x`` that gives the spatial op what it read at the border."""
    if m.pads is not None:
        if any(padding):
            raise Refused(f"{what} pads a tensor that was padded already")
        if any(left != right for left, right in m.pads):
            raise Refused(f"the padding before {what} is uneven")
        assert m.pad_value is not None
        if not _close(m.pad_value, m.bias):
            raise Refused(
                f"the padding before {what} fills with values other than the branch's shift: not exact at the border"
            )
        return tuple(left for left, _ in m.pads)
    if any(padding) and not _close(torch.zeros_like(m.bias), m.bias):
        raise Refused(f"{what} pads with zeros a value that has a shift: not exact at the border")
    return padding


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a.expand_as(b), b, rtol=_RTOL, atol=_ATOL * max(1.0, scale)))


def then_conv_transpose(
    m: ConvMap,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    dilation: tuple[int, ...],
    groups: int,
    output_padding: tuple[int, ...],
    what: str,
) -> ConvMap:
    """A transposed conv reading the branch's input itself. It pads nothing (it crops), but a
    shift before it would reach each output through a varying number of taps, so only the
    identity may come before it; per-channel ops and 1x1 convs may follow."""
    if not _is_identity(m):
        raise Refused(f"{what} (a transposed conv) reads what other ops computed")
    w = weight.detach().double()
    c_in, out_g = int(w.shape[0]), int(w.shape[1])
    if c_in != m.out_channels:
        raise Refused(f"{what} reads {c_in} channels, the branch has {m.out_channels}")
    k = tuple(int(x) for x in w.shape[2:])
    as_conv = (
        w.reshape(groups, c_in // groups, out_g, *k)
        .transpose(1, 2)
        .reshape(groups * out_g, c_in // groups, *k)
    )
    b = bias.detach().double() if bias is not None else torch.zeros(groups * out_g, dtype=torch.float64)
    params = w.numel() + (bias.numel() if bias is not None else 0)
    macs = float(w.numel()) / max(1, math.prod(stride))  # per output position
    return ConvMap(
        as_conv,
        b,
        groups,
        stride,
        padding,
        dilation,
        output_padding=output_padding,
        macs_out=macs,
        params=params,
    )


def transposed_weight(m: ConvMap) -> torch.Tensor:
    """The ``[in, out/groups, *k]`` weight of a transposed map (the layout nn.ConvTranspose keeps)."""
    g, k = m.groups, m.kernel
    out_g, in_g = m.out_channels // g, int(m.weight.shape[1])
    return m.weight.reshape(g, out_g, in_g, *k).transpose(1, 2).reshape(g * in_g, out_g, *k)


def _is_identity(m: ConvMap) -> bool:
    one = m.groups == m.out_channels == m.in_channels and not m.spatial and m.pads is None
    return one and bool((m.weight == 1).all()) and not bool(m.bias.any()) and m.output_padding is None


def then_pool(
    m: ConvMap,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    padding: tuple[int, ...],
    divisor: int | None,
    what: str,
) -> ConvMap:
    """Average pooling as the depthwise kernel it is (count_include_pad semantics)."""
    c = m.out_channels
    weight = torch.full((c, 1, *kernel), 1.0 / (divisor or math.prod(kernel)), dtype=torch.float64)
    new = then_conv(m, weight, None, stride, padding, (1,) * len(kernel), c, what)
    return replace(new, params=m.params)  # a pool stores nothing


def then_pad(m: ConvMap, pads: list[tuple[int, int]], value: torch.Tensor, what: str) -> ConvMap:
    if m.spatial or m.pads is not None:
        raise Refused(f"{what} pads a value that a spatial op computed")
    if len(pads) > len(m.stride):
        raise Refused(f"{what} pads the channel or batch dims")
    pads = [(0, 0)] * (len(m.stride) - len(pads)) + list(pads)
    v = value.double().reshape(-1)
    v = v.expand(m.out_channels) if v.numel() == 1 else v
    if v.numel() != m.out_channels:
        raise Refused(f"{what} pads with {v.numel()} values for {m.out_channels} channels")
    return replace(m, pads=tuple(pads), pad_value=v.clone())


@dataclass
class Merged:
    """One conv that computes the sum of the branches, with what each side costs."""

    map: ConvMap
    branch_macs: float
    branch_params: int


def merge(maps: list[ConvMap], adds: int) -> Merged:
    """One conv for the sum of ``maps`` (taps aligned, kernels summed); ``adds``: the
    additions the sum itself costs per output channel and position."""
    first = maps[0]
    if any(m.pads is not None for m in maps):
        raise Refused("a branch ends in a padding no layer reads")
    if len({m.out_channels for m in maps}) > 1 or len({m.in_channels for m in maps}) > 1:
        raise Refused("the branches differ in channels")
    if len({m.stride for m in maps}) > 1:
        raise Refused(f"stride mismatch: {', '.join(sorted({str(m.stride) for m in maps}))}")
    if len({m.output_padding for m in maps}) > 1:
        raise Refused("transposed and plain convs, or transposed convs with different output_padding")
    nd = len(first.stride)
    grid = [_grid([(m.padding[d], m.dilation[d], m.kernel[d]) for m in maps]) for d in range(nd)]
    groups = math.gcd(*[m.groups for m in maps])
    big = torch.zeros(
        first.out_channels, first.in_channels // groups, *[g[2] for g in grid], dtype=torch.float64
    )
    for m in maps:
        index = tuple(
            slice(start, start + (m.kernel[d] - 1) * step + 1, step)
            for d, (start, step) in enumerate(_placement(m, grid[d], d) for d in range(nd))
        )
        big[(slice(None), slice(None), *index)] += regroup(m.weight, m.groups, groups)
    padding = tuple(g[0] for g in grid)
    dilation = tuple(g[1] for g in grid)
    bias = torch.stack([m.bias for m in maps]).sum(0)
    merged = ConvMap(big, bias, groups, first.stride, padding, dilation, output_padding=first.output_padding)
    per_input = first.output_padding is not None  # a transposed conv's taps land on stride^d outputs
    merged.macs_out = float(big.numel()) / (math.prod(first.stride) if per_input else 1)
    merged.params = big.numel() + bias.numel()
    branch_macs = sum(m.macs() for m in maps) + adds * first.out_channels
    return Merged(merged, branch_macs, sum(m.params for m in maps))


def _taps(padding: int, dilation: int, kernel: int) -> list[int]:
    return [-padding + dilation * j for j in range(kernel)]


def _grid(dims: list[tuple[int, int, int]]) -> tuple[int, int, int]:
    """(padding, dilation, kernel) of the smallest tap grid holding every branch's taps, all
    centred on the same position (else the outputs would not line up)."""
    taps = [_taps(*d) for d in dims]
    centres = {t[0] + t[-1] for t in taps}
    if len(centres) > 1:
        raise Refused("padding not aligned: the kernels are not centred on the same position")
    lo, hi = min(t[0] for t in taps), max(t[-1] for t in taps)
    step = 0
    for t in taps:
        for x in t:
            step = math.gcd(step, x - lo)
    step = step or 1
    if lo > 0:
        raise Refused("the branches skip border positions (negative padding)")
    return -lo, step, (hi - lo) // step + 1


def _placement(m: ConvMap, grid: tuple[int, int, int], d: int) -> tuple[int, int]:
    padding, step, _ = grid
    first = -m.padding[d]
    k = m.kernel[d]
    stride = m.dilation[d] // step if k > 1 else 1
    if k > 1 and m.dilation[d] % step:
        raise Refused("kernels do not nest: their taps fall between the merged kernel's")
    return (first + padding) // step, stride
