"""Precision findings: every planted case gets its code in analyze and in fold (JSON and SARIF);
a healthy model gets none; thresholds are configurable; the target dtype keeps exactly the folds
that would overflow it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from bnrewrite import analyze, fold, verify
from bnrewrite.cli import app
from bnrewrite.weight_precision import int8_sqnr_db, measure_layer
from tests.conftest import load_sample

runner = CliRunner()
PLANTED = {
    "PR001": "overflow.0",
    "PR002": "spread.0",
    "PR003": "subnormal.0",
    "PR004": "overflow.1",
    "PR005": "dead.0",
}


def _codes(report) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for d in report.diagnostics:
        if d.code.startswith("PR"):
            found.setdefault(d.code, set()).add(d.module_path)
    return found


@pytest.mark.parametrize("command", ["analyze", "fold"])
def test_every_planted_case_gets_its_code(command):
    model, inputs = load_sample("precision_cases")
    report = analyze(model, inputs) if command == "analyze" else fold(model, inputs).report
    found = _codes(report)
    for code, path in PLANTED.items():
        assert path in found.get(code, set()), (code, found)
    entries = {e["layer"]: e for e in report.extra["precision"]}
    assert set(entries) >= {"overflow.0", "subnormal.0", "dead.0", "spread.0"}
    assert entries["overflow.0"]["fp16_overflow"] > 0 and entries["subnormal.0"]["subnormal"] == 1
    spread = entries["spread.0"]
    assert spread["channel_spread"] > 1000
    assert spread["int8_sqnr_db"]["per_channel"] - spread["int8_sqnr_db"]["per_tensor"] > 6


def test_a_healthy_model_gets_no_precision_finding():
    model = load_sample("precision_cases")[0].__class__  # same architecture
    from samples.precision_cases import build_healthy, example_inputs

    healthy, inputs = build_healthy(), example_inputs()
    assert isinstance(healthy, model)
    for report in (analyze(healthy, inputs), fold(healthy, inputs).report):
        assert not _codes(report), [d.message for d in report.diagnostics]
        assert len(report.extra["precision"]) == 4


def test_findings_in_json_and_sarif():
    res = runner.invoke(app, ["analyze", "samples.precision_cases:build", "--json", "--fail-on", "never"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {d["code"] for d in data["diagnostics"]} >= set(PLANTED)
    assert data["extra"]["precision"][0].keys() == {
        "layer", "weight_absmax", "channel_spread", "int8_sqnr_db", "fp16_overflow", "subnormal",
    }  # fmt: skip
    res = runner.invoke(
        app, ["analyze", "samples.precision_cases:build", "--format", "sarif", "--fail-on", "never"]
    )
    sarif = json.loads(res.stdout)
    results = {r["ruleId"] for r in sarif["runs"][0]["results"]}
    assert results >= set(PLANTED)
    rules = {r["id"] for r in sarif["runs"][0]["tool"]["driver"]["rules"]}
    assert rules >= {*PLANTED, "FD111"}
    assert runner.invoke(app, ["explain", "PR004"]).exit_code == 0


def test_thresholds_come_from_pyproject(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(
        "[tool.bnrewrite.precision]\nint8-spread = 1e9\nill-conditioned-scale = 1e9\n", encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["analyze", "samples.precision_cases:build", "--json", "--fail-on", "never"])
    codes = {d["code"] for d in json.loads(res.stdout)["diagnostics"]}
    assert "PR002" not in codes and "PR004" not in codes and "PR001" in codes
    (tmp_path / "pyproject.toml").write_text("[tool.bnrewrite.precision]\nint8-sprad = 3\n", encoding="utf-8")
    res = runner.invoke(app, ["analyze", "samples.precision_cases:build"])
    assert res.exit_code == 2 and "int8-sprad" in res.output


def test_int8_sqnr_sees_the_small_channels():
    rows = torch.tensor([[1000.0, -500.0, 250.0], [0.01, -0.02, 0.03]], dtype=torch.float64)
    per_tensor, per_channel = int8_sqnr_db(rows, False), int8_sqnr_db(rows, True)
    assert per_tensor < 25 < per_channel  # the small row rounds to zero per tensor: 0 dB for it
    p = measure_layer("l", rows.reshape(2, 3, 1, 1).float(), None, "conv", 1)
    assert math.isclose(p.channel_spread, 1000 / 0.03, rel_tol=1e-5)


def test_target_fp16_keeps_exactly_the_folds_that_would_overflow():
    model, inputs = load_sample("precision_cases")
    folded, report = fold(model, inputs, target_dtype=torch.float16)
    kept = {d.module_path: d for d in report.diagnostics if d.code == "FD111"}
    assert set(kept) == {"overflow.1"} and "beyond float16" in kept["overflow.1"].message
    assert {a.module_path for a in report.actions} == {"subnormal.1", "dead.1", "spread.1"}
    own = [d for d in report.diagnostics if d.code == "PR001" and d.module_path == "overflow.1"]
    assert own and "cannot run in that dtype" in own[0].message  # either way
    assert report.extra["proof"]["target_dtype"]["dtype"] == "float16"
    in_bf16 = fold(model, inputs, target_dtype=torch.bfloat16).report
    assert not [d for d in in_bf16.diagnostics if d.code == "FD111"]  # bfloat16's range holds them all
    assert verify(model, folded, inputs).passed


@pytest.mark.parametrize("gamma, kept", [(1e-5, True), (1e-3, False)])
def test_a_fold_whose_error_doubles_in_the_target_dtype_is_kept(gamma, kept):
    """The layer check judges each fold in the target dtype too: with gamma 1e-5 the folded
    weights fall into float16's subnormal range and lose their digits, while the original conv
    computes at full float16 precision before the BatchNorm scales it: the fold is kept (FD111).
    With gamma 1e-3 both are as good: folded."""
    from torch import nn

    from samples._stats import trained

    model = trained(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    )
    with torch.no_grad():
        model[1].weight.fill_(gamma)
        model[1].bias.zero_()  # (a shift would dominate both errors)
    inputs = (torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)
    _, report = fold(model, inputs, target_dtype=torch.float16)
    found = [d for d in report.diagnostics if d.code in ("FD111", "FD207")]
    if kept:
        assert [d.code for d in found] == ["FD111"] and "in float16 the folded layer" in found[0].message
        assert not report.actions
    else:
        assert not found and len(report.actions) == 1
    assert not [d for d in fold(model, inputs).report.diagnostics if d.code == "FD207"]  # float32: fine


def test_verify_in_a_dtype_reports_both_errors():
    model, inputs = load_sample("resnet")
    folded, _ = fold(model, inputs)
    result = verify(model, folded, inputs, dtype=torch.float16)
    assert result.passed and all(c.dtype == "float16" for c in result.checks)
    assert all(c.original_abs_error > 0 and c.max_abs_error > 0 for c in result.checks)
    res = runner.invoke(app, ["verify", "samples.resnet:build", "samples.resnet:build", "--dtype", "bf16"])
    assert res.exit_code == 0 and "float64" in res.output
    assert (
        runner.invoke(
            app, ["verify", "samples.resnet:build", "samples.resnet:build", "--dtype", "int4"]
        ).exit_code
        == 2
    )


def test_fold_cli_target_dtype():
    res = runner.invoke(
        app, ["fold", "samples.precision_cases:build", "--dry-run", "--target-dtype", "fp16", "--json"]
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert {d["code"] for d in data["diagnostics"]} >= {"FD111", "PR001"}


def test_the_aten_path_reports_what_the_module_path_reports():
    """A program folded as a graph gets the same precision findings as the module it came from."""
    model, inputs = load_sample("precision_cases")
    by_module = _codes(fold(model, inputs).report)
    program = torch.export.export(model, inputs)
    by_graph = _codes(fold(program, inputs).report)
    assert by_graph == by_module
