"""Merging parallel branches: every re-parameterizable sample becomes as few ops as its own
hand-written reparameterization, exactly; every set that is not merged says why."""

from __future__ import annotations

import importlib
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bnrewrite import analyze, fold
from bnrewrite.semantics.norms import is_batchnorm_module
from bnrewrite.verify import verify
from tests.conftest import assert_unchanged, float64_reference, randomize_bn, state_snapshot

REP_SAMPLES = ["repvgg", "acnet", "dbb", "mobileone", "repconv", "repmixer"]


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def executed(model: nn.Module, inputs: tuple) -> Counter[str]:
    with torch.no_grad(), _Ops() as counter:
        model(*inputs)
    return counter.ops


@pytest.mark.parametrize("name", REP_SAMPLES)
def test_sample_runs_no_more_ops_than_its_own_reparameterization(name):
    mod = importlib.import_module(f"samples.{name}")
    model, inputs = mod.build(), mod.example_inputs()
    snap = state_snapshot(model)
    folded, report = fold(model, inputs)
    assert type(folded) is type(model)
    assert not [d for d in report.diagnostics if d.code == "FD207"]
    hand = mod.reparameterize(model)
    ours, theirs = sum(executed(folded, inputs).values()), sum(executed(hand, inputs).values())
    assert ours <= theirs * 1.05, (ours, theirs)
    assert executed(folded, inputs)["convolution"] <= executed(hand, inputs)["convolution"]
    assert verify(model, folded, inputs).passed
    ref = float64_reference(model, *inputs)
    with torch.no_grad():
        base = (model(*inputs).double() - ref).abs().max().item()
        err = (folded(*inputs).double() - ref).abs().max().item()
    assert err <= 4 * base + 1e-6, (err, base)
    assert_unchanged(model, snap)


def test_repvgg_blocks_become_one_conv_each_and_keep_the_rest_of_their_forward():
    mod = importlib.import_module("samples.repvgg")
    model, inputs = mod.build(), mod.example_inputs()
    folded, report = fold(model, inputs)
    merged = [d for d in report.diagnostics if d.code == "FD109"]
    assert len(merged) == 6
    assert any("3 branches become one 3x3 conv" in d.message for d in merged)
    block = folded.stage2[1]  # grouped (g2) block with an identity BatchNorm
    convs = [m for m in block.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 and convs[0].groups == 2 and convs[0].kernel_size == (3, 3)
    assert isinstance(block.nonlinearity, nn.ReLU)
    assert not [m for m in folded.modules() if is_batchnorm_module(m)]


def test_keep_branches_folds_only_the_batchnorms():
    mod = importlib.import_module("samples.repvgg")
    model, inputs = mod.build(), mod.example_inputs()
    folded, report = fold(model, inputs, merge_branches=False)
    assert not [d for d in report.diagnostics if d.code in ("FD109", "FD104")]
    assert {a.kind for a in report.actions} == {"fold-into-preceding"}
    assert "branch_sets" not in report.extra
    assert isinstance(folded.stage1[1].rbr_identity, nn.BatchNorm2d)  # nothing to absorb it
    assert verify(model, folded, inputs).passed


def test_analyze_lists_every_branch_set_with_its_verdict():
    mod = importlib.import_module("samples.repmixer")
    report = analyze(mod.build(), mod.example_inputs())
    sets = report.extra["branch_sets"]
    verdicts = Counter(s["verdict"] for s in sets)
    assert verdicts == {"merge": 2, "keep": 2}
    kept = [s for s in sets if s["verdict"] == "keep"]
    assert all("nonlinear op" in s["reason"] and "convffn.act" in s["reason"] for s in kept)
    assert not [d for d in report.diagnostics if d.code == "FD110"]  # residual bodies draw no finding


class _Pair(nn.Module):
    """Two branches read ``x``: ``a`` (conv+BN) and ``b`` (conv, or anything given)."""

    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)


def _conv_bn(cin, cout, k, stride=1, padding=0, groups=1, dilation=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, padding, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


def _chain(padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=padding)
    )


