"""Calibration data from code: DataLoader factories, --max-batches, sharding, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from bnrewrite import progress
from bnrewrite.calibration import calibration_batches
from bnrewrite.checkpoint import read_state_dict
from bnrewrite.cli import app
from tests.data_factories import _dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runner = CliRunner()


def _recalibrate(tmp_path, name, *extra):
    out = tmp_path / f"{name}.pt"
    res = runner.invoke(app, ["recalibrate", "samples.resnet:build", "-o", str(out), "--json", *extra])
    assert res.exit_code == 0, res.output
    return read_state_dict(out)


def test_loader_factory_equals_the_same_data_from_a_file(tmp_path):
    torch.save(_dataset().tensors[0], tmp_path / "data.pt")
    from_file = _recalibrate(tmp_path, "file", "--data", str(tmp_path / "data.pt"), "--batch-size", "4")
    from_code = _recalibrate(tmp_path, "code", "--data", "tests.data_factories:make_loader")
    for k, v in from_file.items():
        torch.testing.assert_close(from_code[k], v, rtol=1e-6, atol=1e-7)
    assert int(from_code["bn1.num_batches_tracked"]) == 4


def test_max_batches_limits_the_stream(tmp_path):
    sd = _recalibrate(tmp_path, "two", "--data", "tests.data_factories:make_loader", "--max-batches", "2")
    assert int(sd["bn1.num_batches_tracked"]) == 2
    assert (
        len(
            list(calibration_batches("tests.data_factories:make_loader", max_batches=3, rank=1, world_size=2))
        )
        == 1
    )


def test_strided_and_self_sharded_splits_cover_every_batch_once():
    spec = "tests.data_factories:make_loader"
    ranks = [list(calibration_batches(spec, rank=r, world_size=2)) for r in (0, 1)]
    assert [len(b) for b in ranks] == [2, 2]
    every = torch.cat([b[0] for b in ranks[0] + ranks[1]])
    assert torch.equal(every.sort(0).values, _dataset().tensors[0].sort(0).values)
    sharded = [
        list(calibration_batches("tests.data_factories:make_sharded_loader", rank=r, world_size=2))
        for r in (0, 1)
    ]
    assert sum(len(b) for b in sharded) == 8  # 16 samples, batch 2, each rank its own half


@pytest.mark.parametrize(
    "spec,message",
    [
        ("tests.data_factories:not_iterable", "not an iterable of batches"),
        ("tests.data_factories:raises", "the factory raised RuntimeError: dataset path not found"),
        ("tests.data_factories:yields_strings", "batch 0 holds str"),
        ("tests.data_factories:missing", "has no attribute"),
        ("no_such_pkg.mod:make", "cannot import"),
    ],
)
def test_bad_factories_get_one_line_errors(tmp_path, spec, message):
    res = runner.invoke(
        app, ["recalibrate", "samples.resnet:build", "--data", spec, "-o", str(tmp_path / "o.pt")]
    )
    assert res.exit_code == 1 and message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o.pt").exists()


@pytest.mark.parametrize("factory", ["make_loader", "make_sharded_loader"])
def test_torchrun_with_a_loader_factory_equals_one_process(tmp_path, factory):
    """Equal to one process over the same batches. (A self-sharding loader forms other batches
    than the unsharded one, and BatchNorm normalizes with batch statistics while calibrating,
    so the reference for it is one process over the batches the ranks saw.)"""
    spec = f"tests.data_factories:{factory}"
    if factory == "make_loader":
        single = _recalibrate(tmp_path, "single", "--data", spec)
    else:
        seen = [b[0] for r in (0, 1) for b in calibration_batches(spec, rank=r, world_size=2)]
        torch.save(seen, tmp_path / "seen.pt")
        single = _recalibrate(tmp_path, "single", "--data", str(tmp_path / "seen.pt"))
    dist = tmp_path / "dist.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "bnrewrite", "recalibrate", "samples.resnet:build", "--data", spec,
         "-o", str(dist), "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = read_state_dict(dist)
    for k, v in single.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7)


def test_progress_only_on_a_terminal_and_never_with_machine_output(monkeypatch):
    monkeypatch.delenv("BNREWRITE_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.wanted(quiet=False) and not progress.wanted(quiet=True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not progress.wanted(quiet=False)
    monkeypatch.setenv("BNREWRITE_PROGRESS", "1")
    assert progress.wanted(quiet=False) and not progress.wanted(quiet=True)
    progress.enable(True)
    try:
        assert list(progress.track(range(3), "items")) == [0, 1, 2]
    finally:
        progress.enable(False)


def test_cli_shows_progress_when_asked_and_never_with_json(tmp_path, monkeypatch):
    monkeypatch.setenv("BNREWRITE_PROGRESS", "1")
    args = ["recalibrate", "samples.resnet:build", "--data", "tests.data_factories:make_loader"]
    shown = runner.invoke(app, [*args, "-o", str(tmp_path / "a.pt")])
    assert shown.exit_code == 0 and "calibration batches" in shown.output
    quiet = runner.invoke(app, [*args, "-o", str(tmp_path / "b.pt"), "--json"])
    assert quiet.exit_code == 0 and "calibration batches" not in quiet.output
    progress.enable(False)
