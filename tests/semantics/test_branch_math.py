"""The merge math on its own: every composed or merged map equals running the layers."""

import pytest
import torch
import torch.nn.functional as F

from bnrewrite.semantics import branch_math as bm


def _run(m: bm.ConvMap, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def test_regroup_keeps_the_map():
    w = torch.randn(8, 2, 3, 3, dtype=torch.float64)
    x = torch.randn(1, 8, 5, 5, dtype=torch.float64)
    want = F.conv2d(x, w, groups=4, padding=1)
    got = F.conv2d(x, bm.regroup(w, 4, 2), groups=2, padding=1)
    assert torch.allclose(want, got)


def test_pointwise_then_spatial_then_pointwise_is_one_conv():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, generator=g)
    w1, w2, w3 = (
        torch.randn(s, dtype=torch.float64, generator=g) for s in ((6, 2, 1, 1), (6, 3, 3, 3), (4, 6, 1, 1))
    )
    b2 = torch.randn(6, dtype=torch.float64, generator=g)
    m = bm.identity(4, 2)
    m = bm.then_conv(m, w1, None, (1, 1), (0, 0), (1, 1), 2, "a")
    m = bm.then_conv(m, w2, b2, (2, 2), (1, 1), (1, 1), 2, "b")
    m = bm.then_conv(m, w3, None, (1, 1), (0, 0), (1, 1), 1, "c")
    want = F.conv2d(F.conv2d(F.conv2d(x, w1, groups=2), w2, b2, 2, 1, groups=2), w3)
    assert torch.allclose(_run(m, x), want)


def test_a_shift_before_zero_padding_is_refused_and_a_matching_pad_value_is_exact():
    shift = torch.tensor([0.5, -1.0], dtype=torch.float64)
    m = bm.then_affine(bm.identity(2, 2), torch.ones(2, dtype=torch.float64), shift)
    w = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(bm.Refused, match="not exact at the border"):
        bm.then_conv(m, w, None, (1, 1), (1, 1), (1, 1), 1, "k")
    padded = bm.then_pad(m, [(1, 1), (1, 1)], shift, "pad")
    merged = bm.then_conv(padded, w, None, (1, 1), (0, 0), (1, 1), 1, "k")
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    y = x + shift.view(1, -1, 1, 1)
    want = F.conv2d(F.pad(y, [1, 1, 1, 1], value=0.0) + _border(shift, y.shape), w)
    assert torch.allclose(_run(merged, x), want)


def _border(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    inner = torch.zeros(1, shape[1], shape[2], shape[3], dtype=torch.float64)
    return F.pad(inner, [1, 1, 1, 1], value=1.0) * value.view(1, -1, 1, 1)


def test_nested_kernels_merge_and_misaligned_ones_are_refused():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64, generator=g)
    ws = [torch.randn(3, 3, *k, dtype=torch.float64, generator=g) for k in ((3, 3), (1, 3), (3, 1), (1, 1))]
    pads = [(1, 1), (0, 1), (1, 0), (0, 0)]
    maps = [bm.then_conv(bm.identity(3, 2), w, None, (1, 1), p, (1, 1), 1, "w") for w, p in zip(ws, pads)]
    merged = bm.merge(maps, adds=3)
    want = sum(F.conv2d(x, w, padding=p) for w, p in zip(ws, pads))
    assert torch.allclose(_run(merged.map, x), want) and merged.map.kernel == (3, 3)
    off = bm.then_conv(bm.identity(3, 2), ws[0], None, (1, 1), (0, 0), (1, 1), 1, "w")  # centred elsewhere
    with pytest.raises(bm.Refused, match="not aligned"):
        bm.merge([maps[0], off], adds=1)
