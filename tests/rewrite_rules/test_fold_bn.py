"""Every fold pattern against a float64 reference, and every skip reason by its code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bnrewrite import fold
from bnrewrite.modules import ChannelAffine, FrozenBatchNorm
from tests.conftest import assert_unchanged, float64_reference, randomize_bn, state_snapshot

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONVT = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def n_bn(model: nn.Module) -> int:
    return (
        sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if not hasattr(model, "graph")
        else sum(
            1
            for n in model.graph.nodes
            if (
                n.op == "call_module"
                and isinstance(model.get_submodule(n.target), nn.modules.batchnorm._BatchNorm)
            )
            or "batch_norm" in str(n.target)
        )
    )


def check(model: nn.Module, x: torch.Tensor, *, aten: bool = False, **kw):
    """Fold, then require float32 error vs float64 no worse than ~2x the original's own."""
    snap = state_snapshot(model)
    src = torch.export.export(model, (x,)) if aten else model
    folded, report = fold(src, (x,), **kw)
    assert_unchanged(model, snap)
    ref = float64_reference(model, x)
    with torch.no_grad():
        base = (model(x).double() - ref).abs().max().item()
        err = (folded(x).double() - ref).abs().max().item()
    assert err <= 2 * base + 1e-6 * max(1.0, ref.abs().max().item()), (err, base)
    return folded, report


def kinds(report) -> list[str]:
    return [a.kind for a in report.actions]


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
@pytest.mark.parametrize(
    "nd,groups,stride,dilation,padding,mode,bias",
    [
        (1, 1, 1, 1, 0, "zeros", True),
        (2, 2, 2, 1, 1, "zeros", False),
        (2, 4, 1, 2, 2, "reflect", True),
        (3, 1, 1, 1, 1, "replicate", False),
        (2, 1, 1, 1, "same", "circular", True),
    ],
)
def test_conv_then_bn(aten, nd, groups, stride, dilation, padding, mode, bias):
    conv = CONV[nd](
        4,
        8,
        3,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias,
        padding_mode=mode,
    )
    model = randomize_bn(nn.Sequential(conv, BN[nd](8)))
    x = torch.randn(2, 4, *([9] * nd))
    folded, report = check(model, x, aten=aten)
    assert kinds(report) == ["fold-into-preceding"] and n_bn(folded) == 0


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
@pytest.mark.parametrize("nd,groups", [(1, 1), (2, 2), (3, 4)])
def test_conv_transpose_then_bn_any_groups(aten, nd, groups):
    model = randomize_bn(nn.Sequential(CONVT[nd](8, 12, 2, stride=2, groups=groups), BN[nd](12)))
    folded, report = check(model, torch.randn(2, 8, *([4] * nd)), aten=aten)
    assert kinds(report) == ["fold-into-preceding"] and n_bn(folded) == 0


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_linear_then_bn1d(aten):
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU()))
    _folded, report = check(model, torch.randn(4, 6), aten=aten)
    assert kinds(report) == ["fold-into-preceding"]


def test_linear_then_bn1d_on_rank3_is_refused_with_reason():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(6, 5)
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(self.lin(x))

    model = randomize_bn(Seq())
    _folded, report = check(model, torch.randn(2, 3, 6), bn_to_affine=True)
    assert kinds(report) == ["scale-shift"]
    assert "FD202" in report.codes()


def test_linear_without_shapes_is_not_guessed():
    model = randomize_bn(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)))
    _, report = fold(model, bn_to_affine=True)
    assert kinds(report) == ["scale-shift"] and "FD202" in report.codes()
    folded, report = fold(model)  # by default it stays a BatchNorm, with the same reason
    assert kinds(report) == [] and "FD202" in report.codes() and n_bn(folded) == 1


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
@pytest.mark.parametrize("padding,mode", [(0, "zeros"), (1, "reflect"), (1, "replicate"), (1, "circular")])
@pytest.mark.parametrize("groups", [1, 4])
def test_bn_into_following_conv(aten, padding, mode, groups):
    model = randomize_bn(
        nn.Sequential(
            nn.Conv2d(3, 8, 3),
            nn.ReLU(),
            nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 3, padding=padding, padding_mode=mode, groups=groups),
        )
    )
    folded, report = check(model, torch.randn(2, 3, 10, 10), aten=aten)
    assert kinds(report) == ["fold-into-following"] and n_bn(folded) == 0


