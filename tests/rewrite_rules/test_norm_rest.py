"""Norm modules that do more than normalize: the fold absorbs the normalization and keeps the
rest of their forward (activation, dropout, cast), in both graph dialects; analyze, swap,
remove and recalibrate understand them the same way."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from bnrewrite import analyze, fold, recalibrate, remove, swap
from bnrewrite.precision import Float64Everywhere
from bnrewrite.semantics.norms import is_plain_norm_module
from bnrewrite.verify import verify
from tests.conftest import load_sample


class BatchNormCalls(TorchFunctionMode):
    """Counts the batch_norm calls a forward pass really runs."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("batch_norm", "_native_batch_norm_legit_no_training"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def batch_norms_run(model, inputs) -> int:
    counter = BatchNormCalls()
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.n


def close_to_float64(model, folded, inputs, tol=1e-5) -> None:
    """Within ``tol`` of the original evaluated in float64 (casts inside forward included)."""
    ref64 = copy.deepcopy(model).double()
    with torch.no_grad(), Float64Everywhere():
        ref = ref64(*(x.double() for x in inputs))
    with torch.no_grad():
        got = folded(*inputs).double()
    assert torch.allclose(got, ref, rtol=tol, atol=tol), float((got - ref).abs().max())


def test_a_subclass_with_its_own_forward_is_no_plain_batchnorm():
    model, _ = load_sample("bn_act")
    assert not is_plain_norm_module(model.stem.bn)  # F.batch_norm + act in its forward
    assert is_plain_norm_module(nn.BatchNorm2d(3)) and is_plain_norm_module(nn.SyncBatchNorm(3))


def test_bn_act_folds_keeping_the_users_own_activation_objects():
    model, inputs = load_sample("bn_act")
    folded, report = fold(model, inputs)
    assert [a.code for a in report.actions] == ["FD101"] * 4
    assert type(folded.stem.bn) is nn.Sequential and folded.stem.bn[0] is model.stem.bn.act
    assert isinstance(folded.b1.bn[0], nn.SiLU)
    assert list(folded.b3.bn) == [model.b3.bn.drop, model.b3.bn.act]  # dropout, then the activation
    assert type(folded.b2.bn) is nn.Identity  # its activation is Identity: only a BatchNorm
    assert batch_norms_run(model, inputs) == 4 and batch_norms_run(folded, inputs) == 0
    close_to_float64(model, folded, inputs)
    assert verify(model, folded, inputs).passed
    assert "keeps the rest of its forward (ReLU)" in report.actions[0].detail


def test_the_fold_is_wrong_without_the_activation():
    """The float64 comparison above can fail: the same fold with the activations dropped is far off."""
    model, inputs = load_sample("bn_act")
    folded, _ = fold(model, inputs)
    folded.stem.bn = nn.Identity()
    with pytest.raises(AssertionError):
        close_to_float64(model, folded, inputs)


