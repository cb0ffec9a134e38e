"""Folds beyond the immediate neighbour: concat, sum, Linear through reshapes (issue 9)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnrewrite import analyze, fold
from bnrewrite.semantics.norms import is_batchnorm_module
from bnrewrite.verify import verify
from tests.conftest import float64_reference, randomize_bn


def _codes(report) -> list[str]:
    return [a.code for a in report.actions]


def _exact(model, folded, x, tol=1e-5):
    ref = float64_reference(model, x)
    with torch.no_grad():
        got = folded(x).double()
    assert torch.allclose(got, ref, rtol=tol, atol=tol), (got - ref).abs().max()


class MixedKernel(nn.Module):
    """Mixed-kernel depthwise block (MixNet style): BN over a concat of grouped convs."""

    def __init__(self) -> None:
        super().__init__()
        self.k3 = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.k5 = nn.Conv2d(8, 4, 5, padding=2, groups=4)
        self.up = nn.ConvTranspose2d(8, 6, 1, groups=2, bias=False)
        self.drop = nn.Dropout(0.2)
        self.bn = nn.BatchNorm2d(18)

    def forward(self, x):
        return torch.relu(self.bn(torch.cat([self.k3(x), self.drop(self.k5(x)), self.up(x)], dim=1)))


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_bn_over_concat_folds_a_slice_into_each_layer(aten):
    model = randomize_bn(MixedKernel())
    x = torch.randn(2, 8, 9, 9)
    src = torch.export.export(model, (x,)) if aten else model
    folded, report = fold(src, (x,))
    assert _codes(report) == ["FD105"] and report.actions[0].target == "k3, k5, up"
    assert not any(is_batchnorm_module(m) for m in folded.modules())
    _exact(model, folded, x)
    if not aten:
        assert type(folded.bn) is nn.Identity and folded.k3.bias is not None


class DualPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.b = nn.Conv2d(4, 6, 1)
        self.c = nn.Conv2d(4, 6, 3, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x) + self.c(x))


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_bn_over_a_sum_scales_every_term_and_shifts_once(aten):
    model = randomize_bn(DualPath())
    x = torch.randn(2, 4, 7, 7)
    src = torch.export.export(model, (x,)) if aten else model
    folded, report = fold(src, (x,), merge_branches=False)
    assert _codes(report) == ["FD106"] and report.actions[0].target == "a, b, c"
    _exact(model, folded, x)


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_branches_of_a_sum_merge_where_they_nest_then_the_bn_folds(aten):
    """a (3x3) and b (1x1) nest and merge; c (3x3 dilated) would grow the kernel to 5x5 (more
    work), so it stays a term of the sum and the BatchNorm folds into both terms."""
    model = randomize_bn(DualPath())
    x = torch.randn(2, 4, 7, 7)
    src = torch.export.export(model, (x,)) if aten else model
    folded, report = fold(src, (x,))
    codes = _codes(report)
    assert "FD109" in codes and "FD106" in codes, codes
    assert not [d for d in report.diagnostics if d.code == "FD207"]
    _exact(model, folded, x)


class TokenBN(nn.Module):
    """Token model: BatchNorm1d over flattened tokens, and over a transposed Linear output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc2 = nn.Linear(5, 7, bias=False)
        self.bn2 = nn.BatchNorm1d(7)

    def forward(self, x):  # x: (B, T, 6)
        h = self.fc1(x)
        h = self.bn1(h.flatten(0, 1)).reshape_as(h)
        return self.bn2(self.fc2(torch.relu(h)).transpose(1, 2))


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_linear_through_reshapes_folds_when_the_axis_is_proven(aten):
    model = randomize_bn(TokenBN())
    x = torch.randn(3, 4, 6)
    src = torch.export.export(model, (x,)) if aten else model
    folded, report = fold(src, (x,))
    assert _codes(report) == ["FD107", "FD107"]
    _exact(model, folded, x)


class WrongAxis(nn.Module):
    """The reshape mixes features into the BN's channel axis: not a fold."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x):  # (4, 6) -> (4, 4) -> viewed as (2, 4, 2): channel axis is not features
        return self.bn(self.fc(x).reshape(2, 4, 2))


def test_reshape_that_moves_the_feature_axis_is_refused_with_reason():
    model = randomize_bn(WrongAxis())
    x = torch.randn(4, 6)
    folded, report = fold(model, (x,))
    assert report.actions == []
    assert any(d.code == "FD202" and "feature axis" in d.message for d in report.diagnostics)
    assert isinstance(folded.bn, nn.BatchNorm1d)
    assert verify(model, folded, (x,)).passed


class BNThenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):  # x: (B, 5, T)
        return self.fc(self.bn(torch.relu(x)).transpose(1, 2))


def test_bn_then_transpose_then_linear_folds_into_the_linear():
    model = randomize_bn(BNThenLinear())
    x = torch.randn(2, 5, 4)
    folded, report = fold(model, (x,))
    assert _codes(report) == ["FD107"] and report.actions[0].kind == "fold-into-following"
    _exact(model, folded, x)


class SharedPiece(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x):
        a = self.a(x)
        return self.bn(torch.cat([a, self.b(x)], 1)), a


def test_concat_piece_read_elsewhere_is_not_folded():
    model = randomize_bn(SharedPiece())
    x = torch.randn(2, 3, 5, 5)
    report = analyze(model, (x,))
    bn = next(n for n in report.norms if n.module_path == "bn")
    assert bn.verdict == "not-foldable" and bn.reason_code == "BN009"
    folded, _ = fold(model, (x,))
    assert isinstance(folded.bn, nn.BatchNorm2d)
