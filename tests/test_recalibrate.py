"""Recalibration: exact statistics, nothing else touched, same result across processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from bnrewrite.recalibrate import read_batches, recalibrate
from tests.conftest import assert_unchanged, state_snapshot


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Conv2d(4, 5, 3),
        nn.BatchNorm2d(5),
    ).eval()


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3 + i, 3, 8, 8, generator=g) for i in range(n)]  # unequal batch sizes


def test_equals_hand_computed_mean_and_variance():
    model = net()
    snap = state_snapshot(model)
    data = batches()
    new, report = recalibrate(model, data)
    assert_unchanged(model, snap)
    with torch.no_grad():
        y = torch.cat([model[0](b) for b in data])
    torch.testing.assert_close(new[1].running_mean, y.mean((0, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(new[1].running_var, y.var((0, 2, 3), unbiased=True), rtol=1e-6, atol=1e-6)
    assert int(new[1].num_batches_tracked) == 4 and report.extra["batches"] == 4
    assert new[0].weight is model[0].weight  # other state shared, untouched
    assert not new.training


def test_selection_limits_what_changes():
    model = net()
    new, report = recalibrate(model, batches(), select="5")
    assert [a.module_path for a in report.actions] == ["5"]
    assert torch.equal(new[1].running_mean, model[1].running_mean)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = batches()
        new, _ = recalibrate(net(), data[rank::world])
        if rank == 0:
            torch.save({k: v for k, v in new.state_dict().items()}, out)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    out = str(tmp_path / "dist.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    dist = torch.load(out, weights_only=True)
    single, _ = recalibrate(net(), batches())
    for k, v in single.state_dict().items():
        torch.testing.assert_close(dist[k], v, rtol=1e-6, atol=1e-7)


def test_read_batches(tmp_path):
    p = tmp_path / "x.pt"
    torch.save(torch.randn(10, 3), p)
    assert [b.shape[0] for b in read_batches(str(p), 4)] == [4, 4, 2]
    torch.save({"batches": [torch.randn(2, 3)] * 3}, p)
    assert len(read_batches(str(p))) == 3
    from bnrewrite.errors import BnrewriteError

    torch.save({"nope": 1}, p)
    with pytest.raises(BnrewriteError):
        read_batches(str(p))
