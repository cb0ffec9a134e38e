"""SARIF 2.1.0 output, validated with a SARIF object model and checked field by field."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from bnrewrite import codes
from bnrewrite.cli import app

runner = CliRunner()


def _sarif(*args: str) -> dict:
    res = runner.invoke(app, ["analyze", *args, "--format", "sarif", "--fail-on", "never"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_sarif_is_valid_and_carries_rules_levels_and_locations():
    sarif_pydantic = pytest.importorskip("sarif_pydantic")
    data = _sarif("samples.bn_after_act:build", "samples.untraceable:build")
    sarif_pydantic.Sarif.model_validate(data)  # the SARIF 2.1.0 object model accepts it
    assert data["version"] == "2.1.0" and len(data["runs"]) == 2
    run = data["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == [c.id for c in codes.all_codes()]
    assert run["results"], "findings are reported"
    for result in run["results"]:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
        assert result["level"] in ("error", "warning", "note")
        assert result["message"]["text"]
    located = [r for run in data["runs"] for r in run["results"] if "locations" in r]
    assert any(loc["logicalLocations"][0]["fullyQualifiedName"] for r in located for loc in r["locations"])
    assert data["runs"][1]["automationDetails"]["id"].endswith("samples.untraceable:build")


def test_several_models_give_one_exit_code(tmp_path):
    res = runner.invoke(app, ["analyze", "samples.resnet:build", "no.such.module:build"])
    assert res.exit_code == 1 and "could not be analyzed" in res.stdout
    ok = runner.invoke(app, ["analyze", "samples.resnet:build", "samples.mlp:build", "--json"])
    assert ok.exit_code == 0
    assert [m["model"] for m in json.loads(ok.stdout)["models"]] == [
        "samples.resnet:build",
        "samples.mlp:build",
    ]


def test_config_from_pyproject_drives_the_cli(tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text('[tool.bnrewrite]\nfail-on = "info"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parents[1]))
    res = runner.invoke(app, ["analyze", "samples.bn_after_act:build"])
    assert res.exit_code == 1  # FD201/FD206 infos fail at fail-on info
    res = runner.invoke(app, ["analyze", "samples.bn_after_act:build", "--ignore-codes", "FD2,BN009"])
    assert res.exit_code == 0, res.stdout
    res = runner.invoke(app, ["analyze", "samples.bn_after_act:build", "--no-config"])
    assert res.exit_code == 0