def test_bn_into_following_zero_padded_conv_is_refused():
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, padding=1))
    )
    folded, report = check(model, torch.randn(2, 3, 10, 10), bn_to_affine=True)
    assert kinds(report) == ["scale-shift"] and report.codes() == ["FD201"]
    assert isinstance(folded.get_submodule("2"), ChannelAffine)
    folded, report = check(model, torch.randn(2, 3, 10, 10))
    assert kinds(report) == [] and report.codes() == ["FD201"]
    assert isinstance(folded.get_submodule("2"), nn.BatchNorm2d)


def test_bn_into_following_linear_and_into_several_consumers():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(6)
            self.a = nn.Linear(6, 3)
            self.b = nn.Linear(6, 2)

        def forward(self, x):
            y = self.bn(torch.relu(x))
            return self.a(y), self.b(y)

    model = randomize_bn(TwoHeads())
    x = torch.randn(4, 6)
    folded, report = fold(model, (x,))
    assert kinds(report) == ["fold-into-following"]
    assert report.actions[0].target == "a, b"
    ref = [r for r in float64_reference(model, x)]
    for got, want in zip(folded(x), ref):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_preactivation_bn_stays_batchnorm_or_becomes_scale_shift_on_request():
    model = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3, padding=1)))
    _folded, report = check(model, torch.randn(2, 3, 8, 8), bn_to_affine=True)
    assert kinds(report) == ["scale-shift"] and report.codes() == ["FD206"]
    folded, report = check(model, torch.randn(2, 3, 8, 8))
    assert kinds(report) == [] and report.codes() == ["FD206"] and n_bn(folded) == 1
    assert "stays a BatchNorm" in report.diagnostics[0].message


