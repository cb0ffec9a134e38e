"""swap / insert / remove / fix / recalibrate from the command line, and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from typer.testing import CliRunner

from bnrewrite.checkpoint import read_state_dict
from bnrewrite.cli import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args), catch_exceptions=False)


def test_swap_writes_state_dict_and_pt2(tmp_path):
    res = run("swap", "samples.resnet:build", "--to", "gn", "-o", str(tmp_path / "gn.pt2"), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["command"] == "swap" and len(data["actions"]) == 15
    assert data["extra"]["deviation"]["max_abs"] > 0
    res = run(
        "swap", "samples.resnet:build", "--to", "frozen", "-o", str(tmp_path / "frozen.safetensors"), "--json"
    )
    assert res.exit_code == 0 and json.loads(res.stdout)["verification"]["passed"]


def test_swap_bad_target_and_groups(tmp_path):
    assert run("swap", "samples.resnet:build", "--to", "xx", "-o", str(tmp_path / "x.pt")).exit_code == 2
    assert not (tmp_path / "x.pt").exists()
    res = run(
        "swap", "samples.mlp:build", "--to", "gn", "--groups", "64", "-o", str(tmp_path / "y.pt"), "--json"
    )
    assert res.exit_code == 0, res.stderr
    assert {d["code"] for d in json.loads(res.stdout)["diagnostics"]} == {"SW001"}


def test_insert_remove_fix(tmp_path):
    res = run("insert", "samples.bn_after_act:build", "-o", str(tmp_path / "ins.pt2"), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["verification"]["passed"]
    res = run(
        "remove", "samples.resnet:build", "--select", "layers.0.*", "-o", str(tmp_path / "rm.pt"), "--json"
    )
    assert res.exit_code == 0 and len(json.loads(res.stdout)["actions"]) == 2
    res = run("fix", "samples.unet3d:build", "-o", str(tmp_path / "fix.py"), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["verification"]["passed"]
    assert (tmp_path / "fix_weights.pt").exists()


def test_recalibrate_single_and_torchrun_agree(tmp_path):
    data = tmp_path / "calib.pt"
    g = torch.Generator().manual_seed(0)
    torch.save([torch.randn(4, 3, 32, 32, generator=g) for _ in range(4)], data)
    single = tmp_path / "single.pt"
    res = run("recalibrate", "samples.resnet:build", "--data", str(data), "-o", str(single))
    assert res.exit_code == 0, res.output
    dist = tmp_path / "dist.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "bnrewrite", "recalibrate", "samples.resnet:build", "--data", str(data), "-o", str(dist)],
        capture_output=True, text=True, timeout=300, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = read_state_dict(single), read_state_dict(dist)  # checkpoint dicts with the structure key
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert int(b["bn1.num_batches_tracked"]) == 4


def test_recalibrate_bad_data(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    res = run("recalibrate", "samples.resnet:build", "--data", str(bad), "-o", str(tmp_path / "o.pt"))
    assert res.exit_code == 1 and "Traceback" not in res.output and not (tmp_path / "o.pt").exists()


def test_surgery_dry_run_writes_nothing(tmp_path):
    res = run("remove", "samples.resnet:build", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)["extra"]["plan"]
    assert plan and all(step["becomes"] == "Identity" for step in plan)
    assert not list(tmp_path.iterdir())
    assert run("remove", "samples.resnet:build").exit_code == 2  # neither -o nor --dry-run
