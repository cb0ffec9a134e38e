"""The CLI through typer's runner: exit codes, JSON schema, one-line errors, no partial output."""

from __future__ import annotations

import json
import os

import pytest
import torch
from typer.testing import CliRunner

from bnrewrite.cli import app
from tests.conftest import load_sample

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_analyze_table_and_exit_code():
    res = run("analyze", "samples.bn_after_act:build")
    assert res.exit_code == 0, res.output
    assert "post_unpadded.bn" in res.output and "fold-into-following" in res.output


def test_analyze_json_schema():
    res = run("analyze", "samples.untraceable:build", "--json")
    data = json.loads(res.stdout)
    assert data["schema_version"] == 1 and data["command"] == "analyze"
    assert set(data) >= {"norms", "diagnostics", "actions", "opaque", "dialect", "model"}
    norm = data["norms"][0]
    assert set(norm) >= {
        "node",
        "module_path",
        "kind",
        "before",
        "after",
        "verdict",
        "target",
        "reason_code",
        "reason",
    }
    assert {o["module_path"] for o in data["opaque"]} == {"", "gate"}


def test_fail_on_threshold():
    assert run("analyze", "samples.unet3d:build").exit_code == 0  # BN001 is a warning
    assert run("analyze", "samples.unet3d:build", "--fail-on", "warning").exit_code == 1
    assert run("analyze", "samples.unet3d:build", "--fail-on", "bogus").exit_code == 2


def test_input_shape_overrides_example_inputs():
    res = run("analyze", "samples.resnet:build", "--input-shape", "1,3,16,16", "--json")
    assert res.exit_code == 0


