"""Property: a random set of parallel branches over one input - convs of nesting or clashing
kernels, strides, dilations, groups and biases, with or without a BatchNorm, identities (direct
or through a BatchNorm), average pools (counting padding or not), 1x1 -> kxk chains with or
without a shift before the padded conv - folds to what the float64 reference computes, never
runs more ops, and is merged (one conv for the whole set) exactly when every branch can be."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from bnrewrite import fold
from tests.conftest import float64_reference
from tests.rewrite_rules.test_merge_branches import executed

CONV = {1: nn.Conv1d, 2: nn.Conv2d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}
POOL = {1: nn.AvgPool1d, 2: nn.AvgPool2d}


class Branches(nn.Module):
    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return out


def _branches(branches: list[nn.Module], g: torch.Generator) -> Branches:
    """The set in eval mode, every conv kernel drawn from ``g``."""
    with torch.no_grad():
        for m in branches:
            for p in m.parameters():
                if p.dim() > 1:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return Branches(branches).eval()


def _assert_exact(model: nn.Module, folded: nn.Module, x: torch.Tensor) -> None:
    """No further from float64 than 4x the original's own error (plus float32 rounding)."""
    ref = float64_reference(model, x)
    with torch.no_grad():
        base = (model(x).double() - ref).abs().max().item()
        err = (folded(x).double() - ref).abs().max().item()
    assert err <= 4 * base + 1e-6 * max(1.0, ref.abs().max().item()), (err, base)


def _bn(nd: int, c: int, affine: bool, g: torch.Generator) -> nn.Module:
    bn = BN[nd](c, affine=affine)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn


