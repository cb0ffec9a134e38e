"""The speed check: a fold that gives a transposed conv a bias is kept only if it is no slower."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from bnrewrite import analyze, fold
from bnrewrite.cli import app
from bnrewrite.plan import fold_cost
from bnrewrite.semantics.norms import is_batchnorm_module
from tests.conftest import float64_reference, randomize_bn


def _slow_bias(monkeypatch, ratio: float = 2.0) -> list[tuple]:
    """Every new transposed-conv bias measures ``ratio`` x the BatchNorm; returns the calls."""
    calls: list[tuple] = []

    def measure(layer, weight, in_shape, output_padding, bn_after, nominal):
        calls.append((tuple(weight.shape), in_shape, bn_after, nominal))
        return fold_cost.Timing(ratio, 1.0, in_shape, nominal, str(weight.device))

    monkeypatch.setattr(fold_cost, "_measure", measure)
    return calls


class Decoder(nn.Module):
    """A bias-free 1x1 transposed conv (slow bias path), then an upsampling one, each + BN."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.ConvTranspose2d(16, 16, 1, groups=4, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.up = nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn3(self.conv(torch.relu(self.bn2(self.up(torch.relu(self.bn1(self.mix(x))))))))


def _exact(model, folded, x):
    ref = float64_reference(model, x)
    with torch.no_grad():
        assert torch.allclose(folded(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_a_slower_fold_keeps_its_batchnorm_and_says_why(monkeypatch):
    calls = _slow_bias(monkeypatch)
    model = randomize_bn(Decoder())
    x = torch.randn(2, 16, 10, 12)
    folded, report = fold(model, (x,))
    assert [a.module_path for a in report.actions] == ["bn3"]  # a plain conv never asks
    kept = {d.module_path: d for d in report.diagnostics if d.code == "FD108"}
    assert set(kept) == {"bn1", "bn2"}
    assert "2.00x" in kept["bn1"].message and "2x16x10x12 input" in kept["bn1"].message
    assert isinstance(folded.bn1, nn.BatchNorm2d) and folded.mix.bias is None
    # the input shape is recovered from the recorded output shape, through stride/padding
    assert ((16, 8, 3, 3), (2, 16, 10, 12), True, False) in calls
    _exact(model, folded, x)
    entries = {e.module_path: e for e in analyze(model, (x,)).norms}
    assert entries["bn1"].reason_code == "FD108" and entries["bn3"].reason_code == "FD101"


def test_no_speed_check_and_bn_to_affine_fold_without_timing(monkeypatch):
    calls = _slow_bias(monkeypatch)
    model = randomize_bn(Decoder())
    x = torch.randn(2, 16, 10, 12)
    for options in ({"speed_check": False}, {"bn_to_affine": True}):
        folded, report = fold(model, (x,), **options)
        assert len(report.actions) == 3 and not any(is_batchnorm_module(m) for m in folded.modules())
        _exact(model, folded, x)
    assert calls == []


def test_a_fold_no_slower_than_the_batchnorm_is_kept(monkeypatch):
    _slow_bias(monkeypatch, ratio=1.02)  # within the noise margin
    model = randomize_bn(Decoder())
    folded, report = fold(model, (torch.randn(1, 16, 6, 6),))
    assert len(report.actions) == 3 and folded.mix.bias is not None


def test_a_layer_that_cannot_be_timed_is_folded(monkeypatch):
    def fails(*args):
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setattr(fold_cost, "_measure", fails)
    folded, report = fold(randomize_bn(Decoder()), (torch.randn(1, 16, 6, 6),))
    assert len(report.actions) == 3 and folded.mix.bias is not None


def test_without_inputs_a_nominal_shape_is_timed_and_named(monkeypatch):
    calls = _slow_bias(monkeypatch)
    _, report = fold(randomize_bn(Decoder()))
    assert {c[1] for c in calls} == {(1, 16, 32, 32)} and all(c[3] for c in calls)
    assert any("nominal: pass example inputs" in d.message for d in report.diagnostics)


class SumOfTransposed(nn.Module):
    def __init__(self, biased: bool) -> None:
        super().__init__()
        self.a = nn.ConvTranspose2d(6, 6, 1, bias=False)
        self.b = nn.ConvTranspose2d(6, 6, 1, bias=biased)
        self.c = nn.Conv2d(6, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return self.bn(self.a(x) + self.b(x) + self.c(x))


@pytest.mark.parametrize("biased", [True, False], ids=["term-with-bias", "plain-conv-term"])
def test_a_sum_puts_its_shift_where_a_bias_costs_nothing(monkeypatch, biased):
    calls = _slow_bias(monkeypatch)
    model = randomize_bn(SumOfTransposed(biased))
    x = torch.randn(2, 6, 5, 5)
    folded, report = fold(model, (x,), merge_branches=False)  # the sum's own fold, terms kept apart
    assert [a.code for a in report.actions] == ["FD106"] and calls == []
    assert folded.a.bias is None  # no zero bias on the terms without the shift
    assert (folded.b.bias is not None) == biased and (folded.c.bias is not None) != biased
    _exact(model, folded, x)


def test_shift_none_keeps_a_missing_bias_missing():
    from bnrewrite.semantics.fold_math import into_preceding

    w = torch.randn(4, 3, 1, 1)
    s = torch.rand(4) + 0.5
    out, bias = into_preceding("conv", w, None, 1, s, None)
    assert bias is None and torch.allclose(out, w * s.reshape(-1, 1, 1, 1))
    _, bias = into_preceding("conv", w, torch.ones(4), 1, s, None)
    assert torch.allclose(bias, s.double())


def test_cli_no_speed_check_folds_the_slow_layer(monkeypatch, tmp_path):
    _slow_bias(monkeypatch)
    torch.save(randomize_bn(Decoder()).state_dict(), tmp_path / "w.pt")
    runner = CliRunner()
    base = ["fold", "tests.plan.test_fold_cost:Decoder", "--weights", str(tmp_path / "w.pt")]
    shape = ["--input-shape", "1,16,8,8", "--eval", "--json"]
    slow = runner.invoke(app, [*base, "-o", str(tmp_path / "a.pt"), *shape])
    fast = runner.invoke(app, [*base, "-o", str(tmp_path / "b.pt"), *shape, "--no-speed-check"])
    assert slow.exit_code == 0 and fast.exit_code == 0, slow.output + fast.output
    assert '"FD108"' in slow.output and '"FD108"' not in fast.output
    assert "test_fold_cost.py:42" in slow.output  # the user's line, not the tracer's


@pytest.mark.real_timing
def test_real_timing_measures_both_forms_and_caches_them():
    model = randomize_bn(Decoder())
    x = torch.randn(1, 16, 8, 8)
    fold(model, (x,))
    timings = list(fold_cost._cache.values())
    assert len(timings) == 2 and all(t.folded_ms > 0 and t.original_ms > 0 for t in timings)
    assert {t.shape for t in timings} == {(1, 16, 8, 8)} and not any(t.nominal for t in timings)
    fold(model, (x,))  # identical layers are not timed again
    assert list(fold_cost._cache.values()) == timings


def test_large_inputs_are_shrunk_for_timing():
    layer = nn.ConvTranspose2d(64, 32, 2, stride=2, bias=False)
    site = type("Site", (), {})()
    site.module, site.padding, site.stride, site.dilation = layer, (0, 0), (2, 2), (1, 1)
    shape, nominal = fold_cost._input_shape(site, layer.weight, (4, 32, 2048, 4096), (0, 0))
    assert not nominal and shape[:2] == (1, 64)
    assert 64 * shape[2] * shape[3] <= fold_cost.MAX_ELEMENTS and abs(shape[3] - 2 * shape[2]) <= 1
