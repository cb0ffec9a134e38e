"""``--norm-affine`` on the CLI: analyze and ``fold --dry-run`` show the plan, fold writes it."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from bnrewrite import load
from bnrewrite.cli import app

runner = CliRunner()
SAMPLE = "samples.transformer_blocks:build"


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_analyze_shows_the_rule_and_its_refusals():
    res = run("analyze", SAMPLE, "--norm-affine", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    verdicts = {n["module_path"]: n["verdict"] for n in data["norms"]}
    assert verdicts["vit.norm1"] == "norm-affine" and verdicts["post.norm"] == "not-applicable"
    assert {d["module_path"] for d in data["diagnostics"] if d["code"] == "FD112"} == {
        "post.norm",
        "head_norm",
        "stage.gn2",
    }


def test_dry_run_lists_the_weights_it_would_write(tmp_path):
    res = run("fold", SAMPLE, "--norm-affine", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)["extra"]["plan"]
    assert {"folds": ["stage.gn1"], "modules": {}, "weights": ["stage.gn1", "stage.pw"]} in plan
    assert not list(tmp_path.iterdir())


def test_fold_writes_the_folded_model(tmp_path):
    out = tmp_path / "folded.pt"
    res = run("fold", SAMPLE, "--norm-affine", "-o", str(out), "--verify", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert sum(a["code"] == "FD112" for a in data["actions"]) == 5
    assert data["verification"]["passed"]
    folded = load(SAMPLE, weights=out).model
    assert folded.vit.norm1.weight is None
    assert torch.equal(folded.llama.input_norm.weight, torch.ones_like(folded.llama.input_norm.weight))


def test_explain():
    res = run("explain", "FD112")
    assert res.exit_code == 0 and "normalize(x) * weight" in res.output