class SharedConv(nn.Module):
    """One conv called twice; only the first call feeds a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.conv(x * 2)


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_shared_conv_is_folded_per_call_site(aten):
    model = randomize_bn(SharedConv())
    folded, report = check(model, torch.randn(2, 4, 6, 6), aten=aten)
    assert kinds(report) == ["fold-into-preceding"]
    if aten:  # each call site reads its own weight tensor
        weights = [
            n.args[1].target
            for n in folded.graph.nodes
            if n.op == "call_function" and "conv2d" in str(n.target)
        ]
        assert len(set(weights)) == 2
    else:
        calls = [n.target for n in folded.graph.nodes if n.op == "call_module"]
        assert sorted(calls) == ["conv", "conv_folded1"]
        assert torch.equal(folded.conv.weight, model.conv.weight)


def test_conv_bias_affine_false_and_own_eps():
    model = randomize_bn(
        nn.Sequential(nn.Conv2d(3, 4, 3, bias=True), nn.BatchNorm2d(4, affine=False, eps=0.3))
    )
    _folded, report = check(model, torch.randn(2, 3, 6, 6))
    assert kinds(report) == ["fold-into-preceding"]


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_functional_batch_norm(aten):
    class Func(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 3, 3, 3))
            self.register_buffer("m", torch.randn(4))
            self.register_buffer("v", torch.rand(4) + 0.2)
            self.g = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return F.batch_norm(F.conv2d(x, self.w), self.m, self.v, self.g, None, False, 0.1, 1e-3)

    model = Func().eval()
    folded, report = check(model, torch.randn(2, 3, 6, 6), aten=aten)
    assert kinds(report) == ["fold-into-preceding"] and n_bn(folded) == 0


def test_frozen_batchnorm_folds():
    frozen = FrozenBatchNorm(4)
    with torch.no_grad():
        frozen.running_var.uniform_(0.5, 2)
        frozen.weight.normal_()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen).eval()
    _, report = check(model, torch.randn(2, 3, 6, 6))
    assert kinds(report) == ["fold-into-preceding"]


def test_training_mode_is_refused_unless_eval():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train()
    snap = state_snapshot(model)
    folded, report = fold(model, (torch.randn(2, 3, 6, 6),))
    assert kinds(report) == [] and report.codes() == ["BN002"]
    folded, report = fold(model, (torch.randn(2, 3, 6, 6),), eval_mode=True)
    assert kinds(report) == ["fold-into-preceding"]
    assert_unchanged(model, snap)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), model.eval()(x), rtol=1e-4, atol=1e-5)


def test_no_running_stats_and_bad_stats_are_refused():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    assert fold(model, (torch.randn(2, 3, 6, 6),)).report.codes() == ["BN005"]
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].running_var[1] = -3.0
    assert fold(model, (torch.randn(2, 3, 6, 6),)).report.codes() == ["BN004"]


def test_untraceable_model_is_folded_in_its_traceable_parts():
    from tests.conftest import load_sample

    model, inputs = load_sample("untraceable")
    folded, report = check(model, inputs[0])
    assert len([a for a in report.actions if a.kind == "fold-into-preceding"]) == 4
    assert "FD203" in report.codes()
    assert type(folded) is type(model) and folded is not model
    assert isinstance(model.stem, nn.Sequential)  # original tree untouched


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtype_device_and_requires_grad_are_kept(dtype):
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).to(dtype)
    model[0].weight.requires_grad_(False)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    folded, _ = fold(model, (x,))
    conv = folded.get_submodule("0")
    assert conv.weight.dtype == dtype and conv.bias.dtype == dtype
    assert conv.weight.requires_grad is False
    ref = float64_reference(model, x)
    base = (model(x).double() - ref).abs().max()
    assert (folded(x).double() - ref).abs().max() <= 2 * base + 1e-6


def test_only_changed_tensors_are_new_and_names_survive():
    from tests.conftest import load_sample

    model, inputs = load_sample("mobilenet")
    folded, _ = fold(model, inputs)
    old = {k: v.data_ptr() for k, v in model.state_dict().items()}
    new = folded.state_dict()
    assert (
        "classifier.1.weight" in new and new["classifier.1.weight"].data_ptr() == old["classifier.1.weight"]
    )
    assert "stem.0.weight" in new and new["stem.0.weight"].data_ptr() != old["stem.0.weight"]


def test_inplace_writes_into_the_existing_storage():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    ptr = model[0].weight.data_ptr()
    x = torch.randn(2, 3, 6, 6)
    want = model(x)
    folded, _ = fold(model, (x,), inplace=True)
    assert folded.get_submodule("0").weight.data_ptr() == ptr
    torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)


def test_norm_chain_folds_to_a_fixed_point():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm2d(4)))
    folded, report = check(model, torch.randn(2, 3, 6, 6))
    assert kinds(report) == ["fold-into-preceding", "fold-into-preceding"] and n_bn(folded) == 0


def test_computed_statistics_are_refused_with_reason():
    class Computed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("m", torch.randn(4))
            self.register_buffer("v", torch.rand(4) + 0.5)

        def forward(self, x):
            y = self.conv(x)
            return F.batch_norm(y, y.mean((0, 2, 3)), self.v, training=False)  # mean from the data

    model = Computed().eval()
    _folded, report = fold(model, (torch.randn(2, 3, 6, 6),))
    assert kinds(report) == [] and report.codes() == ["FD204"]


def test_leaf_modules_by_class_name_and_glob():
    from tests.conftest import load_sample

    model, inputs = load_sample("resnet")
    _, report = fold(model, inputs, leaf_modules=["BasicBlock"])
    assert len(report.actions) == 1  # only the stem BN is outside the leaf blocks
    _, report = fold(model, inputs, leaf_modules=["layers.[0-4]"])
    assert len(report.actions) == 3


@pytest.mark.parametrize("aten", [False, True], ids=["module", "aten"])
def test_inplace_never_corrupts_another_call_site(aten):
    model = randomize_bn(SharedConv())
    x = torch.randn(2, 4, 6, 6)
    want = model(x)
    src = torch.export.export(model, (x,)) if aten else model
    folded, _ = fold(src, (x,), inplace=True)
    torch.testing.assert_close(folded(x), want, rtol=1e-4, atol=1e-5)