@st.composite
def branch_sets(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    nd = draw(st.sampled_from([1, 2]))
    c = draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([1, 1, 2]))
    kinds = ["conv", "conv", "chain", "pool"] + (["identity", "bn"] if stride == 1 else [])
    chosen = draw(st.lists(st.sampled_from(kinds), min_size=2, max_size=4))
    mergeable = True
    branches: list[nn.Module] = []
    for kind in chosen:
        bn_after = draw(st.booleans())
        if kind == "conv":
            k = draw(st.sampled_from([1, 3]))
            kernel = (draw(st.sampled_from([1, 3])), k) if nd == 2 else k
            d = draw(st.sampled_from([1, 2])) if k == 3 else 1
            ks = kernel if isinstance(kernel, tuple) else (kernel,)
            pad = tuple(d * (x // 2) for x in ks)
            conv = CONV[nd](c, c, kernel, stride, pad, dilation=d, groups=draw(st.sampled_from([1, 2])),
                            bias=draw(st.booleans()))  # fmt: skip
            layers = [conv] + ([_bn(nd, c, draw(st.booleans()), g)] if bn_after else [])
        elif kind == "chain":  # 1x1 -> (BN) -> 3x3 padded: exact only without a shift before the pad
            shift = draw(st.booleans())
            layers = [CONV[nd](c, c, 1, bias=False)] + ([_bn(nd, c, True, g)] if shift else [])
            layers.append(CONV[nd](c, c, 3, stride, 1, bias=draw(st.booleans())))
            mergeable = mergeable and not shift
        elif kind == "pool":
            include = draw(st.booleans())
            layers = [POOL[nd](3, stride, 1, count_include_pad=include)]
            layers += [_bn(nd, c, True, g)] if bn_after else []
            mergeable = mergeable and include
        elif kind == "identity":
            layers = [nn.Identity()]
        else:
            layers = [_bn(nd, c, draw(st.booleans()), g)]
        branches.append(nn.Sequential(*layers))
    model = _branches(branches, g)
    x = torch.randn(2, c, *([7] * nd), generator=g)
    return model, x, mergeable


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(branch_sets())
def test_random_branch_sets_fold_exactly_and_never_run_more(case):
    model, x, mergeable = case
    folded, report = fold(model, (x,))
    codes = [d.code for d in report.diagnostics]
    assert "FD207" not in codes, [d.message for d in report.diagnostics]
    _assert_exact(model, folded, x)
    before, after = executed(model, (x,)), executed(folded, (x,))
    assert sum(after.values()) <= sum(before.values())
    sets = report.extra.get("branch_sets", [])
    merged_all = len(sets) == 1 and sets[0]["verdict"] == "merge" and "kept beside" not in sets[0]["reason"]
    if merged_all:  # one conv (or, for a per-channel map, one BatchNorm), nothing else
        layers = sum(n for op, n in after.items() if "conv" in op or "batch_norm" in op or "pool" in op)
        assert layers == 1 and not after["add"], after
    if not mergeable:
        assert not merged_all, sets


CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}


@st.composite
def transposed_sets(draw):
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    nd = draw(st.sampled_from([1, 2]))
    cin, cout = draw(st.sampled_from([2, 4])), draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([1, 2]))
    extra = stride - 1  # output_padding that keeps every branch at the same size
    branches = []
    for _ in range(draw(st.integers(2, 3))):
        k = draw(st.sampled_from([1, 3]))
        kernel = (draw(st.sampled_from([1, 3])), k) if nd == 2 else k
        ks = kernel if isinstance(kernel, tuple) else (kernel,)
        pad = tuple(x // 2 for x in ks)
        conv = CONVT[nd](cin, cout, kernel, stride, pad, output_padding=extra, groups=draw(st.sampled_from([1, 2])),
                         bias=draw(st.booleans()))  # fmt: skip
        layers = [conv] + ([_bn(nd, cout, draw(st.booleans()), g)] if draw(st.booleans()) else [])
        branches.append(nn.Sequential(*layers))
    model = _branches(branches, g)
    return model, torch.randn(2, cin, *([5] * nd), generator=g)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(transposed_sets())
def test_random_transposed_branch_sets_fold_exactly(case):
    model, x = case
    folded, report = fold(model, (x,))
    assert "FD207" not in [d.code for d in report.diagnostics]
    _assert_exact(model, folded, x)
    before, after = executed(model, (x,)), executed(folded, (x,))
    assert sum(after.values()) <= sum(before.values())
    if any(s["verdict"] == "merge" for s in report.extra.get("branch_sets", [])):
        assert after["convolution"] < before["convolution"]


@st.composite
def mergeable_sets(draw):
    """Sets every branch of which can merge at no extra cost: kxk convs of one shape, 1x1 convs
    of the same groups and stride (nested in the kxk taps), identities and BatchNorms at stride
    1, each conv with or without a BatchNorm. The merged conv is the kxk conv's shape; the kxk
    conv has a bias (a bias the branches do not store would cost more values: refused)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    nd = draw(st.sampled_from([1, 2]))
    c = draw(st.sampled_from([2, 4]))
    groups = draw(st.sampled_from([1, 2]))
    stride = draw(st.sampled_from([1, 2]))
    k = draw(st.sampled_from([3, 5]))
    extra = draw(
        st.lists(
            st.sampled_from(["kxk", "1x1"] + (["identity", "bn"] if stride == 1 else [])),
            min_size=1,
            max_size=3,
        )
    )
    branches = []
    for kind in ["kxk", *extra]:
        if kind in ("kxk", "1x1"):
            size = k if kind == "kxk" else 1
            bias = kind == "kxk" or draw(st.booleans())  # the kxk conv holds the merged bias: no new values
            layers = [CONV[nd](c, c, size, stride, size // 2, groups=groups, bias=bias)]
            if draw(st.booleans()):
                layers.append(_bn(nd, c, draw(st.booleans()), g))
        elif kind == "identity":
            layers = [nn.Identity()]
        else:
            layers = [_bn(nd, c, draw(st.booleans()), g)]
        branches.append(nn.Sequential(*layers))
    model = _branches(branches, g)
    return model, torch.randn(2, c, *([7] * nd), generator=g)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mergeable_sets())
def test_sets_every_branch_of_which_can_merge_are_merged(case):
    """The other direction: where every branch can merge, the set is one conv."""
    model, x = case
    folded, report = fold(model, (x,))
    sets = report.extra.get("branch_sets", [])
    assert len(sets) == 1 and sets[0]["verdict"] == "merge", sets
    after = executed(folded, (x,))
    assert after["convolution"] == 1 and not after["add"] and not after.get("native_batch_norm"), after
    _assert_exact(model, folded, x)
