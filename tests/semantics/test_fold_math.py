"""The fold arithmetic against direct float64 evaluation, per layer kind and groups."""

import pytest
import torch
import torch.nn.functional as F

from bnrewrite.semantics import fold_math

torch.manual_seed(0)


def _bn(x, s, t):
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * s.view(shape) + t.view(shape)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_then_bn(groups):
    w, b = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    s, t = torch.rand(8, dtype=torch.float64) + 0.1, torch.randn(8, dtype=torch.float64)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    w2, b2 = fold_math.into_preceding("conv", w, b, groups, s, t)
    torch.testing.assert_close(
        F.conv2d(x, w2, b2, groups=groups), _bn(F.conv2d(x, w, b, groups=groups), s, t)
    )


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_then_bn(groups):
    w = torch.randn(8, 12 // groups, 2, 2, dtype=torch.float64)
    s, t = torch.rand(12, dtype=torch.float64) + 0.1, torch.randn(12, dtype=torch.float64)
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    w2, b2 = fold_math.into_preceding("conv_transpose", w, None, groups, s, t)
    want = _bn(F.conv_transpose2d(x, w, None, stride=2, groups=groups), s, t)
    torch.testing.assert_close(F.conv_transpose2d(x, w2, b2, stride=2, groups=groups), want)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_bn_then_unpadded_conv(groups):
    w, b = torch.randn(8, 8 // groups, 3, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    s, t = torch.rand(8, dtype=torch.float64) + 0.1, torch.randn(8, dtype=torch.float64)
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    w2, b2 = fold_math.into_following("conv", w, b, groups, s, t)
    torch.testing.assert_close(
        F.conv2d(x, w2, b2, groups=groups), F.conv2d(_bn(x, s, t), w, b, groups=groups)
    )


def test_bn_then_linear_and_pointwise_transpose():
    w, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    s, t = torch.rand(8, dtype=torch.float64) + 0.1, torch.randn(8, dtype=torch.float64)
    x = torch.randn(3, 8, dtype=torch.float64)
    w2, b2 = fold_math.into_following("linear", w, b, 1, s, t)
    torch.testing.assert_close(F.linear(x, w2, b2), F.linear(_bn(x, s, t), w, b))
    wt = torch.randn(8, 3, 1, 1, dtype=torch.float64)
    xi = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    w3, b3 = fold_math.into_following("conv_transpose", wt, None, 2, s, t)
    torch.testing.assert_close(
        F.conv_transpose2d(xi, w3, b3, groups=2), F.conv_transpose2d(_bn(xi, s, t), wt, None, groups=2)
    )


def test_a_wrong_fold_is_detected():
    """The checks above can fail: folding with the wrong channel axis is caught."""
    w = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    s, t = torch.rand(8, dtype=torch.float64) + 0.1, torch.randn(8, dtype=torch.float64)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    wrong = w * s.view(1, -1, 1, 1)[:, :4]
    with pytest.raises(AssertionError):
        torch.testing.assert_close(F.conv2d(x, wrong), _bn(F.conv2d(x, w), s, t))