class ShapeDependent(nn.Module):
    """Shape-dependent padding: symbolic_trace fails, torch.export captures (ATen dialect)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.shape[-1] % 4:
            x = F.pad(x, (0, 4 - x.shape[-1] % 4))
        return self.net(x)


def test_bn_act_in_the_aten_dialect_through_torch_export_capture():
    net, inputs = load_sample("bn_act")
    model = ShapeDependent(net).eval()
    folded, report = fold(model, inputs)
    assert report.extra["capture"] == "torch.export"
    assert [a.code for a in report.actions] == ["FD101"] * 4
    assert folded.net.stem.bn[0] is net.stem.bn.act and list(folded.net.b3.bn) == [
        net.b3.bn.drop,
        net.b3.bn.act,
    ]
    assert batch_norms_run(folded, inputs) == 0
    close_to_float64(model, folded, inputs)


def test_bn_act_as_an_exported_program():
    model, inputs = load_sample("bn_act")
    program = torch.export.export(model, inputs)
    folded, report = fold(program, inputs)
    assert isinstance(folded, fx.GraphModule) and len(report.actions) == 4
    assert batch_norms_run(folded, inputs) == 0
    close_to_float64(model, folded, inputs)


def test_inplace_abn_style_module_becomes_the_graph_of_the_rest_of_its_forward():
    model, inputs = load_sample("inplace_abn")
    folded, report = fold(model, inputs)
    assert {a.module_path: a.code for a in report.actions} == {
        "abn1": "FD101",
        "abn2": "FD101",
        "bn3": "FD101",
    }
    fd104 = {d.module_path: d.message for d in report.diagnostics if d.code == "FD104"}
    assert "leaky_relu" in fd104["abn1"] and "no chain of its own modules" in fd104["abn1"]
    assert isinstance(folded.abn1, fx.GraphModule) and type(folded) is type(model)
    assert batch_norms_run(folded, inputs) == 0
    close_to_float64(model, folded, inputs)


def test_a_subclass_that_adds_a_cast_folds_through_the_cast():
    model, inputs = load_sample("inplace_abn")
    folded, report = fold(model, inputs)
    bn3 = next(a for a in report.actions if a.module_path == "bn3")
    assert bn3.target == "conv3" and "keeps the rest of its forward (to, to)" in bn3.detail
    assert verify(model, folded, inputs).passed


def test_analyze_shows_what_stays():
    model, inputs = load_sample("bn_act")
    norms = {n.module_path: n for n in analyze(model, inputs).norms}
    assert norms["stem.bn"].verdict == "fold-into-preceding"
    assert "keeps the rest of its forward (ReLU)" in norms["stem.bn"].reason
    assert "keeps the rest" not in norms["b2.bn"].reason


def test_swap_to_groupnorm_keeps_the_activation():
    model, inputs = load_sample("bn_act")
    swapped, report = swap(model, "gn", example_inputs=inputs)
    new = swapped.stem.bn
    assert isinstance(new[0], nn.GroupNorm) and new[1] is model.stem.bn.act
    assert "keeps the rest of its forward (ReLU)" in report.actions[0].detail
    x = inputs[0]
    with torch.no_grad():
        want = model.stem.bn.act(new[0](model.stem.conv(x)))
        assert torch.equal(swapped.stem(x), want)
    assert type(swapped) is type(model)


def test_swap_of_an_abn_style_module_keeps_its_leaky_relu():
    model, inputs = load_sample("inplace_abn")
    swapped, _ = swap(model, "gn", select="abn1", example_inputs=inputs)
    x = inputs[0]
    with torch.no_grad():
        gn = swapped.abn1[0]
        want = F.leaky_relu(gn(model.conv1(x)), model.abn1.slope)
        assert torch.allclose(swapped.abn1(model.conv1(x)), want)


def test_remove_keeps_the_activation():
    model, inputs = load_sample("bn_act")
    stripped, _ = remove(model, example_inputs=inputs)
    assert list(stripped.stem.bn) == [model.stem.bn.act]
    x = inputs[0]
    with torch.no_grad():
        assert torch.equal(stripped.stem(x), torch.relu(model.stem.conv(x)))


def test_recalibrate_measures_the_input_of_the_normalization_inside():
    model, _ = load_sample("inplace_abn")
    batches = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    result, report = recalibrate(model, batches)
    assert {a.module_path for a in report.actions} == {"abn1", "abn2", "bn3"}
    with torch.no_grad():
        seen = torch.cat([model.conv1(b) for b in batches]).transpose(0, 1).flatten(1).double()
    assert torch.allclose(result.abn1.running_mean.double(), seen.mean(1), atol=1e-5)
    assert torch.allclose(result.abn1.running_var.double(), seen.var(1), atol=1e-4)
    assert not torch.equal(model.abn1.running_mean, result.abn1.running_mean)  # the input is untouched


def test_fix_absorbs_a_conv_bias_into_the_running_mean_of_a_norm_that_does_more():
    from bnrewrite import fix
    from samples._stats import trained
    from samples.bn_act import BatchNormAct2d

    model = trained(nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4)))
    x = torch.randn(2, 3, 8, 8)
    fixed, report = fix(model, example_inputs=(x,))
    assert [a.code for a in report.actions] == ["BN001"]
    assert fixed[0].bias is None and type(fixed[1]) is BatchNormAct2d  # the user's class, act kept
    close_to_float64(model, fixed, (x,))