def test_fold_verify_writes_pt2_and_graph(tmp_path):
    out = tmp_path / "r.pt2"
    res = run(
        "fold",
        "samples.resnet:build",
        "-o",
        str(out),
        "--verify",
        "--graph",
        str(tmp_path / "r.svg"),
        "--json",
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["verification"]["passed"] and len(data["actions"]) == 15
    assert out.exists() and (tmp_path / "r.dot").exists()
    res = run("verify", "samples.resnet:build", str(out))
    assert res.exit_code == 0 and "PASS" in res.stdout


def test_fold_refuses_to_overwrite(tmp_path):
    out = tmp_path / "r.pt2"
    out.write_text("x")
    res = run("fold", "samples.mlp:build", "-o", str(out))
    assert res.exit_code == 1 and "--force" in res.stderr and out.read_text() == "x"


def test_explain():
    res = run("explain", "bn001")
    assert res.exit_code == 0 and "redundant" in res.stdout
    assert run("explain").exit_code == 0
    assert run("explain", "XX999").exit_code == 2


@pytest.mark.parametrize(
    "args,code,needle",
    [
        (["analyze", "nope.pt2"], 1, "no such file"),
        (["analyze", "no_such_pkg:build"], 1, "cannot import"),
        (["analyze", "samples.resnet:build", "--input-shape", "a,b"], 2, "--input-shape"),
        (["analyze", "samples.resnet:build", "--input-shape", "1,5,8,8"], 1, "failed on the example inputs"),
        (["fold", "samples.mlp:build", "-o", "/nonexistent_dir/x.pt2"], 1, "does not exist"),
        (["fold", "samples.mlp:build", "-o", "out.xyz"], 2, "output format"),
        (["verify", "samples.mlp:build", "samples.resnet:build"], 1, ""),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, code, needle):
    res = run(*args)
    assert res.exit_code == code, (res.stdout, res.stderr)
    assert "Traceback" not in res.output
    assert needle in res.stderr
    assert len(res.stderr.strip().splitlines()) <= 1 or needle == ""


def test_unwritable_output_directory(tmp_path):
    if os.geteuid() == 0:  # root passes permission checks: use a place no one can write
        target, needle = "/proc/bnrewrite_out.pt2", "cannot write"
    else:
        d = tmp_path / "ro"
        d.mkdir()
        d.chmod(0o500)
        target, needle = str(d / "x.pt2"), "not writable"
    res = run("fold", "samples.mlp:build", "-o", target)
    assert res.exit_code == 1 and needle in res.stderr, res.stderr
    assert "Traceback" not in res.output


def test_pickle_payload_not_executed_via_cli(tmp_path):
    from tests.test_load import Marker

    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save(Marker(str(marker)), path)
    res = run("analyze", str(path))
    assert res.exit_code == 1 and "--trust-pickle" in res.stderr
    assert not marker.exists()


def test_trusted_pickle_round_trip(tmp_path):
    model, _ = load_sample("mlp")
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    res = run("analyze", str(path), "--trust-pickle", "--input-shape", "4,32")
    assert res.exit_code == 0, res.output


def test_explain_json_lists_every_code():
    data = json.loads(run("explain", "--json").stdout)
    assert {"BN001", "FD101", "SW001"} <= {c["id"] for c in data}


@pytest.mark.parametrize("fmt", ["pt2", "onnx", "py"])
def test_done_when_every_input_kind_folds_to_a_verified_artifact(tmp_path, fmt, monkeypatch):
    """A .pt2, a state_dict plus model code, and a trusted pickled module all fold and verify."""
    model, inputs = load_sample("mobilenet")
    pt2 = tmp_path / "in.pt2"
    torch.export.save(torch.export.export(model, inputs), pt2)
    weights = tmp_path / "w.pt"
    torch.save({"model": model.state_dict()}, weights)
    pickled = tmp_path / "whole.pt"
    torch.save(model, pickled)
    monkeypatch.chdir(tmp_path)  # .py outputs import from here; samples come from the repo root
    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cases = [
        [str(pt2)],
        ["samples.mobilenet:build", "--weights", str(weights)],
        [str(pickled), "--trust-pickle", "--input-shape", "2,3,32,32"],
    ]
    for i, case in enumerate(cases):
        out = tmp_path / f"out{i}.{fmt}"
        res = run("fold", *case, "-o", str(out), "--verify", "--json")
        assert res.exit_code == 0, (case, res.output)
        data = json.loads(res.stdout)
        assert data["verification"]["passed"] and len(data["actions"]) == 14
        assert out.exists()
        if fmt == "onnx":
            assert data["extra"]["onnxruntime_check"]["passed"] in (True, None)


def test_bad_inputs_leave_no_output_files(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"\x00" * 64)
    for args in (
        ["fold", str(bad), "-o", str(out_dir / "a.pt2")],
        ["fold", "samples.mlp:build", "--input-shape", "4,7", "-o", str(out_dir / "b.pt2")],
        ["fold", "samples.mlp:build", "--weights", str(bad), "-o", str(out_dir / "c.pt2")],
        ["export", "samples.untraceable:build", "-o", str(out_dir / "d.pt2")],
    ):
        res = run(*args)
        assert res.exit_code == 1, (args, res.output)
        assert "Traceback" not in res.output
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr[:2000]
    assert list(out_dir.iterdir()) == []


def test_text_in_square_brackets_is_printed_literally(monkeypatch):
    """rich markup never swallows text: an extra's install hint and module paths keep their brackets."""
    from bnrewrite import cli
    from bnrewrite.errors import BnrewriteError

    def broken(*_a, **_k):
        raise BnrewriteError("ONNX export needs the onnx extra: pip install 'bnrewrite[onnx]'")

    monkeypatch.setattr(cli.base, "_load", broken)
    result = runner.invoke(app, ["fold", "samples.resnet:build", "-o", "never.pt2"])
    assert result.exit_code == 1
    assert "pip install 'bnrewrite[onnx]'" in result.output


def test_report_tables_print_paths_and_messages_literally():
    from rich.console import Console

    from bnrewrite.diagnostics import Action, Diagnostic, Report, Severity
    from bnrewrite.render import render_report

    report = Report("fold", "Net")
    report.actions.append(Action("fold-into-preceding", "n", "layers[0].bn", "folds into [red]x[/]"))
    report.diagnostics.append(
        Diagnostic("FD201", Severity.INFO, "stays: output['a'] [dim]", None, "heads[1]")
    )
    report.extra["proof"] = {
        "passed": True,
        "forward_passes": 2,
        "float64_passes": 0,
        "local_checks": 3,
        "max_abs_error": 1e-7,
        "tolerance": 1e-5,
        "worst_output": "output['a']",
        "undone": [],
    }
    console = Console(record=True, width=200, markup=False)
    render_report(report, console)
    text = console.export_text()
    for literal in ("layers[0].bn", "folds into [red]x[/]", "stays: output['a'] [dim]", "heads[1]"):
        assert literal in text
    assert "proof: passed: 3 local checks, 2 forward passes" in text and "{" not in text


def test_fold_dry_run_writes_nothing(tmp_path):
    result = run("fold", "samples.bn_act:build", "--dry-run", "--json")
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert len(data["extra"]["plan"]) == 4 and data["actions"]
    assert not list(tmp_path.iterdir())
    assert run("fold", "samples.bn_act:build").exit_code == 2  # neither -o nor --dry-run


def test_fold_merges_branches_unless_told_to_keep_them(tmp_path):
    merged = run(
        "fold", "samples.repvgg:build", "--input-shape", "1,3,32,32", "-o", str(tmp_path / "m.pt"), "--json"
    )
    assert merged.exit_code == 0, merged.output
    data = json.loads(merged.output)
    assert {a["kind"] for a in data["actions"]} == {"merge-branches"}
    assert all(s["verdict"] == "merge" for s in data["extra"]["branch_sets"])
    kept = run(
        "fold", "samples.repvgg:build", "--input-shape", "1,3,32,32", "-o", str(tmp_path / "k.pt"), "--json",
        "--keep-branches",
    )  # fmt: skip
    assert kept.exit_code == 0, kept.output
    data = json.loads(kept.output)
    assert {a["kind"] for a in data["actions"]} == {"fold-into-preceding"}
    assert "FD109" not in {d["code"] for d in data["diagnostics"]}
    text = run("analyze", "samples.repmixer:build", "--input-shape", "1,3,32,32").stdout
    assert "Branch sets (4)" in text and "nonlinear op" in text
    assert "branches-merged" in run("explain", "FD109").stdout and run("explain", "FD110").exit_code == 0
    planned = json.loads(run("analyze", "samples.repvgg:build", "--keep-branches", "--json").stdout)
    assert "merge-branches" not in {n["verdict"] for n in planned["norms"]}
