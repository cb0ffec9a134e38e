"""Runs leave no trace: buffers restored, training flags restored, even when buffers are skipped."""

from __future__ import annotations

import torch
from torch import nn

from bnrewrite.capture.recording import record_run
from bnrewrite.runtime import buffers_restored, eval_modes


class Counter(nn.Module):
    """Writes its buffer in every forward, in eval mode too."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("seen", torch.zeros(1))

    def forward(self, x):
        self.seen += 1
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.count = Counter()
        self.bn2 = nn.BatchNorm2d(4)
        self.count.register_buffer("shared", self.bn2.running_mean)  # a norm buffer another module holds

    def forward(self, x):
        self.count.shared.add_(1.0)
        return self.bn2(self.count(self.bn(self.conv(x))))


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_an_eval_run_restores_every_buffer_something_writes():
    net = Net().train()
    before = _state(net)
    with torch.no_grad(), buffers_restored(net), eval_modes(net):
        net(torch.randn(2, 3, 8, 8))
        assert float(net.count.seen) == 1.0  # written during the run
    after = _state(net)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert net.training and net.bn.training  # flags back


def test_a_hook_that_writes_a_norm_buffer_is_undone_too():
    net = Net()

    def doubles(m, _args, _out):
        m.running_var.mul_(2.0)

    net.bn.register_forward_hook(doubles)
    before = _state(net)
    record_run(net, (torch.randn(2, 3, 8, 8),))
    assert all(torch.equal(before[k], v) for k, v in _state(net).items())


def test_a_parent_that_writes_its_batchnorms_statistics_in_eval_mode_is_undone():
    class Ema(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            self.bn.running_mean.mul_(0.9).add_(0.1 * y.mean((0, 2, 3)))  # its own EMA, any mode
            return self.bn(y)

    net = Ema().eval()
    before = _state(net)
    record_run(net, (torch.randn(2, 3, 8, 8),))
    assert all(torch.equal(before[k], v) for k, v in _state(net).items())


def test_training_flags_set_by_a_custom_setattr_go_through_it():
    class Loud(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.sets = 0

        def __setattr__(self, name, value):
            if name == "training":
                object.__setattr__(self, "sets", getattr(self, "sets", 0) + 1)
            super().__setattr__(name, value)

    m = nn.Sequential(Loud())
    with eval_modes(m):
        assert not m[0].training
    assert m[0].training and m[0].sets == 2  # eval, then restore: both through its __setattr__


def test_networkx_is_imported_only_when_a_view_is_built():
    import subprocess
    import sys

    code = "import sys, bnrewrite, bnrewrite.cli; print('networkx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # ~0.2 s of every CLI start-up otherwise
