"""The eager recording pass counts the consumers of every module's output as the code ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnrewrite.capture.recording import record_run
from bnrewrite.errors import BnrewriteError


class Readers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        out = self.bn(y) + y  # two consumers of conv's output: a module call and an add
        z = self.conv2(out)
        z = self.drop(z)  # eval Dropout passes its input on: not a consumer of its own
        torch._assert(z.dim() == 4, "4-D")  # reads only the shape: not a consumer
        return self.bn2(z.reshape_as(z))  # reshape_as reads z's values once (and its shape)


def test_consumers_are_counted_in_the_code_that_called_the_module():
    rec = record_run(Readers().eval(), (torch.randn(2, 3, 8, 8),))
    assert rec.readers["conv"] == 2
    assert rec.readers["bn"] == 1
    assert rec.readers["conv2"] == 1  # reshape_as (the eval Dropout passes it on: not a consumer)
    assert rec.calls["bn2"] == 1 and rec.out_shapes["bn2"] == (2, 4, 8, 8)


def test_the_recording_leaves_no_mode_behind_when_the_model_fails():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x[:, :2])  # wrong channel count: the conv raises

    with pytest.raises(BnrewriteError, match="failed on the example inputs"):
        record_run(Broken(), (torch.randn(1, 3, 8, 8),))
    assert torch._C._len_torch_function_stack() == 0


def test_module_at_finds_what_get_submodule_finds_and_its_errors():
    from bnrewrite.semantics.ops import module_at

    net = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1)), nn.ModuleDict({"a": nn.ReLU()}))
    for path, m in net.named_modules():
        assert module_at(net, path) is m
    with pytest.raises(AttributeError):
        module_at(net, "0.7")
