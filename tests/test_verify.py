from dataclasses import dataclass

import torch
from torch import nn

from bnrewrite import fold
from bnrewrite.verify import _run, float64_copy, verify
from tests.conftest import load_sample, randomize_bn


def test_passes_for_a_correct_fold_and_reports_per_output():
    model, inputs = load_sample("resnet")
    folded, _ = fold(model, inputs)
    result = verify(model, folded, inputs)
    assert result.passed
    assert len(result.checks) == 3  # the given inputs and two random sets
    assert all(c.max_abs_error <= c.tolerance for c in result.checks)


def test_fails_and_names_the_first_diverging_node():
    model, inputs = load_sample("resnet")
    folded, _ = fold(model, inputs)
    with torch.no_grad():
        folded.get_submodule("layers.1.conv2").weight.mul_(1.5)
    result = verify(model, folded, inputs)
    assert not result.passed
    assert result.first_divergence["node"] == "layers_1_conv2"
    assert result.first_divergence["original_node"] == "layers_1_bn2"


def test_tolerance_defaults_follow_dtype():
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).to(torch.float16)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float16)
    folded, _ = fold(model, (x,))
    result = verify(model, folded, (x,))
    assert result.passed and result.checks[0].dtype == "float16"


def test_multiple_outputs_and_no_state_change_in_training_mode():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x), x * 2

    model = Two().train()
    before = model.bn.running_mean.clone()
    result = verify(model, model, (torch.randn(8, 4),), random_sets=1)
    assert result.passed and len(result.checks) == 4
    assert torch.equal(model.bn.running_mean, before)


class TabNetLike(nn.Module):
    """Builds float32 tensors inside forward, as tabular networks do (masks, priors)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        h = self.bn(self.fc(x))
        prior = torch.ones(h.shape, dtype=torch.float32)
        mask = torch.sigmoid(h) * prior
        return torch.mm(mask, torch.eye(6, dtype=torch.float32) * 2)


class CastsToFloat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, bias=False)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return (self.bn(self.conv(x)).float() * 3).sum(dim=(2, 3))


@dataclass
class Out:
    logits: torch.Tensor
    aux: dict


class ReturnsDataclass(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return Out(logits=y.mean((2, 3)), aux={"feat": y, "pair": (y.sum(), torch.arange(2))})


class BitTrick(nn.Module):
    """abs() through the float32 bit pattern: cannot run in float64."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return (y.view(torch.int32) & 0x7FFFFFFF).view(torch.float32)


def _bn64(bn: nn.BatchNorm1d | nn.BatchNorm2d, h: torch.Tensor) -> torch.Tensor:
    shape = (1, -1) + (1,) * (h.dim() - 2)
    mean, var = bn.running_mean.double().reshape(shape), bn.running_var.double().reshape(shape)
    w, b = bn.weight.double().reshape(shape), bn.bias.double().reshape(shape)
    return (h - mean) / torch.sqrt(var + bn.eps) * w + b


def test_reference_runs_in_float64_through_float32_factories():
    model = randomize_bn(TabNetLike())
    x = torch.randn(5, 6)
    ref = float64_copy(model)
    (_, out), *_ = _run(ref, (x.double(),), float64=True)
    h = _bn64(model.bn, x.double() @ model.fc.weight.double().T + model.fc.bias.double())
    assert out.dtype == torch.float64
    assert torch.allclose(out, 2 * torch.sigmoid(h), rtol=0, atol=1e-14)  # by hand
    folded, _ = fold(model, (x,))
    result = verify(model, folded, (x,))
    assert result.passed and result.reference == "float64", result.summary()
    assert 0 < result.checks[0].original_abs_error < 1e-5  # the float32 model vs a real float64 run


def test_explicit_float_casts_stay_float64_in_the_reference():
    model = randomize_bn(CastsToFloat())
    x = torch.randn(2, 2, 6, 6)
    (_, out), *_ = _run(float64_copy(model), (x.double(),), float64=True)
    h = _bn64(model.bn, torch.nn.functional.conv2d(x.double(), model.conv.weight.double()))
    assert out.dtype == torch.float64
    assert torch.allclose(out, (3 * h).sum(dim=(2, 3)), rtol=0, atol=1e-12)
    folded, _ = fold(model, (x,))
    assert verify(model, folded, (x,)).passed


def test_dataclass_outputs_are_compared_leaf_by_leaf_with_paths():
    model = randomize_bn(ReturnsDataclass())
    x = torch.randn(2, 2, 6, 6)
    folded, _ = fold(model, (x,))
    result = verify(model, folded, (x,), random_sets=0)
    assert result.passed, result.summary()
    paths = [c.path for c in result.checks]
    assert paths == ["output.logits", "output.aux['feat']", "output.aux['pair'][0]", "output.aux['pair'][1]"]
    assert "4 output(s) on 1 input set(s)" in result.summary()
    y = _bn64(
        model.bn, torch.nn.functional.conv2d(x.double(), model.conv.weight.double(), model.conv.bias.double())
    )
    got = folded(x)
    assert torch.allclose(got.aux["feat"].double(), y, atol=1e-5)  # by hand


def _plant_wrong_fold(model: nn.Module, x: torch.Tensor) -> nn.Module:
    folded, _ = fold(model, (x,))
    for m in folded.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            with torch.no_grad():
                m.weight.mul_(1.01)
    return folded


def test_planted_wrong_folds_fail_on_each_model():
    cases = [
        (TabNetLike(), torch.randn(5, 6)),
        (CastsToFloat(), torch.randn(2, 2, 6, 6)),
        (ReturnsDataclass(), torch.randn(2, 2, 6, 6)),
        (BitTrick(), torch.randn(2, 2, 6, 6)),
    ]
    for model, x in cases:
        model = randomize_bn(model)
        result = verify(model, _plant_wrong_fold(model, x), (x,))
        assert not result.passed, type(model).__name__


def test_model_that_cannot_run_in_float64_falls_back_and_says_so():
    model = randomize_bn(BitTrick())
    x = torch.randn(2, 2, 6, 6)
    folded, _ = fold(model, (x,))
    result = verify(model, folded, (x,))
    assert result.passed, result.summary()
    assert result.reference == "own dtype"
    assert "cannot run in float64" in result.note
    assert "compared with the original in its own dtype" in result.summary()
    assert all(c.original_abs_error > 0 for c in result.checks)  # one-ulp sensitivity was measured