REFUSALS = {
    "stride": (_Pair(_conv_bn(4, 4, 3, 1, 0), _conv_bn(4, 4, 3, 2, 1)), (1, 4, 5, 5), "stride mismatch"),
    "cost": (_Pair(_conv_bn(4, 4, 3, 1, 1, groups=4), _conv_bn(4, 4, 1)), (1, 4, 6, 6), "would cost more"),
    "dilated": (
        _Pair(_conv_bn(4, 4, 3, 1, 1), _conv_bn(4, 4, 3, 1, 2, dilation=2)),
        (1, 4, 6, 6),
        "would cost more",
    ),
    "new_shape": (
        _Pair(
            _conv_bn(4, 4, 3, 1, 1, groups=2),
            _Pair(_conv_bn(4, 4, (1, 3), 1, (0, 1)), _conv_bn(4, 4, (3, 1), 1, (1, 0))),
        ),
        (1, 4, 6, 6),
        "has the shape of no branch's conv",
    ),
    "border": (_Pair(_conv_bn(4, 4, 3, 1, 1), _chain(1)), (1, 4, 6, 6), "not exact at the border"),
    "exclude_pad": (
        _Pair(_conv_bn(4, 4, 3, 1, 1), nn.AvgPool2d(3, 1, 1, count_include_pad=False)),
        (1, 4, 6, 6),
        "count_include_pad=False",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_set_that_cannot_merge_is_explained_and_stays_exact(case):
    model, shape, why = REFUSALS[case]
    model = randomize_bn(model).eval()
    x = (torch.randn(shape),)
    report = analyze(model, x)
    found = [d for d in report.diagnostics if d.code == "FD110"]  # the outer set first
    assert found and why in found[0].message, [d.message for d in report.diagnostics]
    assert report.extra["branch_sets"][0]["verdict"] == "keep"
    folded, fold_report = fold(model, x)
    assert not [d for d in fold_report.diagnostics if d.code == "FD109"]
    assert verify(model, folded, x).passed


def test_a_chain_whose_kxk_conv_reads_unpadded_values_merges():
    """1x1 -> BN -> 3x3 without padding: no border, so the chain is one 3x3 conv of x."""
    model = randomize_bn(_Pair(_conv_bn(4, 4, 3), _chain(0))).eval()
    x = (torch.randn(1, 4, 7, 7),)
    folded, report = fold(model, x)
    assert [d.code for d in report.diagnostics if d.code.startswith("FD1")] == ["FD109", "FD104"]
    assert executed(folded, x)["convolution"] == 1
    assert verify(model, folded, x).passed


def test_training_mode_batchnorm_is_not_linear():
    model = randomize_bn(_Pair(_conv_bn(4, 4, 3, 1, 1), _conv_bn(4, 4, 1))).eval()
    model.a[1].train()
    report = analyze(model, (torch.randn(2, 4, 6, 6),))
    (d,) = [d for d in report.diagnostics if d.code == "FD110"]
    assert "fewer than two linear branches" in d.message or "training mode" in d.message


class _ThreeTerms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _conv_bn(4, 4, 3, 1, 1), _conv_bn(4, 4, 1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.c(y) + self.b(x) + 1.5


def test_branches_of_one_input_merge_and_other_terms_stay():
    model = randomize_bn(_ThreeTerms()).eval()
    x = (torch.randn(1, 4, 6, 6), torch.randn(1, 4, 6, 6))
    folded, report = fold(model, x)
    assert len([d for d in report.diagnostics if d.code == "FD109"]) == 1
    assert executed(folded, x)["convolution"] == 2
    assert verify(model, folded, x).passed


class _Scaled(nn.Module):
    """RepMixer's combination on a plain tensor: ``x + s * (conv(x) - bn(x))`` and a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(4)
        self.s = nn.Parameter(torch.rand(4, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.s * (self.conv(x) - self.bn(x)) / 2.0


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_linear_combinations_merge_in_either_dialect(aten):
    model = randomize_bn(_Scaled()).eval()
    x = torch.randn(2, 4, 6, 6)
    src = torch.export.export(model, (x,)) if aten else model
    folded, report = fold(src, (x,))
    assert [d.code for d in report.diagnostics if d.code == "FD109"] == ["FD109"]
    assert executed(folded, (x,))["convolution"] == 1
    with torch.no_grad():
        ref = float64_reference(model, x)
        assert (folded(x).double() - ref).abs().max() < 1e-5


def test_an_identity_plus_batchnorm_becomes_a_batchnorm_that_folds_into_the_conv_before():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return F.relu(self.bn(y) + y)

    model = randomize_bn(M()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    folded, _ = fold(model, x)
    assert dict(executed(folded, x)) == {"convolution": 1, "relu": 1}
    assert verify(model, folded, x).passed


class _Up(nn.Module):
    """Parallel upsampling branches: transposed convs whose kernels nest (3x3, 1x1, 3x1)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(
            nn.ConvTranspose2d(4, 6, 3, 2, 1, output_padding=1, bias=False), nn.BatchNorm2d(6)
        )
        self.b = nn.Sequential(
            nn.ConvTranspose2d(4, 6, 1, 2, 0, output_padding=1, groups=2), nn.BatchNorm2d(6)
        )
        self.c = nn.ConvTranspose2d(4, 6, (3, 1), 2, (1, 0), output_padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x) + self.b(x) + self.c(x))


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_transposed_conv_branches_merge(aten):
    model = randomize_bn(_Up()).eval()
    x = torch.randn(2, 4, 5, 6)
    src = torch.export.export(model, (x,)) if aten else model
    folded, report = fold(src, (x,))
    (d,) = [d for d in report.diagnostics if d.code == "FD109"]
    assert "one 3x3 transposed conv" in d.message
    assert executed(folded, (x,))["convolution"] == 1
    ref = float64_reference(model, x)
    with torch.no_grad():
        assert (folded(x).double() - ref).abs().max() < 1e-5


def test_a_transposed_conv_after_a_shift_is_refused():
    chain = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ConvTranspose2d(4, 4, 3, 2, 1, output_padding=1))
    model = _Pair(
        nn.Sequential(nn.ConvTranspose2d(4, 4, 3, 2, 1, output_padding=1), nn.BatchNorm2d(4)), chain
    )
    model = randomize_bn(model).eval()
    report = analyze(model, (torch.randn(1, 4, 5, 5),))
    (d,) = [d for d in report.diagnostics if d.code == "FD110"]
    assert "reads what other ops computed" in d.message


# GhostNetV3's re-parameterizable Ghost module: ``x1 = 0; x1 += branch(x)`` over a ModuleList,
# an in-place ReLU between the primary and the cheap (depthwise) sums, and a channel concat.
def _ghost_conv_bn(i, o, k, s, p, groups=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(o))


class GhostModuleV3(nn.Module):
    def __init__(self, inp, oup, kernel_size=1, ratio=2, dw_size=3, stride=1, relu=True):
        super().__init__()
        init_channels = math.ceil(oup / ratio)
        new_channels = init_channels * (ratio - 1)
        self.primary_rpr_skip = nn.BatchNorm2d(inp) if inp == init_channels and stride == 1 else None
        self.primary_rpr_conv = nn.ModuleList(
            [_ghost_conv_bn(inp, init_channels, kernel_size, stride, kernel_size // 2) for _ in range(3)]
        )
        self.primary_rpr_scale = _ghost_conv_bn(inp, init_channels, 1, 1, 0) if kernel_size > 1 else None
        self.primary_activation = nn.ReLU(inplace=True) if relu else None
        self.cheap_rpr_skip = nn.BatchNorm2d(init_channels)
        self.cheap_rpr_conv = nn.ModuleList(
            [
                _ghost_conv_bn(init_channels, new_channels, dw_size, 1, dw_size // 2, groups=init_channels)
                for _ in range(3)
            ]
        )
        self.cheap_rpr_scale = _ghost_conv_bn(init_channels, new_channels, 1, 1, 0, groups=init_channels)
        self.cheap_activation = nn.ReLU(inplace=True) if relu else None

    def forward(self, x):
        x1 = 0
        if self.primary_rpr_scale is not None:
            x1 += self.primary_rpr_scale(x)
        if self.primary_rpr_skip is not None:
            x1 += self.primary_rpr_skip(x)
        for c in self.primary_rpr_conv:
            x1 += c(x)
        x1 = self.primary_activation(x1) if self.primary_activation is not None else x1
        x2 = self.cheap_rpr_scale(x1) + self.cheap_rpr_skip(x1)
        for c in self.cheap_rpr_conv:
            x2 += c(x1)
        x2 = self.cheap_activation(x2) if self.cheap_activation is not None else x2
        return torch.cat([x1, x2], dim=1)


class _GhostNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = GhostModuleV3(16, 16, 1)
        self.b = GhostModuleV3(16, 32, 3)
        self.c = GhostModuleV3(32, 32, 1, relu=False)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_ghostnet_v3_modules_merge_both_sums():
    model = randomize_bn(_GhostNet()).eval()
    x = (torch.randn(2, 16, 16, 16),)
    folded, report = fold(model, x)
    assert len([d for d in report.diagnostics if d.code == "FD109"]) == 6
    assert dict(executed(folded, x)) == {"convolution": 6, "relu_": 4, "cat": 3}
    assert verify(model, folded, x).passed


class _UntraceableRoot(nn.Module):
    """RepVGG blocks under data-dependent control flow: captured in parts, merged there."""

    def __init__(self) -> None:
        super().__init__()
        from samples.repvgg import RepVGGBlock

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([RepVGGBlock(8, 8), RepVGGBlock(8, 8, groups=2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if x.sum() > 0:
            x = self.blocks[0](x)
        return self.blocks[1](x)


def test_blocks_inside_a_parts_capture_merge():
    model = randomize_bn(_UntraceableRoot()).eval()
    x = (torch.randn(2, 3, 16, 16),)
    folded, report = fold(model, x)
    assert report.extra["capture"] == "parts" and type(folded) is _UntraceableRoot
    assert sorted(d.module_path for d in report.diagnostics if d.code == "FD109") == ["blocks.0", "blocks.1"]
    assert verify(model, folded, x).passed


def test_a_selection_limits_which_sets_merge():
    mod = importlib.import_module("samples.repvgg")
    model, inputs = mod.build(), mod.example_inputs()
    _, report = fold(model, inputs, select="stage1.*")
    merged = sorted(d.module_path for d in report.diagnostics if d.code == "FD109")
    assert merged == ["stage1.0", "stage1.1"]
    kept = [d.message for d in report.diagnostics if d.code == "FD110"]
    assert kept and all("outside the selection" in m for m in kept)
    _, report = fold(model, inputs, types=["LayerNorm"])
    assert not [d for d in report.diagnostics if d.code == "FD109"]
