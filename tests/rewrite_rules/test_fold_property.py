"""Property: over random conv/BN stacks the folded model is as accurate as the original.

Random: 1-3 spatial dims, transposed or not, groups, stride, dilation, padding and padding mode,
bias, affine, float32/float64/bfloat16, BN before or after the conv. The folded model's error
against a float64 evaluation of the original must stay within about 2x the original model's own
error in its dtype.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnrewrite import fold
from tests.conftest import float64_reference

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
SLACK = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2}


@st.composite
def stacks(draw):
    nd = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 4]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    affine = draw(st.booleans())
    bn_first = draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    following = False  # a BN -> conv fold that must happen (no zero padding to keep it inexact)
    if transposed:
        conv = CONVT[nd](cin, cout, k, stride=stride, dilation=dilation, groups=groups, bias=bias)
    else:
        mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
        padding = draw(st.integers(0, 1))
        conv = CONV[nd](
            cin,
            cout,
            k,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            padding_mode=mode,
        )
        following = bn_first and (padding == 0 or mode != "zeros")
    bn = BN[nd](cin if bn_first else cout, affine=affine, eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.05)
        if affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    layers = [nn.ReLU(), bn, conv] if bn_first else [conv, bn]
    model = nn.Sequential(*layers).eval().to(dtype)
    size = 6 + (k - 1) * dilation
    x = torch.randn(2, cin, *([size] * nd), generator=g).to(dtype)
    return model, x, bn_first, following


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stacks())
def test_folded_error_is_within_twice_the_original_error(case):
    model, x, bn_first, following = case
    folded, report = fold(model, (x,))
    assert not [d for d in report.diagnostics if d.code == "FD207"], [d.message for d in report.diagnostics]
    ref = float64_reference(model, x)
    with torch.no_grad():
        base = (model(x).double() - ref).abs().max().item()
        err = (folded(x).double() - ref).abs().max().item()
    scale = max(1.0, ref.abs().max().item())
    assert err <= 2 * base + SLACK[x.dtype] * scale, (err, base, [a.kind for a in report.actions])
    if not bn_first:
        assert [a.kind for a in report.actions] == ["fold-into-preceding"]
    if following:  # the fold really happened: a wrong one would be undone (FD207), not kept
        assert [a.kind for a in report.actions] == ["fold-into-following"], report.diagnostics


class Combined(nn.Module):
    """BatchNorm over a concatenation or a sum of random convs, or over reshaped Linear output."""

    def __init__(self, layers: list[nn.Module], combine: str, bn: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.combine = combine
        self.bn = bn

    def forward(self, x):
        outs = [layer(x) for layer in self.layers]
        if self.combine == "cat":
            return self.bn(torch.cat(outs, 1))
        if self.combine == "sum":
            total = outs[0]
            for o in outs[1:]:
                total = total + o
            return self.bn(total)
        h = outs[0]  # Linear on (B, T, F): BN over tokens, or over the transposed features
        if self.combine == "flatten":
            return self.bn(h.flatten(0, 1)).reshape_as(h)
        return self.bn(h.transpose(1, 2))


@st.composite
def combined(draw):
    combine = draw(st.sampled_from(["cat", "sum", "flatten", "transpose"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if combine in ("flatten", "transpose"):
        fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        layers: list[nn.Module] = [nn.Linear(fin, fout, bias=draw(st.booleans()))]
        bn = nn.BatchNorm1d(fout, affine=draw(st.booleans()))
        x = torch.randn(draw(st.integers(1, 3)), draw(st.integers(2, 4)), fin, generator=g)
    else:
        nd = draw(st.integers(1, 2))
        cin = 2 * draw(st.integers(1, 2))
        n = draw(st.integers(1, 3)) if combine == "cat" else draw(st.integers(2, 3))
        width = 2 * draw(st.integers(1, 2))
        layers = []
        for _ in range(n):
            cout = 2 * draw(st.integers(1, 2)) if combine == "cat" else width
            k = draw(st.sampled_from([1, 3]))  # odd kernels, same padding: pieces line up
            groups = draw(st.sampled_from([1, 2]))
            if k == 1 and draw(st.booleans()):
                layers.append(CONVT[nd](cin, cout, 1, groups=groups, bias=draw(st.booleans())))
            else:
                layers.append(CONV[nd](cin, cout, k, padding=k // 2, groups=groups, bias=draw(st.booleans())))
        channels = sum(layer.out_channels for layer in layers)
        bn = BN[nd](channels if combine == "cat" else width, affine=draw(st.booleans()))
        x = torch.randn(2, cin, *([6] * nd), generator=g)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 3 + 0.05)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return Combined(layers, combine, bn).eval(), x, combine


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(combined())
def test_concat_sum_and_reshaped_linear_fold_exactly(case):
    model, x, combine = case
    folded, report = fold(
        model, (x,), merge_branches=False
    )  # the sum's own fold (merging: test_merge_property)
    expected = {"cat": "FD105", "sum": "FD106", "flatten": "FD107", "transpose": "FD107"}[combine]
    assert [a.code for a in report.actions] == [expected], [d.message for d in report.diagnostics]
    assert not [d for d in report.diagnostics if d.code == "FD207"]
    assert type(folded.bn) is nn.Identity
    ref = float64_reference(model, x)
    with torch.no_grad():
        base = (model(x).double() - ref).abs().max().item()
        err = (folded(x).double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-6 * max(1.0, ref.abs().max().item()), (err, base)
